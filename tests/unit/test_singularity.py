"""The Apptainer/Singularity recipe (no apptainer binary installs on the development machines:
we check what can be checked without building)."""
import re
import subprocess
from pathlib import Path

from hpcfl.cluster.render import render_sbatch
from hpcfl.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEF = (ROOT / "singularity" / "hpcfl.def").read_text()


def sections(text):
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def test_recipe_header_and_sections():
    assert re.search(r"^Bootstrap: docker$", DEF, re.M) and re.search(r"^From: \{\{ BASE \}\}$", DEF, re.M)
    s = sections(DEF)
    for name in ("arguments", "files", "environment", "post", "runscript", "test", "labels", "help"):
        assert name in s, name
    assert "BASE=debian:12" in s["arguments"]


def test_recipe_uses_the_same_install_script_as_make_and_ci():
    post = sections(DEF)["post"]
    assert "bash scripts/install.sh" in post
    assert "bash scripts/install.sh" in (ROOT / "Makefile").read_text().replace("@bash", "bash")
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in post  # Horovod with NCCL where CUDA is present
    assert "import hpcfl, horovod.torch, mpi4py, cucim, monai" in sections(DEF)["test"]
    # the install script honours the variables the recipe sets
    script = (ROOT / "scripts" / "install.sh").read_text()
    for var in ("HPCFL_VENV", "HPCFL_CACHE", "HPCFL_CUCIM_FULL", "HOROVOD_GPU_OPERATIONS"):
        assert var in script, var
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "install.sh")]).returncode == 0


def test_rendered_jobs_run_every_rank_in_the_image():
    cfg = load_config(ROOT / "configs" / "cluster-multinode.yaml")
    text = render_sbatch(cfg, "configs/cluster-multinode.yaml")
    run_line = next(line for line in text.splitlines() if " -m hpcfl run " in line)
    assert run_line.strip().startswith("singularity exec --nv --bind \"$SLURM_SUBMIT_DIR\",/work/project "
                                       "/work/project/hpcfl.sif python3 -m hpcfl run")
    assert "hpcfl.sif python3 -m hpcfl placement" in text  # the placement helper runs in the image too
