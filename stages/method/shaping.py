"""The shaping of the per-token term in the authors' code (METHOD §9 steps 2–6): the adaptive u-clip, the per-response
z-score, the length mask, and the per-response u spread that calibrates the clip.

Pure functions of tensors and explicit scalars. Shapes: B responses, T padded response positions, `mask` [B, T] true
on response tokens (padding may hold anything, even NaN, and never reaches a result). Everything here is a constant
weight (stop-gradient): inputs are detached. `stages.method.advantages.shaped_token_advantages` chains them; the
warm-up that fixes σ_ref is `stages.method.perplexity.PerplexityGate`.
"""

from __future__ import annotations

import torch

Z_EPS = 1e-6  # §9 step 5: the z-score divides by max(std, 1e-6)


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values.detach().to(torch.float64), 0.0)


def response_u_std(pmi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased std of u over each response's tokens, sqrt(Σ_t (u_t − ū)² / (T_i − 1))  (METHOD §9 step 2).

    pmi, mask: [B, T]. Returns [B] float64; NaN for a response of fewer than 2 tokens (no spread to measure: the
    warm-up calibration leaves it out).
    """
    mask = mask.bool()
    u = _masked(pmi, mask)  # [B, T]
    count = mask.sum(-1).to(torch.float64)  # [B]
    mean = u.sum(-1) / count.clamp(min=1)  # [B]
    centred = torch.where(mask, u - mean[:, None], 0.0)  # [B, T]
    std = torch.sqrt((centred * centred).sum(-1) / (count - 1).clamp(min=1))  # [B]
    return torch.where(count >= 2, std, torch.full_like(std, float("nan")))


def clip_u(pmi: torch.Tensor, mask: torch.Tensor, sigma_ref: float | None, k: float, clamp: float) -> torch.Tensor:
    """Adaptive u-clip u_t ← 0 where |u_t| > k·σ_ref, then u_t ← clamp(u_t, −c, c)  (METHOD §9 step 3).

    sigma_ref None (warm-up not finished) or k ≤ 0 skips the zeroing; clamp c ≤ 0 skips the clamp. A token whose |u|
    exceeds k·σ_ref is set to 0 (dropped), not to ±k·σ_ref. Returns [B, T] float32, 0 outside `mask`.
    """
    mask = mask.bool()
    u = torch.where(mask, pmi.detach().to(torch.float32), 0.0)  # [B, T]
    if sigma_ref is not None and k > 0:
        u = torch.where(u.abs() > k * sigma_ref, torch.zeros_like(u), u)
    if clamp > 0:
        u = u.clamp(-clamp, clamp)
    return u


def response_zscore(term: torch.Tensor, mask: torch.Tensor, clamp: float) -> torch.Tensor:
    """Per-response z-score p_t = clamp((r_t − mean_i r) / max(std_i r, 1e-6), −c, c)  (METHOD §9 step 5).

    mean and the **population** std (÷ T_i) over response i's tokens; a constant response (every r_t equal, so also
    a 1-token response and one whose tokens were all clipped to u = 0) gives p = 0 exactly, not rounding noise / 1e-6.
    clamp c ≤ 0 leaves p unclamped. The result sums to ≈ 0 over each response: it moves credit between a response's
    tokens. Computed in float64, returned [B, T] float32, 0 outside `mask`.
    """
    mask = mask.bool()
    r = _masked(term, mask)  # [B, T]
    count = mask.sum(-1).to(torch.float64).clamp(min=1)  # [B]
    mean = r.sum(-1) / count  # [B]
    centred = torch.where(mask, r - mean[:, None], 0.0)  # [B, T]
    std = torch.sqrt((centred * centred).sum(-1) / count)  # [B] population
    p = centred / std.clamp(min=Z_EPS)[:, None]  # [B, T]
    if clamp > 0:
        p = p.clamp(-clamp, clamp)
    high = torch.where(mask, r, -torch.inf).amax(-1)  # [B]
    low = torch.where(mask, r, torch.inf).amin(-1)  # [B]
    constant = high <= low  # [B]: one distinct value (or no token)
    return torch.where(mask & ~constant[:, None], p, 0.0).to(torch.float32)


def length_mask(mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """The rows whose term survives the length mask: T_i < L_mask  (METHOD §9 step 6; L_mask = 0: every row).

    Returns [B] bool. A response of L_mask tokens or more gets p = 0 on every token (its A_i still applies).
    """
    lengths = mask.bool().sum(-1)  # [B]
    return torch.ones_like(lengths, dtype=torch.bool) if max_tokens <= 0 else lengths < max_tokens
