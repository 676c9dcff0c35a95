"""Final-answer extraction, and equivalence checks of model answers against gold answers that model text cannot abuse.

Extraction (pure, linear time, in the caller's process): the last balanced, non-blank ``\\boxed{…}``/``\\fbox{…}``
(escaped ``\\{`` ``\\}`` are not structure); if none, the fallbacks in the order given (default ``hash,answer-is``):
``hash`` = text after the last ``####``; ``answer-is`` = text after the last "answer is"/"answer:" to the end of its
sentence; ``last-number`` = the last number (off by default: it rewards rambling).

Equivalence: math-verify `parse` + `verify` with LaTeX extraction only, on sympy (numbers, fractions, expressions,
intervals, sets, units and ``^\\circ`` stripped, percentages, ``27.0`` = ``27``). Model text is hostile:
- No eval. math-verify's default `ExprExtractionConfig` feeds text to sympy's `parse_expr`, i.e. Python ``eval``
  (measured: ``parse_expr_cached("__import__('os')…")`` runs the command), so it is never used. latex2sympy2_extended
  still calls ``sympy.Number(token)`` on numeric lexer tokens, which ``eval``s: `stages.verifier.sandbox`'s eval guard stops
  anything but number/symbol constructor code (`UnsafeEval`, status ``error``).
- Every check runs in a `stages.verifier.sandbox` worker process with a soft and a hard timeout (status ``timeout``) and an
  address-space limit (status ``error``); each new worker first runs a few warm-up checks (~1 s with the imports).
- Answers or golds over ``max_answer_chars`` are not parsed (``error``), nor are answers with unbalanced braces
  (``ok``, incorrect: they could close the ``\\boxed{}`` they are wrapped in).
Code-like forms (MinervaMath writes `4.5e33`, `np.arcsin(10/13)`, `-1./3`) are rewritten to LaTeX on both sides
before parsing (`latex_form`: text substitutions only, nothing is evaluated).
Throughput: identical (gold, answer) pairs are checked once. `verifier_versions` names the packages whose versions
decide the verdicts (recorded in every verified and eval file: a grader upgrade moves scores).

This module reads and writes no files, manages no processes (`stages.verifier.sandbox`) and knows nothing of groups or
rewards (`stages.verify`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from stages.verifier import sandbox
from stages.verifier.sandbox import UnsafeEval, eval_allowed  # noqa: F401 - part of this module's API (raised/used in workers)

FALLBACKS = ("hash", "answer-is", "last-number")
VERIFIER_PACKAGES = ("math-verify", "latex2sympy2_extended", "sympy")  # the grader: its versions go with every verdict
DEFAULT_FALLBACKS = "hash,answer-is"
STATUSES = ("ok", "no_answer", "timeout", "error")


@dataclass(frozen=True)
class AnswerCheck:
    """Outcome of one response: the answer pulled out, whether it matches the gold, and how the check ended."""

    extracted_answer: str | None  # null when nothing was found; cut to max_answer_chars
    correct: bool  # True only when status == "ok" and the answer is equivalent to the gold
    status: str  # ok | no_answer | timeout | error
    detail: str = ""  # why a check is not ok (exception type, limit hit); empty when ok
    seconds: float = 0.0  # wall time of the equivalence check (0 when none ran)
    reward_value: float | None = None  # a --reward function's reward; None: `reward` is 1 when correct, else 0

    @property
    def reward(self) -> float:
        """R of the row: the reward function's number, else 1.0 for a correct answer and 0.0 otherwise."""
        return float(self.correct) if self.reward_value is None else self.reward_value


def parse_fallbacks(fallbacks: str | Sequence[str]) -> tuple[str, ...]:
    """``"hash,answer-is"`` (or a sequence of names) → validated tuple; ``"none"`` or ``""`` → no fallbacks."""
    names = fallbacks.split(",") if isinstance(fallbacks, str) else list(fallbacks)
    names = [name.strip() for name in names if name.strip()]
    if names == ["none"]:
        return ()
    bad = [name for name in names if name not in FALLBACKS]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"fallbacks: expected a comma list of distinct {', '.join(FALLBACKS)} (or none), "
                         f"got '{','.join(names)}'")
    return tuple(names)


# --- extraction ------------------------------------------------------------------------------------------------

_STRUCTURE_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char (\{, \\, \f…) or a real brace
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|\n")
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def _closing_braces(text: str) -> dict[int, int]:
    """Index of each real '{' → index of its matching '}' (unmatched braces are absent). One C-level regex scan."""
    stack: list[int] = []
    closing: dict[int, int] = {}
    for match in _STRUCTURE_RE.finditer(text):
        char = match.group()
        if char == "{":
            stack.append(match.start())
        elif char == "}" and stack:
            closing[stack.pop()] = match.start()
    return closing


def balanced(text: str) -> bool:
    """Whether every real brace of `text` is matched (escaped ``\{``/``\}`` do not count)."""
    depth = 0
    for match in _STRUCTURE_RE.finditer(text):
        depth += {"{": 1, "}": -1}.get(match.group(), 0)
        if depth < 0:
            return False
    return depth == 0


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}``/``\\fbox{…}`` whose brace closes and whose content is not blank."""
    starts = [match.end() - 1 for match in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    closing = _closing_braces(text)
    for brace in reversed(starts):
        if brace in closing:
            content = text[brace + 1 : closing[brace]].strip()
            if content:
                return content
    return None


def boxed_spans(text: str) -> list[tuple[str, int]]:
    """Every ``\\boxed{…}``/``\\fbox{…}`` whose brace closes, in order: (its stripped content, the index just after
    its closing brace)."""
    closing = _closing_braces(text)
    spans = []
    for match in _BOXED_RE.finditer(text):
        brace = match.end() - 1
        if brace in closing:
            spans.append((text[brace + 1 : closing[brace]].strip(), closing[brace] + 1))
    return spans


def _trim(answer: str) -> str | None:
    answer = answer.strip().strip("$").rstrip(" .,;:!").strip()
    return answer or None


def _extract_hash(text: str) -> str | None:
    found = [match.group(1) for match in _HASH_RE.finditer(text) if match.group(1).strip()]
    return _trim(found[-1]) if found else None


def _extract_answer_is(text: str) -> str | None:
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is None:
        return None
    tail = text[last.end() :]
    end = _SENTENCE_END_RE.search(tail)
    return _trim(tail[: end.start()] if end else tail)


def _extract_last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return last.group().replace(",", "") if last else None


_FALLBACK_EXTRACTORS = {"hash": _extract_hash, "answer-is": _extract_answer_is, "last-number": _extract_last_number}


def extract_answer(text: str, fallbacks: str | Sequence[str] = DEFAULT_FALLBACKS) -> str | None:
    """The final answer of `text`: the last boxed answer, else the first fallback that finds one, else None."""
    answer = extract_boxed(text)
    for name in parse_fallbacks(fallbacks):
        if answer is not None:
            break
        answer = _FALLBACK_EXTRACTORS[name](text)
    return answer


# --- equivalence (runs inside a sandbox worker) -----------------------------------------------------------------

_SCIENTIFIC_RE = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
_CODE_FUNCTION_RE = re.compile(r"(?<![\w.])(?:np|numpy|math|sympy|sp)\.([a-z][a-z0-9]*)\b")
_BARE_POINT_RE = re.compile(r"(?<![\w.])(\d+)\.(?=[\s)/*+\-,\]}]|$)")
_CODE_FUNCTIONS = {"arcsin": "\\arcsin", "arccos": "\\arccos", "arctan": "\\arctan", "sin": "\\sin", "cos": "\\cos",
                   "tan": "\\tan", "sinh": "\\sinh", "cosh": "\\cosh", "tanh": "\\tanh", "exp": "\\exp", "log": "\\ln",
                   "log10": "\\log_{10}", "pi": "\\pi", "e": "e"}
_CODE_SQRT_RE = re.compile(r"(?<![\w.])(?:np|numpy|math|sympy|sp)\.sqrt\(")


def latex_form(text: str) -> str:
    """`text` with code-like numbers and functions written as LaTeX, by substitution alone (nothing is evaluated):
    `4.5e33` → `4.5 \\times 10^{33}`, `1e-5` → `1 \\times 10^{-5}`, `np.arcsin(x)` → `\\arcsin(x)` (`np.log` → `\\ln`),
    `math.sqrt(x)` → `\\sqrt{x}`, `-1./3` → `-1/3`. A number glued to letters (`x2e5`) and unknown `np.` names are
    left alone."""
    text = _SCIENTIFIC_RE.sub(lambda m: f"{m[1]} \\times 10^{{{m[2].lstrip('+')}}}", text)
    while (call := _CODE_SQRT_RE.search(text)) is not None:
        close = _closing_paren(text, call.end() - 1)
        if close is None:
            break
        text = f"{text[:call.start()]}\\sqrt{{{text[call.end():close]}}}{text[close + 1:]}"
    text = _CODE_FUNCTION_RE.sub(lambda m: _CODE_FUNCTIONS.get(m[1], m[0]), text)
    return _BARE_POINT_RE.sub(r"\1", text)


def _closing_paren(text: str, opening: int) -> int | None:
    depth = 0
    for index in range(opening, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return None


def verifier_versions() -> dict[str, str]:
    """{package: installed version} of VERIFIER_PACKAGES (importlib metadata; nothing is imported)."""
    from importlib.metadata import version

    return {name: version(name) for name in VERIFIER_PACKAGES}


_GOLD_CACHE: dict[str, list] = {}  # per worker process; golds repeat across a group's samples


def _parse_latex(text: str) -> list:
    from math_verify import LatexExtractionConfig, parse

    # Wrapped in \boxed{} so math-verify's LaTeX extractor takes the whole answer; parsing_timeout=None disables
    # its signal.alarm (the worker's own timer and the parent's kill bound the time instead).
    return parse("\\boxed{" + latex_form(text) + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None,
                 raise_on_error=True)


def is_equivalent(gold: str, answer: str) -> bool:
    """math-verify equivalence of `answer` to `gold` (both LaTeX or plain). Call it only inside a worker."""
    from math_verify import verify

    if gold not in _GOLD_CACHE:
        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = _parse_latex(gold)
    return bool(verify(_GOLD_CACHE[gold], _parse_latex(answer), timeout_seconds=None, raise_on_error=True))


# sympy's lazy imports (units…) and ANTLR's caches, loaded in each worker before any deadline runs
_WARM_UP = [("27", "27.0"), ("\\frac{1}{2}", "0.5"), ("(0,1]", "(0,1)"), ("\\{1,2\\}", "\\{2,1\\}"),
            ("90", "90^\\circ"), ("5", "5\\text{ cm}"), ("25\\%", "25"), ("x+1", "1+x"), ("\\sqrt{2}/2", "x=3")]
_PRELOAD = ("stages.verifier.answers", "math_verify", "sympy")  # imported once by the forkserver, shared by its workers


def run_checks(pairs: Sequence[tuple[str, str]], *, check: Callable[[str, str], bool] = is_equivalent,
               **options) -> list[tuple]:
    """(status, correct, detail, seconds) of each (gold, answer) pair: `stages.verifier.sandbox.run_checks` with `check`
    (math-verify by default), this module's warm-up and preloads; `options` are its keyword arguments."""
    return sandbox.run_checks(pairs, check, warm_up=_WARM_UP, preload=_PRELOAD, **options)


def _precheck(answer: str | None, gold: str, max_chars: int) -> AnswerCheck | None:
    """The outcome of a row that needs no worker (no answer, too long, unbalanced), else None."""
    if answer is None:
        return AnswerCheck(None, False, "no_answer")
    for which, text in (("answer", answer), ("gold", gold)):
        if len(text) > max_chars:
            detail = f"{which} too long ({len(text)} chars > {max_chars})"
            return AnswerCheck(answer[:max_chars], False, "error", detail)
    return None if balanced(answer) else AnswerCheck(answer, False, "ok", "unbalanced braces")


def check_answers(responses: Sequence[str], golds: Sequence[str], *,
                  fallbacks: str | Sequence[str] = DEFAULT_FALLBACKS, timeout: float = 5.0, workers: int = 2,
                  max_answer_chars: int = 1000, memory_mb: int = 2048,
                  on_progress: Callable[[int, int], None] | None = None) -> list[AnswerCheck]:
    """Extract each response's answer and check it against its gold; one AnswerCheck per response, in order."""
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    names = parse_fallbacks(fallbacks)
    answers = [extract_answer(text, names) for text in responses]
    early = [_precheck(answer, gold, max_answer_chars) for answer, gold in zip(answers, golds)]
    unique: dict[tuple[str, str], int] = {}
    for answer, gold, done in zip(answers, golds, early):
        if done is None:
            unique.setdefault((gold, answer), len(unique))
    outcomes = run_checks(list(unique), timeout=timeout, workers=workers, memory_mb=memory_mb,
                          on_progress=on_progress)
    checks = []
    for answer, gold, done in zip(answers, golds, early):
        if done is None:
            status, correct, detail, seconds = outcomes[unique[(gold, answer)]]
            done = AnswerCheck(answer, bool(correct) and status == "ok", status, detail, float(seconds))
        checks.append(done)
    return checks


def check_with_reward(rows: Sequence[dict], spec: str, search: str, *,
                      fallbacks: str | Sequence[str] = DEFAULT_FALLBACKS, timeout: float = 5.0, workers: int = 2,
                      memory_mb: int = 2048, on_progress: Callable[[int, int], None] | None = None
                      ) -> list[AnswerCheck]:
    """One AnswerCheck per rollout row, its reward from the user's reward function `spec` (`stages.verifier.reward`)
    in the worker processes (0 when the call failed), correct when it is ≥ `schemas.CORRECT_REWARD`; the extracted
    answer is still recorded, for reading."""
    from stages.verifier import reward

    names = parse_fallbacks(fallbacks)
    extracted = [extract_answer(row["response_text"], names) for row in rows]
    pairs = [(row["answer"], payload) for row, payload in zip(rows, reward.row_payloads(rows))]
    outcomes = sandbox.run_checks(pairs, reward.worker_check(spec, search), timeout=timeout, workers=workers,
                                  memory_mb=memory_mb, preload=("stages.verifier.reward",), on_progress=on_progress)
    from schemas import CORRECT_REWARD

    checks = []
    for answer, (status, verdict, detail, seconds) in zip(extracted, outcomes):
        reward_value = float(verdict) if status == "ok" else 0.0
        checks.append(AnswerCheck(answer, reward_value >= CORRECT_REWARD, status, detail, float(seconds),
                                  reward_value))
    return checks


def summarize(checks: Sequence[AnswerCheck]) -> dict:
    """Counts by status, and by failure kind (the detail up to ':', ' (' or ' after'), for metadata and logs."""
    kinds = Counter(re.split(r":| \(| after ", check.detail)[0] for check in checks if check.detail)
    return {"status_counts": {status: sum(c.status == status for c in checks) for status in STATUSES},
            "failure_kinds": dict(kinds)}
