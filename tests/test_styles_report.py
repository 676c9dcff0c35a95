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
