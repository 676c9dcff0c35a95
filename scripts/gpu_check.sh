#!/usr/bin/env bash
# GPU check of antisd on the one GPU we can get, in ≤ 8 minutes: a random model of Qwen3's shape (vocab 151,936, GQA
# 32/8 × 128, qk-norm, 6 layers × 2560 ≈ 1.0B parameters), two 2-step `antisd loop` runs on the HF engine with
# DeepSpeed ZeRO-2 in bf16 and evaluation at every step, ≥ 1,024 new tokens per response:
#   run A  resident trainer, SIGKILLed as step 1's checkpoint is published, then resumed (step 0 replayed)
#   run B  loop.resident_trainer: false
#   run C  the resident loop as 1 rank under `torchrun --nproc-per-node 1` (one step): the launch of N ranks on the one
#          GPU we can get (N > 1 ranks are tested on CPU only, over gloo: tests/test_loop_ranks.py)
# It prints tokens/s and peak memory per stage (memory/peak_gib/<stage>) and exits non-zero on any failure.
#
# The GPU machine (device tool; /work/.library/device/KINDS.md) has torch 2.11 + CUDA, transformers 5.17, peft,
# pyarrow, rich, click and no network: run scripts/gpu_wheels.sh here first (wheels of deepspeed, pydantic, hjson,
# math-verify, … into .whl/, and the tokenizer into .gpu_check/tokenizer; both git-ignored), then carry both:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu_check"], timeout_s=540)
# vLLM is not on that machine: its GPU path (sleep/wake, in-memory weights) is checked by tests/test_resources.py's
# fakes only, until a machine with vLLM runs `antisd loop` with rollout.engine vllm.
#
# Usage:
#   scripts/gpu_check.sh [--out DIR] [--python PY]
#   scripts/gpu_check.sh --cpu-smoke [--out DIR]   # the same flow at toy size on CPU (tests/test_gpu_check.py, CI)
set -euo pipefail

MODE=gpu
OUT=gpu_check_out
PY=${PYTHON:-python3}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) MODE=cpu; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
START=$SECONDS

# --- what the machine lacks: the carried wheels (scripts/gpu_wheels.sh) ------------------------------------------
if [[ $MODE == gpu && -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/antisd-site \
    .whl/*.whl
  export PYTHONPATH="/tmp/antisd-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [[ $MODE == cpu ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# --- environment ---------------------------------------------------------------------------------------------------
echo "== environment ($MODE)"
[[ $MODE == gpu ]] && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }
"$PY" - "$MODE" <<'PY'
import importlib.util, sys
import torch
mode = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
for name in ("transformers", "deepspeed", "peft", "vllm", "math_verify"):
    spec = importlib.util.find_spec(name)
    print(f"{name}: {__import__(name).__version__ if spec and hasattr(__import__(name), '__version__') else ('installed' if spec else 'not installed')}")
from stages.common.stack import missing_apis
missing = missing_apis()
print("APIs antisd needs:", "all present" if not missing else "MISSING " + "; ".join(missing))
if mode == "gpu" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device (use --cpu-smoke on a machine without a GPU)")
if missing:
    sys.exit(1)
PY

# --- the flow ------------------------------------------------------------------------------------------------------
TOKENIZER=()
[[ $MODE == gpu && -f .gpu_check/tokenizer/tokenizer.json ]] && TOKENIZER=(--tokenizer .gpu_check/tokenizer)
status=0
"$PY" scripts/gpu_check.py run --mode "$MODE" --out "$OUT" "${TOKENIZER[@]}" || status=$?
echo "gpu_check.sh: $([[ $status == 0 ]] && echo passed || echo FAILED) in $((SECONDS - START)) s ($MODE)"
exit $status
