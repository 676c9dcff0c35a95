"""Progress of a long stage in tokens: a rich bar with tokens/s and ETA on a terminal; elsewhere (a file, a pipe, a
Slurm log) one log record every `every_s` seconds and one at the end, so `tail -f` shows it moving."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger(__name__)


def progress_line(label: str, done: int, total: int, elapsed: float) -> str:
    """`update: 12,000 / 40,000 tokens (30 %), 300 tok/s, ETA 1m33s`."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_text = "?" if eta == float("inf") else f"{int(eta // 60)}m{int(eta % 60):02d}s"
    share = 100 * done / total if total else 100.0
    return f"{label}: {done:,} / {total:,} tokens ({share:.0f} %), {rate:,.0f} tok/s, ETA {eta_text}"


@contextmanager
def token_progress(label: str, total: int, *, enabled: bool = True, every_s: float = 30.0,
                   clock: Callable[[], float] = time.perf_counter, stream=None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(tokens)`; shows the progress of `total` tokens as described in the module docstring."""
    stream = stream or sys.stderr
    started = clock()
    state = {"done": 0, "last": started}
    if enabled and stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn(label), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, console=Console(file=stream), transient=True) as bar:
            task = bar.add_task(label, total=total, rate="")

            def advance(tokens: int) -> None:
                state["done"] += tokens
                rate = state["done"] / max(clock() - started, 1e-9)
                bar.update(task, advance=tokens, rate=f"{rate:,.0f} tok/s")

            yield advance
        return

    def advance(tokens: int) -> None:
        state["done"] += tokens
        now = clock()
        if enabled and now - state["last"] >= every_s:
            state["last"] = now
            log.info("%s", progress_line(label, state["done"], total, now - started))

    yield advance
    if enabled and state["done"]:
        log.info("%s", progress_line(label, state["done"], total, clock() - started))
