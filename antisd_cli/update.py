"""`antisd update`: scored rollouts + checkpoint → next checkpoint (a thin shell over stages.update)."""

from __future__ import annotations

import click

from antisd_cli.options import (dtype_option, input_path, model_option, out_option, overwrite_option, seed_option,
                                stage_errors, threads_option)


@click.command("update")
@input_path("--scored", "Scored rollouts (Parquet file or directory of parts) from `antisd score`.")
@model_option
@out_option
@click.option("--method", default="antisd", type=click.Choice(["grpo", "sd", "antisd", "rkl-ascent"]),
              help="Per-token advantage (METHOD §2): grpo, sd (+u), antisd (−φ(u)), rkl-ascent (−u).")
@click.option("--lam-max", default=0.5, type=click.FloatRange(min=0), help="λ_max; λ = gate · λ_max.")
@click.option("--warmup-steps", default=5, type=click.IntRange(min=1),
              help="Gate warm-up: steps with λ = 0 whose median teacher entropies calibrate H_warm.")
@click.option("--gate-down", default=0.93, type=click.FloatRange(0, 1, min_open=True),
              help="The gate closes when H < gate-down · H_warm, and reopens at H ≥ H_warm.")
@click.option("--gate", default="auto", type=click.Choice(["auto", "on", "off"]),
              help="Entropy gate: auto = on for antisd and rkl-ascent, off (λ = λ_max always) for sd.")
@click.option("--recalibrate-gate/--no-recalibrate-gate", default=False,
              help="On a resumed run, measure H_warm again over the next warm-up steps.")
@click.option("--lr", default=1e-6, type=click.FloatRange(min=0), help="AdamW learning rate (constant).")
@click.option("--weight-decay", default=0.0, type=click.FloatRange(min=0), help="AdamW weight decay.")
@click.option("--grad-clip", default=1.0, type=click.FloatRange(min=0), help="Gradient-norm clip (0 = off).")
@click.option("--clip-low", default=0.2, type=click.FloatRange(min=0), help="PPO ε_low.")
@click.option("--clip-high", default=0.2, type=click.FloatRange(min=0), help="PPO ε_high (clip-higher if > ε_low).")
@click.option("--loss-agg", default="token-mean",
              type=click.Choice(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
              help="Loss aggregation; normalizers count the whole step batch over all ranks.")
@click.option("--max-response-tokens", default=0, type=click.IntRange(min=0),
              help="seq-mean-token-sum's constant length (0 = longest response of the step).")
@click.option("--adv-eps", default=1e-6, type=click.FloatRange(min=0), help="ε in (R − mean)/(std + ε).")
@click.option("--adv-scale", default="group", type=click.Choice(["group", "none"]),
              help="Divide the group-centred reward by the group std (group) or not (none, Dr.GRPO).")
@click.option("--ppo-epochs", default=1, type=click.IntRange(min=1), help="Passes over the batch.")
@click.option("--mini-batch-size", default=0, type=click.IntRange(min=0),
              help="Sequences per optimizer step (0 = the whole batch: one step, strictly on-policy).")
@click.option("--micro-batch-tokens", default=2048, type=click.IntRange(min=1),
              help="Padded tokens per forward/backward on one rank.")
@click.option("--logprob-chunk", default=64, type=click.IntRange(min=1),
              help="Response positions per LM-head chunk when computing log-probs.")
@click.option("--kl-coef", default=0.0, type=click.FloatRange(min=0),
              help="β: adds β · k3 KL(π_θ‖π_ref) to the loss (same aggregation). > 0 needs ref_logprobs in the "
                   "scored file (antisd score --reference MODEL); 0 = no KL term.")
@click.option("--is-correction", default="off", type=click.Choice(["off", "token"]),
              help="token: truncated importance weight min(exp(student − sampling log-prob), --is-cap).")
@click.option("--is-cap", default=2.0, type=click.FloatRange(min=1), help="Cap of the truncated IS weight.")
@click.option("--deepspeed-config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="DeepSpeed JSON overlaid on the built-in ZeRO-2 default (no optimizer/scheduler sections).")
@click.option("--zero-stage", default=None, type=click.IntRange(0, 3),
              help="ZeRO stage (default: the config file's, else 2).")
@click.option("--state", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Run-state JSON (gate, step, RNG, data cursor); default <model>/antisd_state.json if present.")
@dtype_option
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True,
              help="Recompute activations in backward (less memory).")
@threads_option
@seed_option
@click.option("--force/--no-force", default=False,
              help="Accept a scored file from another model revision, or a run state of another method.")
@overwrite_option
@stage_errors
def update_command(**options):
    """Train the policy one step on scored rollouts and write the next checkpoint.

    The output folder is a Hugging Face model (safetensors, config, tokenizer with chat template) that transformers
    and vLLM load directly, plus deepspeed/ (optimizer state for exact resume), antisd_state.json and metrics.json.
    It is written atomically. Under deepspeed, torchrun or srun every rank runs this same command.

    \b
    Example:
      antisd update --scored scored.parquet --model smollm2-135m --out ckpt_0001
      antisd update --scored s2.parquet --model ckpt_0001 --out ckpt_0002 --method sd
      torchrun --nproc_per_node 8 -m antisd_cli update --scored s.parquet --model ckpt --out next --zero-stage 3
      deepspeed --num_gpus 8 --no_local_rank --module antisd_cli update --scored s.parquet --model ckpt --out next
    """
    from stages.update import UpdateConfig, run

    click.echo(str(run(UpdateConfig(**options))))
