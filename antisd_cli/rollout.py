"""`antisd rollout`: prompts Parquet → rollouts Parquet (n samples per prompt)."""

from __future__ import annotations

import click

from antisd_cli.options import (
    dtype_option, input_path, model_option, out_option, overwrite_option, seed_option, shard_option, stage_errors,
    threads_option,
)


@click.command("rollout")
@model_option
@input_path("--prompts", "Prompts Parquet (from `antisd data prepare`), a file or a directory of parts.")
@out_option
@click.option("--n", default=8, type=click.IntRange(min=1), help="Samples per prompt (the group size).")
@click.option("--temperature", default=1.0, type=click.FloatRange(min=0), help="Sampling temperature; 0 = greedy.")
@click.option("--top-p", default=1.0, type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass.")
@click.option("--max-new-tokens", default=256, type=click.IntRange(min=1),
              help="Response length cap; a sample that hits it has finish_reason 'length'.")
@seed_option
@click.option("--engine", default="auto", type=click.Choice(["auto", "vllm", "hf"]),
              help="Sampling engine; auto = vllm when installed, else hf (transformers generate).")
@click.option("--max-prompts", default=0, type=click.IntRange(min=0),
              help="Use only the first N prompts of the file, before sharding (0 = all).")
@shard_option
@dtype_option
@threads_option
@click.option("--batch-size", default=0, type=click.IntRange(min=0),
              help="Samples (prompts × n) per engine call; 0 = engine default (hf 32, vllm 1024).")
@click.option("--device", default="auto", help="HF engine device: auto (cuda if available), cpu, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=True, help="Rich progress bar on stderr (shown only on a terminal).")
@overwrite_option
@stage_errors
def rollout_command(model, prompts, out, n, temperature, top_p, max_new_tokens, seed, engine, max_prompts, shard,
                    dtype, threads, batch_size, device, progress, overwrite):
    """Sample N responses per prompt and write one row per sample.

    Each row keeps the prompt's columns, the exact prompt and response token ids, the response text, the
    log-prob of every sampled token (after temperature/top-p) and why it stopped. Same seed, same rows (hf).

    \b
    Example:
      antisd data prepare arith --num 32 --out prompts.parquet
      antisd rollout --prompts prompts.parquet --out rollouts.parquet --n 8 --max-new-tokens 128
      antisd rollout --prompts prompts.parquet --out rollouts/ --shard 0/4   # part file of shard 0
    """
    from stages.rollout import RolloutConfig, run

    config = RolloutConfig(
        prompts=prompts, out=out, model=model, n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, engine=engine, max_prompts=max_prompts, shard=shard, dtype=dtype,
        threads=threads, batch_size=batch_size, device=device, progress=progress, overwrite=overwrite,
    )
    click.echo(str(run(config)))
