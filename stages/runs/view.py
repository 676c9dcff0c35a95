"""The loop's live view on stderr (one table row per finished step, and the stage now running), and the table of a
finished run that `antisd demo` and `antisd inspect RUN_DIR` print with the notes that say what it shows.

On a terminal the live view is a rich Live table; elsewhere (CI, Slurm logs) it prints one plain line per finished
step. Which steps were the gate's warm-up (λ = 0: plain GRPO) is its own column, so "gate" never reads as open while λ
is 0 by construction. It only displays; the metrics themselves are written by the loop.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from stages.common import metrics as keys


def _number(key: str, fmt: str) -> Callable[[dict], str | None]:
    def cell(row: dict) -> str | None:
        value = row.get(key)
        if value is None:
            return None
        try:
            return fmt.format(value)
        except (ValueError, TypeError):
            return str(value)

    return cell


def _eval_cell(row: dict) -> str | None:
    """Held-out accuracy with its 95 % bootstrap interval over problems: `0.479 [0.33, 0.62]`."""
    accuracy = row.get(keys.EVAL_ACCURACY)
    if accuracy is None:
        return None
    low, high = row.get(keys.evaluation("accuracy_ci_low")), row.get(keys.evaluation("accuracy_ci_high"))
    return f"{accuracy:.3f}" + ("" if low is None or high is None else f" [{low:.2f}, {high:.2f}]")


def _gate_cell(row: dict) -> str | None:
    """warm-up (the gate calibrates; λ = 0 by construction), on or off; rows of runs before gate/warmup: on/off."""
    if row.get(keys.GATE_WARMUP) == 1:
        return "warm-up"
    is_open = row.get(keys.GATE_OPEN)
    return None if is_open is None else ("on" if is_open else "off")


def _grad_cell(row: dict) -> str | None:
    if row.get(keys.NO_SIGNAL) == 1:
        return "no signal"
    return _number(keys.GRAD_NORM, "{:.3g}")(row)


# (header, cell of a metrics row: text, or None for "–"); a column no row fills is left out of a table
COLUMNS: list[tuple[str, Callable[[dict], str | None]]] = [
    ("step", _number(keys.STEP, "{:d}")),
    ("reward", _number(keys.REWARD_MEAN, "{:.3f}")),
    ("eval acc [95% CI]", _eval_cell),
    ("H teacher", _number(keys.TEACHER_ENTROPY_MEDIAN, "{:.3f}")),
    ("tppl", _number(keys.TEACHER_PPL_MEAN, "{:.3f}")),
    ("gate", _gate_cell),
    ("λ", _number(keys.GATE_LAMBDA, "{:.2f}")),
    ("−φ(u)", _number(keys.PMI_ANTISD_TERM_MEAN, "{:+.4f}")),
    ("len", _number(keys.LENGTH_MEAN, "{:.1f}")),
    ("grad norm", _grad_cell),
    ("rollout tok/s", _number(keys.ROLLOUT_TOK_S, "{:.0f}")),
    ("step s", _number(keys.timing("step"), "{:.1f}")),
]


def cells(row: dict) -> list[str]:
    return [cell(row) or "–" for _, cell in COLUMNS]


def steps_table(rows: list[dict], title: str, caption: str | None = None):
    """A rich Table of metrics rows, without the columns no row fills (e.g. H teacher under §9's --no-entropy)."""
    from rich.table import Table

    used = [i for i, (_, cell) in enumerate(COLUMNS) if any(cell(row) is not None for row in rows)] \
        or list(range(len(COLUMNS)))
    table = Table(*[COLUMNS[i][0] for i in used], title=title, caption=caption)
    for row in rows:
        values = cells(row)
        table.add_row(*[values[i] for i in used])
    return table


def _steps_text(steps: list[int]) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"


def run_notes(rows: list[dict], base: dict, method: str = "antisd") -> list[str]:
    """What the table shows and what it does not: the warm-up steps (λ = 0: plain GRPO), the evaluation and its
    interval, which part of the held-out change came during the warm-up, steps without learning signal."""
    notes = []
    warmup = [row[keys.STEP] for row in rows if row.get(keys.GATE_WARMUP) == 1]
    if warmup:
        notes.append(f"{_steps_text(warmup)}: the gate's warm-up, λ = 0 by construction, so these steps train plain "
                     f"GRPO (the group-relative reward only); {method}'s token term acts only after them.")
    evaluated = [row for row in rows if row.get(keys.EVAL_ACCURACY) is not None]
    if evaluated:
        last = evaluated[-1]
        problems, n = last.get(keys.evaluation("problems")), last.get(keys.evaluation("n"))
        what = f"{problems} held-out problems" if problems else "the held-out problems"
        notes.append(f"eval acc: accuracy on {what}" + (f" (avg@{n})" if n else "") + ", with its 95 % bootstrap "
                     "interval over problems" + (f"; base model {_eval_cell(base)}" if _eval_cell(base) else "") +
                     ". A change inside the intervals is noise.")
        notes += _attribution(evaluated, base, set(warmup), method)
    skipped = [row[keys.STEP] for row in rows if row.get(keys.NO_SIGNAL) == 1]
    if skipped:
        notes.append(f"step{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))}: no learning signal "
                     "(every group's rewards equal, λ = 0): no optimizer step, the weights carried over.")
    return notes


def _attribution(evaluated: list[dict], base: dict, warmup: set[int], method: str) -> list[str]:
    """The held-out change during the warm-up (GRPO's) and after it (GRPO + the term), from the evaluations that
    bound each part; nothing when the run has no warm-up step or no evaluation on both sides of its end."""
    if not warmup:
        return []
    end = max(warmup)
    before = [row for row in evaluated if row[keys.STEP] <= end]
    after = [row for row in evaluated if row[keys.STEP] > end]
    start = base.get(keys.EVAL_ACCURACY)
    if start is None or not before or not after:
        return []
    warm, last = before[-1], after[-1]
    return [f"held-out change: {start:.3f} → {warm[keys.EVAL_ACCURACY]:.3f} by step {warm[keys.STEP]} (warm-up: "
            f"GRPO's, not {method}'s), then → {last[keys.EVAL_ACCURACY]:.3f} by step {last[keys.STEP]} (GRPO with "
            f"{method}'s term); a GRPO run with the same seed (--set update.method=grpo) is the comparison."]


def next_commands(run_dir: Path, rows: list[dict]) -> list[str]:
    """The commands to look further: the run's files, one scored row decoded, the curves."""
    last = rows[-1][keys.STEP] if rows else 0
    return [f"antisd inspect {run_dir}   # this table and the run's files",
            f"antisd inspect {run_dir / f'step_{last:04d}' / 'scored.parquet'} --row 0   # one response: both views "
            "decoded, per-token s, t, u = t − s, H",
            f"antisd plot {run_dir} --out {run_dir / 'curves.png'}   # reward, held-out accuracy, gate, λ by step"]


def print_run(console, run_dir: Path, title: str, more_commands: list[str] = ()) -> None:
    """A finished (or running) run as `antisd demo` ends and `antisd inspect RUN_DIR` shows it: the steps table, the
    notes that say what it shows, and the commands to look further (`more_commands` after them)."""
    from rich.markup import escape

    from stages.runs.run_dir import Run

    run = Run(run_dir)
    rows, base = run.metrics_rows(), run.base_evaluation()
    method = run.configured("update").get("method", "antisd")
    console.print(steps_table(rows, title))
    for note in run_notes(rows, base, method):  # one line each (soft_wrap: never broken, so a command copies whole)
        console.print(escape(f"- {note}"), soft_wrap=True)
    console.print("Next:")
    for command in [*next_commands(run_dir, rows), *more_commands]:
        console.print(escape(f"  {command}"), soft_wrap=True)


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
        title = f"antisd loop — {len(self.rows)}/{self.steps} steps"
        if self.baseline_accuracy is not None:
            title += f" — base eval acc {self.baseline_accuracy:.3f}"
        return steps_table(self.rows[-20:], title, caption=self.current or None)

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
            self.console.print(f"base model: eval accuracy {_eval_cell(result)}")
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
            line = "  ".join(f"{name}={cell(row)}" for name, cell in COLUMNS if cell(row) is not None)
            from rich.markup import escape

            self.console.print(escape(line), soft_wrap=True)  # one record per line in a log file, however long
        self._refresh()
