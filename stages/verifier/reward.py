"""`verify --reward module:function`: a user's reward function (trusted code) in place of math-verify's answer check.

The function is called as `function(problem=…, answer=…, response=…, row=…)` with the problem text, the reference
answer, the model's response text and the whole rollout row (a dict of its columns), and returns True/False (or 1/0):
whether the response is correct. It runs in the same killable worker processes as the built-in check, with the same
per-call timeout and memory limit, so a slow or crashing function costs one row (status timeout/error), not the stage;
the model output it reads is still untrusted text (the workers' sympy eval guard stays on).

A spec is `package.module:function` (importable from the working directory or the environment) or
`path/to/file.py:function`. `stages.verifier.rows` imports it once in the parent first, so a typo is a one-line error
before any work. Like the rest of the checking code, this module imports nothing else of stages/.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
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


def as_correct(value) -> bool:
    """The function's verdict: a bool, or a number equal to 0 or 1; anything else is an error of that row."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise TypeError(f"reward function returned {value!r}; expected True/False or 1/0")


def reward_check(spec: str, search: str, answer: str, payload: str) -> bool:
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
    return as_correct(value)


def worker_check(spec: str, search: str) -> Callable[[str, str], bool]:
    """A picklable check(gold, payload) for `stages.verifier.sandbox.run_checks`."""
    return functools.partial(reward_check, spec, search)


def row_payloads(rows: Sequence[dict]) -> list[str]:
    return [json.dumps(row, default=str) for row in rows]
