"""Paired read-outs of the arith study from its committed curves (docs/reproduction/arith/curves.csv), every comparison
over the seeds both methods ran.

Run: .venv/bin/python scripts/reproduction_paired.py docs/reproduction/arith/curves.csv > docs/reproduction/arith/paired.md

Per method, against GRPO on the same seeds: the seed-mean held-out accuracy by step of both, GRPO's best on those
seeds, the first step at which the method reaches it ("never" if it does not), the paired final difference, and per
seed whether the teacher's median entropy fell from the first to the last step (GRPO) or rose.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ACCURACY, ENTROPY = "eval/accuracy", "teacher/entropy_median"


def load(path: Path) -> dict:
    """{(method, seed): {metric: {step: value}}} from a `antisd plot --format csv` file."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    with open(path) as handle:
        for row in csv.DictReader(handle):
            runs[(row["method"], int(row["seed"]))][row["metric"]][int(row["step"])] = float(row["value"])
    return runs


def seed_mean(runs: dict, method: str, seeds: list[int]) -> dict[int, float]:
    steps = set.intersection(*(set(runs[(method, s)][ACCURACY]) for s in seeds))
    return {step: statistics.fmean(runs[(method, s)][ACCURACY][step] for s in seeds) for step in sorted(steps)}


def main(path: Path) -> None:
    runs = load(path)
    methods = sorted({m for m, _ in runs} - {"grpo"})
    print(f"<!-- written by scripts/reproduction_paired.py {path} -->\n")
    print("| method | paired seeds | method by step (seed mean) | GRPO by step, same seeds | GRPO best, same seeds |"
          " first step ≥ it | final − GRPO (per seed) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in methods:
        seeds = sorted(s for m, s in runs if m == method and ("grpo", s) in runs)
        ours, grpo = seed_mean(runs, method, seeds), seed_mean(runs, "grpo", seeds)
        trained = {step: v for step, v in grpo.items() if step >= 0}
        best = max(trained.values())
        first = next((step for step, v in ours.items() if step >= 0 and v >= best), "never")
        last = max(trained)
        finals = [runs[(method, s)][ACCURACY][last] - runs[("grpo", s)][ACCURACY][last] for s in seeds]
        curve = lambda c: ", ".join(f"{step}: {v:.3f}" for step, v in c.items() if step >= 0)  # noqa: E731
        print(f"| `{method}` | {', '.join(map(str, seeds))} | {curve(ours)} | {curve(grpo)} | {best:.3f} | {first} | "
              f"{statistics.fmean(finals):+.3f} ({', '.join(f'{d:+.3f}' for d in finals)}) |")
    print("\nTeacher median entropy, first → last step, per GRPO seed:\n")
    for (method, seed), metrics in sorted(runs.items()):
        if method == "grpo":
            entropy = metrics.get(ENTROPY)
            if not entropy:  # a grpo run without the teacher pass (score.teacher off) logs no teacher entropy
                print(f"- grpo s{seed}: not logged (no teacher pass)")
                continue
            first, last = entropy[min(entropy)], entropy[max(entropy)]
            print(f"- grpo s{seed}: {first:.3f} → {last:.3f} ({'fell' if last < first else 'rose'})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
