"""Summarize the arith study's committed per-run files into the Markdown table of docs/reproduction.md.

Run: .venv/bin/python scripts/reproduction_table.py docs/reproduction/arith/runs > docs/reproduction/arith/table.md

Each folder under the root holds one run's config.yaml, metrics.jsonl and eval_base.json (what
scripts/collect_run_files.sh copies out of a run directory); nothing else is read, so the table can be recomputed
from the repository.

Per method (finished runs only; METHOD-nogate = the gate off, λ = λ_max every step; mean over seeds, with the
per-seed values): base, final and best held-out accuracy, the first step at
which the method's seed-mean held-out accuracy reaches GRPO's best seed-mean accuracy over the same seeds (paired),
mean response length, mean
training reward of the last 4 steps, the final accuracy minus GRPO's for the same seed (paired: same seed means same
first batch and base), and gate activity (fraction of post-warm-up steps with the gate open, mean λ).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stages.common import metrics as keys


def load_run(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    base = json.loads((run_dir / "eval_base.json").read_text()) if (run_dir / "eval_base.json").exists() else {}
    update, loop = config["update"], config["loop"]
    method = update.get("method", "antisd") + ("-nogate" if update.get("gate") == "off" else "")
    return {"name": run_dir.name, "method": method, "steps": loop["steps"], "seed": loop["seed"], "rows": rows,
            "base": base.get(keys.EVAL_ACCURACY), "warmup": update.get("warmup_steps", 5)}


def eval_curve(run: dict) -> dict[int, float]:
    return {r[keys.STEP]: r[keys.EVAL_ACCURACY] for r in run["rows"] if keys.EVAL_ACCURACY in r}


def mean_curve(runs: list[dict]) -> dict[int, float]:
    steps = set.intersection(*(set(eval_curve(r)) for r in runs)) if runs else set()
    return {s: statistics.mean(eval_curve(r)[s] for r in runs) for s in sorted(steps)}


def final_accuracy(run: dict) -> float | None:
    curve = eval_curve(run)
    return curve[max(curve)] if curve else None


def fmt(values: list[float], digits: int = 3, signed: bool = False) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    spec = f"{'+' if signed else ''}.{digits}f"
    inner = ", ".join(f"{v:{spec}}" for v in values)
    return f"{statistics.mean(values):{spec}} ({inner})" if len(values) > 1 else f"{values[0]:{spec}}"


def main(root: Path) -> str:
    runs = [load_run(d) for d in sorted(root.iterdir()) if (d / "metrics.jsonl").exists()]
    runs = [r for r in runs if r["rows"] and len(r["rows"]) >= r["steps"]]  # finished runs only (not the 0-step base)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[run["method"]].append(run)
    grpo_curve = mean_curve(by_method.get("grpo", []))
    grpo_best = max(grpo_curve.values()) if grpo_curve else None
    grpo_final = {r["seed"]: final_accuracy(r) for r in by_method.get("grpo", [])}
    lines = [
        "| method | seeds | steps | base acc | final acc | best acc | first step ≥ GRPO best (same seeds) "
        "| final − GRPO (same seed) | response length | train reward (last 4) | gate open | mean λ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    known = ("grpo", "antisd", "antisd-nogate", "sd", "rkl-ascent", "rkl-ascent-nogate")
    methods = [m for m in known if m in by_method] + sorted(set(by_method) - set(known))
    for method in methods:
        group = by_method[method]
        curve = mean_curve(group)
        # GRPO's best over the seeds this method ran too: a comparison of means over other seeds is not paired
        paired_grpo = mean_curve([r for r in by_method.get("grpo", []) if r["seed"] in {g["seed"] for g in group}])
        best = max(paired_grpo.values()) if paired_grpo else None
        reach = next((s for s, acc in curve.items() if best is not None and acc >= best), None)
        finals = [final_accuracy(r) for r in group]
        paired = [final_accuracy(r) - grpo_final[r["seed"]] for r in group
                  if final_accuracy(r) is not None and grpo_final.get(r["seed"]) is not None]
        bests = [max(eval_curve(r).values()) if eval_curve(r) else None for r in group]
        lengths = [statistics.mean(x[keys.LENGTH_MEAN] for x in r["rows"]) for r in group]
        rewards = [statistics.mean(x[keys.REWARD_MEAN] for x in r["rows"][-4:]) for r in group]
        after = [[x for x in r["rows"] if x["step"] >= r["warmup"]] for r in group]
        gate_open = [statistics.mean(x[keys.GATE_OPEN] for x in rows) if rows else None for rows in after]
        lambdas = [statistics.mean(x[keys.GATE_LAMBDA] for x in r["rows"]) for r in group]
        steps = min(len(r["rows"]) for r in group)
        lines.append(
            f"| `{method}` | {len(group)} | {steps} | {fmt([r['base'] for r in group])} | {fmt(finals)} | {fmt(bests)} "
            f"| {'never' if reach is None else reach} | {fmt(paired, 3, signed=True)} | {fmt(lengths, 1)} | {fmt(rewards)} "
            f"| {fmt(gate_open, 2)} | {fmt(lambdas, 2)} |"
        )
    lines.append("")
    lines.append(f"GRPO's best seed-mean held-out accuracy: {grpo_best:.3f}" if grpo_best is not None else "No GRPO runs.")
    lines.append("")
    lines.append("Seed-mean held-out accuracy by step (accuracy after that step's update):")
    lines.append("")
    curves = {m: mean_curve(by_method[m]) for m in methods}
    steps = sorted(set().union(*(set(c) for c in curves.values()))) if curves else []
    lines.append("| method | " + " | ".join(str(s) for s in steps) + " |")
    lines.append("| --- |" + " --- |" * len(steps))
    for method, curve in curves.items():
        lines.append(f"| `{method}` | " + " | ".join(f"{curve[s]:.3f}" if s in curve else "–" for s in steps) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reproduction/arith/runs")), end="")
