"""`antisd eval`: benchmark → per-sample verified rows + summary (avg@K, pass@k, maj@K, length, truncation)."""

from __future__ import annotations

import json

import click

from antisd_cli.options import (
    dtype_option, model_option, out_option, overwrite_option, seed_option, stage_errors, threads_option,
)
from stages.eval import BENCHMARKS, default


@click.command("eval")
@model_option
@click.option("--benchmark", "-b", required=True, metavar="|".join(BENCHMARKS) + "|FILE",
              help="A built-in benchmark, or a prompts Parquet (from `antisd data prepare`).")
@out_option
@click.option("--n", default=default("n"), type=click.IntRange(min=1), help="Samples per problem (K).")
@click.option("--temperature", default=default("temperature"), type=click.FloatRange(min=0),
              help="Sampling temperature; 0 = greedy (top-p is then 1).")
@click.option("--top-p", default=default("top_p"), type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling mass.")
@click.option("--max-new-tokens", default=default("max_new_tokens"), type=click.IntRange(min=1),
              help="Response length cap; a sample that hits it counts as truncated.")
@click.option("--num", default=default("num"), type=click.IntRange(min=0),
              help="Evaluate only the first N problems (0 = all).")
@click.option("--split", default=default("split"), type=click.Choice(["train", "test"]),
              help="arith/gsm8k split (math500, aime24 and amc23 have only test).")
@seed_option
@click.option("--engine", default=default("engine"), type=click.Choice(["auto", "vllm", "hf"]),
              help="Sampling engine; auto = vllm when installed, else hf (transformers generate).")
@dtype_option
@threads_option
@click.option("--batch-size", default=default("batch_size"), type=click.IntRange(min=0),
              help="Samples per engine call; 0 = engine default.")
@click.option("--workers", default=default("workers"), type=click.IntRange(min=1),
              help="Answer-check worker processes.")
@click.option("--timeout", default=default("timeout"), type=click.FloatRange(min=0, min_open=True),
              help="Seconds per answer check.")
@click.option("--bootstrap-resamples", default=default("bootstrap_resamples"), type=click.IntRange(min=1),
              help="Bootstrap resamples of the avg@K 95% interval (over problems, seeded by --seed).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
@overwrite_option
@stage_errors
def eval_command(model, benchmark, out, n, temperature, top_p, max_new_tokens, num, split, seed, engine, dtype,
                 threads, batch_size, workers, timeout, bootstrap_resamples, as_json, overwrite):
    """Evaluate a model: sample N responses per problem, verify them, print avg@N, pass@k, maj@N.

    Writes one row per sample to OUT (verified-file columns: answer, extracted_answer, correct, …) and the
    summary to <OUT stem>.summary.json; prints the summary table (with a 95% bootstrap interval for avg@N), then
    the rows path, on stdout.

    \b
    Example:
      antisd eval --model smollm2-135m --benchmark arith --num 200 --n 4 --max-new-tokens 64 --out eval.parquet
      antisd eval --model runs/antisd_s0/step_0019/checkpoint --benchmark gsm8k --n 8 --out gsm8k.parquet
      antisd eval -m smollm2-135m -b held_out.parquet --temperature 0 --n 1 --out greedy.parquet
    """
    from rich.console import Console

    from stages.eval import EvalConfig, render, run, summary_path

    config = EvalConfig(
        benchmark=benchmark, out=out, model=model, n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, num=num, split=split, seed=seed, engine=engine, dtype=dtype,
        threads=threads, batch_size=batch_size, workers=workers, timeout=timeout,
        bootstrap_resamples=bootstrap_resamples, overwrite=overwrite,
    )
    path = run(config)
    summary = json.loads(summary_path(path).read_text())
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        render(summary, Console(soft_wrap=True))
    click.echo(str(path))
