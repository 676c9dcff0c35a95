"""`antisd update`: scored rollouts + checkpoint → next checkpoint (a thin shell over stages.update)."""

from __future__ import annotations

import click

from antisd_cli.options import (
    MODEL_HELP,
    BadInput,
    attn_option,
    config_option,
    dtype_option,
    input_path,
    model_option,
    overwrite_option,
    seed_option,
    stage_errors,
    threads_option,
    variant_option,
)
from stages.method.terms import method_names
from stages.method.variants import VARIANTS
from stages.training.config import GATE_STATISTICS, IS_CORRECTIONS, LAM_MODES, TERM_NORMS, U_CLIPS, UpdateConfig

C = UpdateConfig


@click.command("update")
@input_path("--scored", "Scored rollouts (Parquet file or directory of parts) from `antisd score`.")
@model_option(C, MODEL_HELP + " The policy to train: by default the one the scored file records (its scorer, "
                              "whose log-probs are the step's old policy).",
              show_default="the scored file's model (its metadata)")
@click.option("--out", "-o", type=click.Path(dir_okay=True), default=None,
              help="Output checkpoint folder (required unless --no-train).")
@config_option(C, "method", "Per-token advantage (METHOD §2): grpo, sd (+u), antisd (−φ(u)), rkl-ascent (−u).",
               type=click.Choice(method_names()))
@config_option(C, "variant", "paper: METHOD §1–§5 as the paper's text states them; official: §9, the authors' code "
                             "that produced the paper's numbers. Sets the default of every option whose default "
                             "reads 'paper …, official …' (an option set explicitly wins). A variant other than "
                             "the run state's needs --switch-method.",
               type=click.Choice(VARIANTS), show_default="the run state's; official for a fresh run, paper for a "
                                                         "state written before variants existed")
@config_option(C, "lam_max", "λ_max: λ = gate · λ_max (--lam-mode batch), the upper clamp of λ_i (perplexity).")
@config_option(C, "warmup_steps", "Gate warm-up: steps with λ = 0 that calibrate the gate (H_warm; σ_ref and M).")
@variant_option(C, "gate_statistic", "What the gate watches: entropy (the step's median teacher entropy, METHOD §5) "
                                     "or perplexity (mean teacher perplexity of the responses below --ppl-spike, §9).",
                type=click.Choice(GATE_STATISTICS))
@config_option(C, "gate_down", "Entropy gate: closes when H < gate-down · H_warm, and reopens at H ≥ H_warm.")
@config_option(C, "gate", "Gate: auto = on for antisd and rkl-ascent, off (λ acts at every step after the warm-up; "
                          "with the entropy gate from the first) for sd and grpo.",
               type=click.Choice(["auto", "on", "off"]))
@variant_option(C, "lam_mode", "batch: one λ = g · λ_max for the step (§5); perplexity: λ_i = clamp(lam-scale · "
                               "ln(clamp(tppl_i / target, 0.5, ppl-ratio-max)), 0, λ_max) per response (§9).",
                type=click.Choice(LAM_MODES))
@config_option(C, "lam_scale", "Perplexity λ_i: the factor of the logarithm.")
@config_option(C, "ppl_ratio_max", "Perplexity λ_i: the upper clamp of tppl_i / target.")
@config_option(C, "ppl_spike", "Responses with a teacher perplexity above it get λ_i = 0 and are left out of M and of "
                               "the gate statistic.")
@variant_option(C, "ppl_target_ratio", "target = max(ppl-target-ratio · M − ppl-target-offset, ppl-target-floor), M "
                                       "the upper median of the warm-up's tppl < ppl-spike; λ_i = 0 below it, and the "
                                       "perplexity gate closes when its statistic falls under it.")
@variant_option(C, "ppl_target_offset", "See --ppl-target-ratio.")
@config_option(C, "ppl_target_floor", "See --ppl-target-ratio.")
@config_option(C, "ppl_reactivate_ratio", "The closed perplexity gate reopens when its statistic exceeds this · M.")
@variant_option(C, "u_clip", "adaptive: u ← 0 where |u| > u-clip-k · σ_ref, σ_ref the warm-up's mean per-response "
                             "std of u (§9); off: u as scored.", type=click.Choice(U_CLIPS))
@config_option(C, "u_clip_k", "The adaptive u-clip's k.")
@variant_option(C, "u_clamp", "Then clamp u to ±u-clamp (0 = off).")
@variant_option(C, "term_norm", "response: z-score the method's term within each response (population std; a "
                                "constant or 1-token response gets 0), so it only moves credit between a response's "
                                "tokens (§9); none: the term as it is (§2).", type=click.Choice(TERM_NORMS))
@config_option(C, "term_norm_clamp", "Clamp of the z-scored term (0 = off).")
@variant_option(C, "length_mask", "Responses of at least this many tokens get no token term (0 = off).")
@config_option(C, "recalibrate_gate", "Measure H_warm again over the next warm-up steps (once: steps that follow one "
                                      "run with this flag do not restart the warm-up).")
@config_option(C, "lr", "AdamW peak learning rate (the height of --lr-schedule).")
@config_option(C, "lr_schedule", "Learning rate after the warm-up, by the run's update step (kept in the run state, "
                                 "so a resumed run follows the same curve): constant, linear or cosine decay.",
               type=click.Choice(["constant", "linear", "cosine"]))
@config_option(C, "lr_warmup_steps", "Update steps of linear learning-rate warm-up from lr/W to lr (0 = none).")
@config_option(C, "lr_decay_steps", "Update steps after the warm-up over which linear/cosine decay reach "
                                    "lr · lr-min-ratio (needed by linear and cosine).")
@config_option(C, "lr_min_ratio", "Floor of the decay as a share of --lr.")
@variant_option(C, "weight_decay", "AdamW weight decay.")
@config_option(C, "grad_clip", "Gradient-norm clip (0 = off).")
@config_option(C, "clip_low", "PPO ε_low.")
@variant_option(C, "clip_high", "PPO ε_high (clip-higher if > ε_low).")
@variant_option(C, "dual_clip", "Dual-clip c > 1: the loss of a token with A < 0 is at most −c·A (0 = off).")
@variant_option(C, "loss_agg", "Loss aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum; normalizers "
                               "count the whole step batch over all ranks.",
                type=click.Choice(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]))
@config_option(C, "max_response_tokens", "seq-mean-token-sum's constant length (0 = longest response of the step).")
@config_option(C, "adv_eps", "ε in (R − mean)/(std + ε).")
@variant_option(C, "adv_scale", "Divide the group-centred reward by the group std (group) or not (none, Dr.GRPO).",
                type=click.Choice(["group", "none"]))
@config_option(C, "overlong_buffer", "DAPO overlong shaping: tokens before --overlong-max-tokens over which a reward "
                                     "penalty falls linearly to −overlong-penalty (0 = off).")
@config_option(C, "overlong_penalty", "The overlong penalty at the response limit.")
@config_option(C, "overlong_max_tokens", "The response limit of the overlong penalty (0 = the rollouts' "
                                         "max_new_tokens, read from the scored file).")
@config_option(C, "overlong_filter", "Truncated responses (finish_reason length) carry no loss; their rewards still "
                                     "count in their group's advantage.")
@config_option(C, "ppo_epochs", "Passes over the batch.")
@config_option(C, "mini_batch_size", "Sequences per optimizer step (0 = the whole batch: one step, strictly "
                                     "on-policy).")
@config_option(C, "micro_batch_tokens", "Padded tokens per forward/backward on one rank.")
@config_option(C, "progress", "Show tokens/s and ETA on stderr (a bar on a terminal, a line every 30 s in a file).")
@config_option(C, "logprob_chunk", "Response positions per LM-head chunk when computing log-probs (default: 64 on "
                                    "CPU, on CUDA as many as fit 4 GiB of fp32 logits, as score).")
@config_option(C, "kl_coef", "β: adds β · k3 KL(π_θ‖π_ref) to the loss (same aggregation). > 0 needs ref_logprobs "
                             "in the scored file (antisd score --reference MODEL); 0 = no KL term.")
@variant_option(C, "is_correction", "token: truncated importance weight min(exp(student − sampling log-prob), "
                                    "--is-cap); auto: token when the rollouts came from vLLM or a 16-bit sampler, off "
                                    "for the HF engine in fp32 (the trainer's own forward).",
                type=click.Choice(IS_CORRECTIONS))
@config_option(C, "is_cap", "Cap of the truncated IS weight (>= 1).")
@config_option(C, "deepspeed_config", "DeepSpeed JSON overlaid on the built-in ZeRO-2 default (no optimizer/scheduler "
                                      "sections).", type=click.Path(exists=True, dir_okay=False))
@config_option(C, "zero_stage", "ZeRO stage 0-3 (default: the config file's, else 2).")
@config_option(C, "state", "Run-state JSON (gate, step, RNG); default <model>/antisd_state.json if present.",
               type=click.Path(exists=True, dir_okay=False))
@config_option(C, "switch_method", "Accept a run state written by another --method (continue a GRPO checkpoint as "
                                   "AntiSD): its step, RNG and optimizer carry on, and the gate re-calibrates H_warm.")
@config_option(C, "optimizer_state", "Write deepspeed/ (the optimizer state) into --out, what continuing exactly from "
                                     "it needs; --no-optimizer-state writes the weights and run state only.")
@dtype_option(C)
@attn_option(C)
@config_option(C, "comm_timeout_minutes", "Bound of every collective between ranks (NCCL's own default is 10 "
                                          "minutes; rank 0 writes and fsyncs the checkpoint while the others wait).")
@config_option(C, "gradient_checkpointing", "Recompute activations in backward: less memory, ~30% more compute, and "
                                            "no shared prefixes (the cache of a checkpointed layer is dropped). "
                                            "Default: on for CUDA, off on CPU.")
@config_option(C, "share_prefix", "Run each group's prompt once per micro-batch, its cache repeated over the samples "
                                  "(the same gradients, fewer positions).")
@config_option(C, "lora_rank", "Train rank-r LoRA adapters (PEFT) on the frozen model (0 = full training); --out "
                               "holds the merged weights and the adapter in adapter/.")
@config_option(C, "lora_alpha", "LoRA scale numerator: the adapter is scaled by alpha / rank.")
@config_option(C, "lora_dropout", "Dropout on the adapter's input (> 0: the update's log-probs differ from score's).")
@config_option(C, "lora_target_modules", "Layers that get adapters: all-linear (every linear layer but the output "
                                         "head) or a comma list of module names (q_proj,v_proj).")
@config_option(C, "lora_merge", "Write the merged weights next to the adapter (--no-lora-merge: adapter only; "
                                "stages merge it into its base when they load it; not for vLLM).")
@threads_option(C)
@seed_option(C, "Seeds the mini-batch order; the RNG state is restored from the run state when present.")
@config_option(C, "trust_checkpoint", "Load --model's DeepSpeed state (deepspeed/*.pt) with full unpickling, which "
                                    "can run code its writer put there; without it only tensors and DeepSpeed's own "
                                    "state classes load, and a file with anything else is refused.")
@config_option(C, "force", "Accept a scored file whose old log-probs came from another model revision.")
@config_option(C, "advantages_out", "Also write what the step trains on, one row per response: sequence advantage, "
                                    "λ_i, teacher perplexity, and per token u, the term before and after "
                                    "normalisation and the final advantage (antisd inspect FILE --row N shows it "
                                    "beside the tokens).", metavar="FILE.parquet")
@config_option(C, "train", "--no-train: write --advantages-out only (the run state's gate advanced, nothing saved; "
                           "no model, no checkpoint).")
@overwrite_option(C)
@stage_errors
def update_command(**options):
    """Train the policy one step on scored rollouts and write the next checkpoint.

    The output folder is a Hugging Face model (safetensors, config, tokenizer with chat template) that transformers
    and vLLM load directly, plus deepspeed/ (optimizer state for exact resume), antisd_state.json and metrics.json.
    It is written atomically. Under deepspeed, torchrun or srun every rank runs this same command.

    \b
    Example:
      antisd update --scored scored.parquet --model smollm2-135m --out ckpt_0001
      antisd update --scored s2.parquet --model ckpt_0001 --out ckpt_0002 --method sd --switch-method
      antisd update --scored s.parquet --model ckpt --variant paper --no-train --advantages-out adv.parquet
      torchrun --nproc_per_node 8 -m antisd_cli update --scored s.parquet --model ckpt --out next --zero-stage 3
      deepspeed --num_gpus 8 --no_local_rank --module antisd_cli update --scored s.parquet --model ckpt --out next
    """
    from stages.update import run

    if options["out"] is None:
        if options["train"]:
            raise BadInput("--out: required (unless --no-train)")
        options["out"] = ""
    click.echo(str(run(UpdateConfig(**options))))
