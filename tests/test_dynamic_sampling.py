"""loop.dynamic_sampling (DAPO): draws until the step has prompts_per_step mixed-reward groups, bounded, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from click.testing import CliRunner
from test_loop import tiny_config

from antisd_cli.main import cli
from stages.common.io import read_artifact, read_metadata
from stages.runs import dynamic

# Mixed groups only for problems whose answer is divisible by 3 (sample 0 right, the others wrong); every other group
# is all-wrong, so the step needs further draws to fill (arith answers are spread evenly over the residues).
REWARD = '''
def every_third_answer(problem, answer, response, row):
    return row["sample_idx"] == 0 and int(answer) % 3 == 0
'''


def verified_table(groups: dict[str, list[float]]) -> pa.Table:
    rows = [(pid, i, r) for pid, rewards in groups.items() for i, r in enumerate(rewards)]
    return pa.table({"prompt_id": [r[0] for r in rows], "sample_idx": [r[1] for r in rows],
                     "reward": [r[2] for r in rows]})


def test_select_keeps_the_first_mixed_groups_in_draw_order():
    draws = [verified_table({"a": [0, 0], "b": [1, 0]}), verified_table({"c": [1, 1], "d": [0, 1], "e": [1, 0]})]
    assert dynamic.needs_more(draws[:1], 2, 3) and not dynamic.needs_more(draws, 2, 3)
    assert not dynamic.needs_more(draws[:1], 2, 1)  # the bound
    table, record = dynamic.select(draws, 2)
    assert table.column("prompt_id").to_pylist() == ["b", "b", "d", "d"]  # e is a third mixed group: not kept
    assert record == {"draws": 2, "groups_drawn": 5, "groups_mixed": 3, "groups_kept": 2, "rollouts_drawn": 10,
                      "drawn_reward_mean": 0.5, "filled": True}


def test_select_without_any_mixed_group_keeps_draw_zero():
    draws = [verified_table({"a": [0, 0]}), verified_table({"b": [1, 1]})]
    table, record = dynamic.select(draws, 2)
    assert table.column("prompt_id").to_pylist() == ["a", "a"]
    assert record["groups_kept"] == 0 and record["filled"] is False


def test_refill_draws_unused_rows_only_and_is_seeded():
    rows = dynamic.refill_indices(10, 4, {0, 1, 2, 3, 4, 5, 6}, seed=7)
    assert sorted(rows) == [7, 8, 9] and rows == dynamic.refill_indices(10, 4, {0, 1, 2, 3, 4, 5, 6}, seed=7)
    picked = dynamic.refill_indices(100, 5, set(), seed=1)
    assert len(set(picked)) == 5 and picked != dynamic.refill_indices(100, 5, set(), seed=2)


def dynamic_config(tmp_path: Path, model_dir: Path, max_draws: int = 6) -> Path:
    (tmp_path / "every_third.py").write_text(REWARD)
    config = tiny_config(model_dir, steps=1)
    config["loop"].update({"eval_every": 0, "prompts_per_step": 2, "dynamic_sampling": True, "max_draws": max_draws})
    config["verify"]["reward"] = str(tmp_path / "every_third.py") + ":every_third_answer"
    config["rollout"]["n"] = 3
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dynamic")
    config = dynamic_config(tmp, tiny_model_dir)
    result = CliRunner().invoke(cli, ["loop", "--config", str(config), "--out", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    return tmp / "run", config


def test_the_step_trains_on_mixed_groups_drawn_until_filled(dynamic_run):
    run_dir, _ = dynamic_run
    step = run_dir / "step_0000"
    draws = sorted((step / "draws").iterdir(), key=lambda p: int(p.name))
    tables = [read_artifact(d / "verified.parquet", "verified")[0] for d in draws]
    expected, record = dynamic.select(tables, 2)
    kept = read_artifact(step / "verified.parquet", "verified")[0]
    assert kept.column("prompt_id").to_pylist() == expected.column("prompt_id").to_pylist()
    assert len(set(kept.column("prompt_id").to_pylist())) == 2 and record["filled"]
    assert all(int(a) % 3 == 0 for a in kept.column("answer").to_pylist())  # only this reward's mixed groups
    assert read_metadata(step / "verified.parquet")["dynamic_sampling"] == record
    # draws hold distinct prompts; draw 0's are the step's cursor prompts
    rows = [read_metadata(step / "prompts.parquet")["config"]["rows"]]
    rows += [read_metadata(d / "prompts.parquet")["config"]["rows"] for d in draws[1:]]
    flat = [r for draw in rows for r in draw]
    assert len(flat) == len(set(flat)) == 2 * len(draws)
    scored = read_artifact(step / "scored.parquet", "scored")[0]
    assert scored.column("prompt_id").to_pylist() == kept.column("prompt_id").to_pylist()
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["sampling/draws"] == len(draws) >= 2 and metrics["sampling/groups_kept"] == 2
    assert metrics["sampling/filled"] == 1.0 and metrics["reward/zero_variance_frac"] == 0.0
    assert "dynamic_sampling" in (step / "commands.sh").read_text()


def test_dynamic_sampling_resumes_to_the_same_selection(dynamic_run, tmp_path):
    """A run killed after its second draw continues from the draws on disk and selects the same groups."""
    import shutil

    run_dir, config = dynamic_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    step = copy / "step_0000"
    for name in ("verified.parquet", "scored.parquet", "metrics.json"):
        (step / name).unlink()
    shutil.rmtree(step / "checkpoint")
    for extra in sorted((step / "draws").iterdir(), key=lambda p: int(p.name))[2:]:
        shutil.rmtree(extra)
    (copy / "metrics.jsonl").unlink()
    result = CliRunner().invoke(cli, ["loop", "--config", str(config), "--out", str(copy)])
    assert result.exit_code == 0, result.output
    for name in ("verified.parquet", "scored.parquet"):
        again = read_artifact(step / name, name.split(".")[0])[0]
        first = read_artifact(run_dir / "step_0000" / name, name.split(".")[0])[0]
        assert again.column("prompt_id").to_pylist() == first.column("prompt_id").to_pylist()
        assert again.column("response_token_ids").to_pylist() == first.column("response_token_ids").to_pylist()


def test_the_bound_stops_the_draws(tmp_path, tiny_model_dir):
    config = dynamic_config(tmp_path, tiny_model_dir, max_draws=1)
    result = CliRunner().invoke(cli, ["loop", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["sampling/draws"] == 1 and not (tmp_path / "run" / "step_0000" / "draws" / "1").exists()
    assert metrics["sampling/groups_kept"] == metrics["sampling/groups_mixed"] <= 2


def test_slurm_refuses_dynamic_sampling_before_writing(tmp_path, tiny_model_dir):
    config = dynamic_config(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(cli, ["loop", "--config", str(config), "--out", str(tmp_path / "run"), "--launcher",
                                      "slurm", "--dry-run"])
    assert result.exit_code == 2 and "loop.dynamic_sampling" in result.output
    assert not (tmp_path / "run").exists()
