"""The eval estimators against hand-computed values and an independent (exact, comb-based) pass@k."""

from __future__ import annotations

import math
import random

import pytest

from stages.method import estimators  # n=5, c=2: C(3,k)/C(5,k) = 3/5, 3/10, 1/10, 0/5, 0/1


@pytest.mark.parametrize("k, expected", [(1, 2 / 5), (2, 7 / 10), (3, 9 / 10), (4, 1.0), (5, 1.0)])
def test_pass_at_k_hand_computed_n5_c2(k, expected):
    assert estimators.pass_at_k(5, 2, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_pass_at_k_no_correct_is_zero(k):
    assert estimators.pass_at_k(5, 0, k) == 0.0


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_pass_at_k_all_correct_is_one(k):
    assert estimators.pass_at_k(5, 5, k) == 1.0


def test_pass_at_1_equals_fraction_correct():
    for n in range(1, 20):
        for c in range(n + 1):
            assert estimators.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


def test_pass_at_k_matches_exact_binomials_over_random_cases():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 60)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert estimators.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)


def test_pass_at_k_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not.
    value = estimators.pass_at_k(1000, 1, 500)
    assert value == pytest.approx(0.5, abs=1e-12)
    assert 0.0 <= estimators.pass_at_k(10_000, 3, 10) <= 1.0


@pytest.mark.parametrize("n, c, k", [(5, 2, 0), (5, 2, 6), (5, 6, 1), (5, -1, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        estimators.pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_problems():
    # problem A: n=5,c=2 -> pass@2 = 0.7; problem B: n=5,c=0 -> 0; mean 0.35
    assert estimators.mean_pass_at_k([(5, 2), (5, 0)], 2) == pytest.approx(0.35)


def test_avg_at_k_is_mean_of_problem_accuracies():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4]
    # 1/4, 2/4, 0 -> 0.25
    assert estimators.avg_at_k(correct) == pytest.approx(0.25)
    assert estimators.problem_accuracies(correct) == [0.25, 0.5, 0.0]


def test_avg_at_k_rejects_problem_without_samples():
    with pytest.raises(ValueError):
        estimators.avg_at_k([[True], []])


def test_majority_vote_picks_most_frequent_answer():
    assert estimators.majority_vote(["3", "5", "5", "3", "5"]) == 1


def test_majority_vote_tie_goes_to_first_appearance():
    assert estimators.majority_vote(["7", "4", "4", "7"]) == 0
    assert estimators.majority_vote(["4", "7", "7", "4"]) == 0
    assert estimators.majority_vote([None, "9", "8"]) == 1


def test_majority_vote_ignores_missing_answers():
    assert estimators.majority_vote([None, None, "2", None]) == 2
    assert estimators.majority_vote([None, None]) is None


def test_maj_at_k_hand_computed():
    keys = [
        ["12", "12", "13"],  # majority 12, correct
        ["5", "6", "6"],  # majority 6, wrong (gold 5)
        ["1", "2", None],  # tie 1/2 -> first (1), correct
        [None, None, None],  # no answer -> wrong
    ]
    correct = [
        [True, True, False],
        [True, False, False],
        [True, False, False],
        [False, False, False],
    ]
    assert [estimators.majority_correct(k, c) for k, c in zip(keys, correct)] == [True, False, True, False]
    assert estimators.maj_at_k(keys, correct) == pytest.approx(0.5)


def test_maj_at_k_tie_is_order_dependent_but_deterministic():
    # the same votes in another order: the first-seen answer wins, run after run
    assert estimators.majority_correct(["wrong", "right"], [False, True]) is False
    assert estimators.majority_correct(["right", "wrong"], [True, False]) is True


def test_majority_group_counts_correct_if_any_copy_verified():
    # the second copy of "8" timed out in verification; the group is still the right answer
    assert estimators.majority_correct(["8", "8", "3"], [False, True, False]) is True


def test_bootstrap_interval_contains_mean_and_is_seeded():
    rng = random.Random(3)
    values = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(50)]
    mean = sum(values) / len(values)
    low, high = estimators.bootstrap_interval(values, seed=7)
    assert low <= mean <= high
    assert low < high
    assert estimators.bootstrap_interval(values, seed=7) == (low, high)
    assert estimators.bootstrap_interval(values, seed=8) != (low, high)


def test_bootstrap_interval_of_constant_values_is_a_point():
    assert estimators.bootstrap_interval([0.5] * 10, seed=0) == (0.5, 0.5)


def test_bootstrap_interval_narrows_with_more_problems():
    rng = random.Random(0)
    small = [float(rng.random() < 0.3) for _ in range(20)]
    large = [float(rng.random() < 0.3) for _ in range(2000)]
    low_s, high_s = estimators.bootstrap_interval(small, seed=0, resamples=500)
    low_l, high_l = estimators.bootstrap_interval(large, seed=0, resamples=500)
    assert high_l - low_l < high_s - low_s


def test_bootstrap_interval_width_matches_normal_approximation():
    # mean of 400 Bernoulli(0.5): sd = 0.025, 95% half-width ~ 1.96 * 0.025 = 0.049
    values = [1.0, 0.0] * 200
    low, high = estimators.bootstrap_interval(values, seed=1, resamples=2000)
    assert (high - low) / 2 == pytest.approx(0.049, abs=0.006)


@pytest.mark.parametrize("n, expected", [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8])])
def test_k_values(n, expected):
    assert estimators.k_values(n) == expected


def test_stratified_bootstrap_of_one_group_is_the_plain_bootstrap():
    values = [random.Random(7).random() for _ in range(23)]
    assert estimators.stratified_bootstrap_interval([values], seed=5, resamples=300) == \
        estimators.bootstrap_interval(values, seed=5, resamples=300)


def test_stratified_bootstrap_weighs_groups_equally_whatever_their_size():
    # constant groups: every resample's average is (1 + 0) / 2, however many problems each group has
    assert estimators.stratified_bootstrap_interval([[1.0] * 2, [0.0] * 40], resamples=50) == (0.5, 0.5)


def test_stratified_bootstrap_interval_covers_the_average_and_is_seeded():
    groups = [[1.0, 0.0, 1.0, 0.5], [0.0, 0.25, 0.0]]
    low, high = estimators.stratified_bootstrap_interval(groups, seed=1)
    average = (2.5 / 4 + 0.25 / 3) / 2
    assert low <= average <= high and low < high
    assert estimators.stratified_bootstrap_interval(groups, seed=1) == (low, high)
    with pytest.raises(ValueError):
        estimators.stratified_bootstrap_interval([[1.0], []])
