"""The two variants of every method: `paper` (METHOD §1–§5 as the paper's text states them) and `official` (§9, the
authors' verl code that produced the paper's numbers), as presets of the knobs where they differ.

A knob named here is `None` in its stage's Config unless set explicitly; `None` takes the value of the run's variant
(`update_preset`), so an explicitly set knob always wins. `update.variant` is the run's one switch: the loop derives
the verify and score knobs of the §9 teacher prompt from it (`PROMPT_PRESETS`) unless the run config sets them.
Items marked [inferred] in METHOD §9 (the Dr.GRPO advantage, the importance-weight cap) are presets like the others.
Data and lookups only: no torch, no config classes (stages.training.config resolves an UpdateConfig with these).
"""

from __future__ import annotations

VARIANTS = ("paper", "official")
DEFAULT_VARIANT = "official"  # reproducing the paper's numbers means running the authors' code
PRE_VARIANT = "paper"  # the variant of a run directory or run state written before variants existed

# update knobs whose default is the variant's (stages.training.config.UpdateConfig fields)
_UPDATE: dict[str, dict[str, object]] = {
    "paper": {
        "weight_decay": 0.0, "clip_high": 0.2, "dual_clip": 0.0, "loss_agg": "token-mean", "adv_scale": "group",
        "is_correction": "off", "u_clip": "off", "u_clamp": 0.0, "term_norm": "none", "length_mask": 0,
        "lam_mode": "batch", "gate_statistic": "entropy",
    },
    "official": {
        "weight_decay": 0.01, "clip_high": 0.28, "dual_clip": 3.0, "loss_agg": "seq-mean-token-mean",
        "adv_scale": "none", "is_correction": "token", "u_clip": "adaptive", "u_clamp": 5.0, "term_norm": "response",
        "length_mask": 12000, "lam_mode": "perplexity", "gate_statistic": "perplexity",
    },
}
# knobs whose default is the method's, in either variant: §9's λ target is max(0.93·M, 1.01) for antisd and
# max(M − 0.10, 1.01) for sd, i.e. max(ratio·M − offset, floor)
_METHOD: dict[str, dict[str, object]] = {
    "sd": {"ppl_target_ratio": 1.0, "ppl_target_offset": 0.10},
}
_METHOD_DEFAULT = {"ppl_target_ratio": 0.93, "ppl_target_offset": 0.0}

UPDATE_KNOBS = (*_UPDATE["paper"], *_METHOD_DEFAULT)

# the teacher prompt of §9 (verify's privileged context, score's teacher turn); the loop applies these for
# update.variant unless the run config sets the knob itself (and score.entropy from update.gate_statistic: only the
# entropy gate reads the entropies)
PROMPT_PRESETS: dict[str, dict[str, dict[str, object]]] = {
    "paper": {
        "verify": {"privileged_fallback": "reference", "privileged_max_chars": 4000, "privileged_max_tokens": 0,
                   "privileged_cut_boxed": False, "privileged_context_tokens": 0, "privileged_keep_head": 1.0},
        "score": {"teacher_layout": "paper", "peer_assessment": True},
    },
    "official": {
        "verify": {"privileged_fallback": "assessment", "privileged_max_chars": 0, "privileged_max_tokens": 3072,
                   "privileged_cut_boxed": True, "privileged_context_tokens": 4096, "privileged_keep_head": 0.25},
        "score": {"teacher_layout": "official", "peer_assessment": False},
    },
}


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return variant


def update_preset(variant: str, method: str) -> dict[str, object]:
    """The value of every knob in UPDATE_KNOBS for `method` under `variant`."""
    return {**_UPDATE[check_variant(variant)], **_METHOD_DEFAULT, **_METHOD.get(method, {})}


def preset_text(knob: str) -> str:
    """How --help shows a knob's default: each variant's value, and a method's own where it has one."""
    if knob in _METHOD_DEFAULT:
        own = "; ".join(f"{method} {values[knob]}" for method, values in _METHOD.items() if knob in values)
        return f"{_METHOD_DEFAULT[knob]}; {own}"
    for stage in ("verify", "score"):
        if knob in PROMPT_PRESETS["paper"][stage]:
            return ", ".join(f"{v} {PROMPT_PRESETS[v][stage][knob]}" for v in VARIANTS) + " (loop: update.variant's)"
    return ", ".join(f"{variant} {_UPDATE[variant][knob]}" for variant in VARIANTS)
