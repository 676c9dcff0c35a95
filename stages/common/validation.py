"""Config validation shared by every stage's frozen Config dataclass: one rule set, all problems reported at once.

A Config class checks itself in `__post_init__` through a `Checks` collector, so a config that exists is valid,
however it was made (CLI, `loop`, Slurm rendering, tests). Problems are (field, message) pairs; `ConfigError` renders
them as CLI options (`--lr: must be a finite number, got nan`), and the run config re-labels them as config keys
(`update.lr: …`). Every float field must be finite, whatever else its class requires: NaN passes `x >= 0` and
`x <= 1` alike, so a range check alone lets it through. This module checks values only: files and engines are the
stages' business.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

from stages.common.errors import InputError


def option_name(field: str) -> str:
    """The CLI option of a config field: `micro_batch_tokens` → `--micro-batch-tokens`."""
    return "--" + field.replace("_", "-")


class ConfigError(InputError):
    """A config with invalid values; `problems` holds every (field, message) found, in field order."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("; ".join(f"{option_name(field)}: {message}" for field, message in self.problems))

    def labelled(self, prefix: str) -> list[str]:
        """The problems as `PREFIX.field: message` lines (the run config's spelling)."""
        return [f"{prefix}.{field}: {message}" for field, message in self.problems]


def _is_float(value: Any) -> bool:
    return isinstance(value, float)


class Checks:
    """Collects the problems of one config object; `done()` raises them together as a ConfigError."""

    def __init__(self, config: Any):
        self.config = config
        self.problems: list[tuple[str, str]] = [  # first, so a NaN gets this one message and no range message
            (f.name, f"must be a finite number, got {getattr(config, f.name)!r}") for f in dataclasses.fields(config)
            if _is_float(getattr(config, f.name)) and not math.isfinite(getattr(config, f.name))]

    def _value(self, name: str) -> Any:
        return getattr(self.config, name)

    def fail(self, name: str, message: str) -> None:
        self.problems.append((name, message))

    def require(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            self.fail(name, message)

    def _broken(self, name: str) -> bool:
        """True when the field already has a problem (a non-finite float gets one message, not three)."""
        return any(field == name for field, _ in self.problems)

    def at_least(self, low: float, *names: str) -> None:
        for name in names:
            value = self._value(name)
            if value is not None and not self._broken(name) and not value >= low:
                self.fail(name, f"must be >= {low:g}, got {value!r}")

    def above(self, low: float, *names: str) -> None:
        for name in names:
            value = self._value(name)
            if value is not None and not self._broken(name) and not value > low:
                self.fail(name, f"must be > {low:g}, got {value!r}")

    def between(self, name: str, low: float, high: float, *, low_open: bool = False) -> None:
        value = self._value(name)
        if value is None or self._broken(name):
            return
        ok = (value > low if low_open else value >= low) and value <= high
        if not ok:
            bracket = "(" if low_open else "["
            self.fail(name, f"must be in {bracket}{low:g}, {high:g}], got {value!r}")

    def choice(self, name: str, valid: Iterable[str]) -> None:
        valid = tuple(valid)
        value = self._value(name)
        if value not in valid:
            self.fail(name, f"must be one of {', '.join(map(str, valid))}, got {value!r}")

    def absorb(self, build) -> None:
        """Call `build()` (which makes another Config from this one's values, under the same field names) and add
        its problems, one per field."""
        try:
            build()
        except ConfigError as exc:
            seen = {name for name, _ in self.problems}
            self.problems += [(name, message) for name, message in exc.problems if name not in seen]

    def done(self) -> None:
        """Raise every problem found, in the order of the dataclass fields."""
        if self.problems:
            order = [f.name for f in dataclasses.fields(self.config)]
            self.problems.sort(key=lambda p: order.index(p[0]) if p[0] in order else len(order))
            raise ConfigError(self.problems)
