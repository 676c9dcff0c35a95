"""Figures and tables written to files: training curves (PNG or SVG), pass@k curves (PNG), the PMI heatmap (PNG), the
token-coloured rollout page (HTML) and CSV text. The only module that imports matplotlib, inside the drawing
functions, through its object API with the Agg canvas (no pyplot state). Functions take plain data (arrays, rows) and compute nothing beyond a
group's per-step mean and band; what to draw is the commands' business (`stages.plot`, `stages.analyze`).
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

import numpy as np

from stages.common.io import atomic_output


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


LEGEND_CHARACTERS_PER_INCH = 11  # at fontsize 9, with room for the handle


def legend_layout(labels: list[str], width_inches: float) -> tuple[list[str], int]:
    """(labels wrapped to fit, columns) for a legend across a figure `width_inches` wide: as many columns as the
    longest label allows (up to 5), and a label longer than one column's width broken at its commas and spaces."""
    import textwrap

    room = max(20, int(width_inches * LEGEND_CHARACTERS_PER_INCH) - 4)
    longest = max((len(label) for label in labels), default=0)
    columns = max(1, min(len(labels), 5, room // (longest + 4) if longest else 5))
    width = room // columns - 4
    return ["\n".join(textwrap.wrap(label, width, break_on_hyphens=False)) or label for label in labels], columns


def is_binary(series: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """Whether every value of a panel's series is 0 or 1 (gate/open, gate/warmup): drawn as steps, not slopes."""
    values = [v for _, vs in series for v in vs.tolist()]
    return bool(values) and all(v in (0.0, 1.0) for v in values)


def draw_curves(panels: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]], band: str, path: Path,
                base_step: int | None = None, xlabel: str = "step", image_format: str = "png") -> None:
    """One panel per metric; thin lines per run, a thick mean and shaded band per group with several runs; a panel
    of 0/1 values (a gate) as steps held from one step to the next, with ticks at 0 and 1.

    `panels`: metric → group name (legend label) → that group's runs' (steps, values) series (empty: not logged).
    `base_step`: the step at which a base-model record is drawn, named in the x label when a panel has it.
    `xlabel`: what the x values count (steps; `antisd report`: updates). `image_format`: png or svg.
    """
    metrics = list(panels)
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure = _figure(4.6 * columns, 3.3 * rows)
    from matplotlib.ticker import MaxNLocator

    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    groups = list(dict.fromkeys(g for by_group in panels.values() for g in by_group))
    colours = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    # a dash pattern per group, later groups drawn narrower on top: a curve equal to another stays visible
    dashes = [(None, None), (6, 3), (2, 2), (8, 2, 2, 2), (4, 1, 1, 1, 1, 1), (1, 3)]
    styles = {g: dict(dashes=dashes[i % len(dashes)]) if i % len(dashes) else {} for i, g in enumerate(groups)}
    widths = {g: 1.0 - 0.15 * min(i, 3) for i, g in enumerate(groups)}
    for ax, metric in zip(axes, metrics):
        drawn = False
        binary = is_binary([s for series in panels[metric].values() for s in series])
        shape = dict(drawstyle="steps-mid") if binary else {}  # step k's state centred on its tick
        for group, series in panels[metric].items():
            several = len(series) > 1
            for steps, values in series:
                ax.plot(steps, values, color=colours[group], lw=(0.8 if several else 1.9) * widths[group],
                        alpha=0.4 if several else 1, marker="." if steps.size < 40 else None, ms=3, **styles[group],
                        **shape)
                drawn = True
            if several:
                steps, mean, low, high = group_band(series, band)
                ax.plot(steps, mean, color=colours[group], lw=2.4 * widths[group], **styles[group], **shape)
                ax.fill_between(steps, low, high, color=colours[group], alpha=0.18, lw=0,
                                step="mid" if binary else None)
        if binary:
            ax.set_yticks([0, 1])
            ax.set_ylim(-0.1, 1.1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric, fontsize=10)
        has_base = base_step is not None and any(base_step in steps for series in panels[metric].values()
                                                 for steps, _ in series)
        ax.set_xlabel(f"{xlabel} ({base_step}: base model)" if has_base else xlabel)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles = [axes[0].plot([], [], color=colours[g], lw=2.2, **styles[g])[0] for g in groups]
    spread = "min–max" if band == "minmax" else "±1 std"
    labels, legend_columns = legend_layout(groups, 4.6 * columns)
    figure.legend(handles, labels, loc="outside upper center", ncols=legend_columns,
                  title=f"mean over seeds, band {spread}", fontsize=9)
    save_png(figure, path, image_format)


def draw_pass_at_k(ks: list[int], curves: dict[str, list[np.ndarray]], title: str, path: Path) -> None:
    """pass@k against k (log₂ axis): per group (legend label) a thin line per run, and with several runs their mean
    (thick) and min–max band. `curves`: group → its runs' arrays of pass@k at `ks`. With one k (n = 1) the groups
    stand side by side instead: a dot per run, the mean as a bar across, the min–max as a vertical line."""
    figure = _figure(6.4, 4.4)
    ax = figure.subplots()
    for index, (group, runs) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        stacked = np.array(runs)  # [runs, len(ks)]
        label = f"{group} ({len(runs)} run{'s' if len(runs) > 1 else ''})"
        if len(ks) == 1:
            ax.plot([index] * len(runs), stacked[:, 0], "o", color=colour, alpha=0.6, label=label)
            ax.plot([index - 0.25, index + 0.25], [stacked.mean()] * 2, color=colour, lw=2.2)
            ax.vlines(index, stacked.min(), stacked.max(), color=colour, lw=1.0)
            continue
        for values in stacked:
            ax.plot(ks, values, color=colour, lw=0.8 if len(runs) > 1 else 2.0, alpha=0.45 if len(runs) > 1 else 1,
                    marker="." if len(ks) < 12 else None)
        if len(runs) > 1:
            ax.plot(ks, stacked.mean(axis=0), color=colour, lw=2.2)
            ax.fill_between(ks, stacked.min(axis=0), stacked.max(axis=0), color=colour, alpha=0.15, lw=0)
        ax.plot([], [], color=colour, lw=2.2, label=label)
    if len(ks) == 1:
        ax.set_xticks(range(len(curves)), list(curves), fontsize=8)
        ax.set(xlim=(-0.6, len(curves) - 0.4), xlabel=f"k = {ks[0]}")
    else:
        ax.set_xscale("log", base=2)
        ticks = [k for k in ks if k & (k - 1) == 0] + ([ks[-1]] if ks[-1] & (ks[-1] - 1) else [])
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set(xlabel="k (samples)")
    ax.set(ylabel="pass@k", title=title, ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(title="mean over seeds: bar; min–max: line" if len(ks) == 1 else "mean over seeds, band min–max",
              fontsize=9)
    save_png(figure, path)


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("drawing needs matplotlib: pip install 'antisd[plots]'") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: Path, image_format: str = "png") -> None:
    """Write `figure` to `path` atomically as PNG (120 dpi) or, with image_format svg, as SVG."""
    with atomic_output(path) as handle:
        figure.savefig(handle, format=image_format, dpi=120)


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


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()
