"""scripts/styles_report.py: the paired read-outs of the styles study, on hand-made committed run files."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import load_script


def _run(docs: Path, name: str, method: str, seed: int, rewards: list[float], correct: dict[str, float]) -> None:
    folder = docs / "runs" / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"loop": {"seed": seed}, "update": {"method": method,
                                                                                         "warmup_steps": 2}}))
    rows = [{"step": i, "reward/mean": r, "response/length_mean": 30.0, "teacher/entropy_median": 1.0 - 0.01 * i,
             **({"eval/accuracy": sum(correct.values()) / len(correct)} if i == len(rewards) - 1 else {})}
            for i, r in enumerate(rewards)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "evals.json").write_text(json.dumps({"base": {k: 0.0 for k in correct}, str(len(rewards) - 1): correct}))


def test_paired_bootstrap_of_identical_differences_is_exact():
    module = load_script("styles_report")
    a, b = {"p1": 1.0, "p2": 1.0, "p3": 0.0}, {"p1": 0.0, "p2": 0.0, "p3": -1.0}  # every difference is +1
    assert module.paired_bootstrap(a, b) == (1.0, 1.0, 1.0)
    mean, low, high = module.paired_bootstrap({"p1": 1.0, "p2": 0.0}, {"p1": 0.0, "p2": 0.0, "p9": 1.0})
    assert mean == 0.5 and low == 0.0 and high == 1.0  # only shared problems; resampled means lie in [0, 1]


def test_the_paired_table_differences_arms_from_grpo_on_the_same_seed(tmp_path):
    module = load_script("styles_report")
    problems = [f"p{i}" for i in range(10)]
    _run(tmp_path, "grpo_s0", "grpo", 0, [0.1, 0.2, 0.3], {p: float(i < 4) for i, p in enumerate(problems)})
    _run(tmp_path, "sd_s0", "sd", 0, [0.1, 0.1, 0.1], {p: float(i < 2) for i, p in enumerate(problems)})
    text = "\n".join(module.training_tables(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| sd | 0 |"))
    # per-step differences 0, −0.1, −0.2: mean −0.1, sd 0.1, 2·0.1/√3 = 0.115
    assert "-0.100 ± 0.115 (3)" in row
    assert "-0.200 [" in row and "(step 2)" in row  # 2 of 10 vs 4 of 10 on the same problems


def test_a_right_first_sum_is_this_problems_sum_with_its_right_result():
    module = load_script("styles_report")
    assert module.opens_with_right_sum("What is 47 + 37?", " 47 + 37 = 84. Check: 84 - 37 = 47.")
    assert not module.opens_with_right_sum("What is 47 + 37?", "47 + 37 = 83.")  # wrong result
    assert not module.opens_with_right_sum("What is 47 + 37?", "37 + 47 = 84.")  # not the problem's order
    assert not module.opens_with_right_sum("What is 47 + 37?", "So 47 + 37 = 84.")  # not the opening
    rows = [{"prompt_id": "p", "problem": "What is 47 + 37?", "reward": reward, "response_text": text,
             "response_length": 9, "finish_reason": "stop"}
            for reward, text in [(1.0, "47 + 37 = 84."), (0.0, "47 + 37 = 84. Check: 84 - 7 = 70."), (0.0, "83")]]
    stats = module.style_stats(rows)
    assert stats["right_first_sum_frac"] == 2 / 3 and stats["accuracy_after_right_first_sum"] == 0.5


def _official_run(docs: Path, method: str, seed: int, rewards: list[float], correct: dict[str, float],
                  gate: list[dict] | None = None) -> None:
    """A committed run folder of an `update.variant: official` arm (runs/official/METHOD_sSEED)."""
    folder = docs / "runs" / "official" / f"{method}_s{seed}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"loop": {"seed": seed}, "update": {
        "method": method, "variant": "official", "warmup_steps": 1}}))
    rows = [{"step": i, "reward/mean": r, "response/length_mean": 30.0, "teacher/entropy_median": None,
             **((gate or [{}] * len(rewards))[i]),
             **({"eval/accuracy": sum(correct.values()) / len(correct)} if i == len(rewards) - 1 else {})}
            for i, r in enumerate(rewards)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "evals.json").write_text(json.dumps({"base": {k: 0.0 for k in correct}, str(len(rewards) - 1): correct}))


def test_official_arms_pair_with_their_own_grpo_and_show_their_gate(tmp_path):
    module = load_script("styles_report")
    problems = [f"p{i}" for i in range(10)]
    _run(tmp_path, "grpo_s0", "grpo", 0, [0.1, 0.2, 0.3], {p: float(i < 4) for i, p in enumerate(problems)})
    _official_run(tmp_path, "grpo", 0, [0.2, 0.2, 0.2], {p: float(i < 6) for i, p in enumerate(problems)})
    gate = [{"gate/open": 0, "gate/lambda": 0.0, "gate/lambda_max": 0.0, "gate/lambda_active_frac": 0.0,
             "gate/statistic": 1.8, "gate/target": None, "gate/sigma_ref": None},
            {"gate/open": 1, "gate/lambda": 0.05, "gate/lambda_max": 0.2, "gate/lambda_active_frac": 0.5,
             "gate/statistic": 1.6, "gate/target": 1.67, "gate/sigma_ref": 0.9},
            {"gate/open": 0, "gate/lambda": 0.0, "gate/lambda_max": 0.0, "gate/lambda_active_frac": 0.0,
             "gate/statistic": 1.7, "gate/target": 1.67, "gate/sigma_ref": 0.9}]
    _official_run(tmp_path, "antisd", 0, [0.3, 0.3, 0.3], {p: float(i < 7) for i, p in enumerate(problems)}, gate)
    text = "\n".join(module.training_tables(tmp_path))
    # antisd@official − grpo@official: per-step 0.1, 0.1, 0.1 (2 SE 0); held-out 7 vs 6 of the same 10 problems
    row = next(line for line in text.splitlines() if line.startswith("| antisd@official | 0 |"))
    assert "+0.100 ± 0.000 (3)" in row and "+0.100 [" in row
    base = next(line for line in text.splitlines() if line.startswith("| grpo@official | 0 |"))
    # per-step 0.1, 0, −0.1: sd 0.1, 2·0.1/√3 = 0.115; held-out 6 vs 4 of the same 10
    assert "+0.000 ± 0.115 (3)" in base and "+0.200 [" in base  # the official base against the paper's grpo
    side = next(line for line in text.splitlines() if line.startswith("| antisd | official | 1 |"))
    assert "0.700 [0.700, 0.700]" in side and "+0.100 [" in side
    gate_row = [line for line in text.splitlines() if line.startswith("| antisd@official s0 |")][-1]  # gate table
    assert "| 010 | 0.000 0.050 0.000 | 0.000 0.200 0.000 | 0.00 0.50 0.00 | 1.800 1.600 1.700 | 1.670 | 0.900 |" \
        in gate_row


def test_an_official_arm_with_one_lambda_per_step_is_its_own_arm(tmp_path):
    """`update.lam_mode: batch` under official (the ablation that separates the z-score from the λ_i weights) is
    named apart from the §9 arm with the same gate, and pairs with grpo@official."""
    module = load_script("styles_report")
    folder = tmp_path / "official" / "antisd-nogate-batch_s0"
    folder.mkdir(parents=True)
    update = {"method": "antisd", "variant": "official", "gate": "off", "lam_mode": "batch"}
    (folder / "config.yaml").write_text(yaml.safe_dump({"loop": {"seed": 0}, "update": update}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward/mean": 0.1}) + "\n")
    run = module.load_run(folder)
    assert run["arm"] == "antisd-nogate-batch@official" and module.baseline(run["arm"]) == "grpo@official"
    (folder / "config.yaml").write_text(yaml.safe_dump({"loop": {"seed": 0}, "update": {**update,
                                                                                      "variant": "paper"}}))
    assert module.load_run(folder)["arm"] == "antisd-nogate"  # batch is the paper's own λ: no suffix
