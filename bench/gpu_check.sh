#!/usr/bin/env bash
# Everything GPU in ONE run of at most ~8 minutes, for a short loan of a GPU node (docs/gpu.md).
#
# The node: Python 3.12 with a CUDA build of torch and CuPy, no MPI, no Horovod, no package registry.
# Before the loan, on a machine with a registry:   bash scripts/fetch_gpu_wheels.sh   (-> .gpu-wheels/)
# On the node, from the repository root:          bash bench/gpu_check.sh
#
# It installs the carried wheels into a private prefix (Open MPI 5 and mpi4py from PyPI, cuCIM for CUDA 13,
# pytest), then, each step with its own time limit and its output kept even when it fails:
#   1. what the node is (GPU, driver, torch/CUDA/cuDNN/NCCL, CuPy, cuCIM, MPI; CUDA-aware or not)
#   2. the gpu test tier (tests/gpu) with site.backend: torch (NCCL): cuCIM GPU decode = CPU decode, CuPy
#      batch math = NumPy's, DLPack hand-off, a site's ranks identical and rank 0's mean = the uploads, bf16
#   3. bench/gpu_tiles.py: tiles/s, cuCIM CPU vs GPU decode, NumPy vs CuPy, loader-fed training on the GPU
#   4. bench/gpu_train.py: training samples/s, CPU vs GPU, fp32/bf16/fp16, quickstart CNN and ResNet-18
#   5. the same federation (2 sites x 2 ranks, all on the one GPU) on the CPU and on the GPU, with its time
#      breakdown (summary.json of each)
#   6. bench/federation_overhead.py with the model on the GPU, next to the pinned-copy bound
# Results: $OUT/gpu-check/ (or ./gpu-check-results/): check.log (everything printed), results.json (one
# record per step: command, seconds, exit code, and the JSON each bench wrote).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
out="${OUT:-$here}/gpu-check"
[ -n "${OUT:-}" ] || out="$here/gpu-check-results"
mkdir -p "$out"
log="$out/check.log"
exec > >(tee -a "$log") 2>&1
PY="${HPCFL_GPU_PYTHON:-}"
for cand in "$PY" /opt/torch/.venv/bin/python3 python3; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
done
wheels="${HPCFL_GPU_WHEELS:-$here/.gpu-wheels}"
prefix="$(mktemp -d /tmp/hpcfl-gpu.XXXXXX)"
t_start=$(date +%s)
step() {  # step NAME LIMIT_S CMD...: run, time, record; never stop the whole check
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo; echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  echo "=== $name: exit $rc after ${dt}s"
  "$PY" - "$out/steps.jsonl" "$name" "$rc" "$dt" "$*" <<'EOF'
import json, sys
path, name, rc, dt, cmd = sys.argv[1:]
with open(path, "a") as f:
    f.write(json.dumps({"step": name, "exit": int(rc), "seconds": int(dt), "command": cmd}) + "\n")
EOF
}

echo "hpcfl GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), python $PY, tree $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
# -- 0. install the carried wheels (the node has no registry) -------------------------------------------
if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "gpu_check: no wheels in $wheels: run bash scripts/fetch_gpu_wheels.sh where a package registry is reachable"
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --ignore-installed --prefix "$prefix" "$wheels"/*.whl || exit 2
site="$("$PY" -c "import sys; print(f'$prefix/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages')")"
export PATH="$prefix/bin:$PATH" PYTHONPATH="$site:$here${PYTHONPATH:+:$PYTHONPATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
export HPCFL_GPU_BACKEND=torch
common=(--no-report --set observe.tensorboard=false --set site.backend=torch --set launch.mpirun="$prefix/bin/mpirun")

# -- 1. the node --------------------------------------------------------------------------------------------
step node 60 "$PY" - "$out/node.json" <<'EOF'
import json, subprocess, sys
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
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                nccl=".".join(map(str, torch.cuda.nccl.version())), gpus=torch.cuda.device_count())
for mod in ("cupy", "cucim", "mpi4py", "numpy", "yaml", "pyarrow", "scipy", "skimage", "imagecodecs", "sklearn"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        info[mod] = f"missing ({type(e).__name__})"
from mpi4py import MPI
info["mpi"] = MPI.Get_library_version().strip("\x00").splitlines()[0]
from hpcfl.device import cuda_aware_mpi
info["cuda_aware_mpi"] = cuda_aware_mpi()
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
EOF

# -- 2. the gpu test tier --------------------------------------------------------------------------------------
step gpu-tier 240 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider --junitxml "$out/gpu-tier.xml"

# -- 3. the data path ------------------------------------------------------------------------------------------
step tiles 120 "$PY" bench/gpu_tiles.py --json "$out/gpu_tiles.json"

# -- 4. local training, CPU next to GPU ---------------------------------------------------------------------------
step train 120 "$PY" bench/gpu_train.py --json "$out/gpu_train.json"

# -- 5. one federation, 2 sites x 2 ranks, on the CPU and on the one GPU -------------------------------------------
fed=(configs/digits-2x2.yaml --set data.name=synthetic --set data.features=1024 --set data.samples=16384
     --set "model.hidden=[2048, 2048]" --set fl.rounds=4 --set fl.local_epochs=1 --set train.batch_size=128
     --set launch.slots=2 --set cluster.ranks_per_gpu=4)
for dev in cuda cpu; do
  step "federation-$dev" 120 "$PY" -m hpcfl launch "${fed[@]}" "${common[@]}" --set run.root="$out/runs" \
    --set run.name="fed-$dev" --set train.device=$dev --restart
done

# -- 6. federation overhead with device buffers, next to the pinned-copy bound ----------------------------------
step overhead 120 "$PY" bench/federation_overhead.py --device cuda --sizes 10,25 --sites 2 --rounds 4 \
  --mpirun "$prefix/bin/mpirun" --json "$out/overhead.json"

# -- results ---------------------------------------------------------------------------------------------------
"$PY" - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
res = {"steps": [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]}
for name in ("node", "gpu_tiles", "gpu_train", "overhead"):
    p = out / f"{name}.json"
    if p.exists():
        res[name] = json.loads(p.read_text())
for dev in ("cuda", "cpu"):
    p = out / "runs" / f"fed-{dev}" / "summary.json"
    if p.exists():
        s = json.loads(p.read_text())
        res[f"federation_{dev}"] = {"elapsed_s": s.get("elapsed_s"), "final": (s.get("final") or {}).get("val_accuracy"),
                                    "time_breakdown": s.get("time_breakdown")}
(out / "results.json").write_text(json.dumps(res, indent=1))
print(f"gpu_check: results in {out / 'results.json'}")
EOF
echo "gpu_check: done in $(( $(date +%s) - t_start ))s"
