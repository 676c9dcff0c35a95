"""The policy loss of METHOD §3 and what it is made of: aggregation, PPO-clip, the optional k3 KL, IS weights, and the
METHOD §6 statistics of the PMI.

Pure functions of tensors and explicit scalars, returning tensors and small result records (the caller names the
logged metrics: `stages.common.metrics`). Shapes: B sequences, T padded response positions, `mask` [B, T] true on
response tokens; padded positions may hold anything and never reach a result. Nothing here pads, batches, runs a
model or reduces across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from stages.method.terms import antisd_term

# --- aggregation (METHOD §3 Decision): one table, read by the step normalizer and by `aggregate` ------------------

@dataclass(frozen=True)
class Aggregation:
    """How token losses become one number: numerator over the step's tokens, divided by a step-wide constant."""

    name: str
    per_sequence: bool  # numerator Σ_i (Σ_t m·v / T_i) rather than Σ_{i,t} m·v
    sequences_only: bool  # denominator counts sequences (×T when `per_token_budget`), not tokens
    per_token_budget: bool  # denominator B·T with T a constant length budget (Dr.GRPO)


AGGREGATIONS = {a.name: a for a in (
    Aggregation("token-mean", per_sequence=False, sequences_only=False, per_token_budget=False),
    Aggregation("seq-mean-token-mean", per_sequence=True, sequences_only=True, per_token_budget=False),
    Aggregation("seq-mean-token-sum", per_sequence=False, sequences_only=True, per_token_budget=True),
)}


def _aggregation(agg: str) -> Aggregation:
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid: {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[agg]


def step_normalizer(agg: str, response_lengths: Sequence[int] | torch.Tensor, max_response_tokens: int | None = None
                    ) -> float:
    """The loss denominator for a whole optimizer step, from the response lengths of ALL its sequences (§3).

    token-mean: Σ_i T_i (response tokens of the step). seq-mean-token-mean: B_step (sequences of the step).
    seq-mean-token-sum: B_step · max_response_tokens (Dr.GRPO's constant; default the longest response of the step,
    pass the generation budget to make it a true constant across steps). Pass the result as `normalizer=` to every
    micro-batch's `policy_loss`; the micro-batch losses then sum to the loss of the whole step.
    """
    mode = _aggregation(agg)
    lengths = [int(x) for x in (response_lengths.tolist() if isinstance(response_lengths, torch.Tensor)
                                else response_lengths)]
    if not mode.sequences_only:
        return float(max(sum(lengths), 1))
    if not mode.per_token_budget:
        return float(max(len(lengths), 1))
    budget = max_response_tokens if max_response_tokens is not None else max(lengths, default=1)
    return float(max(len(lengths), 1) * max(budget, 1))


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean",
              normalizer: float | None = None) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar: numerator / normalizer  (METHOD §3 Decision).

    token-mean and seq-mean-token-sum: numerator Σ_{i,t} m·v; seq-mean-token-mean: Σ_i (Σ_t m·v / T_i), sequences
    with T_i = 0 contributing 0. normalizer None means "this call is the whole step": Σ T_i, B, and B·T
    respectively (T = this tensor's padded width). With micro-batches pass `step_normalizer(...)` instead, so that
    the sum of micro-batch results (and of their gradients) equals the full-batch value.
    """
    mode = _aggregation(agg)
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros_like(values))  # [B, T]; NaN in padding never leaks
    lengths = mask.sum(-1)  # [B]
    if mode.per_sequence:
        numerator = (masked.sum(-1) / lengths.clamp(min=1)).sum()
    else:
        numerator = masked.sum()
    if normalizer is None:  # this call is the whole step; the padded width is the length budget
        normalizer = step_normalizer(agg, lengths, max_response_tokens=mask.shape[1])
    return numerator / float(normalizer)


@dataclass(frozen=True)
class PolicyLossStats:
    """Statistics of one `policy_loss` call over its masked tokens (merge micro-batches weighting by `tokens`)."""

    pg_loss: float  # the loss value
    clip_frac: float  # clip_frac_low + clip_frac_high
    clip_frac_low: float  # A < 0 and ρ < 1 − ε_low
    clip_frac_high: float  # A > 0 and ρ > 1 + ε_high
    kl_k1: float  # mean(s − log π_θ): KL(old‖new) estimate from tokens sampled by old
    approx_kl: float  # mean(ρ − 1 − log ρ): the k3 estimate of the same KL
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    tokens: int
    clip_frac_dual: float = 0.0  # A < 0 and ρ > c: the dual clip bounds the loss at −c·A


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, agg: str = "token-mean",
                normalizer: float | None = None, dual_clip: float = 0.0) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO-clip loss_t = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A), ρ = exp(log π_θ(y_t) − s_t)  (METHOD §3).

    dual_clip c > 1 (METHOD §9: c = 3; 0 = off) bounds the loss of a token with A < 0 at −c·A:
    loss_t = min(−c·A, loss_t) where A < 0 (dual-clip PPO, as verl's clip_ratio_c), so a far off-policy token with a
    negative advantage cannot dominate the step. On-policy (ρ = 1) it never binds.

    logprobs [B, T] carries the gradient; old_logprobs (s_t) and advantages are constants (detached here).
    The token losses are reduced by `aggregate(agg, normalizer)`; see there for the micro-batch contract.
    log ρ is clamped to ±20 before exp (a finite loss even for a wildly off-policy token; the clamp does not act
    on-policy, where ρ = 1).
    Returns the loss and its `PolicyLossStats`.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs)).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = torch.where(mask, advantages.detach(), torch.zeros_like(advantages)).to(ratio.dtype)  # [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    token_loss = torch.maximum(unclipped, clipped)  # [B, T] = −min(ρA, clip(ρ)A)
    if dual_clip > 0:
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, -adv * dual_clip), token_loss)  # [B, T]
    loss = aggregate(token_loss, mask, agg, normalizer)
    with torch.no_grad():
        n = max(int(mask.sum()), 1)
        r = ratio[mask]
        lr = log_ratio[mask]
        low = float(((adv < 0) & (ratio < 1.0 - clip_low) & mask).sum()) / n
        high = float(((adv > 0) & (ratio > 1.0 + clip_high) & mask).sum()) / n
        dual = float(((adv < 0) & (ratio > dual_clip) & mask).sum()) / n if dual_clip > 0 else 0.0
        stats = PolicyLossStats(
            pg_loss=float(loss.detach()), clip_frac=low + high, clip_frac_low=low, clip_frac_high=high,
            kl_k1=float(-lr.sum()) / n, approx_kl=float((r - 1.0 - lr).sum()) / n, ratio_mean=float(r.sum()) / n,
            ratio_min=float(r.min()) if r.numel() else math.nan, ratio_max=float(r.max()) if r.numel() else math.nan,
            tokens=int(mask.sum()), clip_frac_dual=dual)
    return loss, stats


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ‖π_ref): exp(r) − 1 − r, r = log π_ref − log π_θ  (METHOD §3, optional).

    Returns [B, T] (0 outside `mask`, ≥ 0, gradient through `logprobs` only; r clamped to ±20). Off by default: the
    update adds kl_coef · aggregate(kl_penalty(...), mask, agg, normalizer) only when kl_coef > 0 (default 0).
    """
    mask = mask.bool()
    r = torch.where(mask, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs)).clamp(-20.0, 20.0)
    kl = torch.exp(r) - 1.0 - r  # [B, T]
    return torch.where(mask, kl, torch.zeros_like(kl))


# --- statistics and weights ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PmiStats:
    """METHOD §6 token statistics of u over masked tokens (means NaN when there are none; weight by `tokens`)."""

    u_mean: float
    antisd_term_mean: float  # mean −φ(u)
    neg_frac: float  # fraction of tokens with u < 0
    tokens: int


def token_stats(pmi: torch.Tensor, mask: torch.Tensor) -> PmiStats:
    """METHOD §6 token statistics over masked tokens: mean u, mean −φ(u), fraction u < 0, and the token count."""
    u = pmi.detach()[mask.bool()].to(torch.float64)  # [N]
    n = u.numel()
    if n == 0:
        return PmiStats(math.nan, math.nan, math.nan, 0)
    return PmiStats(float(u.mean()), float(antisd_term(u).mean()), float((u < 0).double().mean()), n)


def truncated_is_weights(student_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Token-level truncated IS weight w_t = min(exp(s_t − log q_t), cap), q = the rollout engine's sampler.

    Constant (no gradient). Folded into the advantage, since for w > 0:
    −min(ρ·wA, clip(ρ)·wA) = w·(−min(ρA, clip(ρ)A)).
    """
    return torch.exp((student_logprobs - sampling_logprobs).clamp(max=20.0)).clamp(max=cap)


# A sampler's and a scorer's probability of the typical token more than this factor apart: not one model's numbers
MISMATCH_FACTOR = 2.0


def logprob_mismatch(student_logprobs: Sequence[Sequence[float]], sampling_logprobs: Sequence[Sequence[float]]
                     ) -> tuple[float | None, float | None]:
    """(mean, max) of |s_t − log q_t| over every response token whose sampling log-prob is finite: how far the old
    log-probs (score) sit from the sampler's (rollout); (None, None) without a token."""
    gaps = [abs(s - q) for row_s, row_q in zip(student_logprobs, sampling_logprobs)
            for s, q in zip(row_s, row_q) if math.isfinite(q)]
    return (math.fsum(gaps) / len(gaps), max(gaps)) if gaps else (None, None)


def logprob_mismatch_limit(top_p: float = 1.0) -> float:
    """The mean |s_t − log q_t| (nats) above which s and q are not one model's: ln 2 − ln top_p.

    Why: the sampler's q_t = s_t − ln(kept nucleus mass), the kept mass ≥ top_p, so top-p alone moves a token by
    at most −ln top_p; one model's numerics move it by ~1e-6 (fp32 both, docs/vllm-cpu.md) to ~1e-2 (a 16-bit
    sampler). Past that, a mean gap of ln 2 means the typical token's probability differs by a factor of 2, the cap
    of the truncated IS weight (update.is_cap), beyond which no correction applies: the rollouts came from another
    model (another checkpoint's rollouts measured 5.41 nats) or another temperature.
    """
    return math.log(MISMATCH_FACTOR) - math.log(top_p)
