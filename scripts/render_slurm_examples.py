#!/usr/bin/env python
"""Render slurm/*.sbatch from configs/cluster-*.yaml (a test checks they are current)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hpcfl.cluster.render import render_sbatch  # noqa: E402
from hpcfl.config import load_config  # noqa: E402

EXAMPLES = {"single-node-cpu": "configs/cluster-cpu.yaml", "single-node-multigpu": "configs/cluster-gpu.yaml",
            "multi-node-multigpu": "configs/cluster-multinode.yaml"}


def rendered():
    return {name: render_sbatch(load_config(ROOT / cfg), cfg) for name, cfg in EXAMPLES.items()}


if __name__ == "__main__":
    for name, text in rendered().items():
        (ROOT / "slurm" / f"{name}.sbatch").write_text(text)
        print(f"slurm/{name}.sbatch")
