"""Figures: `antisd plot` (training curves of run folders) and the drawings of `antisd analyze pmi`.

`antisd plot runs/A runs/B …` reads each run folder's `metrics.jsonl` (one JSON object per step) and its manifest
(`run.json` or `config.yaml`) and draws one panel per metric, one thin line per run; runs of the same method are
grouped, with their mean and a band (min–max, or ±1 std) over the steps every run of the group logged. A metric
logged only on some steps (eval every k steps) is drawn through the points present. `--format csv` writes the same
data as a tidy table (run, method, seed, step, metric, value) instead.

A run folder's `eval_base.json` (the loop's evaluation of the base model) becomes a record at step −1 holding its
`eval/*` values, so held-out curves start at the model the run started from.

A run's method: `--label` if given, else the manifest's `config.update.method` (or `update.method`, `method`; a loop
manifest without it means the update stage's default), else the folder name without a trailing seed suffix
(`antisd-s1` → `antisd`). Its seed: `config.loop.seed` (or `loop.seed`, `config.seed`, `seed`), else that suffix.

Also here: the PMI heatmap and the token-coloured HTML page of `stages.analyze`. Matplotlib is imported only inside
the drawing functions, through its object API with the Agg canvas (no pyplot state). This module computes no
statistics beyond per-step means and bands.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common.io import InputError, atomic_write_text, read_json_object

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("reward/mean", "eval/accuracy", "response/length_mean", "teacher/entropy_median", "gate/lambda",
                   "gate/open", "pmi/antisd_term_mean")
MANIFESTS = ("run.json", "config.yaml")
SEED_SUFFIX = re.compile(r"^(.+?)[-_.](?:seed|s)?(\d+)$")


@dataclass(frozen=True)
class PlotConfig:
    """Options of `antisd plot`."""

    runs: tuple[str, ...] = ()  # run folders, each holding metrics.jsonl
    out: str = "curves.png"  # output file
    format: str = "png"  # png (figure) | csv (tidy table: run, method, seed, step, metric, value)
    metrics: tuple[str, ...] = DEFAULT_METRICS  # panels / CSV metrics; ("all",) = every numeric metric logged
    labels: tuple[str, ...] = ()  # one group name per run, in order, overriding the method; () = from manifests
    band: str = "minmax"  # band around a group's mean: minmax | std
    overwrite: bool = False


@dataclass(frozen=True)
class RunMetrics:
    """One run folder's metric records and where it belongs."""

    name: str
    method: str
    seed: int | None
    records: list[dict]


# --- reading runs ------------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl; a torn last line (a run still writing) is skipped with a warning."""
    lines = path.read_text().splitlines()
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


def load_run(path: str | Path, label: str | None) -> RunMetrics:
    """Read a run folder (or its metrics.jsonl): records, method and seed."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise InputError(f"{path}: no such run folder")
    metrics = path if path.is_file() else folder / "metrics.jsonl"
    if not metrics.exists():
        raise InputError(f"{folder}: no metrics.jsonl (not a run folder?)")
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
    return RunMetrics(folder.name, method, None if seed is None else int(seed),
                      base_record(folder) + read_metrics(metrics))


BASE_STEP = -1  # where the base model's evaluation (eval_base.json) is drawn


def base_record(folder: Path) -> list[dict]:
    """[the eval/* values of `folder`/eval_base.json at step BASE_STEP], or [] when the run has none."""
    path = folder / "eval_base.json"
    if not path.is_file():
        return []
    values = {k: v for k, v in read_json_object(path).items() if k.startswith("eval/")}
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


def group_band(series: list[tuple[np.ndarray, np.ndarray]], band: str) -> tuple[np.ndarray, ...]:
    """(steps, mean, low, high) over the steps every series has; low/high = min/max or mean ∓ std (ddof 0)."""
    common = series[0][0]
    for steps, _ in series[1:]:
        common = np.intersect1d(common, steps)
    stacked = np.array([values[np.isin(steps, common)] for steps, values in series])  # [runs, steps]
    mean = stacked.mean(axis=0)
    if band == "std":
        std = stacked.std(axis=0)
        return common, mean, mean - std, mean + std
    return common, mean, stacked.min(axis=0), stacked.max(axis=0)


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


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("drawing needs matplotlib: pip install 'antisd[plots]'") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        figure.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def draw_curves(runs: list[RunMetrics], metrics: tuple[str, ...], band: str, path: Path) -> None:
    """One panel per metric; thin lines per run, a thick mean and shaded band per method with several runs."""
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = _figure(4.6 * columns, 3.3 * rows)
    from matplotlib.ticker import MaxNLocator

    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    methods = list(dict.fromkeys(run.method for run in runs))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, metric in zip(axes, metrics):
        drawn = False
        for method in methods:
            group = [run for run in runs if run.method == method]
            series = [s for s in (metric_series(run.records, metric) for run in group) if s[0].size]
            several = len(series) > 1
            for steps, values in series:
                ax.plot(steps, values, color=colours[method], lw=0.8 if several else 1.6, alpha=0.4 if several else 1,
                        marker="." if steps.size < 40 else None, ms=3)
                drawn = True
            if several:
                steps, mean, low, high = group_band(series, band)
                ax.plot(steps, mean, color=colours[method], lw=2.2)
                ax.fill_between(steps, low, high, color=colours[method], alpha=0.18, lw=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel(f"step ({BASE_STEP}: base model)" if any(
            BASE_STEP in metric_series(run.records, metric)[0] for run in runs) else "step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles = [axes[0].plot([], [], color=colours[m], lw=2.2)[0] for m in methods]
    names = [f"{m} ({sum(r.method == m for r in runs)} run{'s' if sum(r.method == m for r in runs) > 1 else ''})"
             for m in methods]
    spread = "min–max" if band == "minmax" else "±1 std"
    figure.legend(handles, names, loc="outside upper center", ncols=min(len(methods), 5),
                  title=f"mean over seeds, band {spread}", fontsize=9)
    save_png(figure, path)


def draw_pmi_heatmap(path: Path, p_student: np.ndarray, p_teacher: np.ndarray, u: np.ndarray,
                     labels: list[tuple[str, float, float]], bins: int, clip: float) -> None:
    """2-D histogram of tokens over (p_s, p_t) ∈ [0, 1]²: token count (log) and mean u per cell, labels annotated."""
    figure = _figure(11, 4.8)
    from matplotlib.colors import LogNorm

    p_student, p_teacher = np.clip(p_student, 0, 1), np.clip(p_teacher, 0, 1)
    edges = np.linspace(0, 1, bins + 1)
    counts, _, _ = np.histogram2d(p_student, p_teacher, bins=[edges, edges])  # [bins, bins], x = p_s
    sums, _, _ = np.histogram2d(p_student, p_teacher, bins=[edges, edges], weights=u)
    mean_u = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    left, right = figure.subplots(1, 2)
    image = left.pcolormesh(edges, edges, np.ma.masked_equal(counts, 0).T, cmap="viridis", norm=LogNorm())
    figure.colorbar(image, ax=left, label="tokens")
    image = right.pcolormesh(edges, edges, np.ma.masked_invalid(mean_u).T, cmap="RdBu_r", vmin=-clip, vmax=clip)
    figure.colorbar(image, ax=right, label=f"mean u = t − s (clipped ±{clip:g})")
    for ax, title in ((left, "token count"), (right, "mean u per cell")):
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.3")
        ax.set(xlabel="p_student = e^s", ylabel="p_teacher = e^t", xlim=(0, 1), ylim=(0, 1), title=title)
    placed: list[tuple[float, float]] = []
    for text, x, y in labels:
        crowd = sum(abs(x - a) < 0.08 and abs(y - b) < 0.08 for a, b in placed)  # stack labels of nearby points
        placed.append((x, y))
        left_side = x > 0.75
        right.annotate(text.replace("$", r"\$"), (x, y), xytext=(-4 if left_side else 4, -4 - 11 * crowd),
                       textcoords="offset points", fontsize=8, ha="right" if left_side else "left", va="top",
                       arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.3"} if crowd else None,
                       bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.75, "lw": 0})
        right.plot([x], [y], "k.", ms=3)
    save_png(figure, path)


def u_color(u: float, clip: float) -> str:
    """Diverging colour of u clipped to ±clip: blue (u < 0, deflated by c) – white – red (u > 0, inflated)."""
    x = max(-1.0, min(1.0, u / clip)) if math.isfinite(u) else 0.0
    end = (178, 24, 43) if x > 0 else (33, 102, 172)
    rgb = [round(255 + (e - 255) * abs(x)) for e in end]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def render_rollouts_html(rollouts: list[dict], clip: float) -> str:
    """A standalone HTML page: each rollout's tokens on a background coloured by u, hover shows s, t, u, H.

    Each rollout dict holds `header` (label → value, shown above it), `problem` and `tokens`, a list of
    (text, special, s, t, u, H). All model and dataset text is HTML-escaped: it is untrusted.
    """
    esc = html.escape
    legend = "".join(f'<span class="tok" style="background:{u_color(v, clip)}">{v:+.1f}</span> '
                     for v in np.linspace(-clip, clip, 9))
    parts = [
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>antisd PMI rollouts</title><style>',
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}.resp{font-family:monospace;white-space:pre-wrap;"
        "line-height:1.6;border:1px solid #ccc;padding:.5em}.tok{border-radius:2px}.special{color:#888}"
        "h2{font-size:1em;margin-top:2em}",
        "</style></head><body>",
        "<h1>Tokens coloured by u = t − s (PMI with the privileged context)</h1>",
        f"<p>Red: inflated by the context (u &gt; 0); blue: deflated (u &lt; 0); clipped to ±{clip:g}. "
        f"Hover a token for s, t, u and the teacher entropy H.</p><p>{legend}</p>",
    ]
    for rollout in rollouts:
        header = " · ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in rollout["header"].items())
        parts.append(f"<h2>{header}</h2><details><summary>problem</summary><pre>{esc(rollout['problem'])}</pre>"
                     '</details><div class="resp">')
        for text, special, s, t, u, h in rollout["tokens"]:
            title = esc(f"{text!r} s={s:.3f} t={t:.3f} u={u:+.3f} H={h:.3f}", quote=True)
            cls = "tok special" if special else "tok"
            style = f"background:{u_color(u, clip)}"
            parts.append(f'<span class="{cls}" style="{style}" title="{title}">{esc(text)}</span>')
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)


# --- the stage ---------------------------------------------------------------------------------------------------


def check_config(config: PlotConfig) -> Path:
    """Validate the options and the output path before reading anything; return the output path."""
    if not config.runs:
        raise InputError("plot: give at least one run folder")
    if config.format not in ("png", "csv"):
        raise InputError(f"--format {config.format}: choose png or csv")
    if config.band not in ("minmax", "std"):
        raise InputError(f"--band {config.band}: choose minmax or std")
    if config.labels and len(config.labels) != len(config.runs):
        raise InputError(f"--label: given {len(config.labels)} times for {len(config.runs)} runs (give one per run)")
    if not config.metrics:
        raise InputError("--metrics: empty list")
    out = Path(config.out)
    if not out.parent.exists():
        raise InputError(f"{out}: output directory {out.parent} does not exist")
    if out.exists() and not config.overwrite:
        raise InputError(f"{out}: output exists (pass --overwrite to replace it)")
    return out


def run(config: PlotConfig, loaded=None) -> Path:
    """Draw (or tabulate) the curves of `config.runs` into `config.out`; `loaded` is unused (no model)."""
    out = check_config(config)
    labels = config.labels or (None,) * len(config.runs)
    runs = [load_run(path, label) for path, label in zip(config.runs, labels)]
    if len({run.name for run in runs}) < len(runs):  # same folder name under different parents
        runs = [RunMetrics(str(path), r.method, r.seed, r.records) for path, r in zip(config.runs, runs)]
    metrics = all_metrics(runs) if config.metrics == ("all",) else tuple(config.metrics)
    for metric in metrics:
        if not any(metric_series(run.records, metric)[0].size for run in runs):
            log.warning("no run logged %s", metric)
    if config.format == "csv":
        from stages.analyze import to_csv

        atomic_write_text(out, to_csv(tidy_rows(runs, metrics), ["run", "method", "seed", "step", "metric", "value"]))
    else:
        draw_curves(runs, metrics, config.band, out)
    groups = {m: sum(r.method == m for r in runs) for m in dict.fromkeys(r.method for r in runs)}
    log.info("%d runs in %d groups (%s) → %s", len(runs), len(groups),
             ", ".join(f"{m}×{n}" for m, n in groups.items()), out)
    return out
