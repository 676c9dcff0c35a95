"""`antisd plot`: training curves of run folders, grouped by method, as a PNG or a tidy CSV."""

from __future__ import annotations

import click

from antisd_cli.options import config_option, field_default, overwrite_option, stage_errors
from stages.plot import BANDS, DEFAULT_METRICS, FORMATS, PlotConfig

C = PlotConfig


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Output file (.png, .svg or .csv).")
@click.option("--format", "format_", default=field_default(C, "format"), type=click.Choice(FORMATS),
              help="auto: from --out's suffix (.png, .svg, .csv; another suffix is refused); png, svg: one panel per "
                   "metric; csv: tidy rows (run, method, seed, step, metric, value).")
@click.option("--metrics", default=",".join(DEFAULT_METRICS),
              help="Comma-separated metric keys to draw or tabulate; 'all' = every numeric metric logged.")
@click.option("--label", "labels", multiple=True,
              help="Group name of each run, in order (give once per run) [default: the manifest's method].")
@config_option(C, "band", "Band around a method's mean over seeds.", type=click.Choice(BANDS))
@overwrite_option(C)
@stage_errors
def plot_command(runs, out, format_, metrics, labels, band, overwrite):
    """Plot the per-step metrics of RUNS (folders holding metrics.jsonl, or a CSV this command wrote), one line per
    run.

    Runs of the same method (from run.json / config.yaml, else the folder name without a -sN seed suffix) are
    grouped: thick line = mean over seeds, band = min–max or ±1 std; runs of one method whose settings differ are
    named by the settings that differ. Metrics logged only on some steps (eval) are drawn through the points
    present, 0/1 metrics (the gate) as steps; the base model's evaluation sits at step −1.

    \b
    Example:
      antisd plot runs/grpo-s0 runs/grpo-s1 runs/antisd-s0 runs/antisd-s1 --out curves.png
      antisd plot runs/* --metrics all --out curves.csv
      antisd plot runs/antisd-s0 runs/grpo-s0 --out curves.svg
      antisd plot curves.csv --out curves.png                  # redraw from the table
    """
    from stages.plot import run

    metric_keys = tuple(m.strip() for m in metrics.split(",") if m.strip())
    config = PlotConfig(runs=tuple(runs), out=out, format=format_, metrics=metric_keys, labels=tuple(labels),
                        band=band, overwrite=overwrite)
    click.echo(str(run(config)))
