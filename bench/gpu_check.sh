#!/usr/bin/env bash
# Everything GPU in ONE call under one deadline (default 480 s, the wheel install included), for a short loan
# of a GPU node (docs/gpu.md). The work is done by bench/gpu_check.py (standard library only until the carried
# wheels are installed), with the node's Python.
#
# The node: Python 3.12 with a CUDA build of torch and CuPy, no MPI, no Horovod, no package registry.
# Before the loan, on a machine with a registry:   bash scripts/fetch_gpu_wheels.sh   (-> .gpu-wheels/)
# On the node, from the repository root:          bash bench/gpu_check.sh [--deadline 480] [--install-only]
#
# It installs the carried wheels into a private prefix (Open MPI 5 and mpi4py from PyPI, cuCIM for CUDA 13,
# pytest; the node's own copies of any of these are kept), then each step under its share of the deadline,
# its output kept even when it fails or is cut (a step the deadline leaves too little time is skipped, and
# the check says so):
#   1. node: GPU, driver, torch/CUDA/cuDNN/NCCL, GPU UUIDs, CuPy, cuCIM, the MPI mpi4py loaded, CUDA-aware
#   2. gpu-tier: tests/gpu with site.backend: torch
#   3. tiles: bench/gpu_tiles.py (cuCIM CPU vs GPU decode, NumPy vs CuPy, loader-fed training)
#   4. train: bench/gpu_train.py (samples/s at matched batch sizes, channels_last on and off, fp32/bf16/fp16)
#   5. federation-cuda / -cpu: 2 sites x 2 ranks on the one GPU and on the CPU; steady-state round time
#      (median of rounds 2..) from metrics.jsonl
#   6. overhead: bench/federation_overhead.py with the model on the GPU
# Results: $OUT/gpu-check/ (or ./gpu-check-results/): check.log (everything printed) and results.json (one
# record per step, rewritten after every step, and the JSON each bench wrote).
# --install-only: install the wheels and print the environment to export (PATH, PYTHONPATH, LD_LIBRARY_PATH,
# MPI4PY_LIBMPI) with which `mpirun -np 2 python -c "from mpi4py import MPI"` works.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="${HPCFL_GPU_PYTHON:-}"
for cand in "$PY" /opt/torch/.venv/bin/python3 python3; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
done
exec "$PY" "$here/bench/gpu_check.py" "$@"
