"""`antisd loop`: layout, metrics, resume after kill -9 equals an uninterrupted run, config refusal."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from antisd_cli.main import cli
from stages.common.errors import InputError
from stages.runs.config import LoopConfig

REPO = Path(__file__).resolve().parent.parent


def tiny_config(model_dir: Path, steps: int = 2) -> dict:
    return {
        "loop": {"model": str(model_dir), "steps": steps, "prompts_per_step": 2, "seed": 3, "eval_every": 2,
                 "eval_max_new_tokens": 4, "train": {"name": "arith", "split": "train"},
                 "eval": {"name": "arith", "split": "test", "num": 2}, "tensorboard": False},
        "rollout": {"n": 2, "max_new_tokens": 6},
        "verify": {"workers": 1},
        # sd is ungated, so λ > 0 from the first step and the weights move even when every reward is 0.
        "update": {"method": "sd", "lr": 1.0e-3, "variant": "paper"},  # the paper's text: METHOD §2–§5
    }


def weights_digest(checkpoint: Path) -> str:
    return hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()


def write_config(tmp_path: Path, model_dir: Path, steps: int = 2) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(model_dir, steps)))
    return path


def run_loop(config: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["loop", "--config", str(config), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("loop")
    config = write_config(tmp, tiny_model_dir)
    result = run_loop(config, tmp / "run")
    assert result.exit_code == 0, result.output
    (tmp / "stderr.txt").write_text(result.stderr)  # the log as a file or a Slurm log holds it
    return tmp / "run", config


def test_loop_writes_every_stage_and_metrics(finished_run):
    run_dir, _ = finished_run
    for step in (0, 1):
        step_dir = run_dir / f"step_{step:04d}"
        for name in ("prompts", "rollouts", "verified", "scored"):
            assert (step_dir / f"{name}.parquet").exists(), name
        assert (step_dir / "checkpoint" / "model.safetensors").exists()
        assert (step_dir / "commands.sh").read_text().count("antisd ") == 4
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("reward/mean", "teacher/entropy_median", "gate/lambda", "actor/pg_loss", "timing_s/rollout",
                "timing_s/update", "timing_s/step"):
        assert key in rows[0], key
    assert "eval/accuracy" in rows[1] and "eval/accuracy" not in rows[0]
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["finished"] == [0, 1]
    assert manifest["latest_checkpoint"].endswith("step_0001/checkpoint")


def test_step_files_say_their_step_and_name_each_fact_once(finished_run):
    """Every step file's metadata names its loop step; one key per fact across the stages (inputs, model, wall_s)."""
    from stages.common.io import read_metadata

    run_dir, _ = finished_run
    for step in (0, 1):
        metadata = {name: read_metadata(run_dir / f"step_{step:04d}" / f"{name}.parquet")
                    for name in ("prompts", "rollouts", "verified", "scored")}
        assert {name: meta.get("step") for name, meta in metadata.items()} == dict.fromkeys(metadata, step)
        for name in ("rollouts", "verified", "scored"):
            meta = metadata[name]
            assert isinstance(meta["inputs"], dict) and meta["wall_s"] >= 0, name
            assert not {"input", "wall_time_s", "seconds", "model_path"} & set(meta), name
        assert metadata["rollouts"]["model"] == metadata["scored"]["model"]


def test_the_log_of_a_run_reads_in_a_file(finished_run):
    """What a Slurm log of `antisd loop` holds: one record per line, no blank line or carriage return, no stage config
    record per step, numbers with a few digits, and each stage's progress once at its end (rollout and score too)."""
    import re

    run_dir, _ = finished_run
    log = (run_dir.parent / "stderr.txt").read_text()
    lines = log.splitlines()
    assert "\r" not in log and all(line.strip() for line in lines)
    assert "Config(" not in log and max(map(len, lines)) < 400
    assert not re.findall(r"\d\.\d{7,}", log), re.findall(r".{40}\d\.\d{7,}.{10}", log)
    for stage in ("rollout", "score", "update"):
        progress = [line for line in lines if f"stages.common.progress: {stage}: " in line]
        assert len(progress) == 2 and all("(100 %)" in line for line in progress), (stage, progress)


def test_files_written_before_the_keys_were_one_still_read():
    from stages.common.io import recorded_model

    old = {"artifact": "verified", "config": {"model": "tokenizer-only"},
           "rollouts_metadata": {"artifact": "rollouts", "model_path": "/ckpt/a", "wall_s": 1.0}}
    assert recorded_model(old, "rollouts") == "/ckpt/a"
    assert recorded_model({"artifact": "scored", "model": "/ckpt/b", "seconds": 2.0}, "scored") == "/ckpt/b"
    assert recorded_model(old, "scored") is None


def test_loop_moves_the_weights(finished_run, tiny_model_dir):
    run_dir, _ = finished_run
    assert weights_digest(run_dir / "step_0001" / "checkpoint") != weights_digest(tiny_model_dir)


def test_step_prompts_follow_the_seeded_cursor(finished_run):
    import pyarrow.parquet as pq

    from stages.runs.plan import step_prompt_indices

    run_dir, _ = finished_run
    train = pq.read_table(run_dir / "train_prompts.parquet").column("prompt_id").to_pylist()
    for step in (0, 1):
        ids = pq.read_table(run_dir / f"step_{step:04d}" / "prompts.parquet").column("prompt_id").to_pylist()
        assert ids == [train[i] for i in step_prompt_indices(len(train), 2, step, 3)]


def test_rerun_of_finished_run_is_a_no_op(finished_run):
    run_dir, config = finished_run
    before = weights_digest(run_dir / "step_0001" / "checkpoint")
    result = run_loop(config, run_dir)
    assert result.exit_code == 0, result.output
    assert weights_digest(run_dir / "step_0001" / "checkpoint") == before


def test_resume_refuses_a_different_config(finished_run):
    run_dir, config = finished_run
    result = run_loop(config, run_dir, "--set", "update.lr=0.5")
    assert result.exit_code == 2
    assert "different config (update.lr)" in result.stderr and str(run_dir) in result.stderr


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    target_stage, target_step = sys.argv[1], int(sys.argv[2])
    import stages.training.checkpoint, stages.common.io
    if target_stage == "update":
        original = stages.training.checkpoint._publish
        def publish(tmp, out):
            if Path(out).parent.name == f"step_{target_step:04d}":
                os.kill(os.getpid(), signal.SIGKILL)   # temp checkpoint written, not yet renamed
            return original(tmp, out)
        stages.training.checkpoint._publish = publish
    else:
        original = stages.common.io.write_artifact
        def write_artifact(table, path, artifact, metadata):
            if artifact == "rollouts" and Path(path).parent.name == f"step_{target_step:04d}":
                os.kill(os.getpid(), signal.SIGKILL)   # sampling done, nothing written yet
            return original(table, path, artifact, metadata)
        stages.common.io.write_artifact = write_artifact
    from antisd_cli.main import cli
    cli(sys.argv[3:])
    """
)


@pytest.mark.parametrize("stage", ["update", "rollout"])
def test_resume_after_kill_equals_uninterrupted(stage, finished_run, tmp_path):
    run_dir, config = finished_run
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, stage, "1", "loop", "--config", str(config), "--out",
                             str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "step_0001" / "checkpoint").exists()
    assert not (out / "step_0000" / "checkpoint" / "deepspeed").exists()  # weights only: the resume replays step 0
    if stage == "rollout":
        assert not (out / "step_0001" / "rollouts.parquet").exists()
    resumed = run_loop(config, out)
    assert resumed.exit_code == 0, resumed.output
    assert weights_digest(out / "step_0001" / "checkpoint") == weights_digest(run_dir / "step_0001" / "checkpoint")
    assert (out / "step_0001" / "checkpoint" / "deepspeed").is_dir()  # the last step writes the full state
    assert not list(out.rglob("*.tmp"))


def test_a_run_made_before_variants_resumes_as_paper_with_the_same_numbers(finished_run, tiny_model_dir, tmp_path):
    """A run directory written before update.variant existed (its run.json and config.yaml lack the key) continues
    with the paper's text, not the new default: extended from 1 to 2 steps by a config without the key, it ends
    with the weights of the uninterrupted paper run."""
    run_dir, _ = finished_run
    first = tiny_config(tiny_model_dir, steps=1)
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(first))
    out = tmp_path / "old"
    assert run_loop(tmp_path / "one.yaml", out).exit_code == 0
    manifest = json.loads((out / "run.json").read_text())
    del manifest["config"]["update"]["variant"], manifest["update_settings"]  # what an antisd before variants wrote
    (out / "run.json").write_text(json.dumps(manifest))
    second = tiny_config(tiny_model_dir, steps=2)
    del second["update"]["variant"]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(second))
    resumed = run_loop(tmp_path / "two.yaml", out)
    assert resumed.exit_code == 0, resumed.output
    assert yaml.safe_load((out / "config.yaml").read_text())["update"]["variant"] == "paper"
    assert json.loads((out / "run.json").read_text())["update_settings"]["gate_statistic"] == "entropy"
    assert weights_digest(out / "step_0001" / "checkpoint") == weights_digest(run_dir / "step_0001" / "checkpoint")
    refused = run_loop(tmp_path / "two.yaml", out, "--set", "update.variant=official")
    assert refused.exit_code == 2 and "different config (update.variant)" in refused.output


def test_print_config_resolves_overrides(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(cli, ["loop", "-c", str(config), "-o", str(tmp_path / "r"), "--set", "update.lr=3e-6",
                                      "--print-config"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["update"]["lr"] == 3e-6 and resolved["loop"]["steps"] == 2
    assert not (tmp_path / "r").exists()


# --- k3 KL to a frozen reference ----------------------------------------------------------------------------------

def test_loop_with_kl_coef_scores_against_the_base_model_loaded_once(tmp_path, tiny_model_dir, monkeypatch):
    import pyarrow.parquet as pq

    from stages.lm import models
    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda model, **kw: loads.append(str(model)) or real_load(model, **kw))
    raw = tiny_config(tiny_model_dir, steps=2)
    raw["loop"]["eval_every"] = 0
    raw["update"]["kl_coef"] = 0.5
    config = tmp_path / "kl.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run_loop(config, tmp_path / "run")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for step in (0, 1):
        step_dir = tmp_path / "run" / f"step_{step:04d}"
        scored = pq.read_table(step_dir / "scored.parquet")
        assert "ref_logprobs" in scored.column_names
        assert f"--reference {tiny_model_dir}" in (step_dir / "commands.sh").read_text()
    assert abs(rows[0]["actor/kl_ref"]) < 1e-6  # step 0: the policy is the reference
    assert rows[1]["actor/kl_ref"] > 1e-6  # step 1: the policy has moved away from the frozen base model
    assert loads.count(str(tiny_model_dir)) == 2  # step 0's policy, and the reference once for both steps


def test_kl_free_configs_keep_their_digest():
    """The reference is filled in by step_configs, not stored in the RunConfig: a config without KL is unchanged."""
    from stages.runs import config as run_config
    from stages.runs.plan import score_reference

    assert run_config.resolve({}, ["score.chunk_size=32"]).to_dict()["score"] == {"chunk_size": 32}  # only set keys
    with_kl = run_config.resolve({}, ["update.kl_coef=0.1"])
    assert with_kl.to_dict()["score"] == {} and score_reference(with_kl) == "smollm2-135m"
    assert score_reference(run_config.resolve({})) is None
    assert score_reference(run_config.resolve({}, ["update.kl_coef=0.1", "score.reference=/frozen"])) == "/frozen"


# --- the training-set cursor: distinct prompts in every step ----------------------------------------------------

@pytest.mark.parametrize("total", [1, 2, 7, 10, 33, 100])
def test_every_step_holds_distinct_prompts_across_epoch_boundaries(total):
    from stages.runs.plan import step_prompt_indices

    for per_step in sorted({1, 2, 3, 8, total - 1, total} - {0}):
        if per_step > total:
            continue
        steps = [step_prompt_indices(total, per_step, step, seed=5) for step in range(3 * total // per_step + 2)]
        for indices in steps:
            assert len(indices) == per_step and len(set(indices)) == per_step
            assert all(0 <= i < total for i in indices)
        assert steps == [step_prompt_indices(total, per_step, step, seed=5) for step in range(len(steps))]
        first_epoch = [i for indices in steps[: total // per_step] for i in indices]
        assert len(set(first_epoch)) == len(first_epoch)  # an epoch uses each prompt at most once


def test_the_math500_sized_case_of_the_issue_has_no_duplicate():
    from stages.runs.plan import step_prompt_indices

    for step in (15, 31, 109, 140, 156, 187):  # where the old cursor repeated a prompt (500 prompts × 32)
        assert len(set(step_prompt_indices(500, 32, step, seed=0))) == 32


def test_a_run_made_before_the_speed_settings_existed_resumes(tmp_path):
    """A manifest of an older antisd (no loop.checkpoint_every, keep_checkpoints 0, its own digest) is resumed: the
    settings that only change speed or storage (runs.config.RESUMABLE_CHANGES) may differ; a result setting may not."""
    from stages.runs import config as run_config
    from stages.runs.plan import init_run

    old = run_config.resolve({}).to_dict()
    del old["loop"]["checkpoint_every"]
    old["loop"]["keep_checkpoints"] = 0
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": old, "config_digest": "e2bab0b4a61045fa"}))
    init_run(LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve({}, ["update.threads=2"])))
    with pytest.raises(InputError, match=r"different config \(update.lr\)"):
        init_run(LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve({}, ["update.lr=3e-6"])))


def test_a_run_made_before_a_setting_existed_resumes_when_it_is_at_its_default(tmp_path):
    """Options added later (loop.dynamic_sampling, loop.max_draws) are absent from an older run's manifest: at their
    defaults they compute what the run did, so it resumes; set to something else they are a different run."""
    from stages.runs import config as run_config
    from stages.runs.plan import init_run

    old = run_config.resolve({}).to_dict()
    del old["loop"]["dynamic_sampling"], old["loop"]["max_draws"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": old, "config_digest": "0" * 16}))
    init_run(LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve({})))
    with pytest.raises(InputError, match=r"different config \(loop.dynamic_sampling\)"):
        init_run(LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve({}, ["loop.dynamic_sampling=true"])))


def test_the_first_epoch_is_unchanged_by_the_fix():
    """Steps inside the first epoch read the seeded permutation in order, as before: existing runs keep their data."""
    import random

    from stages.runs.plan import stage_seed, step_prompt_indices

    order = list(range(100))
    random.Random(stage_seed(0, 0, "epoch")).shuffle(order)
    assert [i for step in range(3) for i in step_prompt_indices(100, 32, step, 0)] == order[:96]


def test_a_batch_larger_than_the_training_set_is_refused_before_anything(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = run_loop(config, tmp_path / "run", "--set", "loop.prompts_per_step=8", "--set", "loop.train.num=5")
    assert result.exit_code == 2
    assert "loop.prompts_per_step 8: the training set has only 5 prompts" in result.stderr
    assert not (tmp_path / "run").exists()


def test_slurm_rendering_of_the_issue_example_has_distinct_prompts_at_step_162(tmp_path):
    import pyarrow.parquet as pq

    result = CliRunner().invoke(cli, [
        "loop", "-c", str(REPO / "examples" / "configs" / "reproduce.yaml"), "-o", str(tmp_path / "run"),
        "--launcher", "slurm", "--dry-run", "--set", "loop.steps=170", "--set", "loop.prompts_per_step=8",
        "--set", "loop.train.num=100", "--window", "170"])
    assert result.exit_code == 0, result.output
    for step in (12, 24, 162, 169):
        ids = pq.read_table(tmp_path / "run" / f"step_{step:04d}" / "prompts.parquet").column("prompt_id").to_pylist()
        assert len(ids) == 8 and len(set(ids)) == 8, (step, ids)


# --- the whole config is checked before anything runs or is written -----------------------------------------------

@pytest.mark.parametrize("launcher", [[], ["--launcher", "slurm", "--dry-run"]])
def test_every_config_error_is_reported_before_any_work(tmp_path, tiny_model_dir, launcher):
    config = write_config(tmp_path, tiny_model_dir)
    result = run_loop(config, tmp_path / "run", "--set", "update.method=ppo", "--set", "update.lr=nan",
                      "--set", "rollout.n=0", "--set", "loop.steps=-1", *launcher)
    assert result.exit_code == 2
    for fragment in ("update.method: must be one of grpo, sd, antisd, rkl-ascent, got 'ppo'",
                     "update.lr: must be a finite number, got nan", "rollout.n: must be >= 1, got 0",
                     "loop.steps: must be >= 0, got -1"):
        assert fragment in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_refused_config_leaves_the_run_directory_as_it_was(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    slurm = ["--launcher", "slurm", "--dry-run"]  # renders the run directory without training
    assert run_loop(config, tmp_path / "run", *slurm).exit_code == 0
    manifest = (tmp_path / "run" / "run.json").read_text()
    assert run_loop(config, tmp_path / "run", "--set", "rollout.n=0", *slurm).exit_code == 2
    assert (tmp_path / "run" / "run.json").read_text() == manifest
    assert run_loop(config, tmp_path / "run", *slurm).exit_code == 0  # the corrected command is not refused


def test_a_starting_state_of_another_method_is_refused_before_any_work(tmp_path, finished_run):
    run_dir, config = finished_run  # trained with sd
    result = run_loop(config, tmp_path / "cont", "--set", f"loop.model={run_dir / 'step_0001' / 'checkpoint'}",
                      "--set", "update.method=antisd")
    assert result.exit_code == 2 and "update.switch_method" in result.stderr
    assert not (tmp_path / "cont").exists()


# --- one loop per run directory, and a manifest that repairs itself -----------------------------------------------

def test_a_second_loop_on_one_directory_is_refused_while_the_first_holds_it(tmp_path, tiny_model_dir):
    from test_bad_input import hold

    config = write_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    run.mkdir()
    holder = hold(run)
    try:
        result = run_loop(config, run, "--launcher", "slurm", "--dry-run")
        assert result.exit_code == 2 and f"another process (pid {holder.pid}) is writing it" in result.stderr
        assert not (run / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_loop(config, run, "--launcher", "slurm", "--dry-run").exit_code == 0  # kill -9 left no stale lock


def test_resume_repairs_a_manifest_whose_last_write_was_lost(tmp_path, finished_run):
    import shutil

    run_dir, config = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "run.json").read_text())
    manifest.update(finished=[1], latest_checkpoint=None)  # as if run.json failed after step 0 finished
    (copy / "run.json").write_text(json.dumps(manifest))
    result = run_loop(config, copy)
    assert result.exit_code == 0, result.output
    repaired = json.loads((copy / "run.json").read_text())
    assert repaired["finished"] == [0, 1]
    assert repaired["latest_checkpoint"] == str(copy / "step_0001" / "checkpoint")


# --- the gate across loop steps ------------------------------------------------------------------------------------

def _loop_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_recalibrate_gate_in_a_run_config_recalibrates_once(tmp_path, tiny_model_dir):
    raw = tiny_config(tiny_model_dir, steps=3)
    raw["loop"]["eval_every"] = 0
    raw["update"].update(method="antisd", warmup_steps=1, recalibrate_gate=True)
    config = tmp_path / "recal.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run_loop(config, tmp_path / "run")
    assert result.exit_code == 0, result.output
    h_warm = [row["gate/h_warm"] for row in _loop_metrics(tmp_path / "run")]
    assert h_warm[0] is not None and h_warm[1] == h_warm[2] == h_warm[0]  # calibrated at step 0, then kept


def test_a_grpo_checkpoint_continues_as_antisd_through_the_loop(tmp_path, tiny_model_dir):
    from stages.training import checkpoint
    raw = tiny_config(tiny_model_dir, steps=1)
    raw["loop"]["eval_every"] = 0
    raw["update"].update(method="grpo", warmup_steps=1)
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text(yaml.safe_dump(raw))
    assert run_loop(grpo, tmp_path / "grpo").exit_code == 0
    start = tmp_path / "grpo" / "step_0000" / "checkpoint"
    raw["loop"]["model"] = str(start)
    raw["loop"]["steps"] = 2
    raw["update"].update(method="antisd", warmup_steps=2, switch_method=True)
    antisd = tmp_path / "antisd.yaml"
    antisd.write_text(yaml.safe_dump(raw))
    result = run_loop(antisd, tmp_path / "antisd")
    assert result.exit_code == 0, result.output
    assert (start / checkpoint.STATE_FILE).exists()  # nothing deleted by hand
    rows = _loop_metrics(tmp_path / "antisd")
    assert [row["gate/h_warm"] is None for row in rows] == [True, False]  # a fresh 2-step warm-up, once
    state = json.loads((tmp_path / "antisd" / "step_0001" / "checkpoint" / checkpoint.STATE_FILE).read_text())
    assert state["method"] == "antisd" and state["step"] == 3  # the GRPO step count carries on


def test_full_checkpoints_every_k_steps_and_at_the_end(tmp_path, tiny_model_dir):
    from stages.runs.config import LoopSettings
    from stages.runs.plan import full_checkpoint_at

    settings = LoopSettings(steps=7, checkpoint_every=3)
    assert [full_checkpoint_at(settings, step) for step in range(7)] == [False, False, True, False, False, True, True]
    assert all(full_checkpoint_at(LoopSettings(steps=7, resident_trainer=False), step) for step in range(7))
    raw = tiny_config(tiny_model_dir, steps=3)
    raw["loop"].update(eval_every=0, checkpoint_every=2, keep_checkpoints=1)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert run_loop(config, tmp_path / "run").exit_code == 0
    kept = {step: (tmp_path / "run" / f"step_{step:04d}" / "checkpoint").is_dir() for step in range(3)}
    assert kept == {0: False, 1: False, 2: True}  # keep 1: the last step, which is full
    assert (tmp_path / "run" / "step_0002" / "checkpoint" / "deepspeed").is_dir()
    assert "--no-optimizer-state" in (tmp_path / "run" / "step_0000" / "commands.sh").read_text()
    assert "--optimizer-state" in (tmp_path / "run" / "step_0001" / "commands.sh").read_text()


def test_pruning_keeps_the_newest_full_checkpoint_and_the_steps_after_it(tmp_path):
    from stages.runs.run_dir import Run

    run = Run(tmp_path)
    for step, full in enumerate([True, False, True, False, False]):
        (run.checkpoint(step) / ("deepspeed/engine" if full else "")).mkdir(parents=True)
    run.prune_checkpoints(4, keep=2)
    assert [run.checkpoint(step).exists() for step in range(5)] == [False, False, True, True, True]
    run.prune_checkpoints(4, keep=1)  # step 3 stays: a resume replays it from step 2's full state (issue 21)
    assert [run.checkpoint(step).exists() for step in range(5)] == [False, False, True, True, True]


def test_a_grpo_loop_scores_without_the_teacher_pass(tmp_path, tiny_model_dir):
    from stages.common.io import read_metadata

    raw = tiny_config(tiny_model_dir, steps=1)
    raw["loop"]["eval_every"] = 0
    raw["update"]["method"] = "grpo"
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert run_loop(config, tmp_path / "run").exit_code == 0
    step = tmp_path / "run" / "step_0000"
    assert read_metadata(step / "scored.parquet")["teacher"] is False
    assert "--no-teacher" in (step / "commands.sh").read_text()


def test_a_loop_that_frees_its_trainer_each_step_ends_with_the_resident_weights(tmp_path, finished_run, tiny_model_dir):
    run_dir, _ = finished_run
    raw = tiny_config(tiny_model_dir)
    raw["loop"]["resident_trainer"] = False
    config = tmp_path / "free.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run_loop(config, tmp_path / "run")
    assert result.exit_code == 0, result.output
    for step in range(2):
        checkpoint = tmp_path / "run" / f"step_{step:04d}" / "checkpoint"
        assert (checkpoint / "deepspeed").is_dir()  # every step full: the next one reopens the trainer from it
        assert weights_digest(checkpoint) == weights_digest(run_dir / f"step_{step:04d}" / "checkpoint")


def test_a_grpo_run_config_can_ask_for_the_teacher_pass():
    from stages.runs.config import LoopSettings, RunConfig
    from stages.runs.plan import uses_teacher

    def config(method, score):
        return RunConfig(loop=LoopSettings(), stages={"rollout": {}, "verify": {}, "score": score,
                                                      "update": {"method": method}})

    assert not uses_teacher(config("grpo", {}))
    assert uses_teacher(config("grpo", {"teacher": True}))  # logs H and u for a gate replay
    assert uses_teacher(config("antisd", {"teacher": False}))  # a method that reads u always gets it


def test_loop_out_creates_missing_parent_folders(tmp_path, tiny_model_dir):
    raw = tiny_config(tiny_model_dir, steps=1)
    raw["loop"]["eval_every"] = 0
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "runs" / "study" / "grpo_s0"  # neither runs/ nor runs/study/ exists yet
    result = run_loop(config, out)
    assert result.exit_code == 0, result.output
    assert (out / "run.json").exists()
    (tmp_path / "afile").write_text("x")
    refused = run_loop(config, tmp_path / "afile" / "run")
    assert refused.exit_code == 2 and "is a file, not a directory" in refused.stderr


def test_a_zero_step_loop_evaluates_the_base_model_only_and_extends_later(tmp_path, tiny_model_dir):
    # The studies' shared base evaluation is a 0-step loop (scripts/reproduce.sh); raising steps continues the run.
    config = write_config(tmp_path, tiny_model_dir, steps=0)
    out = tmp_path / "run"
    result = run_loop(config, out)
    assert result.exit_code == 0, result.output
    base = (out / "eval_base.json").read_bytes()
    assert "eval/accuracy" in json.loads(base) and not list(out.glob("step_*"))
    extended = run_loop(config, out, "--set", "loop.steps=1")
    assert extended.exit_code == 0, extended.output
    assert (out / "step_0000" / "metrics.json").exists() and (out / "eval_base.json").read_bytes() == base
    refused = run_loop(config, tmp_path / "other", "--set", "loop.steps=-1")
    assert refused.exit_code == 2 and "loop.steps" in refused.stderr
