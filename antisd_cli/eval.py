"""`antisd eval`: benchmark → per-sample verified rows + summary (avg@K, pass@k, maj@K, length, truncation)."""

from __future__ import annotations

import json

import click

from antisd_cli.options import (
    config_option,
    dtype_option,
    model_option,
    out_option,
    overwrite_option,
    prompt_template_option,
    seed_option,
    shard_option,
    stage_errors,
    threads_option,
)
from stages.eval import BENCHMARKS, EvalConfig
from stages.lm.datasets import SPLITS
from stages.lm.engine import ENGINES
from stages.lm.prompts import THINKING
from stages.runs.suites import DEFAULT_PROTOCOL, SUITES

C = EvalConfig
PAPER = SUITES["paper"]
SUITE_DEFAULT = " Default {}; with --suite the suite's (paper: {})."


@click.command("eval")
@model_option(C)
@click.option("--benchmark", "-b", metavar="|".join(BENCHMARKS) + "|FILE",
              help="A built-in benchmark, or a prompts Parquet (from `antisd data prepare`). Or --suite.")
@config_option(C, "suite", "A suite of benchmarks, each with its protocol, into the folder --out (resumable per "
                           "benchmark): " + "; ".join(f"{s.name}: {s.description}" for s in SUITES.values()) + ".",
               type=click.Choice(tuple(SUITES)))
@out_option
@config_option(C, "n", "Samples per problem (K), for every benchmark." + SUITE_DEFAULT.format(
    DEFAULT_PROTOCOL.n, ", ".join(f"{name} {n}" for name, n in PAPER.benchmarks)))
@config_option(C, "suite_n", "--suite: samples per problem of some benchmarks, BENCHMARK=N comma list (wins over "
                             "--n), e.g. aime24=8,minervamath=2.", metavar="BENCH=N,...")
@config_option(C, "temperature", "Sampling temperature; 0 = greedy (top-p is then 1)." + SUITE_DEFAULT.format(
    DEFAULT_PROTOCOL.temperature, PAPER.temperature))
@config_option(C, "top_p", "Nucleus sampling mass, in (0, 1]." + SUITE_DEFAULT.format(DEFAULT_PROTOCOL.top_p,
                                                                                      PAPER.top_p))
@shard_option(C)
@config_option(C, "system_prompt", "A system turn before the problem (as the run's rollout.system_prompt).")
@config_option(C, "chat_template", "Render prompts with this Jinja file instead of the tokenizer's chat "
                                   "template, or 'plain' (Question:/Answer: text, for base models without one).",
               metavar="FILE|plain")
@config_option(C, "answer_instruction", "Appended to every problem in the user turn (\"\" = none); the teacher view "
                                        "repeats it.")
@prompt_template_option(C)
@config_option(C, "thinking", "The chat template's enable_thinking: default, on or off.",
               type=click.Choice(THINKING))
@config_option(C, "max_new_tokens", "Response length cap; a sample that hits it counts as truncated." +
               SUITE_DEFAULT.format(DEFAULT_PROTOCOL.max_new_tokens, PAPER.max_new_tokens))
@config_option(C, "num", "Evaluate only the first N problems (of each benchmark of a suite; 0 = all).")
@config_option(C, "split", "arith/gsm8k split (math500, aime24 and amc23 have only test).", type=click.Choice(SPLITS))
@seed_option(C)
@config_option(C, "engine", "Sampling engine; auto = vllm when installed, else hf (transformers generate).",
               type=click.Choice(ENGINES))
@dtype_option(C)
@threads_option(C)
@config_option(C, "batch_size", "Samples per engine call; 0 = engine default.")
@config_option(C, "workers", "Answer-check worker processes.")
@config_option(C, "timeout", "Seconds per answer check.")
@config_option(C, "bootstrap_resamples", "Bootstrap resamples of the avg@K 95% interval (over problems, seeded by "
                                         "--seed).")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary as JSON (with rows_file: the rows path, "
              "or a suite's folder) instead of the table and the path.")
@overwrite_option(C)
@stage_errors
def eval_command(as_json, **options):
    """Evaluate a model: sample N responses per problem, verify them, print avg@N, pass@k, maj@N.

    Writes one row per sample to OUT (verified-file columns: answer, extracted_answer, correct, …) and the
    summary to <OUT stem>.summary.json; prints the summary table (with a 95% bootstrap interval for avg@N), then
    the rows path, on stdout.

    --suite paper evaluates the paper's five benchmarks into the folder OUT (BENCH.parquet and BENCH.summary.json
    each, then summary.json: avg@n with its interval per benchmark and the five-benchmark average). A rerun
    continues a killed suite (a finished benchmark is not redone); --shard I/N writes part files of every benchmark,
    and a later run without --shard samples any missing shard, merges and summarizes.

    The defaults (4 samples at temperature 0.7, 512 tokens) are a benchmark's; a loop's own held-out check is
    cheaper (loop.eval_n 1, eval_temperature 0 = greedy, eval_max_new_tokens 64, on RUN/eval_prompts.parquet). To
    repeat it on a checkpoint: --benchmark RUN/eval_prompts.parquet --n 1 --temperature 0 --max-new-tokens 64.

    \b
    Example:
      antisd eval --model smollm2-135m --benchmark arith --num 200 --n 4 --max-new-tokens 64 --out eval.parquet
      antisd eval --model runs/antisd_s0/step_0019/checkpoint --benchmark gsm8k --n 8 --out gsm8k.parquet
      antisd eval -m smollm2-135m -b held_out.parquet --temperature 0 --n 1 --out greedy.parquet
      antisd eval --model runs/antisd_s0/step_0099/checkpoint --suite paper --out runs/antisd_s0/step_0099/eval-paper
      antisd eval -m smollm2-135m --suite paper --n 1 --num 3 --max-new-tokens 64 --out paper_smoke
    """
    from rich.console import Console

    from stages.eval import render, render_suite, run, summary_path
    from stages.runs.suites import SUMMARY_NAME

    path = run(EvalConfig(**options))
    summary_file = path / SUMMARY_NAME if options["suite"] else summary_path(path)
    if not summary_file.exists():  # a shard of a suite: its part files are written, the summary comes later
        click.echo(str(path))
        return
    summary = json.loads(summary_file.read_text())
    if as_json:  # stdout holds the JSON alone (`| jq`); the summary names the rows file
        click.echo(json.dumps({**summary, "rows_file": str(path)}, indent=2, sort_keys=True))
        return
    (render_suite if options["suite"] else render)(summary, Console(soft_wrap=True))
    click.echo(str(path))
