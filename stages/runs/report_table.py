"""table.md of `antisd report`, from its report (the content of report.json): text only, every number computed by
`stages.report` before. Also the names of the Speedup's pairings that speedup.csv and the table share.
"""

from __future__ import annotations

SEED, PAIRED_MEANS, UNPAIRED_MEANS = "seed", "paired seed means", "unpaired seed means"  # speedup.csv's `pairing`


def _interval(mean: float, low: float | None, high: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if low is None else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _short(display: str) -> str:
    """A Speedup's display without its reason: `<1.25× (never)` → `<1.25×`."""
    return display.split(" (")[0]


def headline_speedup(rows: list[dict], method: str, seeds: list) -> str:
    """The table's Speedup cell: the seed-mean curves' over the paired seeds, then each seed's; or the unpaired."""
    mine = [row for row in rows if row["method"] == method]
    per_seed = [row for row in mine if row["pairing"] == SEED]
    means = next(row for row in mine if row["pairing"] != SEED)
    if means["pairing"] == UNPAIRED_MEANS:
        return f"{means['display']}; unpaired (no seed in common)"
    paired = {row["seeds"] for row in per_seed}
    unpaired = ["(none)" if seed is None else str(seed) for seed in seeds if str(seed) not in paired]
    detail = f"seed {per_seed[0]['seeds']}" if len(per_seed) == 1 else \
        "seeds " + ", ".join(f"{row['seeds']}: {_short(row['display'])}" for row in per_seed)
    return f"{means['display']}; {detail}" + (f"; unpaired {', '.join(unpaired)}" if unpaired else "")


def _table_one(report: dict, columns: list[str]) -> list[str]:
    baseline, spreads = report["baseline"], {(row["method"], row["score"]): row for row in report["methods"]}
    lines = ["| method | seeds | " + " | ".join(columns) + f" | best updates | Speedup vs {baseline} |",
             "| --- | --- |" + " --- |" * (len(columns) + 2)]
    for method, seeds in report["groups"].items():
        cells = [_interval(spreads[(method, name)]["mean"], spreads[(method, name)]["ci_low"],
                           spreads[(method, name)]["ci_high"]) for name in columns]
        best = ", ".join(str(row["best_updates"]) for row in report["runs"] if row["method"] == method)
        speed = "–" if method == baseline else headline_speedup(report["speedup"], method, seeds)
        lines.append(f"| `{method}` | {len(seeds)} | " + " | ".join(cells) + f" | {best} | {speed} |")
    return lines


def _runs_and_curves(report: dict, columns: list[str]) -> list[str]:
    lines = ["", "## Runs (at the best-average checkpoint; each value with its 95% bootstrap interval over problems)",
             "", "| run | method | seed | best updates | " + " | ".join(columns) + " |",
             "| --- | --- | --- | --- |" + " --- |" * len(columns)]
    for row in report["runs"]:
        cells = " | ".join(_interval(row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"], 4) for name in columns)
        lines.append(f"| {row['run']} | `{row['method']}` | {row['seed']} | {row['best_updates']} | {cells} |")
    means = report["mean_curves"]
    updates = sorted({u for curve in means.values() for u in curve})
    lines += ["", "## Average by updates (mean over each method's seeds; every run's in curves.csv)", "",
              "| method | " + " | ".join(str(u) for u in updates) + " |", "| --- |" + " --- |" * len(updates)]
    for method, curve in means.items():
        lines.append(f"| `{method}` | " + " | ".join(f"{curve[u]:.4f}" if u in curve else "" for u in updates) + " |")
    return lines


def _speedups(report: dict) -> list[str]:
    lines = ["", f"## Speedup over `{report['baseline']}`", "",
             "| method | pairing | seeds | baseline best updates (g) | baseline best average | first updates "
             "reaching it (u) | last evaluated updates | Speedup g/u |", "| --- |" + " --- |" * 7]
    for row in report["speedup"]:
        reached = "never" if row["reached_updates"] is None else row["reached_updates"]
        lines.append(f"| `{row['method']}` | {row['pairing']} | {row['seeds']} | {row['baseline_updates']} | "
                     f"{row['baseline_score']:.4f} | {reached} | {row['last_updates']} | {row['display']} |")
    return lines


def _pass_at_k_section(report: dict) -> list[str]:
    figure = report["pass_at_k"]
    ks = figure["ks"]
    shown = [k for k in ks if k & (k - 1) == 0 or k == ks[-1]]
    lines = ["", f"## pass@k on {figure['benchmark']} (mean over seeds, best checkpoints; every k in pass_at_k.csv)",
             ""]
    if figure["without_counts"]:
        lines += [f"{len(figure['without_counts'])} of the {len(figure['files'])} summaries read hold no per-problem "
                  "counts (`correct_per_problem`, which antisd writes since issue 24): pass@k is the value they "
                  f"store, at k = {', '.join(map(str, ks))}.", ""]
    if report["protocol"][figure["benchmark"]]["n"] == 1:
        lines += ["One sample per problem (n = 1): pass@1 is the accuracy.", ""]
    lines += ["| method | " + " | ".join(f"pass@{k}" for k in shown) + " |", "| --- |" + " --- |" * len(shown)]
    for method in report["groups"]:
        means = {row["k"]: row["pass_at_k"] for row in figure["rows"] if row["method"] == method
                 and row["run"] == "mean"}
        lines.append(f"| `{method}` | " + " | ".join(f"{means[k]:.4f}" for k in shown) + " |")
    return lines


def markdown(report: dict) -> str:
    """table.md: Table 1, the runs, the seed-mean curves, the Speedups and pass@k, then the sources."""
    benchmarks, baseline = report["benchmarks"], report["baseline"]
    columns = [*benchmarks, "average"] if len(benchmarks) > 1 else benchmarks  # one benchmark: it is the average
    protocol = ", ".join(f"{name} avg@{entry['n']} over {entry['problems']} problems"
                         for name, entry in report["protocol"].items())
    lines = [f"# {report['title']}: best-average checkpoint per run", "", f"Evaluated: {protocol}.", "",
             "Accuracy (avg@n) at each run's best-average checkpoint, counted in updates (optimizer steps done; 0 = "
             "the base model, `step_XXXX` holds the weights after XXXX + 1); per method the mean over seeds with its "
             f"95% t interval over seeds. Speedup over `{baseline}`: g ÷ u, g = its best-average updates, u = the "
             "first updates at which the method reaches that average, on the seed-mean curves of the seeds both ran, "
             "then each seed's; `<x×`: never reached within the L evaluated updates, so below g/L "
             "(stages/method/comparison.py).", ""]
    lines += _table_one(report, columns) + _runs_and_curves(report, columns) + _speedups(report)
    lines += _pass_at_k_section(report)
    lines += ["", "## Sources", ""] + [f"- `{source}`" for source in report["sources"]]
    return "\n".join(lines) + "\n"
