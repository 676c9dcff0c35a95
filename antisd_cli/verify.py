"""`antisd verify`: rollouts → verified rows (answer, reward, status, group stats, privileged context)."""

from __future__ import annotations

import click

from antisd_cli.options import input_path, model_option, out_option, overwrite_option, seed_option, stage_errors
from stages.answers import DEFAULT_FALLBACKS, FALLBACKS


@click.command("verify")
@input_path("--rollouts", "Rollouts Parquet (file or directory of part files) from `antisd rollout`.")
@out_option
@seed_option
@click.option("--workers", default=2, type=click.IntRange(min=1), help="Answer-check worker processes.")
@click.option("--timeout", default=5.0, type=click.FloatRange(min=0, min_open=True),
              help="Seconds per answer check; an overrun is interrupted (worker killed if need be): status timeout.")
@click.option("--fallbacks", default=DEFAULT_FALLBACKS, metavar="LIST",
              help=f"Comma list of answer fallbacks tried in order when there is no \\boxed{{}}: "
                   f"{', '.join(FALLBACKS)}; 'none' = boxed only.")
@click.option("--max-answer-chars", default=1000, type=click.IntRange(min=1),
              help="Answers (or golds) longer than this are not parsed: status error.")
@click.option("--worker-memory-mb", default=2048, type=click.IntRange(min=0),
              help="Address-space limit of each worker in MiB (0 = none); a check over it gets status error.")
@click.option("--privileged-max-chars", default=4000, type=click.IntRange(min=0),
              help="Keep the first N characters of privileged_text (0 = no limit).")
@click.option("--privileged-max-tokens", default=0, type=click.IntRange(min=0),
              help="Also keep only its first N tokens of --model's tokenizer (0 = not applied).")
@model_option
@overwrite_option
@stage_errors
def verify_command(rollouts, out, seed, workers, timeout, fallbacks, max_answer_chars, worker_memory_mb,
                   privileged_max_chars, privileged_max_tokens, model, overwrite):
    """Check each rollout's final answer and attach rewards and privileged context.

    Answers are the last \\boxed{} (then the fallbacks), compared with the gold answer by math-verify in worker
    processes with a hard timeout; nothing from the model is ever eval-ed. Every row is kept, with verify_status
    ok | no_answer | timeout | error. The privileged context of each rollout is a correct peer from its group
    (seeded, never itself), else the reference solution, else none; --model is read only for
    --privileged-max-tokens.

    \b
    Example:
      antisd verify --rollouts rollouts.parquet --out verified.parquet
      antisd verify --rollouts rollouts.parquet --out verified.parquet --fallbacks none --timeout 2
    """
    from stages.verify import VerifyConfig, run

    config = VerifyConfig(rollouts=rollouts, out=out, seed=seed, workers=workers, timeout=timeout,
                          fallbacks=fallbacks, max_answer_chars=max_answer_chars, worker_memory_mb=worker_memory_mb,
                          privileged_max_chars=privileged_max_chars, privileged_max_tokens=privileged_max_tokens,
                          model=model, overwrite=overwrite)
    click.echo(str(run(config)))
