#!/usr/bin/env bash
# Figures and tables of docs/reproduction.md from the study's run directories (after scripts/reproduce.sh). The
# per-run files every number is computed from are copied into DOCS/runs/ first (the run directories are not committed)
# and the curves and tables are made from those copies alone.
#   OUT=runs/repro DOCS=docs/reproduction/arith PMI_METHOD=antisd scripts/reproduce_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ANTISD=${ANTISD:-.venv/bin/antisd}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/repro}
DOCS=${DOCS:-docs/reproduction/arith}
STEPS=${STEPS:-8}
PMI_METHOD=${PMI_METHOD:-antisd}  # whose trained policy the second PMI analysis looks at (its runs' last step)
GSM8K_PMI=${GSM8K_PMI:-1}  # 0: skip the base-model GSM8K diagnostic (it does not depend on the study's settings)
mkdir -p "$DOCS"
for dir in "$OUT"/*_s*/; do
  [ -f "$dir/metrics.jsonl" ] && bash scripts/collect_run_files.sh "$dir" "$DOCS/runs/$(basename "$dir")"
done
runs=(); labels=()
for dir in "$DOCS"/runs/*_s*/; do
  name=$(basename "$dir"); runs+=("$dir"); labels+=(--label "${name%_s*}")
done
"$ANTISD" -q plot "${runs[@]}" "${labels[@]}" --out "$DOCS/curves.png" --overwrite
"$ANTISD" -q plot "${runs[@]}" "${labels[@]}" --format csv --out "$DOCS/curves.csv" --overwrite
"$PYTHON" scripts/reproduction_paired.py "$DOCS/curves.csv" > "$DOCS/paired.md"
# the paper's read-out (best-average checkpoint, Speedup over grpo, seed spread, pass@k) of the held-out evaluations
"$ANTISD" -q report "${runs[@]%/}" "${labels[@]}" --baseline grpo --out "$DOCS/report" --overwrite > /dev/null
# PMI of the base model (step 0 of gated antisd: the base weights sample and score with the teacher; grpo may run
# without the teacher pass) and of the trained PMI_METHOD policy (last step).
last=$(printf "step_%04d" $((STEPS - 1)))
"$ANTISD" -q analyze pmi "$OUT"/antisd_s*/step_0000/scored.parquet --out "$DOCS/pmi_base" --overwrite > "$DOCS/pmi_base.txt"
"$ANTISD" -q analyze pmi "$OUT"/"$PMI_METHOD"_s*/"$last"/scored.parquet --model smollm2-135m --out "$DOCS/pmi_antisd" --overwrite \
  > "$DOCS/pmi_antisd.txt"
"$PYTHON" scripts/reproduction_table.py "$DOCS/runs" > "$DOCS/table.md"
cat "$DOCS/table.md"
[ "$GSM8K_PMI" = 1 ] || exit 0
# The diagnostic on longer reasoning: base model on 12 GSM8K test problems (arith answers are too short to hold the
# deliberation words).
if [ ! -f "$OUT/gsm8k_prompts.parquet" ]; then
  "$ANTISD" -q data prepare gsm8k --split test --num 12 --out "$OUT/gsm8k_prompts.parquet"
fi
if [ ! -f "$OUT/pmi_gsm8k_base/summary.json" ]; then  # base model, seeded: the same in every study
  OMP_NUM_THREADS=1 "$ANTISD" -q analyze pmi --prompts "$OUT/gsm8k_prompts.parquet" --model smollm2-135m --n 2 \
    --max-new-tokens 160 --out "$OUT/pmi_gsm8k_base" --overwrite > "$OUT/pmi_gsm8k_base.txt"
fi
cp "$OUT/pmi_gsm8k_base.txt" "$DOCS/pmi_gsm8k_base.txt"
mkdir -p "$DOCS/pmi_gsm8k_base"
cp "$OUT"/pmi_gsm8k_base/{tokens.csv,pieces.csv,heatmap.png,summary.json,rollouts.html} "$DOCS/pmi_gsm8k_base/"
