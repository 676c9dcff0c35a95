"""The training math of METHOD.md as pure functions: group advantages, per-token terms, the clipped policy loss.

Every function here takes tensors and explicit scalars and returns tensors (plus a metrics dict where useful); none
reads a config, a file, a global or the clock, and none keeps state. The per-token methods (`grpo`, `sd`, `antisd`,
`rkl-ascent`, METHOD §2) live in one registry keyed by METHOD's names. The entropy gate (METHOD §5) is the one
stateful object; it lives in `stages.method.gate` and is re-exported here as `EntropyGate`.

Shapes: B sequences, T padded response positions. `mask` is a [B, T] bool (or 0/1) tensor that is true on response
tokens; padded positions may hold anything (even NaN) and never reach a result.
This module does not pad, batch, tokenize, run a model or reduce across ranks: callers do.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from stages.method.gate import EntropyGate, gate_step  # noqa: F401  (re-exported: one import site for the math)

LOG2 = math.log(2.0)
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# --- group advantage (METHOD §2, first line) -------------------------------------------------------------------

def _group_index(group_ids, device) -> torch.Tensor:
    """Map group ids (int tensor, or any sequence of hashables such as prompt_id strings) to 0..G-1, [N] long."""
    if isinstance(group_ids, torch.Tensor):
        return torch.unique(group_ids, return_inverse=True)[1].to(device)
    first: dict = {}
    return torch.tensor([first.setdefault(g, len(first)) for g in group_ids], dtype=torch.long, device=device)


def group_advantages(rewards: torch.Tensor, group_ids, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """GRPO sequence advantage A_seq_i = (R_i − mean_g(R)) / (std_g(R) + ε)  (METHOD §2).

    rewards: [N] (any real dtype). group_ids: [N] int tensor, or a length-N sequence of hashables (e.g. the
    `prompt_id` column); rows with equal ids form a group, in any order. std is the unbiased (n − 1) standard
    deviation within the group. scale="none" drops the division (Dr.GRPO: A = R − mean_g(R)).
    A group whose rewards are all equal (zero variance) and a singleton group give exactly 0.
    Returns [N], float32 unless `rewards` is float64. No gradient is meant to flow (rewards are data).
    """
    if scale not in ("group", "none"):
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    rewards = torch.as_tensor(rewards)
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(torch.float64).reshape(-1)  # [N]
    index = _group_index(group_ids, r.device)  # [N]
    if index.numel() != r.numel():
        raise ValueError(f"group_ids has {index.numel()} entries, rewards {r.numel()}")
    groups = int(index.max()) + 1 if r.numel() else 0
    count = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, index, r) / count  # [G]
    centered = r - mean[index]  # [N]
    sq = torch.zeros_like(count).index_add_(0, index, centered * centered)  # [G]
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # [G] unbiased
    high = torch.full_like(count, -math.inf).scatter_reduce_(0, index, r, "amax")
    low = torch.full_like(count, math.inf).scatter_reduce_(0, index, r, "amin")
    degenerate = (count < 2) | (high == low)  # [G] exact test, immune to rounding in the mean
    adv = centered / (std[index] + eps) if scale == "group" else centered
    return torch.where(degenerate[index], torch.zeros_like(adv), adv).to(out_dtype)


# --- per-token terms (METHOD §2 table) ---------------------------------------------------------------------------

def phi(u: torch.Tensor) -> torch.Tensor:
    """φ(u) = ½(softplus(u) − log 2)  (METHOD §2): φ(0)=0, increasing, φ ≥ −½ log 2, φ ≈ u/2 for u ≫ 0, u/4 near 0.

    torch's softplus switches to the identity above 20 and uses log1p(exp(u)) below, so it neither overflows nor
    loses the tail at |u| = 1e4.
    """
    return 0.5 * (F.softplus(u) - LOG2)


def antisd_term(u: torch.Tensor) -> torch.Tensor:
    """AntiSD token term −φ(u) = −½(softplus(u) − log 2), u = t − s (METHOD §2). Bounded above by ½ log 2 ≈ 0.3466."""
    return -phi(u)


class Method(str, Enum):
    """The per-token advantage methods of METHOD §2, by their registry key."""

    GRPO = "grpo"
    SD = "sd"
    ANTISD = "antisd"
    RKL_ASCENT = "rkl-ascent"


TokenTerm = Callable[[torch.Tensor], torch.Tensor]
_TOKEN_TERMS: dict[str, TokenTerm] = {}


def register_token_term(name: str) -> Callable[[TokenTerm], TokenTerm]:
    """Register f(u) → per-token term under `name`; A_{i,t} = A_seq_i + λ·f(u_{i,t}). A second registration raises."""

    def decorator(fn: TokenTerm) -> TokenTerm:
        if name in _TOKEN_TERMS:
            raise ValueError(f"token-advantage method {name!r} is already registered")
        _TOKEN_TERMS[name] = fn
        return fn

    return decorator


def get_token_term(method: str | Method) -> TokenTerm:
    """The registered term f(u) of `method`; an unknown name raises ValueError listing the valid ones."""
    key = method.value if isinstance(method, Method) else str(method)
    if key not in _TOKEN_TERMS:
        raise ValueError(f"unknown method {key!r}; valid: {', '.join(sorted(_TOKEN_TERMS))}")
    return _TOKEN_TERMS[key]


def token_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_TOKEN_TERMS)


@register_token_term("grpo")
def _grpo_term(u: torch.Tensor) -> torch.Tensor:
    """grpo: no token term (λ is irrelevant)."""
    return torch.zeros_like(u)


@register_token_term("sd")
def _sd_term(u: torch.Tensor) -> torch.Tensor:
    """sd: +u, reverse-KL descent (rewards tokens the solution implies)."""
    return u


@register_token_term("antisd")
def _antisd_term(u: torch.Tensor) -> torch.Tensor:
    """antisd: −φ(u), Jensen–Shannon ascent."""
    return antisd_term(u)


@register_token_term("rkl-ascent")
def _rkl_ascent_term(u: torch.Tensor) -> torch.Tensor:
    """rkl-ascent: −u, reversed sign without the JSD bound (ablation)."""
    return -u


def token_advantages(method: str | Method, seq_adv: torch.Tensor, pmi: torch.Tensor | None, mask: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """Per-token advantage A_{i,t} = A_seq_i + λ·f_method(u_{i,t}), 0 outside `mask`  (METHOD §2).

    f: grpo 0 · sd +u · antisd −φ(u) · rkl-ascent −u. seq_adv: [B]; pmi: [B, T] (u = t − s; may be None for
    grpo); mask: [B, T]. The whole result is a constant weight: sg[·] on seq_adv and u (no gradient; no
    normalization, whitening or clipping of the term). Returns [B, T] float32.
    """
    term_fn = get_token_term(method)
    mask = mask.bool()
    seq = seq_adv.detach().to(torch.float32).reshape(-1, 1)  # [B, 1]
    if pmi is None:
        if term_fn is not _grpo_term:
            raise ValueError(f"method {method!r} needs the pmi tensor")
        pmi = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    u = torch.where(mask, pmi.detach().to(torch.float32), 0.0)  # [B, T]; padding may hold NaN
    adv = seq + float(lam) * term_fn(u)  # [B, T]
    return torch.where(mask, adv, torch.zeros_like(adv))


def token_stats(pmi: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """METHOD §6 token statistics over masked tokens: mean u, mean −φ(u), fraction u < 0, and the token count.

    Keys: pmi/mean_u, pmi/mean_neg_phi, pmi/frac_negative, pmi/tokens (means are NaN when there are no tokens;
    callers merging micro-batches weight by pmi/tokens).
    """
    u = pmi.detach()[mask.bool()].to(torch.float64)  # [N]
    n = u.numel()
    if n == 0:
        return {"pmi/mean_u": math.nan, "pmi/mean_neg_phi": math.nan, "pmi/frac_negative": math.nan, "pmi/tokens": 0}
    return {
        "pmi/mean_u": float(u.mean()),
        "pmi/mean_neg_phi": float(antisd_term(u).mean()),
        "pmi/frac_negative": float((u < 0).double().mean()),
        "pmi/tokens": n,
    }


def masked_median(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Median of `values` over `mask` (mean of the two middle values for an even count; NaN when empty).

    Used for the gate's H = median teacher entropy over all response tokens of a step (METHOD §5).
    """
    v = torch.sort(values.detach()[mask.bool()].to(torch.float64).reshape(-1)).values
    n = v.numel()
    if n == 0:
        return math.nan
    return float(v[n // 2]) if n % 2 else float((v[n // 2 - 1] + v[n // 2]) / 2)


# --- policy loss (METHOD §3) -------------------------------------------------------------------------------------

def step_normalizer(agg: str, response_lengths: Sequence[int] | torch.Tensor, max_response_tokens: int | None = None
                    ) -> float:
    """The loss denominator for a whole optimizer step, from the response lengths of ALL its sequences (§3).

    token-mean: Σ_i T_i (response tokens of the step). seq-mean-token-mean: B_step (sequences of the step).
    seq-mean-token-sum: B_step · max_response_tokens (Dr.GRPO's constant; default the longest response of the step,
    pass the generation budget to make it a true constant across steps). Pass the result as `normalizer=` to every
    micro-batch's `policy_loss`; the micro-batch losses then sum to the loss of the whole step.
    """
    lengths = [int(x) for x in (response_lengths.tolist() if isinstance(response_lengths, torch.Tensor)
                                else response_lengths)]
    if agg == "token-mean":
        return float(max(sum(lengths), 1))
    if agg == "seq-mean-token-mean":
        return float(max(len(lengths), 1))
    if agg == "seq-mean-token-sum":
        budget = max_response_tokens if max_response_tokens is not None else max(lengths, default=1)
        return float(max(len(lengths), 1) * max(budget, 1))
    raise ValueError(f"unknown loss aggregation {agg!r}; valid: {', '.join(AGGREGATIONS)}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean",
              normalizer: float | None = None) -> torch.Tensor:
    """Reduce per-token values [B, T] to a scalar: numerator / normalizer  (METHOD §3 Decision).

    token-mean and seq-mean-token-sum: numerator Σ_{i,t} m·v; seq-mean-token-mean: Σ_i (Σ_t m·v / T_i), sequences
    with T_i = 0 contributing 0. normalizer None means "this call is the whole step": Σ T_i, B, and B·T
    respectively (T = this tensor's padded width). With micro-batches pass `step_normalizer(...)` instead, so that
    the sum of micro-batch results (and of their gradients) equals the full-batch value.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid: {', '.join(AGGREGATIONS)}")
    mask = mask.bool()
    masked = torch.where(mask, values, torch.zeros_like(values))  # [B, T]; NaN in padding never leaks
    if agg == "seq-mean-token-mean":
        lengths = mask.sum(-1)  # [B]
        numerator = (masked.sum(-1) / lengths.clamp(min=1)).sum()
    else:
        numerator = masked.sum()
    if normalizer is None:
        normalizer = {"token-mean": max(int(mask.sum()), 1), "seq-mean-token-mean": max(mask.shape[0], 1),
                      "seq-mean-token-sum": max(mask.numel(), 1)}[agg]
    return numerator / float(normalizer)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.2, agg: str = "token-mean",
                normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss_t = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A), ρ = exp(log π_θ(y_t) − s_t)  (METHOD §3).

    logprobs [B, T] carries the gradient; old_logprobs (s_t) and advantages are constants (detached here).
    The token losses are reduced by `aggregate(agg, normalizer)`; see there for the micro-batch contract.
    log ρ is clamped to ±20 before exp (a finite loss even for a wildly off-policy token; the clamp does not act
    on-policy, where ρ = 1).
    Metrics (floats over this call's masked tokens; weight by actor/tokens when merging micro-batches):
    actor/pg_loss, actor/pg_clipfrac (= low + high), actor/pg_clipfrac_low (A < 0 and ρ < 1−ε_low),
    actor/pg_clipfrac_high (A > 0 and ρ > 1+ε_high), actor/ppo_kl_k1 = mean(s − log π_θ) and actor/ppo_kl_k3 =
    mean(ρ − 1 − log ρ), two estimates of KL(old‖new) from tokens sampled by old; actor/ratio_mean|min|max;
    actor/tokens.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs)).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # [B, T]
    adv = torch.where(mask, advantages.detach(), torch.zeros_like(advantages)).to(ratio.dtype)  # [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    token_loss = torch.maximum(unclipped, clipped)  # [B, T] = −min(ρA, clip(ρ)A)
    loss = aggregate(token_loss, mask, agg, normalizer)
    with torch.no_grad():
        n = max(int(mask.sum()), 1)
        r = ratio[mask]
        lr = log_ratio[mask]
        low = float(((adv < 0) & (ratio < 1.0 - clip_low) & mask).sum()) / n
        high = float(((adv > 0) & (ratio > 1.0 + clip_high) & mask).sum()) / n
        metrics = {
            "actor/pg_loss": float(loss.detach()),
            "actor/pg_clipfrac": low + high,
            "actor/pg_clipfrac_low": low,
            "actor/pg_clipfrac_high": high,
            "actor/ppo_kl_k1": float(-lr.sum()) / n,
            "actor/ppo_kl_k3": float((r - 1.0 - lr).sum()) / n,
            "actor/ratio_mean": float(r.sum()) / n,
            "actor/ratio_min": float(r.min()) if r.numel() else math.nan,
            "actor/ratio_max": float(r.max()) if r.numel() else math.nan,
            "actor/tokens": int(mask.sum()),
        }
    return loss, metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ‖π_ref): exp(r) − 1 − r, r = log π_ref − log π_θ  (METHOD §3, optional).

    Returns [B, T] (0 outside `mask`, ≥ 0, gradient through `logprobs` only; r clamped to ±20). Off by default: the
    update adds kl_coef · aggregate(kl_penalty(...), mask, agg, normalizer) only when kl_coef > 0 (default 0).
    """
    mask = mask.bool()
    r = torch.where(mask, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs)).clamp(-20.0, 20.0)
    kl = torch.exp(r) - 1.0 - r  # [B, T]
    return torch.where(mask, kl, torch.zeros_like(kl))
