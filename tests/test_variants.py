"""The `official` variant (METHOD §9) against hand-computed values: the adaptive u-clip, the per-response z-score, the
length mask, the perplexity λ_i, the perplexity gate and its warm-up calibration, the dual clip, the presets, and the
teacher prompt's exact strings. The update, loop and rank paths of the variant are in test_variants_stages.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stages.method.advantages import shaped_token_advantages, token_advantages
from stages.method.losses import policy_loss
from stages.method.perplexity import (
    PerplexityGate,
    perplexity_lambdas,
    ppl_gate_statistic,
    ppl_gate_step,
    ppl_target,
    teacher_perplexity,
    upper_median,
)
from stages.method.shaping import clip_u, length_mask, response_u_std, response_zscore
from stages.method.terms import get_term, phi


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def rows(*lists, pad=float("nan")):
    """Right-pad float lists into ([B, T] with `pad` in the padding, [B, T] mask)."""
    width = max(len(r) for r in lists)
    values = torch.full((len(lists), width), pad, dtype=torch.float32)
    for i, r in enumerate(lists):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    mask = torch.arange(width)[None, :] < torch.tensor([len(r) for r in lists])[:, None]
    return values, mask


# --- §9 step 2: the per-response spread that calibrates σ_ref -------------------------------------------------------

def test_response_u_std_is_the_unbiased_std_and_nan_below_two_tokens():
    values, mask = rows([1.0, 2.0, 4.0], [3.0], [])
    std = response_u_std(values, mask)
    assert float(std[0]) == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2),
                                          rel=1e-12)  # 1.5275; float64 over exact float32 inputs
    assert math.isnan(float(std[1])) and math.isnan(float(std[2]))


# --- §9 step 3: the adaptive clip ------------------------------------------------------------------------------------

def test_clip_drops_tokens_beyond_k_sigma_to_zero_then_clamps():
    values, mask = rows([0.5, -3.0, 2.5, 1.9, -2.0], [7.0, -9.0])
    clipped = clip_u(values, mask, sigma_ref=1.0, k=2.0, clamp=5.0)
    assert clipped[0].tolist() == [0.5, 0.0, 0.0, 1.899999976158142, -2.0]  # |u| > 2 → 0, |u| = 2 kept
    assert clipped[1].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]
    no_sigma = clip_u(values, mask, sigma_ref=None, k=2.0, clamp=5.0)  # warm-up: the clamp only
    assert no_sigma[1, :2].tolist() == [5.0, -5.0] and not bool(torch.isnan(no_sigma).any())


def test_clip_off_is_u_itself_with_zero_padding():
    values, mask = rows([0.25, -30.0], [1.5])
    assert torch.equal(clip_u(values, mask, None, 2.0, 0.0), torch.where(mask, values, 0.0))


# --- §9 step 5: the per-response z-score ----------------------------------------------------------------------------

def test_zscore_uses_the_population_std_and_sums_to_zero():
    values, mask = rows([1.0, 2.0, 3.0], [0.5, 0.5, 2.0, 5.0])
    p = response_zscore(values, mask, clamp=5.0)
    z = 1 / math.sqrt(2 / 3)  # (3 − 2) / population std sqrt(2/3) = 1.2247
    assert p[0, :3].tolist() == pytest.approx([-z, 0.0, z], rel=1e-6)  # float32 output
    assert abs(float(p[1].sum())) < 1e-6 and float(p[0, 3]) == 0.0  # padding 0


def test_zscore_of_constant_and_one_token_responses_is_exactly_zero():
    # 0.1 is not exact in binary: its mean over three tokens can differ from it by an ulp, which /1e-6 would blow up
    values, mask = rows([0.1, 0.1, 0.1], [4.2], [0.0, 0.0])
    assert torch.equal(response_zscore(values, mask, clamp=5.0), torch.zeros(3, 3))


def test_zscore_clamps_at_five():
    values, mask = rows([0.0] * 99 + [1.0])
    p = response_zscore(values, mask, clamp=5.0)
    # mean 0.01, population std sqrt(0.01·0.99) = 0.0995: the outlier's z is 9.95 → 5, the others −0.1005
    assert float(p[0, 99]) == 5.0
    assert float(p[0, 0]) == pytest.approx(-0.01 / math.sqrt(0.0099), rel=1e-6)


def test_length_mask_keeps_responses_shorter_than_the_limit():
    _, mask = rows([1.0] * 3, [1.0] * 4, [1.0] * 5)
    assert length_mask(mask, 4).tolist() == [True, False, False]
    assert length_mask(mask, 0).tolist() == [True, True, True]


# --- the chain: A = A_i + λ_i·p --------------------------------------------------------------------------------------

def official(method, seq, values, mask, lam, sigma_ref=None, length=0):
    return shaped_token_advantages(method, seq, values, mask, lam, variant="official", sigma_ref=sigma_ref,
                                   u_clip_k=2.0, u_clamp=5.0, term_norm="response", norm_clamp=5.0,
                                   length_mask_tokens=length)


def test_official_antisd_advantage_hand_values():
    values, mask = rows([0.0, 1.0, 3.0], [0.5, -0.5])
    seq, lam = t([0.5, -0.5]), t([0.2, 0.1])
    parts = official("antisd", seq, values, mask, lam, sigma_ref=1.0)  # u = 3 > 2σ_ref: dropped to 0
    r = [-float(phi(t([x]))) for x in (0.0, 1.0, 0.0)]
    mean = sum(r) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
    p = [(x - mean) / std for x in r]  # [+0.7071, −1.4142, +0.7071]
    assert parts.u[0].tolist() == [0.0, 1.0, 0.0]
    assert parts.normalized[0].tolist() == pytest.approx(p, rel=1e-6)
    assert parts.advantages[0].tolist() == pytest.approx([0.5 + 0.2 * x for x in p], rel=1e-6)
    q = [-float(phi(t([0.5]))), -float(phi(t([-0.5])))]
    zq = [(q[0] - q[1]) / abs(q[0] - q[1]), (q[1] - q[0]) / abs(q[0] - q[1])]  # two tokens: ±1
    assert parts.advantages[1, :2].tolist() == pytest.approx([-0.5 + 0.1 * zq[0], -0.5 + 0.1 * zq[1]], rel=1e-6)
    assert float(parts.advantages[1, 2]) == 0.0


def test_all_tokens_clipped_leave_the_sequence_advantage():
    values, mask = rows([4.0, -4.0, 6.0])
    parts = official("antisd", t([0.75]), values, mask, t([0.2]), sigma_ref=1.0)
    assert parts.u.tolist() == [[0.0, 0.0, 0.0]] and parts.normalized.tolist() == [[0.0, 0.0, 0.0]]
    assert parts.advantages.tolist() == [[0.75, 0.75, 0.75]]


def test_a_response_over_the_length_mask_keeps_only_its_sequence_advantage():
    values, mask = rows([0.1, 0.9, -0.4], [0.3, -0.2])
    parts = official("antisd", t([1.0, 1.0]), values, mask, t([0.2, 0.2]), length=3)
    assert parts.advantages[0].tolist() == [1.0, 1.0, 1.0]
    assert parts.advantages[1, :2].tolist() != [1.0, 1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sd_is_exactly_minus_antisd_token_by_token(seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(5, 9, generator=gen) * 2
    mask = torch.arange(9)[None, :] < torch.tensor([9, 1, 4, 7, 2])[:, None]
    for sigma in (None, 0.8):
        sd = official("sd", torch.zeros(5), values, mask, t([0.2] * 5), sigma_ref=sigma)
        anti = official("antisd", torch.zeros(5), values, mask, t([0.2] * 5), sigma_ref=sigma)
        assert torch.equal(sd.term, -anti.term)  # +φ and −φ of the same clipped u
        assert torch.equal(sd.normalized, -anti.normalized)  # the z-score is odd, clamps included
        assert torch.equal(sd.advantages, -anti.advantages)
    assert get_term("sd").term_of("paper")(t([2.0])).item() == 2.0  # the paper's text: +u


def test_everything_off_is_the_paper_formula_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(4, 6, generator=gen)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 1, 5])[:, None]
    seq = torch.randn(4, generator=gen)
    for method in ("grpo", "sd", "antisd", "rkl-ascent"):
        expected = torch.where(mask, seq[:, None].float() + 0.5 * get_term(method).term(torch.where(mask, values, 0.0)),
                               0.0)
        assert torch.equal(token_advantages(method, seq, values, mask, 0.5), expected)


# --- λ_i from the teacher perplexity ---------------------------------------------------------------------------------

def test_teacher_perplexity_and_upper_median():
    assert teacher_perplexity([-1.0, -2.0]) == pytest.approx(math.exp(1.5), rel=1e-15)
    assert teacher_perplexity([]) is None
    assert upper_median([3.0, 1.0, 4.0, 2.0]) == 3.0 and upper_median([2.0, 9.0, 1.0]) == 2.0


def test_targets_of_antisd_and_sd():
    assert ppl_target(2.0, 0.93, 0.0, 1.01) == pytest.approx(1.86)
    assert ppl_target(2.0, 1.0, 0.10, 1.01) == pytest.approx(1.9)
    assert ppl_target(1.05, 0.93, 0.0, 1.01) == 1.01  # the floor
    assert ppl_target(1.08, 1.0, 0.10, 1.01) == 1.01


def test_perplexity_lambdas_hand_values():
    tppl = t([1.2, 1.5, 2.25, 2.99, 3.0, 3.5, float("nan")])
    lam = perplexity_lambdas(tppl, target=1.5, scale=0.2, ratio_max=3.0, lam_max=0.5, spike=3.0).tolist()
    assert lam[:2] == [0.0, 0.0]  # at or below the target
    assert lam[2] == pytest.approx(0.2 * math.log(1.5), rel=1e-12)
    assert lam[3] == pytest.approx(0.2 * math.log(2.99 / 1.5), rel=1e-12)
    assert lam[4] == pytest.approx(0.2 * math.log(2.0), rel=1e-12)  # 3 itself is not above the spike threshold
    assert lam[5:] == [0.0, 0.0]  # the spike mask, and a row without a teacher view


def test_perplexity_lambdas_never_exceed_scale_ln_ratio_max():
    tppl = torch.linspace(0.5, 9.0, 200, dtype=torch.float64)
    lam = perplexity_lambdas(tppl, target=1.01, scale=0.2, ratio_max=3.0, lam_max=0.5, spike=10.0)
    assert float(lam.max()) == pytest.approx(0.2 * math.log(3.0), rel=1e-12)  # ≈ 0.2197 < λ_max
    assert float(perplexity_lambdas(t([50.0]), 1.01, 1.0, 100.0, 0.5, 100.0)) == 0.5  # the λ_max clamp


# --- the perplexity gate -------------------------------------------------------------------------------------------

def test_gate_statistic_and_rule():
    assert ppl_gate_statistic([1.0, 2.0, 3.0, None, 5.0], spike=3.0) == 1.5
    assert ppl_gate_statistic([4.0], spike=3.0) is None
    assert ppl_gate_step(True, 1.5, target=1.86, reactivate=2.14) is False
    assert ppl_gate_step(True, 1.9, 1.86, 2.14) is True
    assert ppl_gate_step(False, 2.14, 1.86, 2.14) is False  # reopens only strictly above
    assert ppl_gate_step(False, 2.2, 1.86, 2.14) is True


def scripted_gate(gated=True):
    """Warm-up of 2 steps: stds 1, 2, 3 → σ_ref 2; tppl < 3 pooled {1.5, 2.0, 2.5, 1.0} → M = 2.0 (upper median),
    target max(0.93·2, 1.01) = 1.86, reactivate 2.14."""
    gate = PerplexityGate(warmup_steps=2, gated=gated)
    inputs = [([1.0, 2.0, float("nan")], [1.5, 2.0, 4.0]), ([3.0], [2.5, 1.0]),
              ([], [1.4, 1.6]), ([], [2.0]), ([], [3.5]), ([], [2.2, 2.2]), ([], [1.0])]
    return gate, inputs


def test_warm_up_calibrates_sigma_ref_m_target_and_reactivate():
    gate, inputs = scripted_gate()
    assert [gate.update(*step) for step in inputs[:2]] == [False, False]
    assert gate.sigma_ref == 2.0 and gate.ppl_m == 2.0
    assert gate.target == pytest.approx(1.86) and gate.reactivate == pytest.approx(2.14)


def test_gate_decides_at_the_step_boundary():
    gate, inputs = scripted_gate()
    acting = [gate.update(*step) for step in inputs]
    # step 3: open (first after warm-up), its statistic 1.5 < target closes step 4; 2.0 keeps it closed; step 5 has
    # no statistic (3.5 is a spike); 2.2 > 2.14 reopens step 7
    assert acting == [False, False, True, False, False, False, True]
    ungated, _ = scripted_gate(gated=False)
    assert [ungated.update(*step) for step in inputs] == [False, False, True, True, True, True, True]


def test_gate_state_round_trips_through_json_mid_sequence():
    gate, inputs = scripted_gate()
    expected = [gate.update(*step) for step in inputs]
    for cut in range(len(inputs)):
        first, _ = scripted_gate()
        got = [first.update(*step) for step in inputs[:cut]]
        resumed = PerplexityGate(warmup_steps=2)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        got += [resumed.update(*step) for step in inputs[cut:]]
        assert got == expected
        assert resumed.state_dict() == gate.state_dict()


def test_gate_refuses_other_settings_when_strict_and_recalibrates_on_request():
    gate, inputs = scripted_gate()
    for step in inputs[:3]:
        gate.update(*step)
    with pytest.raises(ValueError, match="target_ratio"):
        PerplexityGate(warmup_steps=2, target_ratio=0.9).load_state_dict(gate.state_dict())
    assert gate.request_recalibration(True) and gate.calibrating and not gate.request_recalibration(True)
    assert [gate.update(*step) for step in inputs[:2]] == [False, False] and gate.ppl_m == 2.0


def test_a_warm_up_without_perplexities_below_the_spike_waits():
    gate = PerplexityGate(warmup_steps=1)
    assert gate.update([1.0], [5.0]) is False and gate.calibrating
    assert gate.update([1.0], [2.0]) is False and gate.ppl_m == 2.0 and gate.sigma_ref == 1.0


# --- the dual clip -------------------------------------------------------------------------------------------------

def test_dual_clip_bounds_the_loss_of_negative_advantages():
    logprobs = torch.log(t([[5.0, 5.0, 0.5]])).float().requires_grad_()
    old, mask = torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)
    adv = t([[-1.0, 1.0, -1.0]]).float()
    plain, _ = policy_loss(logprobs, old, adv, mask, 0.2, 0.28, "token-mean")
    dual, stats = policy_loss(logprobs, old, adv, mask, 0.2, 0.28, "token-mean", dual_clip=3.0)
    # token 1: ρ = 5, A = −1: max(5, 1.28) = 5 → min(5, 3) = 3; token 2: A > 0: −min(5, 1.28) = −1.28;
    # token 3: ρ = 0.5, A = −1: max(0.5, 0.8) = 0.8 (below c)
    assert float(plain.detach()) == pytest.approx((5 - 1.28 + 0.8) / 3, rel=1e-6)
    assert float(dual.detach()) == pytest.approx((3 - 1.28 + 0.8) / 3, rel=1e-6)
    assert stats.clip_frac_dual == pytest.approx(1 / 3)


# --- presets ------------------------------------------------------------------------------------------------------

def test_presets_resolve_and_an_explicit_knob_wins():
    from stages.training.config import UpdateConfig, resolve_variant

    sd = resolve_variant(UpdateConfig(scored="s", out="o", method="sd"))
    assert (sd.variant, sd.ppl_target_ratio, sd.ppl_target_offset, sd.adv_scale, sd.clip_high, sd.dual_clip,
            sd.loss_agg, sd.is_correction, sd.term_norm, sd.lam_mode, sd.gate_statistic, sd.length_mask,
            sd.weight_decay) == ("official", 1.0, 0.10, "none", 0.28, 3.0, "seq-mean-token-mean", "token", "response",
                                 "perplexity", "perplexity", 12000, 0.01)
    paper = resolve_variant(UpdateConfig(scored="s", out="o", variant="paper", clip_high=0.25))
    assert (paper.clip_high, paper.adv_scale, paper.u_clip, paper.term_norm, paper.dual_clip) == \
        (0.25, "group", "off", "none", 0.0)
    assert resolve_variant(UpdateConfig(scored="s", out="o"), {"gate": {}, "method": "antisd"}).variant == "paper"
    assert resolve_variant(UpdateConfig(scored="s", out="o"), {"gate": {}, "variant": "official"}).variant == \
        "official"


@pytest.mark.parametrize("knobs, message", [
    ({"variant": "paper", "u_clip": "adaptive"}, "u_clip adaptive needs the warm-up calibration"),
    ({"gate_statistic": "entropy"}, "lam_mode perplexity and u_clip adaptive need"),
    ({"dual_clip": 0.5}, "--dual-clip: must be > 1"),
    ({"variant": "text"}, "--variant: must be one of paper, official"),
    ({"train": False}, "--train: --no-train computes nothing without --advantages-out"),
])
def test_impossible_combinations_are_refused(knobs, message):
    from stages.common.validation import ConfigError
    from stages.training.config import UpdateConfig

    with pytest.raises(ConfigError, match=message):
        UpdateConfig(scored="s", out="o", **knobs)


def test_help_shows_each_variants_value():
    from click.testing import CliRunner

    from antisd_cli.main import cli

    result = CliRunner().invoke(cli, ["update", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "[default: (paper 0.2, official 0.28)]" in text  # --clip-high
    assert "[default: (paper token-mean, official seq-mean-token-mean)]" in text
    assert "[default: (0.93; sd 1.0)]" in text  # --ppl-target-ratio


# --- the teacher prompt of §9 --------------------------------------------------------------------------------------

def test_official_teacher_turn_strings_are_the_authors():
    from stages.lm.prompts import ChatOptions, teacher_user_text

    chat = ChatOptions()
    prompt = "What is 2 + 3? Put the final answer in \\boxed{}."
    with_peer = teacher_user_text("What is 2 + 3?", "2 + 3 = 5, \\boxed{5}", False, chat=chat, layout="official",
                                  peer_assessment=False)
    assert with_peer == (f"{prompt}\nYour previous attempt:\n\n2 + 3 = 5, \\boxed{{5}}\n\n"
                         "Now solve this problem step by step.")
    for correct, note in ((True, "correct"), (False, "incorrect")):
        alone = teacher_user_text("What is 2 + 3?", None, correct, chat=chat, layout="official", peer_assessment=False)
        assert alone == f"{prompt}\nPrevious assessment: Your answer is {note}.\n\nNow solve this problem step by step."
    paper = teacher_user_text("What is 2 + 3?", "sol", True, chat=chat)  # METHOD §4, unchanged
    assert paper == (f"{prompt}\n\nYour previous attempt:\nsol\n\nPrevious assessment: Your answer is correct.\n"
                     "Now solve this problem step by step.")


def test_official_budget_and_head_tail_cut(tiny_model_dir):
    from stages.lm.models import load_tokenizer
    from stages.verifier.rows import token_budget, tokens_allowed

    assert tokens_allowed(3072, 4096, 100) == 3072  # min(3072, 4096 − 100 − 300 = 3696)
    assert tokens_allowed(3072, 4096, 1000) == 2796
    assert tokens_allowed(3072, 4096, 3900) == 128  # at least 128
    assert tokens_allowed(50, 0, 3900) == 50  # no context bound: the plain budget
    tokenizer = load_tokenizer(tiny_model_dir)
    text = " ".join(f"w{i}" for i in range(400))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    budget = len(ids) - 8  # C − |prompt| − 300 with C = |ids| + 300 and |prompt| = 8: eight tokens too many
    head, tail = token_budget(tokenizer, 0, len(ids) + 300, keep_head=0.25)(text, prompt_tokens=8).split("\n...\n")
    assert len(tokenizer(head, add_special_tokens=False)["input_ids"]) == budget // 4
    assert len(tokenizer(tail, add_special_tokens=False)["input_ids"]) == budget - budget // 4
    assert text.startswith(head) and text.endswith(tail)
    assert token_budget(tokenizer, 10)(text) == tokenizer.decode(ids[:10])  # keep_head 1: the first tokens only


def test_cut_after_the_boxed_gold_answer():
    from stages.verifier.rows import cut_after_boxed

    text = "first \\boxed{4} then \\boxed{5}. Check: \\boxed{5} done \\boxed{6}"
    assert cut_after_boxed(text, "5", "5") == "first \\boxed{4} then \\boxed{5}. Check: \\boxed{5}"
    assert cut_after_boxed(text, "5.0", "4") == "first \\boxed{4}"  # no box holds the gold: the verified answer's
    assert cut_after_boxed(text, "7", None) == text


def test_without_a_peer_the_fallback_is_the_assessment():
    from stages.verifier.rows import privileged_contexts

    contexts = privileged_contexts(["a", "a", "b"], [0, 1, 0], [True, False, False], ["s \\boxed{1} x", "y", "z"],
                                   ["ref a", "ref a", "ref b"], seed=0, budget=lambda text, n=0: text,
                                   fallback="assessment", prompt_lengths=[5, 5, 5],
                                   boxed_answers=[("1", "1"), ("1", None), ("2", None)])
    assert contexts == [(None, "assessment", None), ("s \\boxed{1}", "peer", 0), (None, "assessment", None)]
