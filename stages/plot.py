"""`antisd plot`: training curves of run folders (PNG or SVG, drawn by `stages.common.figures`) or a tidy CSV.

`antisd plot runs/A runs/B …` reads each run folder's `metrics.jsonl` (one JSON object per step) and its manifest
(`run.json` or `config.yaml`) and draws one panel per metric, one thin line per run; runs of the same method are
grouped, with their mean and a band (min–max, or ±1 std) over the steps every run of the group logged. A metric
logged only on some steps (eval every k steps) is drawn through the points present. `--format csv` writes the same
data as a tidy table (run, method, seed, step, metric, value) instead; such a CSV is also accepted in place of run
folders, so a committed figure can be redrawn from its committed table (its groups are its `method` column).

A run folder's `eval_base.json` (the loop's evaluation of the base model) becomes a record at step −1 holding its
`eval/*` values, so held-out curves start at the model the run started from. A metric whose values are all 0 or 1
(gate/open, gate/warmup) is drawn as steps, not slopes. Runs of one method that differ in a setting are told apart
by the settings that differ, each key a run config leaves out read at its default.

A run's method: `--label` if given, else the manifest's `config.update.method` (or `update.method`, `method`; a loop
manifest without it means the update stage's default), else the folder name without a trailing seed suffix
(`antisd-s1` → `antisd`). Its seed: `config.loop.seed` (or `loop.seed`, `config.seed`, `seed`), else that suffix.

This module reads run folders and decides what to draw; it draws nothing itself.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.common import metrics as keys
from stages.common import validation
from stages.common.errors import InputError
from stages.common.figures import draw_curves, to_csv
from stages.common.io import atomic_write_text, read_json_object, read_text_file

log = logging.getLogger(__name__)

# the gate's statistic is the teacher's median entropy under the paper's text, its mean perplexity under the authors'
# code (METHOD §9): the default panels leave out what no run logged, so each run shows the one it has
DEFAULT_METRICS = (keys.REWARD_MEAN, keys.EVAL_ACCURACY, keys.LENGTH_MEAN, keys.TEACHER_ENTROPY_MEDIAN,
                   keys.TEACHER_PPL_MEAN, keys.GATE_LAMBDA, keys.GATE_OPEN, keys.PMI_ANTISD_TERM_MEAN)
MANIFESTS = ("run.json", "config.yaml")
IMAGE_FORMATS = ("png", "svg")
FORMATS = ("auto", *IMAGE_FORMATS, "csv")  # auto: from the --out suffix (.png, .svg or .csv)
BANDS = ("minmax", "std")
SEED_SUFFIX = re.compile(r"^(.+?)[-_.](?:seed|s)?(\d+)$")


@dataclass(frozen=True)
class PlotConfig:
    """Options of `antisd plot`."""

    runs: tuple[str, ...] = ()  # run folders, each holding metrics.jsonl, or tidy CSVs this command wrote
    out: str = "curves.png"  # output file
    format: str = "auto"  # auto (from out's suffix) | png, svg (figure) | csv (tidy: run, method, seed, step, metric,
    #   value)
    metrics: tuple[str, ...] = DEFAULT_METRICS  # panels / CSV metrics; ("all",) = every numeric metric logged
    labels: tuple[str, ...] = ()  # one group name per run, in order, overriding the method; () = from manifests
    band: str = "minmax"  # band around a group's mean: minmax | std
    overwrite: bool = False

    def __post_init__(self):
        check = validation.Checks(self)
        check.require(bool(self.runs), "runs", "give at least one run folder")
        check.choice("format", FORMATS)
        suffix = Path(self.out).suffix.lower()
        known = [f".{name}" for name in FORMATS[1:]]
        check.require(self.format == "auto" or suffix not in known or suffix == f".{self.format}", "format",
                      f"{self.format}, but --out {self.out} ends in {suffix}")
        check.require(self.format != "auto" or suffix in known, "out",
                      f"{self.out}: give a .png, .svg or .csv file (or --format)")
        check.choice("band", BANDS)
        check.require(not self.labels or len(self.labels) == len(self.runs), "labels",
                      f"given {len(self.labels)} times for {len(self.runs)} runs (give one per run)")
        check.require(bool(self.metrics), "metrics", "empty list")
        check.done()

    @property
    def output_format(self) -> str:
        """png, svg or csv: `format`, or for auto the suffix of `out`."""
        return self.format if self.format != "auto" else Path(self.out).suffix.lower().lstrip(".")


@dataclass(frozen=True)
class RunMetrics:
    """One run folder's metric records and where it belongs."""

    name: str
    method: str
    seed: int | None
    records: list[dict]
    settings: dict = field(default_factory=dict)  # the run config flattened to dotted keys ({} without a manifest)


# --- reading runs ------------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl; a torn last line (a run still writing) is skipped with a warning."""
    lines = read_text_file(path).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s: last line is incomplete, skipped", path)
                continue
            raise InputError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no metric records")
    return records


def read_manifest(folder: Path) -> dict:
    """The run manifest (run.json or config.yaml) of `folder`, or {} when it has none."""
    for name in MANIFESTS:
        path = folder / name
        if path.exists():
            try:
                if name.endswith(".json"):
                    data = json.loads(path.read_text())
                else:
                    import yaml

                    data = yaml.safe_load(path.read_text())
            except (json.JSONDecodeError, ValueError) as exc:
                raise InputError(f"{path}: unreadable manifest ({str(exc).splitlines()[0]})") from None
            return data if isinstance(data, dict) else {}
    return {}


def lookup(data: dict, *dotted: str):
    """The first of the dotted keys present in nested dicts (`config.update.method`), else None."""
    for key in dotted:
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return None


def run_identity(folder: Path, label: str | None) -> tuple[str, int | None, dict]:
    """(method, seed, flattened config) of a run folder, by the rules of the module docstring."""
    manifest = read_manifest(folder)
    suffix = SEED_SUFFIX.match(folder.name)
    method = label or lookup(manifest, "config.update.method", "update.method", "method")
    if method is None and lookup(manifest, "config.loop", "loop") is not None:
        from stages.training.config import UpdateConfig

        method = UpdateConfig.method
    method = str(method) if method is not None else (suffix.group(1) if suffix else folder.name)
    seed = lookup(manifest, "config.loop.seed", "loop.seed", "config.seed", "seed")
    if seed is None and suffix:
        seed = suffix.group(2)
    config = manifest.get("config", manifest) if isinstance(manifest.get("config"), dict) else manifest
    settings = flatten(config)
    resolved = manifest.get("update_settings")  # every update knob at its value, the variant's included
    if isinstance(resolved, dict):
        settings.update({f"update.{key}": value for key, value in resolved.items()})
    return method, None if seed is None else int(seed), settings


def load_run(path: str | Path, label: str | None) -> RunMetrics:
    """Read a run folder (or its metrics.jsonl): records, method and seed."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise InputError(f"{path}: no such run folder")
    metrics = path if path.is_file() else folder / "metrics.jsonl"
    if not metrics.exists():
        raise InputError(f"{folder}: no metrics.jsonl (not a run folder?)")
    method, seed, settings = run_identity(folder, label)
    return RunMetrics(folder.name, method, seed, base_record(folder) + read_metrics(metrics), settings)


TIDY_COLUMNS = ("run", "method", "seed", "step", "metric", "value")


def load_tidy_csv(path: Path) -> list[RunMetrics]:
    """The runs of a tidy CSV written by `antisd plot --format csv`, in the order they first appear."""
    import csv

    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != TIDY_COLUMNS:
            raise InputError(f"{path}: not a curves table of `antisd plot` (columns {', '.join(TIDY_COLUMNS)})")
        runs: dict[str, tuple[str, str, dict[int, dict]]] = {}
        for number, row in enumerate(reader, 2):
            try:
                step, value = int(row["step"]), float(row["value"])
            except (TypeError, ValueError):
                raise InputError(f"{path}: line {number}: step {row['step']!r} / value {row['value']!r} "
                                 "is not a number") from None
            name, method, seed, by_step = runs.setdefault(row["run"], (row["run"], row["method"], row["seed"], {}))
            by_step.setdefault(step, {"step": step})[row["metric"]] = value
    if not runs:
        raise InputError(f"{path}: no rows")
    return [RunMetrics(name, method, int(seed) if seed else None, [by_step[k] for k in sorted(by_step)])
            for name, method, seed, by_step in runs.values()]


def flatten(config: dict, prefix: str = "") -> dict:
    """{"update.lr": 1e-5, "loop.train.name": "arith", …} of a nested config."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_defaults() -> dict:
    """Every run-config key at its default, dotted: the loop's and each stage Config's (a run config lists only the
    stage keys it sets; one it leaves out ran at the default, so two runs that both left it out do not differ)."""
    import dataclasses

    from stages.runs import config as run_config

    defaults = flatten(run_config.resolve({}).to_dict())
    for section, (_, _, owned) in run_config.STAGE_SECTIONS.items():
        for spec in dataclasses.fields(run_config.stage_class(section)):
            if spec.name not in owned and spec.default is not dataclasses.MISSING:
                defaults[f"{section}.{spec.name}"] = spec.default
    return defaults


def split_by_settings(runs: list[RunMetrics]) -> list[RunMetrics]:
    """Runs of one method whose configs differ in more than the seed (or speed-only settings) get group names that
    say how: `antisd (update.lr=2e-05)`; runs that differ only by seed stay one group. A key a config lacks reads as
    its default (a setting added after the run was made, at its default, is what the run did)."""
    from dataclasses import replace

    from stages.runs import config as run_config

    ignored = run_config.RESUMABLE_CHANGES | {"loop.seed"}
    defaults = config_defaults()

    def setting(run: RunMetrics, key: str):
        return run.settings.get(key, defaults.get(key))

    out = []
    for run in runs:
        peers = [r for r in runs if r.method == run.method]
        keys_ = sorted({k for r in peers for k in r.settings} - ignored)
        differing = [k for k in keys_ if len({json.dumps(setting(r, k), sort_keys=True) for r in peers}) > 1]
        if differing:
            detail = ", ".join(f"{k}={setting(run, k)}" for k in differing)
            run = replace(run, method=f"{run.method} ({detail})")
        out.append(run)
    return out


BASE_STEP = keys.BASE_STEP  # where the base model's evaluation (eval_base.json) is drawn


def base_record(folder: Path) -> list[dict]:
    """[the eval/* values of `folder`/eval_base.json at step BASE_STEP], or [] when the run has none."""
    path = folder / "eval_base.json"
    if not path.is_file():
        return []
    values = {k: v for k, v in read_json_object(path).items() if k.startswith(keys.EVAL_PREFIX)}
    return [{"step": BASE_STEP, **values}] if values else []


def metric_series(records: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `metric`: only finite numeric values; a step logged twice (a resumed run) keeps the last."""
    by_step: dict[int, float] = {}
    for index, record in enumerate(records):
        value = record.get(metric)
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            by_step[int(record.get("step", index))] = float(value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def all_metrics(runs: list[RunMetrics]) -> tuple[str, ...]:
    names = {k for run in runs for record in run.records for k, v in record.items()
             if k != "step" and isinstance(v, (int, float))}
    return tuple(sorted(names))


def tidy_rows(runs: list[RunMetrics], metrics: tuple[str, ...]) -> list[dict]:
    """The CSV rows: one per (run, metric, step) with a value."""
    rows = []
    for run in runs:
        for metric in metrics:
            for step, value in zip(*metric_series(run.records, metric)):
                rows.append({"run": run.name, "method": run.method, "seed": "" if run.seed is None else run.seed,
                             "step": int(step), "metric": metric, "value": repr(float(value))})
    return rows


# --- drawing -----------------------------------------------------------------------------------------------------


# --- the stage ---------------------------------------------------------------------------------------------------


def check_config(config: PlotConfig) -> Path:
    """Validate the output path before reading anything (the options were checked when `config` was made)."""
    out = Path(config.out)
    if not out.parent.exists():
        raise InputError(f"{out}: output directory {out.parent} does not exist")
    if out.exists() and not config.overwrite:
        raise InputError(f"{out}: output exists (pass --overwrite to replace it)")
    return out


def curve_panels(runs: list[RunMetrics], metrics: tuple[str, ...]) -> dict:
    """metric → "method (k runs)" → the (steps, values) series of that method's runs that logged the metric."""
    counts = {m: sum(r.method == m for r in runs) for m in dict.fromkeys(r.method for r in runs)}
    labels = {m: f"{m} ({k} run{'s' if k > 1 else ''})" for m, k in counts.items()}
    return {metric: {labels[m]: [s for s in (metric_series(r.records, metric) for r in runs if r.method == m)
                                 if s[0].size] for m in counts} for metric in metrics}


def run(config: PlotConfig) -> Path:
    """Draw (or tabulate) the curves of `config.runs` into `config.out`."""
    out = check_config(config)
    tables = [path for path in config.runs if Path(path).suffix.lower() == ".csv" and Path(path).is_file()]
    if tables and config.labels:
        raise InputError(f"{tables[0]}: --label names run folders; a curves CSV carries its groups in `method`")
    labels = config.labels or (None,) * len(config.runs)
    runs = [run for path, label in zip(config.runs, labels)
            for run in (load_tidy_csv(Path(path)) if path in tables else [load_run(path, label)])]
    if not config.labels:
        runs = split_by_settings(runs)
    if len({run.name for run in runs}) < len(runs) and not tables:  # same folder name under different parents
        runs = [RunMetrics(str(path), r.method, r.seed, r.records) for path, r in zip(config.runs, runs)]
    metrics = all_metrics(runs) if config.metrics == ("all",) else tuple(config.metrics)
    logged = {metric for metric in metrics if any(metric_series(run.records, metric)[0].size for run in runs)}
    if config.metrics == DEFAULT_METRICS:
        metrics = tuple(metric for metric in metrics if metric in logged) or metrics
    for metric in metrics:
        if metric not in logged:
            log.warning("no run logged %s", metric)
    if config.output_format == "csv":
        atomic_write_text(out, to_csv(tidy_rows(runs, metrics), list(TIDY_COLUMNS)))
    else:
        draw_curves(curve_panels(runs, metrics), config.band, out, base_step=BASE_STEP,
                    image_format=config.output_format)
    groups = {m: sum(r.method == m for r in runs) for m in dict.fromkeys(r.method for r in runs)}
    log.info("%d runs in %d groups (%s) → %s", len(runs), len(groups),
             ", ".join(f"{m}×{n}" for m, n in groups.items()), out)
    return out
