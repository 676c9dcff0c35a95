"""`verify --reward module:function`: a user's reward function (trusted code) in place of math-verify's answer check.

The function is called as `function(problem=…, answer=…, response=…, row=…)` with the problem text, the reference
answer, the model's response text and the whole rollout row (a dict of its columns), and returns the response's reward:
True/False (1/0), or any finite float, as TRL's and verl's reward functions may (partial credit, format bonuses, −1/+1).
The row's `correct` is reward ≥ 1 (`schemas.CORRECT_REWARD`): what makes a rollout a peer solution the teacher view
may show (METHOD §4), its note "correct" and an evaluation's hit; the reward itself is what the group advantages
normalize. A row whose call raises, times out or returns anything else gets reward 0 and status error or timeout
(`stages.verifier.rows` logs the first traceback and fails when every row failed). It runs in the same killable
worker processes as the built-in check, with the same per-call timeout and memory limit, so a slow or crashing
function costs one row (status timeout/error), not the stage; the model output it reads is still untrusted text (the
workers' sympy eval guard stays on).

A spec is `package.module:function` (importable from the working directory or the environment) or
`path/to/file.py:function`. `stages.verifier.rows` imports it once in the parent first, so a typo is a one-line error
before any work. Like the rest of the checking code, this module imports nothing else of stages/.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import numbers
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

_LOADED: dict[tuple[str, str], Callable] = {}


def spec_problem(spec: str) -> str | None:
    """Why `spec` is not of the form TARGET:FUNCTION, or None."""
    target, sep, function = spec.rpartition(":")
    if not sep or not target.strip() or not function.isidentifier():
        return f"{spec!r}: expected module:function or path/to/file.py:function"
    return None


def _import(target: str, search: str):
    if target.endswith(".py"):
        path = Path(target) if Path(target).is_absolute() else Path(search) / target
        module_spec = importlib.util.spec_from_file_location(path.stem, path)  # not put in sys.modules
        if module_spec is None or not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    if search not in sys.path:
        sys.path.append(search)  # `my_rewards:fn` from the working directory, as `python -m` finds it
    return importlib.import_module(target)


def load_function(spec: str, search: str) -> Callable:
    """The callable named by `spec` (`search`: the folder relative names resolve from); cached per process."""
    key = (spec, search)
    if key not in _LOADED:
        target, _, name = spec.rpartition(":")
        function = getattr(_import(target, search), name)
        if not callable(function):
            raise TypeError(f"{name} is not callable")
        _LOADED[key] = function
    return _LOADED[key]


def as_reward(value) -> float:
    """The function's reward: True/False as 1/0, or any finite real number (ints, floats, numpy scalars), as a
    float; anything else (a string, None, NaN, ±inf) is an error of that row."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        reward = float(value)
        if math.isfinite(reward):
            return reward
    raise TypeError(f"reward function returned {value!r}; expected a finite number (a float reward) or True/False")


def reward_check(spec: str, search: str, answer: str, payload: str) -> float:
    """The worker-side check: the user's function on one row (`payload`: the row as JSON). An exception it raises
    carries its traceback (`antisd_traceback`), which the sandbox keeps as the row's detail: verify shows the first."""
    row = json.loads(payload)
    try:
        value = load_function(spec, search)(problem=row.get("problem"), answer=answer,
                                            response=row.get("response_text"), row=row)
    except Exception as exc:  # noqa: BLE001 - user code: anything; re-raised with its traceback attached
        user_frames = exc.__traceback__.tb_next  # from the user's function down
        exc.antisd_traceback = "".join(traceback.format_exception(type(exc), exc, user_frames)[-8:])
        raise
    return as_reward(value)


def worker_check(spec: str, search: str) -> Callable[[str, str], float]:
    """A picklable check(gold, payload) for `stages.verifier.sandbox.run_checks`."""
    return functools.partial(reward_check, spec, search)


def row_payloads(rows: Sequence[dict]) -> list[str]:
    return [json.dumps(row, default=str) for row in rows]
