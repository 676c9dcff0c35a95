"""Hand-computed checks of the METHOD math in stages.method (terms, advantages, losses, gate), plus loop-reference
parity tests."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stages.method.advantages import group_advantages, token_advantages
from stages.method.gate import EntropyGate, gate_step, median_teacher_entropy
from stages.method.losses import aggregate, kl_penalty, policy_loss, step_normalizer, token_stats
from stages.method.terms import antisd_term, get_term, method_names, phi, register_term

HALF_LOG2 = 0.5 * math.log(2.0)  # 0.34657359


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# --- φ and the AntiSD term ---------------------------------------------------------------------------------------

def test_phi_is_zero_at_zero():
    assert float(phi(t([0.0]))) == 0.0
    assert float(antisd_term(t([0.0]))) == 0.0


def test_antisd_term_hand_values():
    # −φ(2) = −½(log(1+e²) − log 2) = −½(2.1269280 − 0.6931472); −φ(−2) = −½(0.1269280 − 0.6931472)
    got = antisd_term(t([2.0, -2.0, 0.5, 100.0, -100.0]))
    want = t([-0.7168904, 0.2831096, -0.1404653, -(100.0 - math.log(2)) / 2, HALF_LOG2])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_phi_is_increasing():
    u = torch.linspace(-20, 50, 7001, dtype=torch.float64)
    assert bool((phi(u).diff() > 0).all())
    wide = torch.linspace(-1e4, 1e4, 20001, dtype=torch.float64)  # far left φ saturates at −½ log 2 in floating point
    assert bool((phi(wide).diff() >= 0).all())


def test_antisd_term_bounded_by_half_log2():
    u = torch.cat([torch.linspace(-1e4, 1e4, 20001), t([-1e30, -1e4, -100.0, 0.0], torch.float32)])
    assert bool((antisd_term(u) <= HALF_LOG2 + 1e-7).all())
    assert abs(float(antisd_term(t([-1e4]))) - HALF_LOG2) < 1e-12  # the bound is reached on the far left


def test_antisd_term_is_minus_half_u_for_large_u():
    u = t([30.0, 100.0, 1e3])
    torch.testing.assert_close(antisd_term(u) + u / 2, torch.full_like(u, HALF_LOG2), rtol=0, atol=1e-9)


def test_antisd_term_is_minus_quarter_u_near_zero():
    u = t([-1e-3, -1e-4, 1e-4, 1e-3])
    # −φ(u) = −u/4 − u²/16 + O(u⁴)
    torch.testing.assert_close(antisd_term(u), -u / 4, rtol=0, atol=1e-7)
    torch.testing.assert_close(antisd_term(u), -u / 4 - u * u / 16, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [100.0, 1e4])
def test_antisd_term_no_overflow(dtype, magnitude):
    u = torch.tensor([-magnitude, magnitude], dtype=dtype, requires_grad=True)
    out = antisd_term(u)
    out.sum().backward()
    out = out.detach()
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(u.grad).all())
    assert float(out[0]) == pytest.approx(HALF_LOG2, abs=1e-2)
    assert float(out[1]) == pytest.approx(-(magnitude - math.log(2)) / 2, rel=1e-2)


# --- group advantages --------------------------------------------------------------------------------------------

REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
GROUPS = [0, 0, 0, 0, 1, 1, 1, 2, 3, 3]
S3 = 1 / math.sqrt(3)  # unbiased std of {1,0,0,1}: sqrt(4·0.25/3)
S2 = 1 / math.sqrt(2)  # unbiased std of {1,0}: sqrt(2·0.25/1)


def test_group_advantages_hand_example():
    got = group_advantages(t(REWARDS, torch.float32), torch.tensor(GROUPS), eps=0.0)
    want = [0.5 / S3, -0.5 / S3, -0.5 / S3, 0.5 / S3, 0, 0, 0, 0, 0.5 / S2, -0.5 / S2]
    torch.testing.assert_close(got, t(want, torch.float32), rtol=0, atol=1e-6)
    assert got.dtype == torch.float32


def test_group_advantages_eps_in_denominator():
    got = group_advantages(t(REWARDS), torch.tensor(GROUPS), eps=0.1)
    assert float(got[0]) == pytest.approx(0.5 / (S3 + 0.1), abs=1e-12)


def test_group_advantages_zero_variance_and_singleton_are_exactly_zero():
    got = group_advantages(t([0.1, 0.1, 0.1, 0.7]), ["a", "a", "a", "b"])
    assert got.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_group_advantages_scale_none_is_centered_reward():
    got = group_advantages(t(REWARDS), torch.tensor(GROUPS), scale="none")
    assert got.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0.5, -0.5]


def test_group_advantages_string_ids_in_any_order():
    ids = ["p1", "p0", "p1", "p0"]
    got = group_advantages(t([1.0, 1.0, 0.0, 0.0]), ids, eps=0.0)
    torch.testing.assert_close(got, t([0.5 / S2, 0.5 / S2, -0.5 / S2, -0.5 / S2]), rtol=0, atol=1e-6)


def test_group_advantages_rejects_bad_scale_and_length():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(t([1.0]), [0], scale="batch")
    with pytest.raises(ValueError, match="entries"):
        group_advantages(t([1.0, 0.0]), torch.tensor([0]))


def _group_advantages_loop(rewards, groups, eps):
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        n = len(members)
        if n < 2 or max(members) == min(members):
            out.append(0.0)
            continue
        mean = sum(members) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1))
        out.append((r - mean) / (std + eps))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_group_advantages_matches_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 7, (40,), generator=gen)
    rewards = torch.randint(0, 2, (40,), generator=gen).double() * torch.rand(40, generator=gen, dtype=torch.float64)
    got = group_advantages(rewards, groups, eps=1e-6)
    want = _group_advantages_loop(rewards.tolist(), groups.tolist(), 1e-6)
    torch.testing.assert_close(got, t(want), rtol=1e-9, atol=1e-9)


# --- registry and token advantages -------------------------------------------------------------------------------

SEQ_ADV = t([1.0, -1.0], torch.float32)
PMI = t([[2.0, -2.0, 0.0], [0.5, float("nan"), 7.0]], torch.float32)  # NaN / 7 sit in padding
MASK = torch.tensor([[True, True, True], [True, False, False]])


def test_registry_holds_methods_names_and_rejects_unknown():
    assert method_names() == ("grpo", "sd", "antisd", "rkl-ascent")  # METHOD §2's table
    with pytest.raises(ValueError, match="grpo, sd, antisd, rkl-ascent"):
        get_term("anti-sd")
    assert [get_term(m).gated_by_default for m in method_names()] == [False, False, True, True]  # METHOD §5


def test_registering_a_name_twice_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_term("sd", gated_by_default=False, formula="x")(lambda u: u)


@pytest.mark.parametrize(
    "method, want",
    [
        ("grpo", [[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]),
        ("sd", [[2.0, 0.0, 1.0], [-0.75, 0.0, 0.0]]),  # A + 0.5·u
        ("antisd", [[1 - 0.3584452, 1 + 0.1415548, 1.0], [-1 - 0.0702327, 0.0, 0.0]]),  # A − 0.5·φ(u)
        ("rkl-ascent", [[0.0, 2.0, 1.0], [-1.25, 0.0, 0.0]]),  # A − 0.5·u
    ],
)
def test_token_advantages_hand_values(method, want):
    got = token_advantages(method, SEQ_ADV, PMI, MASK, lam=0.5)
    torch.testing.assert_close(got, t(want, torch.float32), rtol=0, atol=1e-6)


def test_sd_and_antisd_terms_have_opposite_signs():
    u = torch.linspace(-20, 20, 401)
    mask = torch.ones(1, 401, dtype=torch.bool)
    zero = torch.zeros(1)
    sd = token_advantages("sd", zero, u[None], mask, 0.5)
    anti = token_advantages("antisd", zero, u[None], mask, 0.5)
    assert torch.equal(torch.sign(sd), -torch.sign(anti))


def test_token_advantages_respect_mask_and_nan_padding():
    for method in method_names():
        got = token_advantages(method, SEQ_ADV, PMI, MASK, lam=0.5)
        assert bool(torch.isfinite(got).all())
        assert bool((got[~MASK] == 0).all())


def test_token_advantages_are_constants():
    pmi = PMI.clone().nan_to_num().requires_grad_(True)
    seq = SEQ_ADV.clone().requires_grad_(True)
    got = token_advantages("antisd", seq, pmi, MASK, lam=0.5)
    assert not got.requires_grad


def test_grpo_needs_no_pmi_but_others_do():
    assert token_advantages("grpo", SEQ_ADV, None, MASK, lam=0.5).tolist() == [[1, 1, 1], [-1, 0, 0]]
    with pytest.raises(ValueError, match="pmi"):
        token_advantages("sd", SEQ_ADV, None, MASK, lam=0.5)


_LOOP_TERMS = {
    "grpo": lambda u: 0.0,
    "sd": lambda u: u,
    "antisd": lambda u: -0.5 * (math.log1p(math.exp(u)) - math.log(2)),
    "rkl-ascent": lambda u: -u,
}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", sorted(_LOOP_TERMS))
def test_token_advantages_match_loop_reference(seed, method):
    gen = torch.Generator().manual_seed(seed)
    b, width = 5, 9
    seq = torch.randn(b, generator=gen)
    pmi = torch.randn(b, width, generator=gen) * 5
    lengths = torch.randint(0, width + 1, (b,), generator=gen)
    mask = torch.arange(width)[None] < lengths[:, None]
    got = token_advantages(method, seq, pmi, mask, lam=0.3)
    want = torch.zeros(b, width)
    for i in range(b):
        for j in range(int(lengths[i])):
            want[i, j] = float(seq[i]) + 0.3 * _LOOP_TERMS[method](float(pmi[i, j]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_token_stats_hand_values():
    stats = token_stats(PMI, MASK)  # masked u: 2, −2, 0, 0.5
    assert stats.u_mean == pytest.approx(0.125, abs=1e-7)
    assert stats.antisd_term_mean == pytest.approx((-0.7168904 + 0.2831096 + 0 - 0.1404653) / 4, abs=1e-6)
    assert stats.neg_frac == 0.25
    assert stats.tokens == 4
    assert math.isnan(token_stats(PMI, torch.zeros_like(MASK)).u_mean)


def test_median_teacher_entropy_even_odd_empty():
    rows = [[5.0, 1.0, 9.0], [3.0], [100.0, 7.0]]
    assert median_teacher_entropy(rows, [True, True, False]) == (4.0, 4)  # {1,3,5,9}: rows with a teacher view
    assert median_teacher_entropy(rows, [True, False, False]) == (5.0, 3)
    assert median_teacher_entropy(rows, [False, False, False]) == (None, 0)


# --- policy loss --------------------------------------------------------------------------------------------------

def _clip_case():
    ratios = [1.5, 0.5, 1.1, 0.7]
    logprobs = torch.log(t([ratios])).requires_grad_(True)
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = t([[1.0, -1.0, -1.0, 2.0]])
    return logprobs, old, adv, torch.ones(1, 4, dtype=torch.bool)


def test_policy_loss_hand_computed_clip_case():
    logprobs, old, adv, mask = _clip_case()
    loss, metrics = policy_loss(logprobs, old, adv, mask)
    # token losses: −min(1.5,1.2)·1 = −1.2 (high clip); −min(−0.5,−0.8) = 0.8 (low clip); 1.1; −min(1.4,1.6) = −1.4
    assert float(loss.detach()) == pytest.approx((-1.2 + 0.8 + 1.1 - 1.4) / 4, abs=1e-12)
    loss.backward()
    # clipped tokens give no gradient; d(−Aρ)/dlogπ = −Aρ: token 2 → 1.1, token 3 → −1.4; / 4 tokens
    torch.testing.assert_close(logprobs.grad, t([[0.0, 0.0, 0.275, -0.35]]), rtol=0, atol=1e-12)
    assert metrics.clip_frac == 0.5
    assert metrics.clip_frac_low == 0.25 and metrics.clip_frac_high == 0.25
    assert metrics.kl_k1 == pytest.approx(-math.log(1.5 * 0.5 * 1.1 * 0.7) / 4, abs=1e-9)
    k3 = sum(r - 1 - math.log(r) for r in [1.5, 0.5, 1.1, 0.7]) / 4  # 0.0872617
    assert metrics.approx_kl == pytest.approx(k3, abs=1e-9)
    assert metrics.ratio_max == pytest.approx(1.5) and metrics.tokens == 4


def test_policy_loss_clip_higher():
    logprobs, old, adv, mask = _clip_case()
    loss, metrics = policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert float(loss.detach()) == pytest.approx((-1.5 + 0.8 + 1.1 - 1.4) / 4, abs=1e-12)
    assert metrics.clip_frac_high == 0.0


def test_policy_loss_on_policy_is_minus_mean_advantage():
    adv = t([[1.0, -3.0, 2.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    lp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    loss, metrics = policy_loss(lp, lp.detach(), adv, mask)
    assert float(loss.detach()) == pytest.approx(-(1 - 3 + 2 + 4) / 4)
    assert metrics.clip_frac == 0.0 and metrics.approx_kl == 0.0


def test_policy_loss_ignores_nan_in_padding():
    lp = t([[0.1, float("nan")]]).requires_grad_(True)
    loss, _ = policy_loss(lp, t([[0.0, float("inf")]]), t([[1.0, float("nan")]]), torch.tensor([[1, 0]]))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(lp.grad).all())


def test_aggregations_hand_values():
    values = t([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate(values, mask, "token-mean")) == pytest.approx(16 / 4)
    assert float(aggregate(values, mask, "seq-mean-token-mean")) == pytest.approx((2 + 10) / 2)
    assert float(aggregate(values, mask, "seq-mean-token-sum")) == pytest.approx(16 / 6)
    assert float(aggregate(values, mask, "seq-mean-token-sum", normalizer=2 * 8)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(values, mask, "sum")


def test_step_normalizer_values():
    assert step_normalizer("token-mean", [3, 1, 0]) == 4
    assert step_normalizer("seq-mean-token-mean", [3, 1, 0]) == 3
    assert step_normalizer("seq-mean-token-sum", [3, 1, 0]) == 9
    assert step_normalizer("seq-mean-token-sum", torch.tensor([3, 1, 0]), max_response_tokens=128) == 384


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", range(3))
def test_micro_batch_split_gives_same_loss_and_grad(agg, seed):
    gen = torch.Generator().manual_seed(seed)
    b, width = 7, 11
    params = torch.randn(b, width, generator=gen, dtype=torch.float64).requires_grad_(True)
    old = params.detach() + 0.3 * torch.randn(b, width, generator=gen, dtype=torch.float64)
    adv = torch.randn(b, width, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([11, 3, 0, 7, 1, 9, 5])
    mask = torch.arange(width)[None] < lengths[:, None]
    full, _ = policy_loss(params, old, adv, mask, agg=agg)
    (full_grad,) = torch.autograd.grad(full, params)
    normalizer = step_normalizer(agg, lengths, max_response_tokens=width)
    total = 0.0
    for lo, hi in [(0, 2), (2, 5), (5, 7)]:
        trim = int(lengths[lo:hi].max())  # each micro-batch padded only to its own longest response
        sl = (slice(lo, hi), slice(0, trim))
        part, _ = policy_loss(params[sl], old[sl], adv[sl], mask[sl], agg=agg, normalizer=normalizer)
        total = total + part
    (split_grad,) = torch.autograd.grad(total, params)
    torch.testing.assert_close(total, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-12, atol=1e-12)


def _policy_loss_loop(lp, old, adv, lengths, cl, ch):
    total, count = 0.0, 0
    for i, n in enumerate(lengths):
        for j in range(n):
            ratio = math.exp(lp[i][j] - old[i][j])
            total += -min(ratio * adv[i][j], min(max(ratio, 1 - cl), 1 + ch) * adv[i][j])
            count += 1
    return total / count


@pytest.mark.parametrize("seed", range(5))
def test_policy_loss_matches_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    b, width = 4, 6
    lp = torch.randn(b, width, generator=gen)
    old = lp + 0.4 * torch.randn(b, width, generator=gen)
    adv = torch.randn(b, width, generator=gen)
    lengths = torch.randint(1, width + 1, (b,), generator=gen).tolist()
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    loss, _ = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    want = _policy_loss_loop(lp.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, 0.28)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_kl_penalty_k3_hand_values():
    lp = t([[0.0, 0.0, -1.0]]).requires_grad_(True)
    ref = t([[math.log(0.5), 0.0, 5.0]])
    kl = kl_penalty(lp, ref, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(kl.detach(), t([[0.5 - 1 + math.log(2), 0.0, 0.0]]), rtol=0, atol=1e-12)
    kl.sum().backward()  # d/dlp (e^{ref−lp} − 1 − ref + lp) = 1 − e^{ref−lp}
    torch.testing.assert_close(lp.grad, t([[0.5, 0.0, 0.0]]), rtol=0, atol=1e-12)


# --- entropy gate -------------------------------------------------------------------------------------------------

# W = 5 warm-up medians {2, 1, 3, 2.5, 1.5} → H_warm = 2.0, τ_down = 0.93·2 = 1.86.
SCRIPT = [
    (2.0, 0.0, False), (1.0, 0.0, False), (3.0, 0.0, False), (2.5, 0.0, False),  # warm-up: λ = 0, medians recorded
    (1.5, 0.0, True),   # last warm-up step: H_warm fixed, g = 1, λ still 0
    (1.9, 0.5, True),   # ≥ τ_down: stays on
    (1.86, 0.5, True),  # exactly τ_down is not below it: stays on
    (1.85, 0.0, False),  # < τ_down: off
    (1.95, 0.0, False),  # between τ_down and H_warm: stays off (hysteresis)
    (float("nan"), 0.0, False),  # no measurement: unchanged
    (2.0, 0.5, True),   # ≥ H_warm: back on
    (1.9, 0.5, True),   # between: stays on
    (0.5, 0.0, False),
]


def test_gate_step_rule():
    assert gate_step(True, 1.0, 2.0, 0.93) is False
    assert gate_step(True, 1.9, 2.0, 0.93) is True
    assert gate_step(False, 1.9, 2.0, 0.93) is False
    assert gate_step(False, 2.0, 2.0, 0.93) is True


def test_gate_hysteresis_over_scripted_sequence():
    gate = EntropyGate()
    for step, (median, lam, is_open) in enumerate(SCRIPT, start=1):
        assert gate.update(median) == lam, f"step {step}"
        assert gate.open is is_open, f"step {step}"
        if step == 5:
            assert gate.h_warm == 2.0 and gate.tau_down == pytest.approx(1.86)
        if step < 5:
            assert gate.h_warm is None


def test_gate_state_dict_round_trip_mid_sequence():
    reference, first = EntropyGate(), EntropyGate()
    ref_lams = [reference.update(m) for m, _, _ in SCRIPT]
    for m, _, _ in SCRIPT[:8]:
        first.update(m)
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = EntropyGate()
    resumed.load_state_dict(state)
    lams = [resumed.update(m) for m, _, _ in SCRIPT[8:]]
    assert lams == ref_lams[8:]
    assert resumed.state_dict() == reference.state_dict()


def test_gate_load_refuses_other_hyper_parameters():
    state = EntropyGate(lam_max=0.5).state_dict()
    with pytest.raises(ValueError, match="lam_max"):
        EntropyGate(lam_max=0.3).load_state_dict(state)
    EntropyGate(lam_max=0.3).load_state_dict(state, strict=False)


def test_ungated_gives_lam_max_always():
    gate = EntropyGate(gated=False, lam_max=0.5)
    assert [gate.update(m) for m, _, _ in SCRIPT] == [0.5] * len(SCRIPT)
    assert gate.h_warm == 2.0


def test_gate_recalibrate_reruns_warm_up():
    gate = EntropyGate(warmup_steps=2)
    assert [gate.update(h) for h in [4.0, 2.0, 3.0]] == [0.0, 0.0, 0.5]  # H_warm = 3
    gate.recalibrate()
    assert [gate.update(h) for h in [1.0, 1.0]] == [0.0, 0.0]
    assert gate.h_warm == 1.0
    assert gate.update(0.95) == 0.5  # 0.95 ≥ 0.93·1


def test_gate_recalibration_request_acts_once_and_survives_the_state():
    gate = EntropyGate(warmup_steps=1)
    gate.update(2.0)
    assert gate.request_recalibration(True) and gate.calibrating
    assert gate.update(1.0) == 0.0 and gate.h_warm == 1.0
    restored = EntropyGate(warmup_steps=1)
    restored.load_state_dict(gate.state_dict())
    assert not restored.request_recalibration(True)  # the request was already in force: no second warm-up
    assert not restored.request_recalibration(False)
    assert restored.request_recalibration(True)  # a new request after a step without it
    assert EntropyGate().request_recalibration(False, force=True)


def test_gate_warm_up_without_measurements_waits():
    gate = EntropyGate(warmup_steps=2)
    assert [gate.update(h) for h in [None, float("nan"), 2.0, 2.0]] == [0.0, 0.0, 0.0, 0.5]
    assert gate.h_warm == 2.0


def test_gate_rejects_bad_hyper_parameters():
    with pytest.raises(ValueError, match="warmup_steps"):
        EntropyGate(warmup_steps=0)
    with pytest.raises(ValueError, match="down"):
        EntropyGate(down=1.5)
