"""`UpdateConfig`: the options of `antisd update` (and the `update:` section of a run config), checked on creation.

The method names and their gate defaults come from the registry in `stages.method.terms`; the aggregation names from
`stages.method.losses`; the variants' presets from `stages.method.variants`. A knob left None takes the value of the
config's `variant` (`resolve_variant` fills them in; every stage function receives a resolved config). This module
holds no training code (`stages.training.trainer`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from stages.common import validation
from stages.lm.models import ATTN_IMPLEMENTATIONS
from stages.method.terms import get_term, method_names
from stages.method.variants import DEFAULT_VARIANT, PRE_VARIANT, UPDATE_KNOBS, VARIANTS, update_preset
from stages.training.schedule import LR_SCHEDULES

GATE_CHOICES = ("auto", "on", "off")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ADV_SCALES = ("group", "none")
IS_CORRECTIONS = ("auto", "off", "token")
U_CLIPS = ("off", "adaptive")
TERM_NORMS = ("none", "response")
LAM_MODES = ("batch", "perplexity")
GATE_STATISTICS = ("entropy", "perplexity")


@dataclass(frozen=True)
class UpdateConfig:
    """Options of `antisd update` (one optimizer step per batch by default: strictly on-policy)."""

    scored: str  # scored Parquet file or directory of parts (schemas.SCORED)
    out: str  # output checkpoint folder (HF + deepspeed/ + antisd_state.json + metrics.json)
    # current policy: HF folder (a previous update's --out), embedded model name or Hub id; None: the model the scored
    # file records (its scorer: the policy whose old log-probs the step uses)
    model: str | None = None
    method: str = "antisd"  # a registered method (stages.method.terms): grpo | sd | antisd | rkl-ascent (METHOD §2)
    # paper (METHOD §1–§5 as written) | official (§9, the authors' code): the default of every knob left None below;
    # None: the run state's (a state written before variants existed: paper), official for a fresh run
    variant: str | None = None
    lam_max: float = 0.5  # λ_max: λ = g·λ_max (batch), the upper clamp of λ_i (perplexity)
    warmup_steps: int = 5  # W: steps with λ = 0 that calibrate the gate (H_warm; σ_ref and M)
    gate_down: float = 0.93  # entropy gate: τ_down = gate_down · H_warm
    gate_statistic: str | None = None  # entropy (METHOD §5: median teacher entropy) | perplexity (§9: mean tppl)
    lam_mode: str | None = None  # batch (λ = g·λ_max for the step) | perplexity (λ_i per response, §9)
    lam_scale: float = 0.2  # perplexity λ_i = clamp(lam_scale · ln(clamp(tppl_i/target, 0.5, ppl_ratio_max)), 0, λ_max)
    ppl_ratio_max: float = 3.0  # the upper clamp of tppl_i / target
    ppl_spike: float = 3.0  # tppl_i above it: λ_i = 0, and left out of M and the gate statistic
    ppl_target_ratio: float | None = None  # target = max(ppl_target_ratio · M − ppl_target_offset, ppl_target_floor)
    ppl_target_offset: float | None = None
    ppl_target_floor: float = 1.01
    ppl_reactivate_ratio: float = 1.07  # the perplexity gate reopens above ppl_reactivate_ratio · M
    u_clip: str | None = None  # off | adaptive: u ← 0 where |u| > u_clip_k · σ_ref (σ_ref from the warm-up, §9)
    u_clip_k: float = 2.0
    u_clamp: float | None = None  # then u ← clamp(u, −u_clamp, u_clamp) (0 = off)
    term_norm: str | None = None  # none | response: z-score the term within each response (population std, §9)
    term_norm_clamp: float = 5.0  # the z-scored term's clamp (0 = off)
    length_mask: int | None = None  # responses of at least this many tokens get no term (0 = off)
    gate: str = "auto"  # auto (the method's registered default: antisd, rkl-ascent gated; sd, grpo not) | on | off
    # measure H_warm again over the next W steps; one-shot: a step whose run state was written by a step that had it
    # set does not restart the warm-up (so a loop with it set re-calibrates once, at its first step)
    recalibrate_gate: bool = False
    lr: float = 1e-6  # AdamW peak learning rate (the schedule's height)
    lr_schedule: str = "constant"  # constant | linear | cosine decay after the warm-up (stages.training.schedule)
    lr_warmup_steps: int = 0  # update steps of linear warm-up from lr/W to lr (0 = none)
    lr_decay_steps: int = 0  # update steps after the warm-up over which linear/cosine reach lr · lr_min_ratio
    lr_min_ratio: float = 0.0  # the decay's floor as a share of lr
    weight_decay: float | None = None  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    clip_low: float = 0.2  # PPO ε_low
    clip_high: float | None = None  # PPO ε_high (clip-higher when > clip_low)
    dual_clip: float | None = None  # dual-clip c (> 1): the loss of a token with A < 0 is at most −c·A (0 = off)
    loss_agg: str | None = None  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    max_response_tokens: int = 0  # seq-mean-token-sum's constant T (0 = longest response of the step)
    adv_eps: float = 1e-6  # ε in A = (R − mean)/(std + ε)
    adv_scale: str | None = None  # group (divide by the group std) | none (Dr.GRPO)
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
    # off | token: truncated IS weight min(exp(s − sampling_logprob), is_cap) per token | auto: token for vLLM or 16-bit
    # rollouts (TRL defaults it on for vLLM), off for the HF engine in fp32, whose sampler is the trainer's forward
    is_correction: str | None = None
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
    advantages_out: str | None = None  # write every response's u, term, λ_i and A_{i,t} to this Parquet file
    train: bool = True  # false: compute and write --advantages-out only (no optimizer step, no checkpoint)

    def __post_init__(self):
        from stages.method.losses import AGGREGATIONS  # torch: only when a config is made, not for --help

        check = validation.Checks(self)
        check.choice("method", method_names())
        if self.variant is not None:
            check.choice("variant", VARIANTS)
        check.choice("gate", GATE_CHOICES)
        for name, valid in (("loss_agg", AGGREGATIONS), ("adv_scale", ADV_SCALES), ("is_correction", IS_CORRECTIONS),
                            ("u_clip", U_CLIPS), ("term_norm", TERM_NORMS), ("lam_mode", LAM_MODES),
                            ("gate_statistic", GATE_STATISTICS)):
            if getattr(self, name) is not None:
                check.choice(name, valid)
        check.choice("dtype", DTYPE_CHOICES)
        check.choice("lr_schedule", LR_SCHEDULES)
        check.choice("attn_implementation", ATTN_IMPLEMENTATIONS)
        check.above(0, "comm_timeout_minutes")
        check.require(self.lr_schedule == "constant" or self.lr_decay_steps >= 1, "lr_decay_steps",
                      f"must be >= 1 with lr_schedule {self.lr_schedule} (the steps the decay takes)")
        check.between("lr_min_ratio", 0, 1)
        check.at_least(1, "ppo_epochs", "micro_batch_tokens", "warmup_steps", "logprob_chunk", "is_cap")
        check.at_least(0, "lr", "grad_clip", "clip_low", "lam_max", "mini_batch_size",
                       "max_response_tokens", "adv_eps", "kl_coef", "threads", "lr_warmup_steps", "lr_decay_steps",
                       "overlong_buffer", "overlong_penalty", "overlong_max_tokens", "lora_rank", "u_clip_k",
                       "term_norm_clamp", "lam_scale", "ppl_target_floor", "weight_decay", "clip_high", "dual_clip",
                       "u_clamp", "length_mask", "ppl_target_ratio", "ppl_target_offset")
        check.above(0, "ppl_spike")
        check.at_least(1, "ppl_ratio_max", "ppl_reactivate_ratio")
        self._check_combination(check)
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

    def _check_combination(self, check: validation.Checks) -> None:
        """Knob combinations the step cannot run, judged on the values the variant resolves them to."""
        if self.variant not in (None, *VARIANTS) or self.method not in method_names():
            return  # reported by the choice checks
        knob = resolved_knobs(self)  # a variant left to the run state is judged as official here, and again resolved
        if knob["dual_clip"]:
            check.require(knob["dual_clip"] > 1, "dual_clip", f"must be > 1 (or 0 = off), got {knob['dual_clip']}")
        needs = [f"{name} {knob[name]}" for name, value in (("lam_mode", "perplexity"), ("u_clip", "adaptive"))
                 if knob[name] == value]
        verb = "needs" if len(needs) == 1 else "need"
        check.require(not needs or knob["gate_statistic"] == "perplexity", "gate_statistic",
                      f"{' and '.join(needs)} {verb} the warm-up calibration of gate_statistic perplexity (σ_ref, M), "
                      f"not {knob['gate_statistic']}")
        check.require(self.train or self.advantages_out is not None, "train",
                      "--no-train computes nothing without --advantages-out")


def state_variant(state: dict | None) -> str | None:
    """The variant a run state was written by: its `variant`; paper for one written before variants existed (it has
    a gate but no variant); None for no state."""
    if not state:
        return None
    return state.get("variant", PRE_VARIANT if "gate" in state else None)


def resolved_knobs(config: UpdateConfig, variant: str | None = None) -> dict:
    """The value of every variant knob: the config's where set, else its variant's (for its method)."""
    preset = update_preset(variant or config.variant or DEFAULT_VARIANT, config.method)
    return {name: preset[name] if getattr(config, name) is None else getattr(config, name) for name in UPDATE_KNOBS}


def resolve_variant(config: UpdateConfig, state: dict | None = None) -> UpdateConfig:
    """`config` with its variant (given; else the run state's, `state_variant`; else official) and every knob left
    None at that variant's value: what the trainer runs and the run state records."""
    variant = config.variant or state_variant(state) or DEFAULT_VARIANT
    return replace(config, variant=variant, **resolved_knobs(config, variant))


def method_settings(config: UpdateConfig) -> dict:
    """The resolved options that decide the step's numbers (no paths, no speed or output settings), for the run state
    and the run manifest."""
    skip = {"scored", "out", "model", "state", "deepspeed_config", "threads", "progress", "force", "overwrite",
            "advantages_out", "train", "micro_batch_tokens", "logprob_chunk", "share_prefix", "gradient_checkpointing",
            "optimizer_state"}
    resolved = resolve_variant(config)
    return {f.name: getattr(resolved, f.name) for f in fields(resolved) if f.name not in skip}


def resolved_gradient_checkpointing(value: bool | None, device: str) -> bool:
    """update.gradient_checkpointing as it applies on `device`: the value set, else on for CUDA, off elsewhere."""
    return value if value is not None else str(device).startswith("cuda")


def gated(config: UpdateConfig) -> bool:
    """Whether the entropy gate is on: `--gate on|off`, or the method's registered default for `auto`."""
    return get_term(config.method).gated_by_default if config.gate == "auto" else config.gate == "on"
