"""`antisd report`: the paper's Table 1, its Speedup and its pass@k figure, from the evaluations of several runs
(methods × seeds): suite evaluations (the paper's five benchmarks) or the loop's held-out evaluation.

Reads, per run folder, its manifest (config.yaml or run.json: method from `update.method`, seed from `loop.seed`, as
`antisd plot` reads them; without `--label`, runs of one method whose configs differ in more than the seed become
separate groups) and its evaluations of one kind, live or as scripts/collect_run_files.sh copies them
(`stages.runs.evaluations` says where each lives): `held-out`, the loop's evaluation of `loop.eval` (one benchmark),
or suite S (`loop.eval_suite`, `antisd eval --suite`). `--evaluation auto` takes the one kind every run holds and
asks for a choice when they hold several. Every evaluation must cover the same benchmarks with the same n and
problem count.

Writes to the folder OUT, every number recomputable from the files listed under "Sources" in table.md (and
`sources` in report.json): table.md (Table 1: per method the best-average checkpoint's accuracies, mean over seeds
with the 95% t interval over seeds, and the Speedup over the baseline; then the runs, the seed-mean curves, the
Speedups, pass@k); runs.csv, methods.csv, speedup.csv, curves.csv, pass_at_k.csv; pass_at_k.png, curves.png;
report.json.

Best checkpoint, Speedup, seed spread and pass@k are `stages.method.comparison`'s. The Speedup is computed per seed
the baseline also ran, and over the seed-mean curves of those paired seeds (each group's mean over them at the
updates all of them evaluated), the table's headline; when no seed pairs, over all seeds of both, marked unpaired.
pass@k at the best checkpoints: every k = 1…n from the per-problem counts, or the k a summary stores when it has none
(older summaries; the table says which). This module reads summaries only: no rows, no model, no sampling.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stages.common import validation
from stages.common.errors import InputError
from stages.common.figures import draw_curves, draw_pass_at_k, to_csv
from stages.common.io import atomic_write_json, atomic_write_text, check_output, output_lock
from stages.method import comparison
from stages.runs import evaluations, suites
from stages.runs.report_table import PAIRED_MEANS, SEED, UNPAIRED_MEANS, markdown
from stages.verifier import scores

log = logging.getLogger(__name__)

AUTO = "auto"
PAPER_PASS_AT_K = "hmmt_feb25"  # the benchmark of the paper's pass@k figure; the default where it was evaluated


@dataclass(frozen=True)
class ReportConfig:
    """Options of `antisd report`."""

    runs: tuple[str, ...]  # run folders
    out: str  # output folder
    baseline: str = "grpo"  # the method (group) the Speedup is measured against
    evaluation: str = AUTO  # whose evaluations are read: auto | held-out | a suite (stages.runs.evaluations)
    pass_at_k: str | None = None  # the pass@k figure's benchmark; None: hmmt_feb25 where evaluated, else the first
    labels: tuple[str, ...] = ()  # one group name per run, overriding the method of its manifest
    overwrite: bool = False

    def __post_init__(self):
        check = validation.Checks(self)
        check.require(bool(self.runs), "runs", "give at least one run folder")
        check.choice("evaluation", (AUTO, *evaluations.KINDS))
        if self.evaluation in suites.SUITES and self.pass_at_k is not None:
            check.choice("pass_at_k", suites.SUITES[self.evaluation].names)
        check.require(not self.labels or len(self.labels) == len(self.runs), "labels",
                      f"given {len(self.labels)} times for {len(self.runs)} runs (give one per run)")
        check.done()


@dataclass
class RunEvals:
    """One run folder: its group, seed and evaluations (each read as a suite summary) by updates."""

    name: str
    method: str
    seed: int | None
    settings: dict
    summaries: dict[int, dict]  # updates → evaluation summary
    files: dict[int, Path]  # updates → that summary's path

    @property
    def curve(self) -> dict[int, float]:
        return {updates: summary["average"] for updates, summary in self.summaries.items()}

    @property
    def best(self) -> tuple[int, float]:
        return comparison.best_checkpoint(self.curve)


# --- reading -----------------------------------------------------------------------------------------------------

def choose_evaluation(folders: list[Path], requested: str) -> str:
    """`requested`, or with AUTO the one kind of evaluation every folder holds (InputError when none or several)."""
    if requested != AUTO:
        return requested
    held = {folder: evaluations.kinds(folder) for folder in folders}
    common = [kind for kind in evaluations.KINDS if all(kind in kinds for kinds in held.values())]
    if len(common) == 1:
        return common[0]
    if common:
        raise InputError(f"--evaluation: every run holds several evaluations ({', '.join(common)}); pick one")
    found = "; ".join(f"{folder}: {', '.join(kinds) or 'none'}" for folder, kinds in held.items())
    raise InputError(f"--evaluation: no kind of evaluation is held by every run ({found})")


def read_run(folder: Path, label: str | None, kind: str) -> RunEvals:
    from stages.plot import read_manifest, run_identity

    method, seed, settings = run_identity(folder, label)
    files = evaluations.files(folder, kind)
    if not files:
        raise InputError(evaluations.missing_message(folder, kind))
    benchmark = evaluations.held_out_name(settings)
    summaries = {updates: evaluations.read(file, kind, benchmark) for updates, file in files.items()}
    if not read_manifest(folder):
        log.warning("%s: no config.yaml or run.json; method %s and seed %s come from its name", folder, method, seed)
    return RunEvals(folder.name, method, seed, settings, summaries, files)


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


def group_runs(runs: list[RunEvals], baseline: str, labelled: bool) -> dict[str, list[RunEvals]]:
    """{group: its runs}, the baseline first, then by name and seed. Unlabelled runs are named as `antisd plot`
    names them (the method, plus the settings that differ beyond the seed). A seed may appear once per group."""
    from stages.plot import RunMetrics, split_by_settings

    if not labelled:
        named = split_by_settings([RunMetrics(r.name, r.method, r.seed, [], r.settings) for r in runs])
        for run, grouped in zip(runs, named):
            run.method = grouped.method
    groups: dict[str, list[RunEvals]] = {}
    for run in sorted(runs, key=lambda r: (r.method != baseline, r.method, r.seed is None, r.seed or 0)):
        twin = next((other for other in groups.get(run.method, [])
                     if (run.seed is not None and other.seed == run.seed) or other.name == run.name), None)
        if twin is not None:
            raise InputError(f"{run.name}: a second run of {run.method} with seed {run.seed} (or folder name) besides "
                             f"{twin.name}; give the runs --label to tell them apart")
        groups.setdefault(run.method, []).append(run)
    if baseline not in groups:
        raise InputError(f"--baseline {baseline}: no such method among the runs (found: {', '.join(groups)})")
    return groups


def pass_at_k_benchmark(requested: str | None, benchmarks: list[str], kind: str) -> str:
    if requested is None:
        return PAPER_PASS_AT_K if PAPER_PASS_AT_K in benchmarks else benchmarks[0]
    if requested not in benchmarks:
        raise InputError(f"--pass-at-k {requested}: not a benchmark of the {kind} evaluation "
                         f"(its benchmarks: {', '.join(benchmarks)})")
    return requested


# --- computing ---------------------------------------------------------------------------------------------------

def _seed(run: RunEvals) -> int | str:
    return "" if run.seed is None else run.seed


def best_row(run: RunEvals) -> dict:
    """The run at its best-average checkpoint: each benchmark's accuracy and interval, the average and its interval."""
    updates, average = run.best
    summary = run.summaries[updates]
    row = {"run": run.name, "method": run.method, "seed": _seed(run), "best_updates": updates}
    for name, entry in summary["per_benchmark"].items():
        row |= {name: entry["accuracy"], f"{name}_ci_low": entry["accuracy_ci_low"],
                f"{name}_ci_high": entry["accuracy_ci_high"]}
    return row | {"average": average, "average_ci_low": summary["average_ci_low"],
                  "average_ci_high": summary["average_ci_high"], "summary": str(run.files[updates])}


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


def curve_rows(groups: dict[str, list[RunEvals]]) -> list[dict]:
    """Every evaluation of every run: its average (the Speedup's curve) and interval, and its file."""
    return [{"run": run.name, "method": method, "seed": _seed(run), "updates": updates, "average": summary["average"],
             "average_ci_low": summary["average_ci_low"], "average_ci_high": summary["average_ci_high"],
             "summary": str(run.files[updates])}
            for method, members in groups.items() for run in members for updates, summary in run.summaries.items()]


def _speedup_row(method: str, pairing: str, baseline_runs: list[RunEvals], method_runs: list[RunEvals]) -> dict:
    result = comparison.speedup(comparison.mean_curve([run.curve for run in baseline_runs]),
                                comparison.mean_curve([run.curve for run in method_runs]))
    return {"method": method, "pairing": pairing, "seeds": " ".join(str(_seed(run)) for run in method_runs),
            "baseline_seeds": " ".join(str(_seed(run)) for run in baseline_runs), **asdict(result)}


def speedup_rows(groups: dict[str, list[RunEvals]], baseline: str) -> list[dict]:
    """Per method but the baseline: a row per seed the baseline also ran, then one over the seed-mean curves of those
    paired seeds; over all seeds of both (unpaired) when none pairs."""
    partners = {run.seed: run for run in groups[baseline] if run.seed is not None}
    rows = []
    for method, members in groups.items():
        if method == baseline:
            continue
        paired = [run for run in members if run.seed in partners]
        rows += [_speedup_row(method, SEED, [partners[run.seed]], [run]) for run in paired]
        if paired:
            rows.append(_speedup_row(method, PAIRED_MEANS, [partners[run.seed] for run in paired], paired))
        else:
            rows.append(_speedup_row(method, UNPAIRED_MEANS, groups[baseline], members))
    return rows


@dataclass
class PassAtK:
    """pass@k of one benchmark at each run's best checkpoint, at the k every run's summary gives."""

    benchmark: str
    ks: list[int]
    rows: list[dict]  # pass_at_k.csv
    curves: dict[str, list[np.ndarray]]  # group → its runs' pass@k at ks
    files: list[Path]  # the benchmark summaries read
    without_counts: list[Path]  # those of them holding no per-problem counts (their stored k only)


def pass_at_k(groups: dict[str, list[RunEvals]], benchmark: str) -> PassAtK:
    values, files, without_counts = {}, [], []
    for members in groups.values():
        for run in members:
            updates = run.best[0]
            file = run.files[updates].parent / run.summaries[updates]["per_benchmark"][benchmark]["file"]
            summary = evaluations.benchmark_summary(file)
            values[run.name] = scores.pass_at_k_values(summary)
            files.append(file)
            if not summary.get("correct_per_problem"):
                without_counts.append(file)
    ks = sorted(set.intersection(*(set(by_k) for by_k in values.values())))
    rows, curves = [], {}
    for method, members in groups.items():
        curves[method] = [np.array([values[run.name][k] for k in ks]) for run in members]
        rows += [{"method": method, "run": run.name, "seed": _seed(run), "updates": run.best[0], "k": k,
                  "pass_at_k": values[run.name][k]} for run in members for k in ks]
        mean = np.mean(curves[method], axis=0)
        rows += [{"method": method, "run": "mean", "seed": "", "updates": "", "k": k, "pass_at_k": float(value)}
                 for k, value in zip(ks, mean)]
    return PassAtK(benchmark, ks, rows, curves, files, without_counts)


# --- writing -----------------------------------------------------------------------------------------------------

def _title(kind: str) -> str:
    return "Held-out evaluation" if kind == evaluations.HELD_OUT else f"Suite {kind}"


def build_report(kind: str, protocol: dict, baseline: str, groups: dict[str, list[RunEvals]], figure: PassAtK) -> dict:
    benchmarks = list(protocol)
    return {
        "evaluation": kind, "title": _title(kind), "baseline": baseline, "benchmarks": benchmarks,
        "protocol": protocol,
        "groups": {method: [run.seed for run in members] for method, members in groups.items()},
        "runs": [best_row(run) for members in groups.values() for run in members],
        "methods": method_rows(groups, benchmarks),
        "speedup": speedup_rows(groups, baseline),
        "pass_at_k": {"benchmark": figure.benchmark, "ks": figure.ks, "rows": figure.rows,
                      "files": [str(file) for file in figure.files],
                      "without_counts": [str(file) for file in figure.without_counts]},
        "curves": {run.name: run.curve for members in groups.values() for run in members},
        "mean_curves": {method: comparison.mean_curve([run.curve for run in members])
                        for method, members in groups.items()},
        "sources": sorted({str(file) for members in groups.values() for run in members
                           for file in run.files.values()} | {str(file) for file in figure.files}),
    }


def write_report(out: Path, report: dict, groups: dict[str, list[RunEvals]], figure: PassAtK) -> None:
    runs_columns = ["run", "method", "seed", "best_updates"]
    for name in report["benchmarks"]:
        runs_columns += [name, f"{name}_ci_low", f"{name}_ci_high"]
    tables = {
        "runs.csv": (report["runs"], [*runs_columns, "average", "average_ci_low", "average_ci_high", "summary"]),
        "methods.csv": (report["methods"], ["method", "score", "seeds", "mean", "std", "ci_low", "ci_high", "values"]),
        "speedup.csv": (report["speedup"], ["method", "pairing", "seeds", "baseline_seeds", "baseline_updates",
                                            "baseline_score", "reached_updates", "last_updates", "value", "display"]),
        "curves.csv": (curve_rows(groups), ["run", "method", "seed", "updates", "average", "average_ci_low",
                                            "average_ci_high", "summary"]),
        "pass_at_k.csv": (figure.rows, ["method", "run", "seed", "updates", "k", "pass_at_k"]),
    }
    for name, (rows, columns) in tables.items():
        atomic_write_text(out / name, to_csv(rows, columns))
    panel = f"{report['title']}: average" if len(report["benchmarks"]) > 1 else \
        f"{report['title']}: {report['benchmarks'][0]} accuracy"
    draw_curves({panel: {method: [(np.array(list(run.curve)), np.array(list(run.curve.values()))) for run in members]
                         for method, members in groups.items()}}, "minmax", out / "curves.png", base_step=0,
                xlabel="updates")
    draw_pass_at_k(figure.ks, figure.curves, f"pass@k on {figure.benchmark} (best-average checkpoints)",
                   out / "pass_at_k.png")
    atomic_write_text(out / "table.md", markdown(report))
    atomic_write_json(out / "report.json", report)


def run(config: ReportConfig) -> Path:
    """Read the runs, compute the report, write it to the folder `config.out`; return the folder."""
    out = check_output(config.out, config.overwrite, kind="folder")
    folders = [Path(path) for path in config.runs]
    missing = next((folder for folder in folders if not folder.is_dir()), None)
    if missing is not None:
        raise InputError(f"{missing}: no such run folder")
    kind = choose_evaluation(folders, config.evaluation)
    labels = config.labels or (None,) * len(folders)
    runs = [read_run(folder, label, kind) for folder, label in zip(folders, labels)]
    check_protocols(runs)
    groups = group_runs(runs, config.baseline, labelled=bool(config.labels))
    protocol = {name: {"n": entry["n"], "problems": entry["problems"]}  # every evaluation's (check_protocols)
                for name, entry in next(iter(runs[0].summaries.values()))["per_benchmark"].items()}
    figure = pass_at_k(groups, pass_at_k_benchmark(config.pass_at_k, list(protocol), kind))
    report = build_report(kind, protocol, config.baseline, groups, figure)
    out.mkdir(exist_ok=True)
    with output_lock(out):
        write_report(out, report, groups, figure)
    log.info("report of %d runs in %d groups (%s evaluation) → %s", len(runs), len(groups), kind, out)
    return out
