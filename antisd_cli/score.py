"""`antisd score`: verified rollouts → student/teacher log-probs, entropies and PMI (a thin shell over stages.score)."""

from __future__ import annotations

import click

from antisd_cli.options import (dtype_option, input_path, model_option, out_option, overwrite_option, shard_option,
                                stage_errors, threads_option)


@click.command("score")
@input_path("--verified", "Verified rollouts (Parquet file or directory of part files) from `antisd verify`.")
@model_option
@click.option("--reference", default=None, metavar="MODEL",
              help="A frozen reference policy (HF folder or embedded name) whose log-probs of the response tokens "
                   "under the student prompt are stored as ref_logprobs, for update --kl-coef. Default: none.")
@out_option
@click.option("--temperature", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Softmax temperature of the log-probs. Default: the rollout's sampling temperature from the "
                   "input metadata, else 1.0.")
@click.option("--chunk-size", default=64, type=click.IntRange(min=1),
              help="Response positions per LM-head/log-softmax chunk (bounds the [chunk × vocab] logits).")
@click.option("--micro-batch-tokens", default=8192, type=click.IntRange(min=1),
              help="Padded tokens (sequences × longest) per forward pass; sequences are sorted by length.")
@dtype_option
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@threads_option
@shard_option
@overwrite_option
@stage_errors
def score_command(verified, model, reference, out, temperature, chunk_size, micro_batch_tokens, dtype, device, threads,
                  shard, overwrite):
    """Add per-token student/teacher log-probs, entropies and PMI to verified rollouts.

    The same weights score each response twice over its stored token ids: under the student prompt (the old
    policy, s_t) and under the teacher prompt of METHOD §4 (verified solution + assessment, t_t), giving
    u_t = t_t − s_t and the full-vocabulary teacher entropy. Rows without privileged context get u = 0.
    With --reference, a frozen reference model also scores the student view (ref_logprobs, for update --kl-coef).

    \b
    Example:
      antisd score --verified verified.parquet --model smollm2-135m --out scored.parquet
      antisd score --verified verified.parquet --out scored/ --shard 0/4 --micro-batch-tokens 16384
      antisd score --verified verified.parquet --model ckpt_0003 --reference smollm2-135m --out scored.parquet
    """
    from stages.score import ScoreConfig, run

    config = ScoreConfig(verified=verified, out=out, model=model, reference=reference, temperature=temperature,
                         chunk_size=chunk_size, micro_batch_tokens=micro_batch_tokens, dtype=dtype, device=device,
                         threads=threads, shard=shard, overwrite=overwrite)
    click.echo(str(run(config)))
