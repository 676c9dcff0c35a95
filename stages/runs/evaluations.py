"""The evaluations a run folder holds, found and read in one shape, for `antisd report`: the loop's held-out
evaluation (`loop.eval`: one benchmark, every `loop.eval_every` steps) and suite evaluations (`loop.eval_suite`, or
`antisd eval --suite S` on a kept checkpoint).

Where each lives, in a live run folder and in one whose small files scripts/collect_run_files.sh copied out
(it flattens the held-out step summaries into the folder itself); `step_XXXX` holds the weights after XXXX + 1
updates, the base model has 0:

- `held-out`: the base model `eval_base.summary.json`, else `eval_base.json` (the numbers the loop logged, `eval/…`);
  after XXXX + 1 updates `step_XXXX/eval.summary.json`, collected as `step_XXXX.eval.summary.json`;
- suite S: `eval_base-S/summary.json` and `step_XXXX/eval-S/summary.json`, each benchmark's summary beside them.

Each evaluation is read as a suite summary (`stages.runs.suites.suite_summary`'s shape): `average` with its interval
and `per_benchmark` {name: n, problems, accuracy and its interval, `file`: that benchmark's summary, a name beside the
evaluation's file}. A held-out evaluation is a suite of one benchmark, named after the run's eval dataset, whose
average is its accuracy; its `file` is itself. Reads JSON only; no rows, no model.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.common.errors import InputError
from stages.common.io import read_json_object
from stages.common.metrics import EVAL_PREFIX
from stages.runs import suites
from stages.runs.run_dir import BASE_EVAL_NAME, EVAL_NAME

HELD_OUT = "held-out"
KINDS = (HELD_OUT, *suites.SUITES)
STEP_DIR = re.compile(r"^step_(\d+)$")
STEP_SUMMARY = suites.summary_path(f"{EVAL_NAME}.parquet").name  # eval.summary.json, in step_XXXX/
BASE_SUMMARY = suites.summary_path(f"{BASE_EVAL_NAME}.parquet").name  # eval_base.summary.json
BASE_METRICS_NAME = f"{BASE_EVAL_NAME}.json"  # the loop's record of the base model's evaluation (its eval/* numbers)
COLLECTED_STEP_SUMMARY = re.compile(rf"^step_(\d+)\.{re.escape(STEP_SUMMARY)}$")  # collect_run_files.sh's copy


def held_out_base(folder: Path) -> Path | None:
    """The held-out summary of the base model: `eval_base.summary.json`, else `eval_base.json` when it holds a
    held-out evaluation's numbers (a suite run's holds the suite average, without `eval/n`), else None."""
    summary = folder / BASE_SUMMARY
    if summary.is_file():
        return summary
    metrics = folder / BASE_METRICS_NAME
    if metrics.is_file() and {f"{EVAL_PREFIX}n", f"{EVAL_PREFIX}problems"} <= set(read_json_object(metrics)):
        return metrics
    return None


def files(folder: Path, kind: str) -> dict[int, Path]:
    """{updates: the summary file} of the evaluations of `kind` in run folder `folder`, by updates."""
    if kind == HELD_OUT:
        base, step_file = held_out_base(folder), STEP_SUMMARY
    else:
        base = suites.suite_folder(folder / BASE_EVAL_NAME, kind) / suites.SUMMARY_NAME
        base = base if base.is_file() else None
        step_file = f"{suites.suite_folder(EVAL_NAME, kind)}/{suites.SUMMARY_NAME}"
    found = {} if base is None else {0: base}
    for path in folder.iterdir():
        step, collected = STEP_DIR.match(path.name), COLLECTED_STEP_SUMMARY.match(path.name)
        if step and (path / step_file).is_file():
            found[int(step[1]) + 1] = path / step_file  # a live folder's own file wins over a collected copy
        elif collected and kind == HELD_OUT and path.is_file():
            found.setdefault(int(collected[1]) + 1, path)
    return dict(sorted(found.items()))


def kinds(folder: Path) -> list[str]:
    """The kinds of evaluation `folder` holds, in KINDS order (a lone `eval_base.json` makes none)."""
    return [kind for kind in KINDS if any(path.name != BASE_METRICS_NAME for path in files(folder, kind).values())]


def benchmark_summary(path: Path) -> dict:
    """A benchmark's eval summary (`antisd eval`'s `<prefix>.summary.json`, a suite's `<benchmark>.summary.json`), or
    the loop's `eval_base.json` read as one (its `eval/` prefix removed)."""
    summary = read_json_object(path)
    if path.name == BASE_METRICS_NAME:
        summary = {key.removeprefix(EVAL_PREFIX): value for key, value in summary.items()
                   if key.startswith(EVAL_PREFIX)}
    missing = [key for key in ("n", "problems", "accuracy", "accuracy_ci_low", "accuracy_ci_high")
               if key not in summary]
    if missing:
        raise InputError(f"{path}: not an evaluation summary (no {', '.join(missing)})")
    return summary


def read(path: Path, kind: str, benchmark: str) -> dict:
    """The evaluation in `path` as a suite summary (see the module docstring); `benchmark` names a held-out one."""
    if kind != HELD_OUT:
        summary = read_json_object(path)
        if summary.get("suite") != kind or not isinstance(summary.get("per_benchmark"), dict):
            raise InputError(f"{path}: not a summary of suite {kind} (suite {summary.get('suite')!r})")
        return summary
    single = benchmark_summary(path)
    entry = suites.benchmark_entry(single, path.name)
    return {"suite": HELD_OUT, "benchmarks": [benchmark], "average": entry["accuracy"],
            "average_ci_low": entry["accuracy_ci_low"], "average_ci_high": entry["accuracy_ci_high"],
            "per_benchmark": {benchmark: entry}}


def held_out_name(settings: dict) -> str:
    """A held-out evaluation's benchmark name: the run's eval dataset (its flattened config's `loop.eval.name`, or
    the stem of `loop.eval.path` for a user's file), else `held-out` (a folder without a manifest)."""
    if settings.get("loop.eval.path"):
        return Path(str(settings["loop.eval.path"])).stem
    return str(settings.get("loop.eval.name") or HELD_OUT)


def missing_message(folder: Path, kind: str) -> str:
    """Why `folder` has no evaluation of `kind`, and how to make one."""
    if kind == HELD_OUT:
        return (f"{folder}: no held-out evaluation (step_XXXX/{STEP_SUMMARY}, or step_XXXX.{STEP_SUMMARY} as "
                f"scripts/collect_run_files.sh copies it); the loop writes one "
                f"every loop.eval_every steps with loop.eval set")
    evaluated = suites.suite_folder(EVAL_NAME, kind)
    return (f"{folder}: no evaluation of suite {kind} (step_XXXX/{evaluated}/{suites.SUMMARY_NAME}); make one with "
            f"antisd eval "
            f"--suite {kind} --model {folder}/step_XXXX/checkpoint --out {folder}/step_XXXX/{evaluated}")
