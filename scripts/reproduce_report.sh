#!/usr/bin/env bash
# Figures and tables of docs/reproduction.md from the study's run directories (after scripts/reproduce.sh).
#   OUT=runs/repro scripts/reproduce_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ANTISD=${ANTISD:-.venv/bin/antisd}
OUT=${OUT:-runs/repro}
DOCS=${DOCS:-docs/reproduction}
STEPS=${STEPS:-8}
mkdir -p "$DOCS"
runs=(); labels=()
for dir in "$OUT"/*_s*/; do
  [ -f "$dir/metrics.jsonl" ] || continue
  name=$(basename "$dir"); runs+=("$dir"); labels+=(--label "${name%_s*}")
done
"$ANTISD" -q plot "${runs[@]}" "${labels[@]}" --out "$DOCS/curves.png" --overwrite
"$ANTISD" -q plot "${runs[@]}" "${labels[@]}" --format csv --out "$DOCS/curves.csv" --overwrite
# PMI of the base model (step 0 is scored with the base weights) and of the trained ungated AntiSD policy (last step).
last=$(printf "step_%04d" $((STEPS - 1)))
"$ANTISD" -q analyze pmi "$OUT"/*_s*/step_0000/scored.parquet --out "$DOCS/pmi_base" --overwrite > "$DOCS/pmi_base.txt"
"$ANTISD" -q analyze pmi "$OUT"/antisd-nogate_s*/"$last"/scored.parquet --out "$DOCS/pmi_antisd" --overwrite \
  > "$DOCS/pmi_antisd.txt"
.venv/bin/python scripts/reproduction_table.py "$OUT" > "$DOCS/table.md"
cat "$DOCS/table.md"
