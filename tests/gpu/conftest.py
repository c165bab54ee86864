"""The gpu tier: runs where torch sees a CUDA device, and is skipped (with the reason) everywhere else."""
import pytest

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): the gpu tier runs on a GPU machine"


@pytest.fixture(autouse=True)
def _need_cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)


@pytest.fixture(scope="session")
def cupy():
    """CuPy, working: on a GPU machine a missing or broken CuPy is a setup error, not a skip."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    from hpcfl.wsi.feed import cupy_problem

    problem = cupy_problem()
    if problem is not None:
        pytest.fail(f"CuPy is not usable on this GPU machine ({problem}): install cupy-cuda13x (or -cuda12x)")
    import cupy as cp

    return cp
