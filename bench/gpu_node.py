#!/usr/bin/env python
"""What the GPU node is (the GPU check's first step): GPU, driver, torch/CUDA/cuDNN/NCCL, the GPUs' UUIDs,
CuPy, cuCIM, the MPI library mpi4py really loaded, CUDA-aware or not. Writes the JSON file named by argv[1]."""
import json
import subprocess
import sys


def main(path: str) -> None:
    info = {}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError as e:
        info["nvidia_smi"] = str(e)
    import torch

    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        from hpcfl.device import gpu_identity

        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())), gpus=torch.cuda.device_count(),
                    uuids=[gpu_identity(torch.device("cuda", i)) for i in range(torch.cuda.device_count())])
    for mod in ("cupy", "cucim", "mpi4py", "numpy", "yaml", "pyarrow", "scipy", "skimage", "imagecodecs", "sklearn",
                "pytest"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"missing ({type(e).__name__})"
    try:
        from mpi4py import MPI

        info["mpi"] = MPI.Get_library_version().strip("\x00").splitlines()[0]
    except Exception as e:  # noqa: BLE001 - recorded: the MPI steps will fail the same way
        info["mpi"] = f"not loadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    from hpcfl.device import cuda_aware_mpi

    info["cuda_aware_mpi"] = cuda_aware_mpi()
    print(json.dumps(info, indent=1))
    with open(path, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
