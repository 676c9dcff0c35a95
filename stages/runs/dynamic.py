"""DAPO's dynamic sampling for the loop (`loop.dynamic_sampling`): draw more groups until the step has
`prompts_per_step` groups whose rewards differ, at most `loop.max_draws` draws of `prompts_per_step` prompts each.

A group whose rollouts all got the same reward has a GRPO advantage of exactly 0: it costs score and update time and
teaches the group term nothing. Draw 0 is the step's ordinary prompts (the seeded cursor, so every arm of a paired
study still sees the same first prompts); draw d ≥ 1 samples `prompts_per_step` further prompts of the training set,
seeded by (run seed, step, d), never one already drawn in this step. The step's `verified.parquet` then holds the
first `prompts_per_step` mixed groups in draw order; if the draws run out first it holds every mixed group found, and
if none was found, draw 0's groups (the update then learns from the per-token term only). The draws' own files stay in
`step_XXXX/draws/D/` (prompts, rollouts, verified; draw 0's prompts and rollouts are the step's own), and what was
drawn is kept in the metadata of `verified.parquet` and in the step's metrics (`sampling/…`).

Pure functions here, and `Draws`, the books of one step's draws (their files, the prompts drawn, the verified tables:
rank 0's with several ranks); the loop (`stages.loop`) runs the rollouts and verifications they plan.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from stages.common import metrics as keys

log = logging.getLogger(__name__)


def refill_indices(total: int, per_step: int, used: set[int], seed: int) -> list[int]:
    """Rows of the training set for a further draw: `per_step` of those not in `used` (fewer if fewer are left),
    chosen by `seed` (a stage_seed of run seed, step and draw), in the order drawn."""
    unused = [row for row in range(total) if row not in used]
    return random.Random(seed).sample(unused, min(per_step, len(unused)))


def mixed_groups(verified: pa.Table) -> list[str]:
    """prompt_ids of the groups whose rewards are not all equal, in the order they first appear."""
    seen: dict[str, set[float]] = {}
    for prompt_id, reward in zip(verified.column("prompt_id").to_pylist(), verified.column("reward").to_pylist()):
        seen.setdefault(prompt_id, set()).add(reward)
    return [prompt_id for prompt_id, rewards in seen.items() if len(rewards) > 1]


def needs_more(draws: list[pa.Table], per_step: int, max_draws: int) -> bool:
    """Whether another draw runs: fewer than `per_step` mixed groups so far and fewer than `max_draws` draws made."""
    return len(draws) < max_draws and sum(len(mixed_groups(table)) for table in draws) < per_step


def select(draws: list[pa.Table], per_step: int) -> tuple[pa.Table, dict]:
    """The step's verified rows from its draws' verified tables, and the record of what was drawn and kept."""
    mixed = [prompt_id for table in draws for prompt_id in mixed_groups(table)]
    kept_ids = mixed[:per_step]
    combined = pa.concat_tables(draws, promote_options="default")
    if kept_ids:
        table = combined.filter(pc.is_in(combined.column("prompt_id"), pa.array(kept_ids)))
    else:
        table = draws[0]
    drawn_rewards = combined.column("reward").to_pylist()
    record = {
        "draws": len(draws),
        "groups_drawn": sum(len(set(t.column("prompt_id").to_pylist())) for t in draws),
        "groups_mixed": len(mixed),
        "groups_kept": len(kept_ids),
        "rollouts_drawn": combined.num_rows,
        "drawn_reward_mean": sum(drawn_rewards) / len(drawn_rewards) if drawn_rewards else None,
        "filled": len(kept_ids) >= per_step,
    }
    return table, record


def step_metrics(record: dict) -> dict:
    """The selection record as metrics (keys.SAMPLING)."""
    return {keys.sampling(name): float(value) if isinstance(value, bool) else value for name, value in record.items()}


class Draws:
    """The books of step `step`'s draws: draw 0 is the step's own prompts and rollouts, draw d ≥ 1 lives in
    `step_XXXX/draws/d/`. Every file a draw needs is kept, so a resumed step redoes only what is missing."""

    def __init__(self, run, step: int, settings, train_table: pa.Table, rollouts: Path):
        self.run, self.step, self.settings, self.train_table = run, step, settings, train_table
        self.first = {"prompts": run.step_paths(step)["prompts"], "rollouts": Path(rollouts)}
        self.tables: list[pa.Table] = []
        self.used: set[int] = set()

    def seed(self, draw: int, stage: str) -> int:
        from stages.runs.plan import stage_seed

        return stage_seed(self.settings.seed, self.step, f"{stage}/draw{draw}")

    def folder(self, draw: int) -> Path:
        from stages.runs.plan import draw_dir

        return draw_dir(self.run, self.step, draw)

    def plan(self, draw: int) -> dict | None:
        """Draw `draw`'s prompts (written when new) and rollouts files, and whether they are sampled already; None
        when every training prompt has been drawn in this step."""
        from stages.common.io import build_metadata, read_metadata, write_artifact

        folder = self.folder(draw)
        folder.mkdir(parents=True, exist_ok=True)
        prompts, rollouts = (self.first["prompts"], self.first["rollouts"]) if draw == 0 else \
            (folder / "prompts.parquet", folder / "rollouts.parquet")
        if not prompts.exists():
            rows = refill_indices(self.train_table.num_rows, self.settings.prompts_per_step, self.used,
                                  self.seed(draw, "rollout"))
            if not rows:
                return None
            write_artifact(self.train_table.take(rows), prompts, "prompts",
                           build_metadata("prompts", {"step": self.step, "draw": draw, "rows": rows},
                                          step=self.step))
        self.used.update(read_metadata(prompts)["config"]["rows"])
        return {"prompts": str(prompts), "rollouts": str(rollouts), "sampled": rollouts.exists()}

    def verified(self, draw: int, verify: Callable[[str, str, int | None], None]) -> bool:
        """Verify draw `draw` (`verify(rollouts, out, seed)`, seed None: the step's own) unless done; whether
        another draw is needed."""
        from stages.common.io import read_artifact

        rollouts = self.first["rollouts"] if draw == 0 else self.folder(draw) / "rollouts.parquet"
        out = self.folder(draw) / "verified.parquet"
        if not out.exists():
            verify(str(rollouts), str(out), self.seed(draw, "verify") if draw else None)
        self.tables.append(read_artifact(out, "verified")[0])
        return needs_more(self.tables, self.settings.prompts_per_step, self.settings.max_draws)

    def write(self) -> None:
        """The step's verified.parquet: the kept groups, with the record of what was drawn in its metadata."""
        from stages.common.io import read_artifact, write_artifact

        table, record = select(self.tables, self.settings.prompts_per_step)
        metadata = read_artifact(self.folder(0) / "verified.parquet", "verified")[1]
        write_artifact(table, self.run.step_paths(self.step)["verified"], "verified",
                       {**metadata, "dynamic_sampling": record})
        log.info("step %d dynamic sampling: %d draw(s), %d of %d groups mixed, %d kept", self.step, record["draws"],
                 record["groups_mixed"], record["groups_drawn"], record["groups_kept"])
