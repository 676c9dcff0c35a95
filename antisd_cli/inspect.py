"""`antisd inspect FILE|RUN_DIR`: rows, schema, metadata, column stats and sample rows of any stage's Parquet, or a
run folder's steps table and files."""

from __future__ import annotations

import json

import click

from antisd_cli.options import BadInput, config_option, field_default, stage_errors
from stages.inspect import InspectConfig

C = InspectConfig


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=True))
@config_option(C, "samples", "Sample rows to render.")
@config_option(C, "row", "Show this row (0-based) in full instead of samples; a scored row also shows the decoded "
                         "student prompt, teacher prompt and response with per-token s, t, u, H.")
@config_option(C, "model", "Tokenizer that decodes --row (model folder or embedded name) [default: the file's model].")
@click.option("--json", "as_json", is_flag=True, default=field_default(C, "as_json"),
              help="Print the summary (metadata, schema, stats) as JSON.")
@stage_errors
def inspect_command(path, samples, row, as_json, model):
    """Describe a prompts/rollouts/verified/scored Parquet file (or a directory of parts), or a run folder.

    A run folder of `antisd loop` (it holds run.json) shows its steps table (reward, held-out accuracy with its
    interval, the gate's warm-up, λ), what the table does and does not show, and each step's files.

    \b
    Example:
      antisd inspect verified.parquet
      antisd inspect verified.parquet --row 5
      antisd inspect scored.parquet --row 0      # both views decoded, per-token s/t/u/H
      antisd inspect demo_out/run                # a run: its steps and files
    """
    from rich.console import Console

    from stages.inspect import is_run_dir, render, render_run, run_summary, summarize

    if is_run_dir(path):
        if row is not None:
            raise BadInput(f"--row: {path} is a run folder; give one of its step files, e.g. "
                           f"{path}/step_0000/scored.parquet")
        if as_json:
            click.echo(json.dumps(run_summary(path), indent=2, default=str))
        else:
            render_run(path, Console(soft_wrap=False))
        return
    config = InspectConfig(path=path, samples=samples, row=row, as_json=as_json, model=model)
    summary = summarize(config)
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2, default=str))
        return
    render(summary, config, Console(soft_wrap=False))
