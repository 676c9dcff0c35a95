#!/usr/bin/env bash
# The arith_styles study of docs/reproduction.md: calibration (5 few-shot variants) and the PMI polarity test (no
# training), about 45 min on 2 cores, and the paired training arms (phase train: 9 runs of 10 steps, ~30 min each on
# one core; JOBS=2 runs two at a time: ~2 h 30 min). All three phases by default (~3 h 20 min). Resumable: every file
# that exists is kept and reused, every run continues from its folder. A training run holds up to ~8 GB of memory:
# JOBS=3 ran out of memory on a 24 GiB machine.
#   PHASES="calibrate polarity train" OUT=runs/styles DOCS=docs/reproduction/styles scripts/styles_study.sh
#   RUNS="grpo:0 antisd-nogate:0" PHASES=train scripts/styles_study.sh     # a subset of the training arms
#   RUNS=official PHASES=train scripts/styles_study.sh     # the 9 authors'-code arms (METHOD §9): OFFICIAL_RUNS
# A run spec is METHOD[@VARIANT]:SEED; METHOD-nogate runs METHOD with its gate off (λ = λ_max every step);
# METHOD-nogate-batch also sets update.lam_mode batch (one λ = λ_max for every response, not §9's λ_i). The
# config pins update.variant paper (the paper's text, as the committed arms ran); @official runs the same arm with
# --set update.variant=official into $OUT/official/METHOD_sSEED (antisd gated and sd ungated, as the code runs them),
# on the same prompts, held-out set and evaluation steps; its files go to $DOCS/runs/official/METHOD_sSEED.
set -euo pipefail
cd "$(dirname "$0")/.."
ANTISD=${ANTISD:-.venv/bin/antisd}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/styles}
DOCS=${DOCS:-docs/reproduction/styles}
PHASES=${PHASES:-"calibrate polarity train"}
CONFIG=${CONFIG:-examples/configs/styles.yaml}
# the calibration variants tried: SHOTS (data prepare --shots) or SHOTS@LO-HI (and --operands LO-HI)
VARIANTS=${VARIANTS:-"direct,deliberate deliberate,direct deliberate,small,direct direct,deliberate@10-49 direct,deliberate@10-29"}
SHOTS=${SHOTS:-direct,deliberate}  # the variant the polarity test uses (the runs': CONFIG; docs/reproduction.md)
RUNS=${RUNS:-"grpo:0 antisd-nogate:0 sd:0 grpo:1 antisd-nogate:1 sd:1 grpo:2 antisd-nogate:2 sd:2"}
OFFICIAL_RUNS="grpo@official:0 antisd@official:0 sd@official:0 grpo@official:1 antisd@official:1 sd@official:1
grpo@official:2 antisd@official:2 sd@official:2"
[ "$RUNS" = official ] && RUNS=$OFFICIAL_RUNS
JOBS=${JOBS:-2}
PROMPTS=${PROMPTS:-64} N=8 MAX_NEW=80 STEP_PROMPTS=8  # calibration / polarity: 64 problems × 8 rollouts
mkdir -p "$OUT" "$DOCS"
once() { local out=$1; shift; [ -e "$out" ] || "$@"; }  # run a stage unless its output exists

variant_dir() {  # direct,deliberate@10-49 → $OUT/calibrate/direct-deliberate_10-49 (no range: direct-deliberate)
  local shots=${1%%@*} range=""
  [[ $1 == *@* ]] && range=_${1#*@}
  echo "$OUT/calibrate/${shots//,/-}$range"
}
sample() {  # sample() VARIANT: prompts, rollouts and verified rollouts of the base model in variant_dir VARIANT
  local d shots=${1%%@*} operands=()
  d=$(variant_dir "$1")
  [[ $1 == *@* ]] && operands=(--operands "${1#*@}")
  mkdir -p "$d"
  once "$d/prompts.parquet" "$ANTISD" -q data prepare arith_styles --split train --num $PROMPTS --seed 101 \
    --shots "$shots" "${operands[@]}" --out "$d/prompts.parquet"
  once "$d/rollouts.parquet" "$ANTISD" -q rollout --model smollm2-135m --prompts "$d/prompts.parquet" --n $N \
    --temperature 1.0 --max-new-tokens $MAX_NEW --seed 0 --out "$d/rollouts.parquet" > /dev/null
  once "$d/verified.parquet" "$ANTISD" -q verify --rollouts "$d/rollouts.parquet" --out "$d/verified.parquet" \
    > /dev/null
}

for phase in $PHASES; do case $phase in
calibrate)
  for variant in $VARIANTS; do sample "$variant"; done
  "$PYTHON" scripts/styles_report.py calibration "$OUT/calibrate" --out "$DOCS/calibration.json"
  ;;
polarity)
  d=$(variant_dir "$SHOTS")
  sample "$SHOTS"
  once "$d/verified_other.parquet" "$ANTISD" -q verify --rollouts "$d/rollouts.parquet" --privileged-from other \
    --out "$d/verified_other.parquet" > /dev/null
  once "$d/scored_same.parquet" "$ANTISD" -q score --model smollm2-135m --verified "$d/verified.parquet" \
    --out "$d/scored_same.parquet" > /dev/null
  once "$d/scored_other.parquet" "$ANTISD" -q score --model smollm2-135m --verified "$d/verified_other.parquet" \
    --out "$d/scored_other.parquet" > /dev/null
  once "$d/scored_noinstruction.parquet" "$ANTISD" -q score --model smollm2-135m --verified "$d/verified.parquet" \
    --teacher-instruction "" --out "$d/scored_noinstruction.parquet" > /dev/null
  for context in same other noinstruction; do
    "$ANTISD" -q analyze pmi "$d/scored_$context.parquet" --probe Check --probe Split --style-marker "Split:" \
      --gate-subset $STEP_PROMPTS --min-count 20 --rollouts 6 --out "$DOCS/pmi_$context" --overwrite \
      > "$DOCS/pmi_$context.txt"
  done
  ;;
train)
  # the base model's held-out evaluation does not depend on method or seed: a 0-step loop computes it once, every
  # run directory that lacks one gets a copy (loop keeps an eval_base.json it finds), then all arms run in parallel
  export OMP_NUM_THREADS=$((2 / JOBS > 0 ? 2 / JOBS : 1))  # every arm with the same threads (same CPU numerics)
  if [ ! -f "$OUT/base/eval_base.json" ]; then
    "$ANTISD" -q loop -c "$CONFIG" -o "$OUT/base" --set loop.steps=0 > "$OUT/base.log" 2>&1 \
      || { echo "FAILED base evaluation (see $OUT/base.log)"; exit 1; }
  fi
  run_dir() {  # run_dir SPEC: grpo:0 → $OUT/grpo_s0; antisd@official:0 → $OUT/official/antisd_s0
    local spec=$1 name=${1%%:*} seed=${1##*:}; local method=${name%@*}
    if [[ $name == *@* ]]; then echo "$OUT/${name#*@}/${method}_s${seed}"; else echo "$OUT/${name}_s${seed}"; fi
  }
  train_one() {
    local name=${1%%:*} seed=${1##*:} dir; local arm=${name%@*} variant=() lam=(); local gate=()
    dir=$(run_dir "$1")
    [[ $arm == *-batch ]] && { lam=(--set update.lam_mode=batch); arm=${arm%-batch}; }
    local method=${arm%-nogate}
    [ "$method" != "$arm" ] && gate=(--set update.gate=off)
    [[ $name == *@* ]] && variant=(--set update.variant="${name#*@}")
    "$ANTISD" -q loop -c "$CONFIG" -o "$dir" "${gate[@]}" "${variant[@]}" "${lam[@]}" --set update.method="$method" \
      --set loop.seed="$seed" > "$dir.log" 2>&1 && echo "done $dir" || { echo "FAILED $dir (see $dir.log)"; return 1; }
  }
  export -f train_one run_dir; export ANTISD CONFIG OUT
  for spec in $RUNS; do
    dir=$(run_dir "$spec")
    [ -f "$dir/eval_base.json" ] || { mkdir -p "$dir" && cp "$OUT"/base/eval_base.{json,parquet,summary.json} "$dir/"; }
  done
  printf '%s\n' $RUNS | xargs -r -P "$JOBS" -I{} bash -c 'train_one "$1"' _ {}
  # the per-run files every number of the doc is computed from (the run directories are not committed)
  for dir in "$OUT"/*_s*/ "$OUT"/official/*_s*/; do
    [ -d "$dir" ] || continue
    name=${dir#"$OUT"/}; name=${name%/}  # grpo_s0, or official/antisd_s0
    bash scripts/collect_run_files.sh "$dir" "$DOCS/runs/$name"
    "$PYTHON" scripts/styles_report.py styles "$dir" --out "$DOCS/runs/$name/styles.jsonl"
    "$PYTHON" scripts/styles_report.py evals "$dir" --out "$DOCS/runs/$name/evals.json"
  done
  ;;
*) echo "unknown phase $phase (calibrate, polarity, train)"; exit 2 ;;
esac; done
"$PYTHON" scripts/styles_report.py report "$DOCS" --out "$DOCS/table.md"
# the paper's read-out (best-average checkpoint, Speedup over grpo, seed spread, pass@k) of the held-out evaluations
runs=(); labels=()
for dir in "$DOCS"/runs/*_s*/; do name=$(basename "$dir"); runs+=("${dir%/}"); labels+=(--label "${name%_s*}"); done
"$ANTISD" -q report "${runs[@]}" "${labels[@]}" --baseline grpo --out "$DOCS/report" --overwrite > /dev/null
