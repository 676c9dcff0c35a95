#!/usr/bin/env bash
# `make reproduce`: the small-scale reproduction study of docs/reproduction.md. LONG-RUNNING: about 12 minutes per
# pair of runs on 2 CPU cores (12 runs: ~80 min). Resumable: rerunning continues every run from its directory.
#   OUT=runs/repro JOBS=2 STEPS=8 RUNS="antisd:0 grpo:0 ..." SETS="--set update.lr=2e-5" scripts/reproduce.sh
# A run spec is METHOD:SEED; METHOD-nogate runs METHOD with the entropy gate off (λ = λ_max every step). SETS adds
# config overrides to every run (the pilot study of docs/reproduction.md is one such variant).
set -euo pipefail
cd "$(dirname "$0")/.."
ANTISD=${ANTISD:-.venv/bin/antisd}
OUT=${OUT:-runs/repro}
JOBS=${JOBS:-2}
STEPS=${STEPS:-8}
SETS=${SETS:-}
DOCS=${DOCS:-docs/reproduction}
RUNS=${RUNS:-"grpo:0 antisd:0 grpo:1 antisd:1 sd:0 rkl-ascent:0 grpo:2 antisd:2 sd:1 rkl-ascent:1 antisd-nogate:0 antisd-nogate:1"}
mkdir -p "$OUT" "$DOCS"

# The base model's greedy held-out evaluation does not depend on method or seed: run it once (a 0-step loop) and give
# every run directory that lacks one a copy, which the loop then reuses instead of evaluating the base model again.
if [ ! -f "$OUT/base/eval_base.json" ]; then
  OMP_NUM_THREADS=2 "$ANTISD" -q loop -c examples/configs/reproduce.yaml -o "$OUT/base" $SETS --set loop.steps=0 \
      > "$OUT/base.log" 2>&1 || { echo "FAILED base evaluation (see $OUT/base.log)"; exit 1; }
fi
for spec in $RUNS; do
  name=${spec%%:*}; seed=${spec##*:}; dir="$OUT/${name}_s${seed}"
  [ -f "$dir/eval_base.json" ] && continue
  mkdir -p "$dir" && cp "$OUT"/base/eval_base.{json,parquet,summary.json} "$dir/"
done

for spec in $RUNS; do echo "$spec"; done | OMP_NUM_THREADS=1 xargs -P "$JOBS" -I{} bash -c '
  name=${1%%:*}; seed=${1##*:}; method=${name%-nogate}; sets=()
  [ "$method" != "$name" ] && sets=(--set update.gate=off)
  # grpo needs no teacher pass; it runs one anyway so its teacher entropy can be compared and the gate replayed on it
  [ "$method" = grpo ] && sets+=(--set score.teacher=true)
  "$0" -q loop -c examples/configs/reproduce.yaml -o "'"$OUT"'/${name}_s${seed}" "${sets[@]}" '"$SETS"' \
      --set update.method=$method --set loop.seed=$seed --set loop.steps='"$STEPS"' \
      > "'"$OUT"'/${name}_s${seed}.log" 2>&1 && echo "done ${name}_s${seed}" || { echo "FAILED ${name}_s${seed}"; exit 1; }
' "$ANTISD" {}
