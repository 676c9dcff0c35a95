"""`antisd report`: the paper's Table 1, its Speedup and its pass@k figure, from the suite evaluations of several runs
(methods × seeds).

Reads, per run folder, its manifest (config.yaml or run.json: method from `update.method`, seed from `loop.seed`, as
`antisd plot` reads them; runs of one method whose configs differ in more than the seed become separate groups) and
its evaluations of suite SUITE: `RUN/eval_base-SUITE/summary.json` (the base model, 0 updates) and
`RUN/step_XXXX/eval-SUITE/summary.json` (after XXXX + 1 updates), as the loop writes them (`loop.eval_suite`) and
`antisd eval --suite SUITE --model RUN/step_XXXX/checkpoint --out RUN/step_XXXX/eval-SUITE` does for a kept
checkpoint; for the pass@k figure also the benchmark's `<benchmark>.summary.json` beside the best checkpoint's
summary. Every evaluation must cover the same benchmarks with the same n and problem count.

Writes to the folder OUT, every number recomputable from the files listed under "Sources" in table.md (and
`sources` in report.json): table.md (Table 1: per method the best-average checkpoint's per-benchmark accuracies and
average, mean over seeds with the 95% t interval over seeds, and the Speedup over the baseline; then per run, the
Speedups, the pass@k values); runs.csv, methods.csv, speedup.csv, pass_at_k.csv; pass_at_k.png; report.json.

Best checkpoint, Speedup, seed spread and pass@k are `stages.method.comparison`'s. The Speedup is paired by seed
where the baseline ran the method's seed, and computed over seed-mean curves (each group's mean over its seeds at the
updates all of them evaluated) always; the table shows the paired one when every seed has a partner.
This module reads summaries only: no rows, no model, no sampling.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stages.common import validation
from stages.common.errors import InputError
from stages.common.figures import draw_pass_at_k, to_csv
from stages.common.io import atomic_write_json, atomic_write_text, check_output, output_lock, read_json_object
from stages.method import comparison
from stages.runs import suites

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class ReportConfig:
    """Options of `antisd report`."""

    runs: tuple[str, ...]  # run folders
    out: str  # output folder
    baseline: str = "grpo"  # the method (group) the Speedup is measured against
    suite: str = "paper"  # whose evaluations are read (RUN/step_XXXX/eval-SUITE)
    pass_at_k: str = "hmmt_feb25"  # the benchmark of the pass@k figure
    labels: tuple[str, ...] = ()  # one group name per run, overriding the method of its manifest
    overwrite: bool = False

    def __post_init__(self):
        check = validation.Checks(self)
        check.require(bool(self.runs), "runs", "give at least one run folder")
        check.choice("suite", suites.SUITES)
        if self.suite in suites.SUITES:
            check.choice("pass_at_k", suites.SUITES[self.suite].names)
        check.require(not self.labels or len(self.labels) == len(self.runs), "labels",
                      f"given {len(self.labels)} times for {len(self.runs)} runs (give one per run)")
        check.done()


@dataclass
class RunEvals:
    """One run folder: its group, seed and suite summaries by updates."""

    name: str
    method: str
    seed: int | None
    settings: dict
    summaries: dict[int, dict]  # updates → suite summary
    files: dict[int, Path]  # updates → that summary's path


# --- reading -----------------------------------------------------------------------------------------------------

def read_run(path: str, label: str | None, suite: str) -> RunEvals:
    from stages.plot import read_manifest, run_identity

    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such run folder")
    method, seed, settings = run_identity(folder, label)
    files = {0: folder / f"eval_base-{suite}" / suites.SUMMARY_NAME} if (folder / f"eval_base-{suite}").is_dir() else {}
    for step_dir in folder.iterdir():
        match = STEP_DIR.match(step_dir.name)
        if match and (step_dir / f"eval-{suite}" / suites.SUMMARY_NAME).is_file():
            files[int(match[1]) + 1] = step_dir / f"eval-{suite}" / suites.SUMMARY_NAME
    files = {u: files[u] for u in sorted(files) if files[u].is_file()}
    if not files:
        raise InputError(f"{folder}: no evaluation of suite {suite} (step_XXXX/eval-{suite}/summary.json); make "
                         f"one with antisd eval --suite {suite} --model {folder}/step_XXXX/checkpoint --out "
                         f"{folder}/step_XXXX/eval-{suite}")
    summaries = {u: _checked_summary(file, suite) for u, file in files.items()}
    if not read_manifest(folder):
        log.warning("%s: no config.yaml or run.json; method %s and seed %s come from its name", folder, method, seed)
    return RunEvals(folder.name, method, seed, settings, summaries, files)


def _checked_summary(file: Path, suite: str) -> dict:
    summary = read_json_object(file)
    if summary.get("suite") != suite or not isinstance(summary.get("per_benchmark"), dict):
        raise InputError(f"{file}: not a summary of suite {suite} (suite {summary.get('suite')!r})")
    return summary


def check_protocols(runs: list[RunEvals]) -> None:
    """Every evaluation covers the same benchmarks with the same n and problem count (InputError naming a file)."""
    reference, where = None, None
    for run in runs:
        for updates, summary in run.summaries.items():
            shape = {name: (entry["n"], entry["problems"]) for name, entry in summary["per_benchmark"].items()}
            if reference is None:
                reference, where = shape, run.files[updates]
            elif shape != reference:
                raise InputError(f"{run.files[updates]}: evaluated {shape} (benchmark: (n, problems)), but {where} "
                                 f"{reference}; compare runs evaluated alike")


def group_runs(runs: list[RunEvals]) -> list[RunEvals]:
    """Group names as `antisd plot` makes them: the method, plus the settings that differ beyond the seed."""
    from stages.plot import RunMetrics, split_by_settings

    named = split_by_settings([RunMetrics(r.name, r.method, r.seed, [], r.settings) for r in runs])
    for run, grouped in zip(runs, named):
        run.method = grouped.method
    return runs


# --- computing ---------------------------------------------------------------------------------------------------

def curve(run: RunEvals) -> dict[int, float]:
    return {updates: summary["average"] for updates, summary in run.summaries.items()}


def best_row(run: RunEvals) -> dict:
    updates, average = comparison.best_checkpoint(curve(run))
    per_benchmark = run.summaries[updates]["per_benchmark"]
    return {"run": run.name, "method": run.method, "seed": "" if run.seed is None else run.seed,
            "best_updates": updates, **{name: entry["accuracy"] for name, entry in per_benchmark.items()},
            "average": average, "summary": str(run.files[updates])}


def method_rows(groups: dict[str, list[RunEvals]], benchmarks: list[str]) -> list[dict]:
    rows = []
    for method, members in groups.items():
        bests = [best_row(run) for run in members]
        for column in [*benchmarks, "average"]:
            spread = comparison.seed_spread([best[column] for best in bests])
            rows.append({"method": method, "score": column, "seeds": spread.seeds, "mean": spread.mean,
                         "std": spread.std, "ci_low": spread.low, "ci_high": spread.high,
                         "values": " ".join(f"{best[column]:.4f}" for best in bests)})
    return rows


def speedup_rows(groups: dict[str, list[RunEvals]], baseline: str) -> list[dict]:
    """Per method but the baseline: one row per seed the baseline also ran (paired), and one over seed means."""
    rows = []
    partners = {run.seed: run for run in groups[baseline] if run.seed is not None}
    for method, members in groups.items():
        if method == baseline:
            continue
        pairs = [(f"seed {run.seed}", curve(partners[run.seed]), curve(run)) for run in members
                 if run.seed in partners]
        pairs.append(("seed means", comparison.mean_curve([curve(r) for r in groups[baseline]]),
                      comparison.mean_curve([curve(r) for r in members])))
        for pairing, base_curve, method_curve in pairs:
            rows.append({"method": method, "pairing": pairing, **asdict(comparison.speedup(base_curve, method_curve))})
    return rows


def headline_speedup(rows: list[dict], method: str, seeds: list) -> str:
    """The table's Speedup cell: paired when every seed has a baseline partner (the mean of the values when all are
    defined, with each seed's), else the seed-mean curves' (marked so)."""
    paired = [row for row in rows if row["method"] == method and row["pairing"] != "seed means"]
    if paired and len(paired) == len(seeds):
        detail = ", ".join(f"{row['pairing'].removeprefix('seed ')}: {row['display']}" for row in paired)
        values = [row["value"] for row in paired]
        if all(value is not None for value in values):
            return f"{sum(values) / len(values):.2f}× (seeds {detail})"
        return f"seeds {detail}"
    mean_row = next(row for row in rows if row["method"] == method and row["pairing"] == "seed means")
    return f"{mean_row['display']} (seed means)"


def pass_at_k_rows(groups: dict[str, list[RunEvals]], benchmark: str) -> tuple[list[dict], dict, list[Path]]:
    """pass@k (k = 1…n) of `benchmark` at each run's best checkpoint: CSV rows, {group: [curve per run]}, files."""
    rows, curves, files = [], {}, []
    for method, members in groups.items():
        for run in members:
            updates = best_row(run)["best_updates"]
            file = run.files[updates].parent / run.summaries[updates]["per_benchmark"][benchmark]["file"]
            summary = read_json_object(file)
            values = comparison.pass_at_k_curve(list(summary["correct_per_problem"].values()), summary["n"])
            curves.setdefault(method, []).append(np.array(values))
            files.append(file)
            rows += [{"method": method, "run": run.name, "seed": "" if run.seed is None else run.seed,
                      "updates": updates, "k": k, "pass_at_k": value} for k, value in enumerate(values, 1)]
        mean = np.mean(curves[method], axis=0)
        rows += [{"method": method, "run": "mean", "seed": "", "updates": "", "k": k, "pass_at_k": float(value)}
                 for k, value in enumerate(mean, 1)]
    return rows, curves, files


# --- writing -----------------------------------------------------------------------------------------------------

def _cell(row: dict) -> str:
    if row["ci_low"] is None:
        return f"{row['mean']:.3f}"
    return f"{row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def markdown(report: dict) -> str:
    """table.md: Table 1, the runs, the Speedups and pass@k at a few k, then the sources."""
    benchmarks, baseline = report["benchmarks"], report["baseline"]
    spreads = {(row["method"], row["score"]): row for row in report["methods"]}
    lines = [f"# Suite {report['suite']}: best-average checkpoint per run", "",
             "Accuracy (avg@n) at each run's best-average checkpoint; per method the mean over seeds with its 95% t "
             f"interval over seeds. Speedup over `{baseline}`: its best-average updates ÷ the first updates at which "
             "the method reaches that average (stages/method/comparison.py).", "",
             "| method | seeds | " + " | ".join(benchmarks) + f" | average | best updates | Speedup vs {baseline} |",
             "| --- | --- |" + " --- |" * (len(benchmarks) + 3)]
    for method, members in report["groups"].items():
        cells = [_cell(spreads[(method, name)]) for name in [*benchmarks, "average"]]
        best = ", ".join(str(row["best_updates"]) for row in report["runs"] if row["method"] == method)
        speed = "–" if method == baseline else headline_speedup(report["speedup"], method, members)
        lines.append(f"| `{method}` | {len(members)} | " + " | ".join(cells) + f" | {best} | {speed} |")
    lines += ["", "## Runs", "", "| run | method | seed | best updates | " + " | ".join(benchmarks) + " | average |",
              "| --- | --- | --- | --- |" + " --- |" * (len(benchmarks) + 1)]
    for row in report["runs"]:
        scores = " | ".join(f"{row[name]:.4f}" for name in [*benchmarks, "average"])
        lines.append(f"| {row['run']} | `{row['method']}` | {row['seed']} | {row['best_updates']} | {scores} |")
    lines += ["", f"## Speedup over `{baseline}`", "",
              "| method | pairing | baseline best updates (g) | baseline best average | first updates reaching it (u) "
              "| last evaluated updates | Speedup g/u |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["speedup"]:
        reached = "never" if row["reached_updates"] is None else row["reached_updates"]
        lines.append(f"| `{row['method']}` | {row['pairing']} | {row['baseline_updates']} | "
                     f"{row['baseline_score']:.4f} | {reached} | {row['last_updates']} | {row['display']} |")
    ks = sorted({row["k"] for row in report["pass_at_k"]})
    shown = [k for k in ks if k & (k - 1) == 0 or k == ks[-1]]
    lines += ["", f"## pass@k on {report['pass_at_k_benchmark']} (mean over seeds, best checkpoints; all k in "
              "pass_at_k.csv)", "", "| method | " + " | ".join(f"pass@{k}" for k in shown) + " |",
              "| --- |" + " --- |" * len(shown)]
    for method in report["groups"]:
        means = {row["k"]: row["pass_at_k"] for row in report["pass_at_k"] if row["method"] == method
                 and row["run"] == "mean"}
        lines.append(f"| `{method}` | " + " | ".join(f"{means[k]:.4f}" for k in shown) + " |")
    lines += ["", "## Sources", ""] + [f"- `{source}`" for source in report["sources"]]
    return "\n".join(lines) + "\n"


def run(config: ReportConfig) -> Path:
    """Read the runs, compute the report, write it to the folder `config.out`; return the folder."""
    out = check_output(config.out, config.overwrite, kind="folder")
    labels = config.labels or (None,) * len(config.runs)
    runs = group_runs([read_run(path, label, config.suite) for path, label in zip(config.runs, labels)])
    check_protocols(runs)
    groups: dict[str, list[RunEvals]] = {}
    for item in sorted(runs, key=lambda r: (r.method != config.baseline, r.method, r.seed is None, r.seed or 0)):
        groups.setdefault(item.method, []).append(item)
    if config.baseline not in groups:
        raise InputError(f"--baseline {config.baseline}: no such method among the runs (found: {', '.join(groups)})")
    benchmarks = list(suites.SUITES[config.suite].names)
    pass_rows, curves, pass_files = pass_at_k_rows(groups, config.pass_at_k)
    report = {
        "suite": config.suite, "baseline": config.baseline, "benchmarks": benchmarks,
        "groups": {method: [run.seed for run in members] for method, members in groups.items()},
        "runs": [best_row(run) for members in groups.values() for run in members],
        "methods": method_rows(groups, benchmarks),
        "speedup": speedup_rows(groups, config.baseline),
        "pass_at_k_benchmark": config.pass_at_k, "pass_at_k": pass_rows,
        "curves": {run.name: curve(run) for members in groups.values() for run in members},
        "sources": sorted({str(file) for members in groups.values() for run in members
                           for file in run.files.values()} | {str(file) for file in pass_files}),
    }
    out.mkdir(exist_ok=True)
    with output_lock(out):
        tables = {"runs.csv": (report["runs"], ["run", "method", "seed", "best_updates", *benchmarks, "average",
                                                "summary"]),
                  "methods.csv": (report["methods"], ["method", "score", "seeds", "mean", "std", "ci_low", "ci_high",
                                                      "values"]),
                  "speedup.csv": (report["speedup"], ["method", "pairing", "baseline_updates", "baseline_score",
                                                      "reached_updates", "last_updates", "value", "display"]),
                  "pass_at_k.csv": (pass_rows, ["method", "run", "seed", "updates", "k", "pass_at_k"])}
        for name, (rows, columns) in tables.items():
            atomic_write_text(out / name, to_csv(rows, columns))
        draw_pass_at_k(curves, f"pass@k on {config.pass_at_k} (best-average checkpoints)", out / "pass_at_k.png")
        atomic_write_text(out / "table.md", markdown(report))
        atomic_write_json(out / "report.json", report)
    log.info("report of %d runs in %d groups → %s", len(runs), len(groups), out)
    return out
