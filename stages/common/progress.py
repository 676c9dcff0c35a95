"""Progress of a long stage (rollout: samples; score, update: tokens): a rich bar with tokens/s and ETA on a terminal;
elsewhere (a file, a pipe, a Slurm log) one log record every `every_s` seconds and one at the end (unless the last
periodic record already said the same), so `tail -f` shows it moving and no carriage return reaches the file."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    return "?" if seconds == float("inf") else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def progress_line(label: str, done: int, total: int, elapsed: float, unit: str = "tokens",
                  tokens: int | None = None) -> str:
    """`update: 12,000 / 40,000 tokens (30 %), 300 tok/s, ETA 1m33s`; with another `unit` the rate is of `tokens`:
    `rollout: 96 / 256 samples (38 %), 312 tok/s, ETA 2m10s` (the ETA from the units' rate)."""
    tokens = done if tokens is None else tokens
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    token_rate = tokens / elapsed if elapsed > 0 else 0.0
    share = 100 * done / total if total else 100.0
    return (f"{label}: {done:,} / {total:,} {unit} ({share:.0f} %), {token_rate:,.0f} tok/s, "
            f"ETA {_duration(eta)}")


@contextmanager
def counted_progress(label: str, total: int, *, unit: str = "tokens", enabled: bool = True, every_s: float = 30.0,
                     clock: Callable[[], float] = time.perf_counter, stream=None
                     ) -> Iterator[Callable[..., None]]:
    """Yield `advance(count, tokens=None)`: `count` more of `total` units done, `tokens` of them (default `count`)
    for the rate; shows the progress as the module docstring says."""
    stream = stream or sys.stderr
    started = clock()
    state = {"done": 0, "tokens": 0, "last": started, "logged": 0}
    if enabled and stream.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn(label), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + unit),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, console=Console(file=stream), transient=True) as bar:
            task = bar.add_task(label, total=total, rate="")

            def advance(count: int, tokens: int | None = None) -> None:
                state["done"] += count
                state["tokens"] += count if tokens is None else tokens
                rate = state["tokens"] / max(clock() - started, 1e-9)
                bar.update(task, advance=count, rate=f"{rate:,.0f} tok/s")

            yield advance
        return

    def record(now: float) -> None:
        state["last"], state["logged"] = now, state["done"]
        log.info("%s", progress_line(label, state["done"], total, now - started, unit, state["tokens"]))

    def advance(count: int, tokens: int | None = None) -> None:
        state["done"] += count
        state["tokens"] += count if tokens is None else tokens
        now = clock()
        if enabled and now - state["last"] >= every_s:
            record(now)

    yield advance
    if enabled and state["done"] and state["done"] != state["logged"]:
        record(clock())


@contextmanager
def token_progress(label: str, total: int, *, enabled: bool = True, every_s: float = 30.0,
                   clock: Callable[[], float] = time.perf_counter, stream=None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(tokens)`: `counted_progress` in tokens."""
    with counted_progress(label, total, enabled=enabled, every_s=every_s, clock=clock, stream=stream) as advance:
        yield advance
