#!/usr/bin/env bash
# The small per-run files a study's numbers are computed from, copied out of a run folder (run folders are not
# committed): config.yaml, metrics.jsonl, eval_base.json (+ eval_base.summary.json) and each held-out evaluation's
# summary as step_XXXX.eval.summary.json (stages/runs/evaluations.py reads this layout);
# with suite evaluations (loop.eval_suite, antisd eval --suite) also their JSON summaries in the run's own layout
# (eval_base-SUITE/*.json, step_XXXX/eval-SUITE/*.json), which is what `antisd report` reads.
#   scripts/collect_run_files.sh runs/repro/grpo_s0 docs/reproduction/arith/runs/grpo_s0
set -euo pipefail
src=${1:?run folder} dest=${2:?destination folder}
mkdir -p "$dest"
for name in config.yaml metrics.jsonl; do cp "$src/$name" "$dest/"; done
for name in eval_base.json eval_base.summary.json; do [ -f "$src/$name" ] && cp "$src/$name" "$dest/"; done
for summary in "$src"/step_*/eval.summary.json; do
  [ -f "$summary" ] && cp "$summary" "$dest/$(basename "$(dirname "$summary")").eval.summary.json"
done
for summary in "$src"/eval_base-*/*.json "$src"/step_*/eval-*/*.json; do
  [ -f "$summary" ] || continue
  relative=${summary#"$src"/}
  mkdir -p "$dest/$(dirname "$relative")"
  cp "$summary" "$dest/$relative"
done
exit 0
