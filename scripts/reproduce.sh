#!/usr/bin/env bash
# `make reproduce`: the small-scale reproduction study of docs/reproduction.md. LONG-RUNNING: about 1-1.5 hours on
# 2 CPU cores at the default size. Resumable: rerunning continues every run from its directory.
#   OUT=runs/repro JOBS=2 STEPS=8 scripts/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ANTISD=${ANTISD:-.venv/bin/antisd}
OUT=${OUT:-runs/repro}
JOBS=${JOBS:-2}
STEPS=${STEPS:-8}
DOCS=${DOCS:-docs/reproduction}
RUNS=${RUNS:-"antisd:0 grpo:0 sd:0 rkl-ascent:0 antisd:1 grpo:1 sd:1 rkl-ascent:1 antisd:2 grpo:2"}
mkdir -p "$OUT" "$DOCS"

for spec in $RUNS; do echo "$spec"; done | OMP_NUM_THREADS=1 xargs -P "$JOBS" -I{} bash -c '
  method=${1%%:*}; seed=${1##*:}
  "$0" -q loop -c examples/configs/reproduce.yaml -o "'"$OUT"'/${method}_s${seed}" \
      --set update.method=$method --set loop.seed=$seed --set loop.steps='"$STEPS"' \
      > "'"$OUT"'/${method}_s${seed}.log" 2>&1 && echo "done ${method}_s${seed}" || { echo "FAILED ${method}_s${seed}"; exit 1; }
' "$ANTISD" {}

"$ANTISD" -q plot "$OUT"/*_s* --out "$DOCS/curves.png" --overwrite
"$ANTISD" -q plot "$OUT"/*_s* --format csv --out "$DOCS/curves.csv" --overwrite
# PMI of the base model (step 0 is scored with the base weights) and of the trained AntiSD policy (last step).
last=$(printf "step_%04d" $((STEPS - 1)))
"$ANTISD" -q analyze pmi "$OUT"/antisd_s*/step_0000/scored.parquet --out "$DOCS/pmi_base" --overwrite > "$DOCS/pmi_base.txt"
"$ANTISD" -q analyze pmi "$OUT"/antisd_s*/"$last"/scored.parquet --out "$DOCS/pmi_antisd" --overwrite > "$DOCS/pmi_antisd.txt"
.venv/bin/python scripts/reproduction_table.py "$OUT" > "$DOCS/table.md"
cat "$DOCS/table.md"
