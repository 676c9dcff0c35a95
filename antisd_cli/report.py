"""`antisd report`: the paper's table, Speedup and pass@k figure from the suite evaluations of run folders."""

from __future__ import annotations

import click

from antisd_cli.options import config_option, overwrite_option, stage_errors
from stages.report import ReportConfig
from stages.runs.suites import SUITES

C = ReportConfig


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder (table.md, runs/methods/speedup/pass_at_k CSVs, pass_at_k.png, report.json).")
@config_option(C, "baseline", "The method the Speedup is measured against (a group name as in the table).")
@config_option(C, "suite", "Whose evaluations are read: RUN/step_XXXX/eval-SUITE/summary.json (and "
                           "RUN/eval_base-SUITE for the base model).", type=click.Choice(tuple(SUITES)))
@config_option(C, "pass_at_k", "Benchmark of the pass@k figure (k = 1…n at each run's best checkpoint).",
               metavar="BENCHMARK")
@click.option("--label", "labels", multiple=True,
              help="Group name of each run, in order (give once per run) [default: the manifest's method].")
@overwrite_option(C)
@stage_errors
def report_command(runs, out, baseline, suite, pass_at_k, labels, overwrite):
    """Compare RUNS (methods × seeds): best-average checkpoint, Speedup, seed spread and pass@k.

    Each run folder's method and seed come from its config.yaml (update.method, loop.seed), its evaluations from
    step_XXXX/eval-SUITE/summary.json, as `antisd loop` writes them with loop.eval_suite or `antisd eval --suite`
    does for a checkpoint. Per run the checkpoint with the best suite average is taken; per method the mean over
    seeds with a 95% t interval; Speedup = the baseline's best-average updates ÷ the first updates at which the
    method reaches that average, paired by seed where the baseline ran the same seed ("<x× (never)" when it never
    does within its evaluated updates: x = best updates ÷ last updates bounds it). Prints table.md, then the folder.

    \b
    Example:
      antisd report runs/grpo_s0 runs/grpo_s1 runs/antisd_s0 runs/antisd_s1 --baseline grpo --out report
      antisd report runs/* --suite aime25-check --pass-at-k aime25 --out check_report
    """
    from stages.report import run

    folder = run(ReportConfig(runs=tuple(runs), out=out, baseline=baseline, suite=suite, pass_at_k=pass_at_k,
                              labels=tuple(labels), overwrite=overwrite))
    click.echo((folder / "table.md").read_text())
    click.echo(str(folder))
