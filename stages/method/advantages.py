"""Advantages of METHOD §2: the GRPO group-normalized sequence advantage and the per-token advantage of a method.

Pure functions of tensors and explicit scalars; no config, I/O, globals or state. Shapes: N rollouts; B sequences and
T padded response positions, with `mask` [B, T] true on response tokens (padding may hold anything, even NaN, and
never reaches a result). The per-token terms come from the registry in `stages.method.terms`, the §9 shaping of the
term (clip, z-score, length mask) from `stages.method.shaping`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stages.method.shaping import clip_u, length_mask, response_zscore
from stages.method.terms import get_term


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


@dataclass(frozen=True)
class TokenAdvantageParts:
    """The per-token pieces of A_{i,t}, each [B, T] float32 and 0 outside the mask (what `--advantages-out` stores)."""

    u: torch.Tensor  # u after the clip (§9 step 3; u itself when the clip is off)
    term: torch.Tensor  # r_t = f(u_t), the method's term before normalisation
    normalized: torch.Tensor  # p_t: the term after the per-response z-score and the length mask (= term when off)
    advantages: torch.Tensor  # A_{i,t} = A_seq_i + λ_i·p_t


def shaped_token_advantages(method: str, seq_adv: torch.Tensor, pmi: torch.Tensor | None, mask: torch.Tensor,
                            lam, *, variant: str = "paper", sigma_ref: float | None = None, u_clip_k: float = 0.0,
                            u_clamp: float = 0.0, term_norm: str = "none", norm_clamp: float = 5.0,
                            length_mask_tokens: int = 0) -> TokenAdvantageParts:
    """A_{i,t} = A_seq_i + λ_i·p_t with p = norm(f_variant(clip(u)))  (METHOD §2; §9 steps 3–6 and its λ_i).

    With every shaping off (u_clip_k 0 or sigma_ref None, u_clamp 0, term_norm none, length_mask_tokens 0) and a
    scalar λ this is METHOD §2 exactly: p = f(u), f: grpo 0 · sd +u · antisd −φ(u) · rkl-ascent −u. `variant`
    official takes the term's §9 shape (sd: +φ(u)). lam: a float (one λ for the step, §5) or a [B] tensor (λ_i per
    response, §9). clip: `stages.method.shaping.clip_u`; term_norm "response": `response_zscore` (clamp
    `norm_clamp`); a response of `length_mask_tokens` tokens or more gets p = 0 (0 = off). seq_adv: [B]; pmi: [B, T]
    (u = t − s; None only for grpo); mask: [B, T]. Everything is a constant weight: sg[·] on seq_adv, u and λ.
    """
    if term_norm not in ("none", "response"):
        raise ValueError(f"term_norm must be 'none' or 'response', got {term_norm!r}")
    entry = get_term(method)
    mask = mask.bool()
    seq = seq_adv.detach().to(torch.float32).reshape(-1, 1)  # [B, 1]
    if pmi is None:
        if entry.uses_teacher:
            raise ValueError(f"method {method!r} needs the pmi tensor")
        pmi = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    u = clip_u(pmi, mask, sigma_ref, u_clip_k, u_clamp)  # [B, T]; padding may hold NaN, u holds 0 there
    term = entry.term_of(variant)(u)  # [B, T]
    normalized = response_zscore(term, mask, norm_clamp) if term_norm == "response" else term
    if length_mask_tokens > 0:
        normalized = torch.where(length_mask(mask, length_mask_tokens)[:, None], normalized, 0.0)
    scale = float(lam) if not isinstance(lam, torch.Tensor) else lam.detach().to(torch.float32).reshape(-1, 1)
    adv = seq + scale * normalized  # [B, T]
    zero = torch.zeros_like(adv)
    return TokenAdvantageParts(u=u, term=torch.where(mask, term, zero), normalized=torch.where(mask, normalized, zero),
                               advantages=torch.where(mask, adv, zero))


def token_advantages(method: str, seq_adv: torch.Tensor, pmi: torch.Tensor | None, mask: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """Per-token advantage A_{i,t} = A_seq_i + λ·f_method(u_{i,t}), 0 outside `mask`  (METHOD §2).

    f: grpo 0 · sd +u · antisd −φ(u) · rkl-ascent −u. seq_adv: [B]; pmi: [B, T] (u = t − s; may be None for
    grpo); mask: [B, T]. The whole result is a constant weight: sg[·] on seq_adv and u (no gradient; no
    normalization, whitening or clipping of the term). Returns [B, T] float32. (`shaped_token_advantages` with every
    §9 shaping off.)
    """
    return shaped_token_advantages(method, seq_adv, pmi, mask, lam).advantages


def overlong_penalty(lengths, max_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward before the group advantage.

    0 for a response of at most max_tokens − buffer tokens, then falling linearly to −penalty at max_tokens (and
    −penalty beyond): R_len(y) = min(0, (max_tokens − buffer − |y|) / buffer) · penalty, clamped at −penalty.
    lengths: [N] response lengths. buffer ≥ 1 (DAPO's L_cache), max_tokens > buffer (L_max). Returns [N] float64.
    """
    if buffer < 1 or max_tokens <= buffer:
        raise ValueError(f"need 1 <= buffer < max_tokens, got buffer {buffer}, max_tokens {max_tokens}")
    over = torch.as_tensor(lengths, dtype=torch.float64) - (max_tokens - buffer)  # [N] tokens into the buffer
    return -(over.clamp(min=0) / buffer).clamp(max=1.0) * penalty
