"""The loop's live view on stderr: one table row per finished step, and the stage now running.

On a terminal it is a rich Live table; elsewhere (CI, Slurm logs) it prints one plain line per finished step.
It only displays; the metrics themselves are written by the loop.
"""

from __future__ import annotations

import sys

from stages.common import metrics as keys

COLUMNS = [
    ("step", keys.STEP, "{:d}"),
    ("reward", keys.REWARD_MEAN, "{:.3f}"),
    ("eval acc", keys.EVAL_ACCURACY, "{:.3f}"),
    ("H teacher", keys.TEACHER_ENTROPY_MEDIAN, "{:.3f}"),
    ("tppl", keys.TEACHER_PPL_MEAN, "{:.3f}"),
    ("gate", keys.GATE_OPEN, "{:.0f}"),
    ("λ", keys.GATE_LAMBDA, "{:.2f}"),
    ("−φ(u)", keys.PMI_ANTISD_TERM_MEAN, "{:+.4f}"),
    ("len", keys.LENGTH_MEAN, "{:.1f}"),
    ("rollout tok/s", keys.ROLLOUT_TOK_S, "{:.0f}"),
    ("step s", keys.timing("step"), "{:.1f}"),
]


def format_cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


class LoopView:
    def __init__(self, steps: int, stream=None):
        from rich.console import Console

        self.steps = steps
        self.console = Console(file=stream or sys.stderr)
        if not self.console.is_terminal:
            self.console = Console(file=stream or sys.stderr, width=160)
        self.rows: list[dict] = []
        self.current = ""
        self.live = None
        self.baseline_accuracy = None

    def _table(self):
        from rich.table import Table

        title = f"antisd loop — {len(self.rows)}/{self.steps} steps"
        if self.baseline_accuracy is not None:
            title += f" — base eval acc {self.baseline_accuracy:.3f}"
        table = Table(*[name for name, _, _ in COLUMNS], title=title, caption=self.current or None)
        for row in self.rows[-20:]:
            table.add_row(*[format_cell(row, key, fmt) for _, key, fmt in COLUMNS])
        return table

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
        return False

    def _refresh(self):
        if self.live is not None:
            self.live.update(self._table())

    def baseline(self, result: dict) -> None:
        self.baseline_accuracy = result.get(keys.EVAL_ACCURACY)
        if self.live is None and self.baseline_accuracy is not None:
            self.console.print(f"base model: eval accuracy {self.baseline_accuracy:.3f}")
        self._refresh()

    def begin(self, step: int) -> None:
        self.current = f"step {step}: starting"
        self._refresh()

    def stage(self, name: str) -> None:
        self.current = f"running {name}"
        self._refresh()

    def row(self, row: dict) -> None:
        self.rows.append(row)
        self.current = ""
        if self.live is None:
            self.console.print("  ".join(f"{name}={format_cell(row, key, fmt)}" for name, key, fmt in COLUMNS))
        self._refresh()
