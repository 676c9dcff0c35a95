"""`antisd rollout`: prompts Parquet → rollouts Parquet (n samples per prompt)."""

from __future__ import annotations

import click

from antisd_cli.options import (
    attn_option,
    config_option,
    dtype_option,
    input_path,
    model_option,
    out_option,
    overwrite_option,
    prompt_template_option,
    seed_option,
    shard_option,
    stage_errors,
    threads_option,
)
from stages.lm.engine import ENGINES
from stages.lm.prompts import THINKING
from stages.lm.sampling import RolloutConfig

C = RolloutConfig


@click.command("rollout")
@model_option(C)
@input_path("--prompts", "Prompts Parquet (from `antisd data prepare`), a file or a directory of parts.")
@out_option
@config_option(C, "n", "Samples per prompt (the group size).")
@config_option(C, "temperature", "Sampling temperature; 0 = greedy.")
@config_option(C, "top_p", "Nucleus sampling mass, in (0, 1].")
@config_option(C, "max_new_tokens", "Response length cap; a sample that hits it has finish_reason 'length'.")
@seed_option(C)
@config_option(C, "engine", "Sampling engine; auto = vllm when installed, else hf (transformers generate).",
               type=click.Choice(ENGINES))
@config_option(C, "max_prompts", "Use only the first N prompts of the file, before sharding (0 = all); --num as in "
                                 "`data prepare` and `eval`.", "--num")
@shard_option(C)
@dtype_option(C)
@threads_option(C)
@config_option(C, "batch_size", "Samples (prompts × n) per engine call; 0 = engine default (hf 64, vllm 1024).")
@config_option(C, "device", "HF engine device: auto (cuda if available), cpu, cuda or cuda:N.")
@attn_option(C)
@config_option(C, "gpu_memory_utilization", "vLLM on GPU: the share of the card it takes for weights and KV "
                                           "cache (default: vLLM's 0.9 when alone; in `loop`, what the memory plan "
                                           "leaves beside the resident trainer).", type=float)
@config_option(C, "tensor_parallel_size", "vLLM: GPUs one engine spans (tensor parallel); in `loop` as N ranks, "
                                         "groups of this many ranks share one engine.")
@config_option(C, "share_prefix", "HF engine: prefill each group's prompt once per batch and repeat its cache over the "
                                  "samples (the same tokens, about half the time at n = 8).")
@config_option(C, "system_prompt", "A system turn before the few-shot turns and the problem; score's teacher view "
                                   "gets the same (read back from the file's metadata).")
@config_option(C, "chat_template", "Render prompts with this Jinja file instead of the tokenizer's chat "
                                   "template, or 'plain' (Question:/Answer: text, for base models without one); "
                                   "score renders the teacher view with it too.", metavar="FILE|plain")
@config_option(C, "answer_instruction", "Appended to every problem in the user turn (\"\" = none); the teacher view "
                                        "repeats it.")
@prompt_template_option(C)
@config_option(C, "thinking", "The chat template's enable_thinking (Qwen3): default (the template's), on or off.",
               type=click.Choice(THINKING))
@config_option(C, "progress", "Rich progress bar on stderr (shown only on a terminal).")
@overwrite_option(C)
@stage_errors
def rollout_command(**options):
    """Sample N responses per prompt and write one row per sample.

    Each row keeps the prompt's columns, the exact prompt and response token ids, the response text, the
    log-prob of every sampled token (after temperature/top-p) and why it stopped. Same seed, same rows (hf).

    \b
    Example:
      antisd data prepare arith --num 32 --out prompts.parquet
      antisd rollout --prompts prompts.parquet --out rollouts.parquet --n 8 --max-new-tokens 128
      antisd rollout --prompts prompts.parquet --out rollouts/ --shard 0/4   # part file of shard 0
    """
    from stages.rollout import run

    click.echo(str(run(RolloutConfig(**options))))
