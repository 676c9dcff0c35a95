"""`antisd report`: the paper's table, Speedup and pass@k figure from the evaluations of run folders."""

from __future__ import annotations

import click

from antisd_cli.options import config_option, overwrite_option, stage_errors
from stages.report import AUTO, ReportConfig
from stages.runs.evaluations import KINDS

C = ReportConfig


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder (table.md; runs, methods, speedup, curves, pass_at_k CSVs; pass_at_k.png, curves.png; "
                   "report.json).")
@config_option(C, "baseline", "The method the Speedup is measured against (a group name as in the table).")
@config_option(C, "evaluation", "Which evaluations are read: held-out (the loop's, of loop.eval: "
                                "RUN/step_XXXX/eval.summary.json, or step_XXXX.eval.summary.json as collected) or a "
                                "suite's (RUN/step_XXXX/eval-SUITE/summary.json); auto: the one every run holds.",
               type=click.Choice((AUTO, *KINDS)))
@config_option(C, "pass_at_k", "Benchmark of the pass@k figure (at each run's best checkpoint) [default: hmmt_feb25 "
                               "where evaluated, else the first benchmark].", metavar="BENCHMARK")
@click.option("--label", "labels", multiple=True,
              help="Group name of each run, in order (give once per run) [default: the manifest's method].")
@overwrite_option(C)
@stage_errors
def report_command(runs, out, baseline, evaluation, pass_at_k, labels, overwrite):
    """Compare RUNS (methods × seeds): best-average checkpoint, Speedup, seed spread and pass@k.

    Each run folder's method and seed come from its config.yaml (update.method, loop.seed); its evaluations are
    the loop's held-out ones (loop.eval, one benchmark) or a suite's (loop.eval_suite, or `antisd eval --suite`
    on a checkpoint), in a live run folder or as scripts/collect_run_files.sh copies them. Per run the checkpoint
    with the best average is taken (counted in updates: step_XXXX holds XXXX + 1, the base model 0); per method the
    mean over seeds with a 95% t interval; Speedup = the baseline's best-average updates ÷ the first updates at
    which the method reaches that average, on the seed-mean curves of the seeds both ran, and per seed ("<x×
    (never)" when it never does within its evaluated updates: x = best updates ÷ last updates bounds it). Prints
    table.md, then the folder.

    \b
    Example:
      antisd report runs/grpo_s0 runs/grpo_s1 runs/antisd_s0 runs/antisd_s1 --baseline grpo --out report
      antisd report runs/* --evaluation aime25-check --pass-at-k aime25 --out check_report
    """
    from stages.report import run

    folder = run(ReportConfig(runs=tuple(runs), out=out, baseline=baseline, evaluation=evaluation,
                              pass_at_k=pass_at_k, labels=tuple(labels), overwrite=overwrite))
    click.echo((folder / "table.md").read_text())
    click.echo(str(folder))
