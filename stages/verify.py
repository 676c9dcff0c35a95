"""`antisd verify`: rollouts Parquet → verified Parquet (schemas.VERIFIED), every row kept.

Per row: the extracted final answer, reward R (0/1, or a `--reward` function's float), `correct` (R ≥ 1),
`verify_status`, the group statistics of its
prompt and the privileged context of METHOD §4, all computed by `stages.verifier.rows.verify_table` (answer checks in
killable worker processes: `stages.verifier.answers`). This command reads validate → read → verify → write.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stages.common.io import build_metadata, carried_step, check_output, output_lock, read_artifact, write_artifact
from stages.verifier.rows import VerifyConfig, verify_table

log = logging.getLogger(__name__)


def _progress():
    """A rich bar on stderr (only on a terminal) and the callback that advances it."""
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())
    task = bar.add_task("checks", total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def run(config: VerifyConfig, loaded=None) -> Path:
    """Verify `config.rollouts` into `config.out`; return the output path. `loaded`: reuse its tokenizer."""
    started = time.perf_counter()
    out = check_output(config.out, config.overwrite)
    with output_lock(out):
        table, input_metadata = read_artifact(config.rollouts, "rollouts")
        log.debug("verify config: %s", config)  # the whole config is in the output's metadata

        bar, on_progress = _progress()
        with bar:
            table, stats = verify_table(table, config, loaded, on_progress)
        wall = time.perf_counter() - started
        stats["wall_s"] = round(wall, 3)

        # The rollouts metadata rides along whole: its sampling temperature is what `antisd score` looks up there.
        metadata = build_metadata("verified", config, **carried_step(input_metadata),
                                  inputs={"rollouts": str(config.rollouts)},
                                  rollouts_metadata=input_metadata, **stats)
        write_artifact(table, out, "verified", metadata)
        counts = stats["status_counts"]
        sources = stats["privileged_source_counts"]
        log.info("verified %d rollouts (%d groups) in %.1f s: reward mean %.3f; %s; privileged %s → %s",
                 table.num_rows, stats["groups"], wall, stats["reward_mean"],
                 ", ".join(f"{k} {v}" for k, v in counts.items()),
                 ", ".join(f"{k} {v}" for k, v in sorted(sources.items())), out)
        return out
