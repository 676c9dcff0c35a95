"""Accuracy estimators for sampled evaluation: pass@k, avg@k, maj@k and a bootstrap interval.

Every function here is pure (plain Python numbers in, numbers out; the bootstrap takes its seed as an argument).
Notation: a problem has n samples of which c are verified correct.

- pass@k (Chen et al. 2021, unbiased): 1 − C(n−c, k)/C(n, k), the chance that k samples drawn without replacement
  from the n hold at least one correct one. Computed as 1 − ∏_{i=n−c+1}^{n} (1 − k/i), which never forms a binomial
  coefficient, so it neither overflows nor loses precision for large n.
- avg@k: the mean over problems of c/n (the expected accuracy of one sample; equals pass@1).
- maj@k: majority vote over the extracted answers of a problem's samples; the problem counts as solved when the
  winning answer was verified correct. Answers are grouped by a caller-supplied key (eval groups by a normalized
  string, so equivalent-but-differently-written answers such as ``0.5`` and ``\\frac{1}{2}`` are separate votes);
  samples with no answer (key None) do not vote; a tie goes to the answer that appeared first (lowest sample index).
- bootstrap_interval: percentile bootstrap over problems of the mean of per-problem scores.
- stratified_bootstrap_interval: the same for the average of several benchmarks' means (a suite's average), each
  benchmark's problems resampled within that benchmark.

This module does not read files, extract answers or judge equivalence (stages.verifier.answers / stages.verify do).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 − C(n−c, k)/C(n, k) for one problem with `c` correct out of `n` samples.

    Stable form: C(n−c, k)/C(n, k) = ∏_{i=n−c+1}^{n} (1 − k/i); when n − c < k every draw of k holds a correct
    sample and the value is exactly 1.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems; `counts` holds one (n, c) pair per problem."""
    if not counts:
        raise ValueError("pass@k needs at least one problem")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """avg@k: mean over problems of the fraction of a problem's samples that are correct."""
    return sum(problem_accuracies(correct)) / len(correct)


def problem_accuracies(correct: Sequence[Sequence[bool]]) -> list[float]:
    """Per-problem accuracy c/n (the values avg@k and its bootstrap average)."""
    if not correct:
        raise ValueError("avg@k needs at least one problem")
    for index, samples in enumerate(correct):
        if not samples:
            raise ValueError(f"problem {index} has no samples")
    return [sum(bool(x) for x in samples) / len(samples) for samples in correct]


def majority_vote(keys: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Samples vote with their key (None = no answer, no vote). The key with the most votes wins; among tied keys the
    one whose first occurrence has the lowest index wins. The returned index is that first occurrence.
    """
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key is None:
            continue
        votes[key] = votes.get(key, 0) + 1
        first.setdefault(key, index)
    if not votes:
        return None
    winner = min(votes, key=lambda key: (-votes[key], first[key]))
    return first[winner]


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k of one problem: whether the winning answer was verified correct.

    A group of samples sharing a key counts as correct if any of them was verified correct (a key is one answer
    string, so this only differs from "all of them" when the verifier timed out on some copies).
    """
    if len(keys) != len(correct):
        raise ValueError(f"{len(keys)} answers but {len(correct)} verdicts")
    winner = majority_vote(keys)
    if winner is None:
        return False
    return any(bool(ok) for key, ok in zip(keys, correct) if key == keys[winner])


def maj_at_k(keys: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> float:
    """maj@k over problems: the fraction of problems whose majority answer is correct."""
    if not keys or len(keys) != len(correct):
        raise ValueError("maj@k needs one answer list and one verdict list per problem (at least one problem)")
    return sum(majority_correct(k, c) for k, c in zip(keys, correct)) / len(keys)


def bootstrap_interval(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values` (one value per problem).

    Draws `resamples` samples of len(values) problems with replacement from `random.Random(seed)`, takes each
    sample's mean, and returns the (1−confidence)/2 and (1+confidence)/2 empirical quantiles (nearest rank), so
    the same inputs and seed always give the same interval.
    """
    if not values:
        raise ValueError("bootstrap needs at least one value")
    _check_bootstrap(confidence, resamples)
    rng = random.Random(seed)
    size = len(values)
    means = sorted(sum(values[rng.randrange(size)] for _ in range(size)) / size for _ in range(resamples))
    return _percentiles(means, confidence)


def stratified_bootstrap_interval(groups: Sequence[Sequence[float]], *, confidence: float = 0.95,
                                  resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of (1/G)·Σ_g mean(groups[g]): each resample draws len(groups[g]) values with
    replacement from every group g separately (so each benchmark keeps its size and weight 1/G), from
    `random.Random(seed)`; quantiles by nearest rank as in `bootstrap_interval`."""
    if not groups or any(not group for group in groups):
        raise ValueError("stratified bootstrap needs at least one group and a value in every group")
    _check_bootstrap(confidence, resamples)
    rng = random.Random(seed)
    means = sorted(sum(sum(group[rng.randrange(len(group))] for _ in group) / len(group) for group in groups)
                   / len(groups) for _ in range(resamples))
    return _percentiles(means, confidence)


def _check_bootstrap(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def _percentiles(sorted_means: list[float], confidence: float) -> tuple[float, float]:
    resamples = len(sorted_means)
    alpha = (1.0 - confidence) / 2.0
    low_rank = min(resamples - 1, max(0, int(alpha * resamples)))
    high_rank = min(resamples - 1, max(0, int((1.0 - alpha) * resamples) - 1))
    return sorted_means[low_rank], sorted_means[high_rank]


def k_values(n: int) -> list[int]:
    """The k reported for pass@k with n samples: powers of two below n, and n itself (1, 2, 4, …, n)."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    ks = []
    k = 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]
