#!/usr/bin/env bash
# `make reproduce`: the small-scale reproduction study of docs/reproduction.md. LONG-RUNNING: about 20 minutes per
# pair of runs on 2 CPU cores. Resumable: rerunning continues every run from its directory.
#   OUT=runs/repro JOBS=2 STEPS=8 RUNS="antisd:0 grpo:0 ..." scripts/reproduce.sh
# A run spec is METHOD:SEED; METHOD-nogate runs METHOD with the entropy gate off (λ = λ_max every step).
set -euo pipefail
cd "$(dirname "$0")/.."
ANTISD=${ANTISD:-.venv/bin/antisd}
OUT=${OUT:-runs/repro}
JOBS=${JOBS:-2}
STEPS=${STEPS:-8}
DOCS=${DOCS:-docs/reproduction}
RUNS=${RUNS:-"antisd:0 grpo:0 sd:0 antisd-nogate:0 grpo:1 antisd-nogate:1 rkl-ascent-nogate:0 antisd:1 grpo:2 antisd:2 sd:1 rkl-ascent:0"}
mkdir -p "$OUT" "$DOCS"

for spec in $RUNS; do echo "$spec"; done | OMP_NUM_THREADS=1 xargs -P "$JOBS" -I{} bash -c '
  name=${1%%:*}; seed=${1##*:}; method=${name%-nogate}; gate=()
  [ "$method" != "$name" ] && gate=(--set update.gate=off)
  "$0" -q loop -c examples/configs/reproduce.yaml -o "'"$OUT"'/${name}_s${seed}" "${gate[@]}" \
      --set update.method=$method --set loop.seed=$seed --set loop.steps='"$STEPS"' \
      > "'"$OUT"'/${name}_s${seed}.log" 2>&1 && echo "done ${name}_s${seed}" || { echo "FAILED ${name}_s${seed}"; exit 1; }
' "$ANTISD" {}
