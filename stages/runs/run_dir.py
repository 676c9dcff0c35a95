"""The run directory of `antisd loop`: its layout, manifest, metrics file and checkpoint pruning. Holds no model.

Layout (every file is one stage's ordinary output):

    runs/NAME/run.json            manifest: resolved config, its digest, finished stages, latest checkpoint
    runs/NAME/config.yaml         the resolved config (rerun with --config runs/NAME/config.yaml)
    runs/NAME/train_prompts.parquet, eval_prompts.parquet
    runs/NAME/eval_base.parquet, eval_base.summary.json   the base model's held-out evaluation (loop.eval_suite S:
                                  the folder eval_base-S/); eval_base.json: the numbers the loop logged of it
    runs/NAME/step_0000/{prompts,rollouts,verified,scored}.parquet, checkpoint/, metrics.json, commands.sh (a
                                  line is added when a checkpoint it names is pruned)
    runs/NAME/step_0000/eval.parquet, eval.summary.json   the held-out evaluation after this step (eval-S/: suite S)
    runs/NAME/metrics.jsonl       one row per finished step (rebuilt from the per-step metrics.json files)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages.common.io import atomic_write_json, atomic_write_text

STEP_ARTIFACTS = ("prompts", "rollouts", "verified", "scored")
# What marks each part of a step done: its output exists (every write is atomic, so it exists only when complete).
# The loop, its resume and the Slurm launcher all ask `Run.done`.
DONE_MARKERS = {"rollout": "rollouts.parquet", "verify": "verified.parquet", "score": "scored.parquet",
                "update": "checkpoint/config.json", "step": "metrics.json"}
EVAL_NAME = "eval"  # a step's held-out evaluation: step_XXXX/eval.parquet + eval.summary.json (suite S: eval-S/)
BASE_EVAL_NAME = "eval_base"  # the base model's, in the run folder (eval_base.json: the numbers the loop logged)


class Run:
    """A run directory: paths, the manifest, metrics.jsonl and checkpoint pruning."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest_path = root / "run.json"

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:04d}"

    def step_paths(self, step: int) -> dict[str, Path]:
        return {name: self.step_dir(step) / f"{name}.parquet" for name in STEP_ARTIFACTS}

    def checkpoint(self, step: int) -> Path:
        return self.step_dir(step) / "checkpoint"

    def model_for_step(self, step: int, base_model: str) -> str:
        return base_model if step == 0 else str(self.checkpoint(step - 1))

    def output(self, step: int, stage: str) -> Path:
        """The file whose existence marks `stage` (rollout, verify, score, update, or the whole step) of `step` done."""
        return self.step_dir(step) / DONE_MARKERS[stage]

    def done(self, step: int, stage: str) -> bool:
        """Whether `stage` of `step` is done: its output exists (`DONE_MARKERS`; the step: its metrics.json, the last
        file a step writes)."""
        return self.output(step, stage).exists()

    def finished_steps(self) -> list[int]:
        """Steps whose metrics.json exists (the last file a step writes), ascending."""
        steps = (int(folder.name.removeprefix("step_")) for folder in self.root.glob("step_[0-9][0-9][0-9][0-9]"))
        return sorted(step for step in steps if self.done(step, "step"))

    @property
    def base_record(self) -> Path:
        """eval_base.json: the numbers the loop logged of the base model's held-out evaluation (its resume marker)."""
        return self.root / f"{BASE_EVAL_NAME}.json"

    def read_manifest(self) -> dict | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None

    def configured(self, section: str) -> dict:
        """The run config's `section` (loop, rollout, update, …) as the manifest records it; {} without one."""
        return manifest_section(self.read_manifest(), section)

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def metrics_rows(self) -> list[dict]:
        """The finished steps' metrics rows (metrics.jsonl), in step order."""
        path = self.root / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def base_evaluation(self) -> dict:
        """The numbers the loop logged of the base model's held-out evaluation (eval_base.json), or {}."""
        return json.loads(self.base_record.read_text()) if self.base_record.exists() else {}

    def rebuild_metrics(self, steps: int) -> list[dict]:
        """Rewrite metrics.jsonl from the per-step metrics.json files of the first `steps` steps."""
        rows = []
        for step in range(steps):
            path = self.step_dir(step) / "metrics.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
        atomic_write_text(self.root / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return rows

    def full_checkpoint_before(self, step: int) -> int | None:
        """The newest step before `step` whose checkpoint holds the optimizer state (a resume starts there)."""
        return next((old for old in range(step - 1, -1, -1) if self.checkpoint(old).is_dir() and self.is_full(old)),
                    None)

    def prune_checkpoints(self, step: int, keep: int) -> None:
        """Delete the checkpoints that neither the newest `keep` steps (0 keeps all) nor a resume need; step `step`
        has just finished. What a resume needs is `resume_needs`."""
        if keep <= 0:
            return
        existing = [old for old in range(step + 1) if self.checkpoint(old).is_dir()]
        full = [old for old in existing if self.is_full(old)]
        for old in prunable(step, keep, full):
            folder = self.checkpoint(old)
            if folder.is_symlink():
                folder.unlink()  # a link the user made: drop the link, never the folder it points to
            elif folder.exists():
                shutil.rmtree(folder)
            self._note_pruned(old, step, keep)

    def _note_pruned(self, old: int, step: int, keep: int) -> None:
        """Say in the commands.sh of step `old` (its update's --out) and of the next step (its --model) that they name
        a checkpoint pruning deleted, so a rerun by hand knows what to recreate first."""
        note = (f"# {self.checkpoint(old)} was pruned after step {step} (loop.keep_checkpoints {keep}): the commands "
                f"here that name it need it back; rerun the update of {self.step_dir(old).name}/commands.sh (its "
                "--model must exist), or run with loop.keep_checkpoints 0 to keep every checkpoint\n")
        for named_in in (old, old + 1):
            commands = self.step_dir(named_in) / "commands.sh"
            if commands.is_file() and note not in commands.read_text():
                atomic_write_text(commands, commands.read_text() + note)

    def is_full(self, step: int) -> bool:
        """Whether checkpoint `step` holds the optimizer state (a resume can open the trainer there)."""
        from stages.training.checkpoint import engine_state_dir

        return engine_state_dir(self.checkpoint(step)) is not None


def manifest_section(manifest: dict | None, section: str) -> dict:
    """Section `section` of the run config a manifest (run.json) records; {} when it has none."""
    return ((manifest or {}).get("config") or {}).get(section) or {}


def resume_needs(step: int, full_steps: list[int]) -> range:
    """The checkpoints a resume after finished step `step` reads: the newest full one (the trainer opens there; none:
    the run's start model) and every weights-only one after it (their updates are replayed from the scored files,
    each checked against its folder, and the last one is the next step's model)."""
    newest_full = max((old for old in full_steps if old <= step), default=-1)
    return range(max(newest_full, 0), step + 1)


def prunable(step: int, keep: int, full_steps: list[int]) -> list[int]:
    """The checkpoints (steps ≤ `step`) pruning may delete: outside the newest `keep` and outside `resume_needs`
    (so at most loop.checkpoint_every − 1 weights-only folders stay beyond `keep`). Pure: the rule the property
    test checks for every kill point."""
    needed = set(resume_needs(step, full_steps)) | set(range(step - keep + 1, step + 1))
    return [old for old in range(step + 1) if old not in needed]

def config_changes(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """The dotted keys whose values differ between two nested config dicts. A key `old` lacks reads as its value in
    `defaults` (when given): a setting added after a run was made, at its default, computes what the run did."""
    defaults = defaults or {}
    keys = sorted(set(old) | set(new))
    changes = []
    for key in keys:
        a, b = old.get(key, defaults.get(key)), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            nested = defaults.get(key) if isinstance(defaults.get(key), dict) else None
            changes += config_changes(a, b, f"{prefix}{key}.", nested)
        elif a != b:
            changes.append(f"{prefix}{key}")
    return changes
