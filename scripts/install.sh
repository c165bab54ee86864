#!/usr/bin/env bash
# Installs everything hpcfl needs on a Debian/Ubuntu machine, idempotently.
#
# Used by `make demo`, `make test`, CI and the Singularity recipe, so they
# never drift. Slow steps are cached:
#   - apt packages are installed only when their command is missing;
#   - the virtual environment is rebuilt only when this script or
#     requirements.txt change (a stamp file records their hash);
#   - the Horovod wheel (a ~12 min build) is kept in $HPCFL_CACHE and reused.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HPCFL_VENV:-$here/.venv}"
PY="${HPCFL_PYTHON:-python3}"
CACHE="${HPCFL_CACHE:-$HOME/.cache/hpcfl}"
HOROVOD_VERSION=0.28.1
TORCH_VERSION="${HPCFL_TORCH_VERSION:-2.13.0}"
CUCIM_VERSION=26.10.0

log() { printf '[install] %s\n' "$*" >&2; }

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  # Installs the given Debian packages that are not installed yet.
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    log "missing system packages (${missing[*]}) and no apt-get: install them by hand"; exit 1
  fi
  log "apt-get install ${missing[*]}"
  sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- system packages -------------------------------------------------------
# Open MPI (mpirun + headers for mpi4py and Horovod), Debian's cmake 3.25
# (pip's cmake 4.x rejects gloo's old cmake_minimum_required), a C++ compiler.
if [ "${HPCFL_SKIP_APT:-0}" != 1 ]; then
  apt_install openmpi-bin libopenmpi-dev cmake g++ make
  if [ "${HPCFL_WITH_SLURM:-0}" = 1 ]; then  # `make test`, `make test-slurm`: the slurm tier runs a real local cluster
    apt_install slurm-wlm munge iproute2  # iproute2: the two-node tier (network namespaces)
  fi
  if [ "${HPCFL_WITH_BROWSER:-0}" = 1 ]; then  # `make test`, `make test-mpi`: the report's headless-browser test
    apt_install chromium
  fi
fi

# --- virtual environment ---------------------------------------------------
stamp="$VENV/.hpcfl-install-stamp"
want="$(cat "$here/scripts/install.sh" "$here/requirements.txt" | sha256sum | cut -c1-16)-torch$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$VENV/bin/python" -c "import horovod.torch, mpi4py, torch" 2>/dev/null; then
  log "environment up to date ($VENV)"
  exit 0
fi

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
pip_() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }
pip_ install --upgrade pip wheel setuptools >/dev/null
log "torch==$TORCH_VERSION (CPU wheel where the machine has one)"
pip_ install "torch==$TORCH_VERSION"
log "requirements.txt"
pip_ install -r "$here/requirements.txt"
# cuCIM reads slides on the CPU without its ~3.5 GB of CUDA runtime wheels; on a GPU
# machine set HPCFL_CUCIM_FULL=1 to take them (and CuPy) too.
if [ "${HPCFL_CUCIM_FULL:-0}" = 1 ]; then
  pip_ install "cucim-cu12==$CUCIM_VERSION" cupy-cuda12x
else
  pip_ install --no-deps "cucim-cu12==$CUCIM_VERSION"
fi

# --- Horovod ----------------------------------------------------------------
# 0.28.1 is the last release and does not build against torch>=2.1 as shipped:
# its CMake asks for C++14 and torch's headers need C++17. We patch that and
# build with PyTorch + MPI + Gloo, then keep the wheel (keyed by torch and
# Python version) so later installs take seconds.
pyver="$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
# HOROVOD_GPU_OPERATIONS=NCCL (GPU machines, the GPU container) builds with NCCL: a separate cached wheel.
gpuops="${HOROVOD_GPU_OPERATIONS:-}"
wheeldir="$CACHE/wheels/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-$pyver${gpuops:+-$(echo "$gpuops" | tr A-Z a-z)}"
if ! "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null; then
  if ! ls "$wheeldir"/horovod-*.whl >/dev/null 2>&1; then
    log "building Horovod $HOROVOD_VERSION (about 12 minutes on 2 cores; cached afterwards in $wheeldir)"
    build="$(mktemp -d)"
    pip_ download --no-deps --no-binary :all: -d "$build" "horovod==$HOROVOD_VERSION"
    tar -xzf "$build"/horovod-*.tar.gz -C "$build"
    src="$(ls -d "$build"/horovod-$HOROVOD_VERSION)"
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    mkdir -p "$wheeldir.tmp"
    ( cd "$src" && HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 CMAKE_POLICY_VERSION_MINIMUM=3.5 \
        MAKEFLAGS="-j$(nproc)" "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$wheeldir.tmp" . )
    rm -rf "$wheeldir" && mv "$wheeldir.tmp" "$wheeldir"
    rm -rf "$build"
  fi
  log "installing cached Horovod wheel from $wheeldir"
  pip_ install --no-deps "$wheeldir"/horovod-*.whl
  pip_ install cloudpickle psutil pyyaml packaging
fi

# --- hpcfl itself -------------------------------------------------------------
pip_ install --no-deps --no-build-isolation -e "$here"
"$VENV/bin/python" -c "import horovod.torch, mpi4py, torch, hpcfl, cucim, openslide, pyvips, monai" \
  || { log "environment check failed"; exit 1; }
echo "$want" > "$stamp"
log "done: $VENV"
