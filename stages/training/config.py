"""`UpdateConfig`: the options of `antisd update` (and the `update:` section of a run config), checked on creation.

The method names and their gate defaults come from the registry in `stages.method.terms`; the aggregation names from
`stages.method.losses`. This module holds no training code (`stages.training.trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.common import validation
from stages.lm.models import ATTN_IMPLEMENTATIONS
from stages.method.terms import get_term, method_names
from stages.training.schedule import LR_SCHEDULES

GATE_CHOICES = ("auto", "on", "off")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ADV_SCALES = ("group", "none")
IS_CORRECTIONS = ("auto", "off", "token")


@dataclass(frozen=True)
class UpdateConfig:
    """Options of `antisd update` (one optimizer step per batch by default: strictly on-policy)."""

    scored: str  # scored Parquet file or directory of parts (schemas.SCORED)
    out: str  # output checkpoint folder (HF + deepspeed/ + antisd_state.json + metrics.json)
    model: str = "smollm2-135m"  # current policy: HF folder (a previous update's --out) or embedded model name
    method: str = "antisd"  # a registered method (stages.method.terms): grpo | sd | antisd | rkl-ascent (METHOD §2)
    lam_max: float = 0.5  # λ_max; λ = g·λ_max
    warmup_steps: int = 5  # W: gated steps with λ = 0 that calibrate H_warm
    gate_down: float = 0.93  # τ_down = gate_down · H_warm
    gate: str = "auto"  # auto (the method's registered default: antisd, rkl-ascent gated; sd, grpo not) | on | off
    # measure H_warm again over the next W steps; one-shot: a step whose run state was written by a step that had it
    # set does not restart the warm-up (so a loop with it set re-calibrates once, at its first step)
    recalibrate_gate: bool = False
    lr: float = 1e-6  # AdamW peak learning rate (the schedule's height)
    lr_schedule: str = "constant"  # constant | linear | cosine decay after the warm-up (stages.training.schedule)
    lr_warmup_steps: int = 0  # update steps of linear warm-up from lr/W to lr (0 = none)
    lr_decay_steps: int = 0  # update steps after the warm-up over which linear/cosine reach lr · lr_min_ratio
    lr_min_ratio: float = 0.0  # the decay's floor as a share of lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    clip_low: float = 0.2  # PPO ε_low
    clip_high: float = 0.2  # PPO ε_high (clip-higher when > clip_low)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    max_response_tokens: int = 0  # seq-mean-token-sum's constant T (0 = longest response of the step)
    adv_eps: float = 1e-6  # ε in A = (R − mean)/(std + ε)
    adv_scale: str = "group"  # group (divide by the group std) | none (Dr.GRPO)
    # DAPO's overlong shaping: a reward penalty falling linearly to −overlong_penalty over the last overlong_buffer
    # tokens before overlong_max_tokens (0 = the rollouts' max_new_tokens, read from the scored file); 0 = off
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    overlong_max_tokens: int = 0
    overlong_filter: bool = False  # truncated responses (finish_reason length) carry no loss (their rewards still
    #   count in their group's advantage)
    ppo_epochs: int = 1  # passes over the batch
    mini_batch_size: int = 0  # sequences per optimizer step (0 = whole batch: one step)
    micro_batch_tokens: int = 2048  # padded tokens per forward/backward on one rank
    logprob_chunk: int | None = None  # response positions per LM-head chunk (None: 64 on CPU, a 4 GiB budget on CUDA)
    kl_coef: float = 0.0  # β of β·k3 KL to a frozen reference (0 = none; > 0 needs ref_logprobs: score --reference)
    # truncated IS weight min(exp(s − sampling_logprob), is_cap) per token: auto (token for vLLM or 16-bit rollouts,
    # as TRL defaults it on; off for the HF engine in fp32, whose sampler is the trainer's forward) | off | token
    is_correction: str = "auto"
    is_cap: float = 2.0  # cap of the truncated IS weight
    deepspeed_config: str | None = None  # DeepSpeed JSON overlaid on the built-in ZeRO-2 default
    zero_stage: int | None = None  # ZeRO stage 0-3 (None: the config file's, else 2)
    state: str | None = None  # run-state JSON (default: <model>/antisd_state.json if present, else fresh)
    dtype: str = "auto"  # auto: fp32 weights on CPU, DeepSpeed bf16 on GPU | float32 | bfloat16 | float16 (GPU)
    # recompute layer activations in backward: less memory, ~30 % more compute, and no prefix sharing in the update
    # (transformers drops a checkpointed layer's KV cache); None: on for CUDA (one 8k-token response of a 4B model
    # keeps ~38 GB of activations without it, docs/memory.md), off on CPU (short arith responses fit; prefixes shared)
    gradient_checkpointing: bool | None = None
    share_prefix: bool = True  # run each group's prompt once per micro-batch, its cache repeated over the samples
    attn_implementation: str = "auto"  # auto (transformers' default: sdpa) | sdpa | eager | flash_attention_2
    comm_timeout_minutes: float = 60.0  # bound of every collective (NCCL's default 10 min; rank 0 fsyncs checkpoints)
    # LoRA (PEFT): train rank-r adapters on a frozen base (0 = full training); checkpoints hold the merged weights
    # (what rollout and score load) and the adapter (CKPT/adapter), stages.training.lora
    lora_rank: int = 0
    lora_alpha: float = 32.0  # the adapter's scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # > 0 makes the update's log-probs differ from score's (the PPO ratio starts ≠ 1)
    lora_target_modules: str = "all-linear"  # all-linear (every linear layer but the output head) | a comma list
    lora_merge: bool = True  # write the merged weights too (false: adapter only, merged at load; not for vLLM)
    # write deepspeed/ (the ZeRO optimizer and engine state) into --out: what continuing exactly needs; `loop` writes
    # it every loop.checkpoint_every steps and at the end, and weights-only folders in between
    optimizer_state: bool = True
    threads: int = 0  # torch CPU threads (0 = OMP_NUM_THREADS if set, else the cores this process may use)
    progress: bool = True  # tokens/s and ETA on stderr: a bar on a terminal, a record every 30 s elsewhere
    seed: int = 0  # seeds mini-batch order; RNG state is restored from the run state when present
    # continue a run state written by another method (a GRPO checkpoint as AntiSD: the paper's continual run): its
    # step, RNG and optimizer carry on, and the gate re-calibrates H_warm over the next W steps
    switch_method: bool = False
    # load the DeepSpeed state (deepspeed/*.pt) with full unpickling, which can run code the checkpoint's writer put
    # there; without it only tensors, plain containers and DeepSpeed's own state classes load (a checkpoint holding
    # anything else is refused)
    trust_checkpoint: bool = False
    force: bool = False  # accept a scored file whose old log-probs came from another model revision
    overwrite: bool = False  # replace an existing --out folder

    def __post_init__(self):
        from stages.method.losses import AGGREGATIONS  # torch: only when a config is made, not for --help

        check = validation.Checks(self)
        check.choice("method", method_names())
        check.choice("gate", GATE_CHOICES)
        check.choice("loss_agg", AGGREGATIONS)
        check.choice("adv_scale", ADV_SCALES)
        check.choice("is_correction", IS_CORRECTIONS)
        check.choice("dtype", DTYPE_CHOICES)
        check.choice("lr_schedule", LR_SCHEDULES)
        check.choice("attn_implementation", ATTN_IMPLEMENTATIONS)
        check.above(0, "comm_timeout_minutes")
        check.require(self.lr_schedule == "constant" or self.lr_decay_steps >= 1, "lr_decay_steps",
                      f"must be >= 1 with lr_schedule {self.lr_schedule} (the steps the decay takes)")
        check.between("lr_min_ratio", 0, 1)
        check.at_least(1, "ppo_epochs", "micro_batch_tokens", "warmup_steps", "is_cap", "logprob_chunk")
        check.at_least(0, "lr", "weight_decay", "grad_clip", "clip_low", "clip_high", "lam_max", "mini_batch_size",
                       "max_response_tokens", "adv_eps", "kl_coef", "threads", "lr_warmup_steps", "lr_decay_steps",
                       "overlong_buffer", "overlong_penalty", "overlong_max_tokens", "lora_rank")
        check.above(0, "lora_alpha")
        check.require(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        check.require(bool(self.lora_target_modules.strip(" ,")), "lora_target_modules", "empty")
        check.require(not self.lora_rank or self.zero_stage != 3, "lora_rank",
                      "LoRA is not available with ZeRO-3 (use --zero-stage 2: the adapter's optimizer state is small)")
        check.require(not self.overlong_max_tokens or self.overlong_buffer < self.overlong_max_tokens,
                      "overlong_buffer", f"must be below overlong_max_tokens {self.overlong_max_tokens}")
        check.between("gate_down", 0, 1, low_open=True)
        if self.zero_stage is not None:
            check.choice("zero_stage", (0, 1, 2, 3))
        check.done()


def resolved_gradient_checkpointing(value: bool | None, device: str) -> bool:
    """update.gradient_checkpointing as it applies on `device`: the value set, else on for CUDA, off elsewhere."""
    return value if value is not None else str(device).startswith("cuda")


def gated(config: UpdateConfig) -> bool:
    """Whether the entropy gate is on: `--gate on|off`, or the method's registered default for `auto`."""
    return get_term(config.method).gated_by_default if config.gate == "auto" else config.gate == "on"
