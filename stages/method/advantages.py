"""Advantages of METHOD §2: the GRPO group-normalized sequence advantage and the per-token advantage of a method.

Pure functions of tensors and explicit scalars; no config, I/O, globals or state. Shapes: N rollouts; B sequences and
T padded response positions, with `mask` [B, T] true on response tokens (padding may hold anything, even NaN, and
never reaches a result). The per-token terms come from the registry in `stages.method.terms`.
"""

from __future__ import annotations

import math

import torch

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


def token_advantages(method: str, seq_adv: torch.Tensor, pmi: torch.Tensor | None, mask: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """Per-token advantage A_{i,t} = A_seq_i + λ·f_method(u_{i,t}), 0 outside `mask`  (METHOD §2).

    f: grpo 0 · sd +u · antisd −φ(u) · rkl-ascent −u. seq_adv: [B]; pmi: [B, T] (u = t − s; may be None for
    grpo); mask: [B, T]. The whole result is a constant weight: sg[·] on seq_adv and u (no gradient; no
    normalization, whitening or clipping of the term). Returns [B, T] float32.
    """
    term_fn = get_term(method).term
    mask = mask.bool()
    seq = seq_adv.detach().to(torch.float32).reshape(-1, 1)  # [B, 1]
    if pmi is None:
        if get_term(method).uses_teacher:
            raise ValueError(f"method {method!r} needs the pmi tensor")
        pmi = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    u = torch.where(mask, pmi.detach().to(torch.float32), 0.0)  # [B, T]; padding may hold NaN
    adv = seq + float(lam) * term_fn(u)  # [B, T]
    return torch.where(mask, adv, torch.zeros_like(adv))


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
