#!/usr/bin/env bash
# One prepared check of sparsecomm on a single CUDA GPU (issue 16), <= 8 minutes, writing
# benchmarks/results/gpu.md (and gpu.json, gpu_check.log):
#
#   1. the CUDA tests:       pytest -q tests -k cuda (device-parametrised tests and test_*_on_cuda)
#   2. a 1-GPU ASPG run:     launch/train.py --config launch/recipes/demo.yaml comm=local device=cuda
#                            (model, optimizer state, sampling on cuda:0; summary records the versions)
#   3. throughput:           benchmarks/bench_gpu.py (selection, encode/decode, ASPG vs AdamW step
#                            on a 124M-parameter fp32 update on the device)
#
#   bash benchmarks/gpu_check.sh                 # from the repository root, on a GPU host
#   PYTHON=/opt/conda/bin/python bash benchmarks/gpu_check.sh   # the interpreter whose torch has CUDA
#
# The venv ($VENV, default .venv-gpu) is made with --system-site-packages so it uses the host's CUDA
# build of torch (pip's default on this project's CPU machines is the CPU wheel, and GPU hosts often
# have no index); only missing pure-Python dependencies are installed. sparsecomm runs from the
# checkout (PYTHONPATH), nothing is built. Each stage has its own time limit; a failing stage is
# recorded and the next one still runs; the exit status is the first failure's.
# Multi-GPU NCCL exchange (torchrun --nproc-per-node N, N >= 2) needs N GPUs and is not part of it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
OUT=benchmarks/results
LOG=$OUT/gpu_check.log
RUN=${RUN_DIR:-runs/gpu_check}
mkdir -p "$OUT"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
status=0
say() { echo "== $*" | tee -a "$LOG"; }

# ---------------------------------------------------------------- 0. interpreter with CUDA torch
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV" || { echo "cannot create $VENV with $PY" >&2; exit 3; }
fi
VPY=$VENV/bin/python
if ! "$VPY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>>"$LOG"; then
  echo "no CUDA: $VPY has no torch with a visible GPU (set PYTHON= to an interpreter whose torch has CUDA)" | tee -a "$LOG" >&2
  exit 3
fi
missing=$("$VPY" - <<'EOF'
import importlib.util
need = {"numpy": "numpy", "zmq": "pyzmq", "msgpack": "msgpack", "prometheus_client": "prometheus-client",
        "transformers": "transformers", "tokenizers": "tokenizers", "yaml": "pyyaml", "omegaconf": "omegaconf>=2.3,<2.5",
        "pytest": "pytest", "hypothesis": "hypothesis", "pytest_timeout": "pytest-timeout"}
print(" ".join(f"'{pkg}'" for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
  say "installing missing dependencies: $missing"
  # never let pip replace the host's CUDA torch
  eval "\"$VPY\" -m pip install -q $missing" >>"$LOG" 2>&1 || { echo "pip could not install $missing (see $LOG)" >&2; exit 4; }
fi
"$VPY" - <<'EOF' | tee -a "$LOG"
import torch
try:
    import torch.cuda.nccl
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except (ImportError, AttributeError, RuntimeError):
    nccl = None
print(f"== GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, NCCL {nccl}")
EOF

# ---------------------------------------------------------------- 1. CUDA tests (<= 3 min)
say "1. pytest -q tests -k cuda"
timeout 180 "$VPY" -m pytest -q -p no:cacheprovider tests -k cuda 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 | tee -a "$LOG"
tests_rc=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$tests_rc

# ---------------------------------------------------------------- 2. 1-GPU ASPG training run (<= 2 min)
say "2. launch/train.py demo recipe, comm=local optimizer=aspg device=cuda"
rm -rf "$RUN"
timeout 120 "$VPY" launch/train.py --config launch/recipes/demo.yaml "run_dir=$RUN" comm=local optimizer=aspg \
  device=cuda console_every=100 2>&1 | tail -12 | tee -a "$LOG"
train_rc=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$train_rc

# ---------------------------------------------------------------- 3. throughput (<= 2.5 min)
say "3. benchmarks/bench_gpu.py"
timeout 150 "$VPY" benchmarks/bench_gpu.py 2>&1 | tee -a "$LOG"
bench_rc=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$bench_rc

# ---------------------------------------------------------------- results/gpu.md
[ -f "$OUT/gpu.md" ] && [ "$bench_rc" -eq 0 ] || printf '# gpu\n\nbench_gpu.py did not complete (exit %s): see gpu_check.log\n' "$bench_rc" > "$OUT/gpu.md"
{
  echo
  echo "## benchmarks/gpu_check.sh stages"
  echo
  echo "Command: \`bash benchmarks/gpu_check.sh\`; exit statuses: tests $tests_rc, training $train_rc, benchmark $bench_rc; $(( $(date +%s) - start )) s in all."
  echo
  echo "### CUDA tests (\`pytest -q tests -k cuda\`)"
  echo
  echo '```'
  tail -15 "$OUT/gpu_tests.txt"
  echo '```'
  echo
  echo "### 1-GPU ASPG training run (demo recipe, device=cuda)"
  echo
  if [ -f "$RUN/summary.json" ]; then
    "$VPY" - "$RUN/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
keys = ["reward_first", "reward_last", "eval_accuracy_before_rl", "eval_accuracy_after_rl", "sparsity_fp32_exact", "wall_s"]
print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
print("| " + " | ".join(f"{s.get(k, float('nan')):.4g}" for k in keys) + " |")
print(f"\nRuntime recorded by the run: `{json.dumps(s.get('runtime'))}`")
EOF
  else
    echo "No summary.json: the run failed (exit $train_rc); see gpu_check.log."
  fi
} >> "$OUT/gpu.md"
rm -f "$OUT/gpu_tests.txt"
say "done in $(( $(date +%s) - start )) s, status $status; wrote $OUT/gpu.md"
exit "$status"
