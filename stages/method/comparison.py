"""Comparisons of training runs, as the paper reports them: the best-average checkpoint, the Speedup over a baseline
method, the spread over seeds and pass@k curves. Pure functions of plain numbers; `antisd report` reads the files.

A curve maps `updates` (optimizer steps done; 0 = the base model) to a score, here a suite's average accuracy.
- best checkpoint: the updates with the highest score; ties go to the earliest (fewest updates).
- Speedup (the paper's headline): with the baseline's best checkpoint at g updates and score b, and u the first
  updates at which the method's score reaches b (score ≥ b − REACH_TOLERANCE), Speedup = g / u. Undefined cases,
  each with its own display: the method never reaches b within its last evaluated L updates → no value, shown as
  `<g/L× (never)` (if it ever did, it would be after L, so the Speedup is below g/L); u = 0 (its base model already
  scores b) → `∞ (base model)`; g = 0 (the baseline never improved on its base model) → `n/a (baseline best at base)`.
- seed spread: mean, sample standard deviation and the 95% Student-t interval mean ± t_{0.975, s−1}·sd/√s over s
  seeds (no interval for one seed).
- pass@k curve: pass@k for k = 1…n averaged over problems (`estimators.pass_at_k`, unbiased) from each problem's
  count of correct samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from stages.method import estimators

# equal averages computed in different orders differ in the last bits; a method that ties the baseline reaches it
REACH_TOLERANCE = 1e-9
# t_{0.975, df} for df = 1…30 (two-sided 95%); beyond, the Cornish–Fisher expansion in `t_quantile_975`
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def best_checkpoint(curve: dict[int, float]) -> tuple[int, float]:
    """(updates, score) of the highest score of `curve`; among equal scores the fewest updates."""
    if not curve:
        raise ValueError("a curve needs at least one evaluated checkpoint")
    updates = min(curve, key=lambda u: (-curve[u], u))
    return updates, curve[updates]


def first_reaching(curve: dict[int, float], target: float) -> int | None:
    """The fewest updates at which `curve` scores ≥ target − REACH_TOLERANCE, or None."""
    return next((u for u in sorted(curve) if curve[u] >= target - REACH_TOLERANCE), None)


@dataclass(frozen=True)
class Speedup:
    """The Speedup of a method's curve over a baseline's (see the module docstring)."""

    baseline_updates: int  # g: the baseline's best checkpoint
    baseline_score: float  # b: its score
    reached_updates: int | None  # u: the method's first checkpoint scoring ≥ b; None if none
    last_updates: int  # L: the method's last evaluated checkpoint
    value: float | None  # g / u when defined
    display: str  # e.g. "2.50×", "<0.83× (never)", "∞ (base model)", "n/a (baseline best at base)"


def speedup(baseline: dict[int, float], method: dict[int, float]) -> Speedup:
    """Speedup = g / u of `method` over `baseline` (curves: updates → score)."""
    g, b = best_checkpoint(baseline)
    u, last = first_reaching(method, b), max(method)
    if g == 0:
        return Speedup(g, b, u, last, None, "n/a (baseline best at base)")
    if u is None:
        return Speedup(g, b, None, last, None, f"<{g / last:.2f}× (never)" if last > 0 else "never")
    if u == 0:
        return Speedup(g, b, 0, last, None, "∞ (base model)")
    return Speedup(g, b, u, last, g / u, f"{g / u:.2f}×")


def mean_curve(curves: Sequence[dict[int, float]]) -> dict[int, float]:
    """The mean of several curves at the updates every one of them evaluated."""
    common = set.intersection(*(set(curve) for curve in curves)) if curves else set()
    return {u: sum(curve[u] for curve in curves) / len(curves) for u in sorted(common)}


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: a table for df ≤ 30, else z + (z³ + z)/(4·df) + (5z⁵ + 16z³ + 3z)/(96·df²) (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class SeedSpread:
    """A score over seeds: mean, sample std (ddof 1) and the 95% t interval (None with one seed)."""

    mean: float
    std: float | None
    low: float | None
    high: float | None
    seeds: int


def seed_spread(values: Sequence[float]) -> SeedSpread:
    """Mean ± t_{0.975, s−1}·sd/√s over the s values (one per seed)."""
    if not values:
        raise ValueError("a spread needs at least one value")
    count, mean = len(values), sum(values) / len(values)
    if count == 1:
        return SeedSpread(mean, None, None, None, 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1))
    half = t_quantile_975(count - 1) * std / math.sqrt(count)
    return SeedSpread(mean, std, mean - half, mean + half, count)


def pass_at_k_curve(correct_counts: Sequence[int], n: int) -> list[float]:
    """[pass@1, …, pass@n] averaged over problems, problem i having correct_counts[i] of n samples correct."""
    counts = [(n, c) for c in correct_counts]
    return [estimators.mean_pass_at_k(counts, k) for k in range(1, n + 1)]
