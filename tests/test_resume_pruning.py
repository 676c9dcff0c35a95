"""A killed run always resumes: checkpoint pruning never deletes what a resume reads (issue 21, bug 1).

The property test walks every kill point of runs under a grid of (loop.keep_checkpoints, loop.checkpoint_every,
resident trainer) with the real `Run` pruning and the loop's own checkpoint policy, and checks what the resume
(`stages.loop.StepRunner._open_trainer`: the newest full checkpoint, then a replay of each later step against its
folder) would read is on disk. The end-to-end test kills a real run where the old rule lost it for good.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from test_loop import KILLER, REPO, run_loop, tiny_config, weights_digest

from stages.runs.config import LoopSettings
from stages.runs.plan import full_checkpoint_at
from stages.runs.run_dir import Run, prunable, resume_needs


def missing_for_resume(run: Run, step: int) -> list[int]:
    """The checkpoints a resume that starts step `step` would read but cannot find (the loop's resume, step for step:
    open at the newest full checkpoint before `step`, replay every later step against its folder, whose model is the
    folder before it; step `step` itself samples with checkpoint `step` − 1)."""
    full = run.full_checkpoint_before(step)
    first = 0 if full is None else full + 1
    reads = set(range(first, step)) | {replayed - 1 for replayed in range(first, step) if replayed > 0}
    reads |= {step - 1} if step > 0 else set()
    reads |= {full} if full is not None else set()
    return sorted(old for old in reads if not run.checkpoint(old).is_dir())


def publish(run: Run, step: int, full: bool) -> None:
    (run.checkpoint(step) / ("deepspeed/engine" if full else "")).mkdir(parents=True)
    (run.checkpoint(step) / "config.json").write_text("{}")


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("every", [1, 2, 3, 5])
@pytest.mark.parametrize("keep", [1, 2, 3])
def test_no_kill_point_loses_the_run(tmp_path, keep, every, resident):
    settings = LoopSettings(steps=11, checkpoint_every=every, keep_checkpoints=keep, resident_trainer=resident)
    run = Run(tmp_path)
    for step in range(settings.steps):
        assert missing_for_resume(run, step) == [], f"kill during step {step}"
        publish(run, step, full_checkpoint_at(settings, step))
        assert missing_for_resume(run, step + 1) == [], f"kill after step {step}'s checkpoint, before pruning"
        run.prune_checkpoints(step, keep)
        assert missing_for_resume(run, step + 1) == [], f"kill after step {step}"
        newest = [run.checkpoint(old).is_dir() for old in range(max(0, step - keep + 1), step + 1)]
        assert all(newest), f"the newest {keep} checkpoints after step {step}"


@pytest.mark.parametrize("every", [2, 3, 5])
def test_pruning_deletes_what_no_resume_reads(tmp_path, every):
    """The rule is not 'keep everything': after a full checkpoint, every older folder outside the newest K goes."""
    settings = LoopSettings(steps=12, checkpoint_every=every, keep_checkpoints=1)
    run = Run(tmp_path)
    for step in range(settings.steps - 1):
        publish(run, step, full_checkpoint_at(settings, step))
        run.prune_checkpoints(step, 1)
    kept = [old for old in range(settings.steps - 1) if run.checkpoint(old).is_dir()]
    newest_full = max(old for old in range(settings.steps - 1) if full_checkpoint_at(settings, old))
    assert kept == list(range(newest_full, settings.steps - 1))
    assert len(kept) <= every


def test_prunable_is_the_complement_of_what_is_kept():
    assert resume_needs(9, [4]) == range(4, 10)
    assert prunable(9, 1, [4]) == [0, 1, 2, 3]
    assert prunable(9, 3, [4, 9]) == [0, 1, 2, 3, 4, 5, 6]
    assert prunable(3, 1, []) == []  # no full checkpoint yet: the resume replays from the start model


def test_commands_that_name_a_pruned_checkpoint_say_so(tmp_path):
    run = Run(tmp_path)
    for step in range(4):
        publish(run, step, full=True)
        (run.step_dir(step) / "commands.sh").write_text(f"antisd update --model m{step} --out c{step}\n")
        run.prune_checkpoints(step, keep=2)
    notes = {step: (run.step_dir(step) / "commands.sh").read_text() for step in range(4)}
    assert not run.checkpoint(0).exists() and not run.checkpoint(1).exists()
    assert f"# {run.checkpoint(0)} was pruned after step 2 (loop.keep_checkpoints 2)" in notes[0]  # its --out
    assert f"# {run.checkpoint(0)} was pruned after step 2" in notes[1]  # its --model
    assert f"# {run.checkpoint(1)} was pruned after step 3" in notes[1] and notes[2].count("pruned") == 1
    assert "pruned" not in notes[3] and notes[0].startswith("antisd update --model m0")
    run.prune_checkpoints(3, keep=2)  # a second pass (a resumed run) adds nothing
    assert (run.step_dir(1) / "commands.sh").read_text() == notes[1]


def test_pruning_drops_a_linked_checkpoint_folder_not_its_target(tmp_path):
    run = Run(tmp_path / "run")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    run.step_dir(0).mkdir(parents=True)
    run.checkpoint(0).symlink_to(target, target_is_directory=True)
    for step in (1, 2):
        publish(run, step, full=True)
    run.prune_checkpoints(2, keep=1)
    assert not run.checkpoint(0).is_symlink() and (target / "keep.txt").read_text() == "mine"


def test_a_run_killed_where_the_old_rule_lost_it_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """The issue's reproduction at toy size: keep 1, a full checkpoint every 5 steps, killed during step 3's
    rollout (steps 0-2 are weights-only; the old rule had deleted 0 and 1, which the replay reads)."""
    raw = tiny_config(tiny_model_dir, steps=4)
    raw["loop"].update(eval_every=0, keep_checkpoints=1)
    config = tmp_path / "k1.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert run_loop(config, tmp_path / "whole").exit_code == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, "rollout", "3", "loop", "--config", str(config), "--out",
                             str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [(out / f"step_{s:04d}" / "checkpoint").is_dir() for s in range(3)] == [True, True, True]
    resumed = run_loop(config, out)
    assert resumed.exit_code == 0, resumed.output
    assert weights_digest(out / "step_0003" / "checkpoint") == weights_digest(tmp_path / "whole" / "step_0003" /
                                                                              "checkpoint")
    assert [(out / f"step_{s:04d}" / "checkpoint").is_dir() for s in range(4)] == [False, False, False, True]


def test_a_missing_replay_checkpoint_is_one_line_naming_it(tmp_path, tiny_model_dir):
    """A folder deleted by hand (or by an earlier antisd) is named, not taken for a LoRA checkpoint."""
    import shutil

    raw = tiny_config(tiny_model_dir, steps=3)
    raw["loop"].update(eval_every=0, keep_checkpoints=0)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert run_loop(config, out, "--set", "loop.steps=2").exit_code == 0
    shutil.rmtree(out / "step_0001" / "checkpoint" / "deepspeed")  # as if killed before step 1's full state
    shutil.rmtree(out / "step_0000" / "checkpoint")
    result = run_loop(config, out)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip().splitlines()[-1]  # after the log records of the steps that ran
    assert message.startswith("Error: ") and "step_0000/checkpoint" in message and "missing" in message, message
    assert "adapter" not in message and "Traceback" not in result.stderr
