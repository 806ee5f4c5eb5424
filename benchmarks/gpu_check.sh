#!/usr/bin/env bash
# One GPU check, run once from the repository root on a machine with one CUDA GPU (about 7 minutes):
#
#   bash benchmarks/gpu_check.sh
#
# 0. cuda_sync_check.py: every balancer's step under torch.cuda.set_sync_debug_mode("warn");
# 1. step_overhead.py --device cuda, T = 8, every balancer (host syncs, launches, kernels per step);
# 2. balancer_cost.py --device cuda --workload gpu against TorchJD, T = 2, 8, 32, params mode;
# 3. fsdp_smoke.py: every balancer x {32-true, bf16-mixed}, 3 steps through FSDPStrategy.
# Each part runs under its own timeout; a failure or a timeout in one does not stop the others. Output goes
# to $OUT (default /tmp/gpu_check_out), 8 files at most: log.txt (environment, install, every part's stderr),
# step_overhead.md/.json, balancer_cost.md/.json, fsdp_smoke.md/.json, summary.txt; the summary is printed
# last.
#
# Packages missing on the machine travel as cp312 wheels in the git-ignored .whl/ folder (carry it) and are
# installed with --no-deps into /tmp/site: torchjd 0.18.0, quadprog + qpsolvers (its UPGrad/DualProj
# projector), cvxpy + ecos + clarabel + qdldl (its NashMTL and CAGrad), cffi + pycparser (clarabel's).
# cvxpy's other requirements (scs, osqp, highspy, sparsediffpy: 60 MB, over the size that travels) are left
# out: the ECOS and Clarabel solvers that TorchJD calls do not need them. numpy and scipy are the machine's.
# Remade with: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#   --platform manylinux_2_28_x86_64 ... -d .whl torchjd==0.18.0 quadprog==0.1.14 qpsolvers==4.13.0
#   cvxpy==1.9.3 ecos==2.0.14 clarabel==0.11.1 qdldl==0.1.9.post1 cffi==2.1.1 pycparser==3.12
set -u
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
T_SYNC=${T_SYNC:-80} T_STEP=${T_STEP:-130} T_COST=${T_COST:-190} T_FSDP=${T_FSDP:-120}  # seconds per part
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
started=$(date +%s)

{
  echo "# gpu_check $(date -u +%FT%TZ)"
  nvidia-smi || echo "nvidia-smi failed"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "wheels installed: $(ls .whl | tr '\n' ' ')" || echo "wheel install FAILED"
  else
    echo "no .whl/ folder: torchjd and its solvers are not installed (carry .whl)"
  fi
} >"$LOG" 2>&1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - >>"$LOG" 2>&1 <<'EOF'
import importlib, importlib.metadata, sys
print("python", sys.version.split()[0])
for name in ("torch", "lightning", "torchmetrics", "transformers", "numpy", "scipy", "torchjd", "cvxpy", "lightning_mtl"):
    try:
        mod = importlib.import_module(name)
        version = getattr(mod, "__version__", None)
        if version is None:
            version = importlib.metadata.version(name)
        print(name, version, getattr(mod, "__file__", ""))
    except Exception as err:
        print(name, "IMPORT FAILED:", type(err).__name__, err)
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import cvxpy
    print("cvxpy solvers", cvxpy.installed_solvers())
except Exception as err:
    print("cvxpy solvers: none", err)
EOF

declare -a SUMMARY
part() {  # part NAME TIMEOUT COMMAND...: stdout to $OUT/NAME.md, stderr to the log
  local name=$1 limit=$2 t0 rc status
  shift 2
  t0=$(date +%s)
  echo -e "\n## $name: $* (timeout ${limit} s)" >>"$LOG"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.md" 2>>"$LOG"
  rc=$?
  case $rc in
    0) status=ok; grep -q '^skip' "$OUT/$name.md" && status="skipped (see $name.md)" ;;
    124 | 137) status="timed out after ${limit} s (partial output kept)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  SUMMARY+=("| $name | $status | $(($(date +%s) - t0)) s | $name.md, $name.json |")
}

part cuda_sync_check "$T_SYNC" python3 benchmarks/cuda_sync_check.py --steps 3
part step_overhead "$T_STEP" python3 benchmarks/step_overhead.py --device cuda --tasks 8 --warmup 12 \
  --train-metrics off --json "$OUT/step_overhead.json"
part balancer_cost "$T_COST" python3 benchmarks/balancer_cost.py --device cuda --workload gpu --compare \
  --libraries ours,torchjd --modes params --tasks 2 8 32 --steps 15 --warmup 2 --json "$OUT/balancer_cost.json"
part fsdp_smoke "$T_FSDP" python3 benchmarks/fsdp_smoke.py --device cuda --modes params features \
  --json "$OUT/fsdp_smoke.json"

{
  echo "## environment (nvidia-smi and the install in log.txt)"
  grep -E '^(python|torch|lightning|torchmetrics|torchjd|cvxpy|lightning_mtl|cuda|wheel|no .whl)' "$LOG" | cut -c1-160
  echo
  echo "## cuda_sync_check (torch.cuda.set_sync_debug_mode)"
  grep -E '^\||over their allowance|^skip' "$OUT/cuda_sync_check.md"
  echo
  echo "## step_overhead (T = 8, cuda)"
  sed -n '/^## T = /,$p' "$OUT/step_overhead.md"
  echo
  echo "## balancer_cost targets (T = 2, 8, 32, gpu workload; tables in balancer_cost.md)"
  sed -n '/^## Targets/,$p' "$OUT/balancer_cost.md"
  echo
  echo "## fsdp_smoke"
  grep -E '^\||ok, .* failed|^skip' "$OUT/fsdp_smoke.md"
  echo
  echo "## gpu_check summary ($(($(date +%s) - started)) s in all; log: log.txt)"
  echo "| part | status | time | files |"
  echo "|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
