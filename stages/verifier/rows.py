"""Verified rows (schemas.VERIFIED) from rollouts, every row kept: `VerifyConfig` (the options of `antisd verify`) and
`verify_table`, which `antisd verify` and `antisd eval` share.

Per row: the extracted final answer, reward R (0 or 1 from math-verify; a `--reward` function's number, which may be
any finite float), `correct` (R ≥ 1, `schemas.CORRECT_REWARD`), `verify_status` (ok | no_answer | timeout | error,
from `stages.verifier.answers.check_answers`, which runs every check in killable worker processes), the group
statistics of its prompt (rows sharing `prompt_id` in this file), and the privileged context of METHOD §4:
1. `peer`: a correct rollout of the same group other than this one, picked by a stable hash of
   (seed, prompt_id, sample_idx) (never Python's `hash()`), its `<think>…</think>` stripped; peers whose text is
   empty after stripping are skipped;
2. else `reference`: the prompt's reference `solution` (when not null or blank);
3. else `none` (privileged_text null: the score stage gives this rollout no teacher term).
With `privileged_fallback` "assessment" (METHOD §9, the authors' code) step 2 and 3 are replaced: a rollout without a
correct peer gets `assessment` (privileged_text null; the teacher sees only the note on this rollout).
With `privileged_from` "other" (a control the paper does not run) the context comes from a different problem of the
same file instead: each prompt gets a donor prompt by a seeded cycle over the file's distinct prompts (never itself),
and a rollout's context is a correct rollout of the donor (`other_peer`, peer_sample_idx null), else the donor's
reference solution (`other_reference`), else `none`; the teacher's note still assesses this rollout.
A peer's text is first cut right after its last `\boxed{}` holding the gold answer (else holding its own verified
answer; unchanged if none) when `privileged_cut_boxed` (§9). Every text is then cut to its first
`privileged_max_chars` characters, then to a token budget of `model`'s tokenizer: `privileged_max_tokens` (0 = none),
and with `privileged_context_tokens` C > 0 at most C − |prompt| − 300 (at least 128; |prompt| the row's prompt
tokens), cut at token boundaries of the original text. Of a text over budget the first `privileged_keep_head` share
of the budget is kept and, when that is below 1, the last tokens for the rest, joined by "\n...\n" (§9: 25 % / 75 %;
1 = the head only: the text reads as a solution from its start). This module reads and writes no file (`stages.verify`) and builds no teacher prompt (`stages.lm.prompts`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa

import schemas
from stages.common import validation
from stages.common.errors import InputError
from stages.lm.models import DEFAULT_MODEL
from stages.lm.prompts import strip_think
from stages.verifier import answers
from stages.verifier import reward as reward_functions

log = logging.getLogger(__name__)


PRIVILEGED_FROM = ("same", "other")
PRIVILEGED_FALLBACKS = ("reference", "assessment")
CONTEXT_RESERVE_TOKENS = 300  # §9: the budget leaves this much of the context for the rest of the teacher prompt
MIN_PRIVILEGED_TOKENS = 128  # §9: the context-bound budget never falls below this
ELISION = "\n...\n"  # §9: joins the kept head and tail of a text over budget


@dataclass(frozen=True)
class VerifyConfig:
    """Options of `antisd verify` (each option is its key in kebab-case)."""

    rollouts: str  # input rollouts Parquet (file or directory of part files); later stages' files are accepted
    out: str  # output verified Parquet
    seed: int = 0  # picks the peer solution of each rollout (same seed, same picks)
    workers: int = 2  # answer-check worker processes
    timeout: float = 5.0  # seconds per answer check; overruns are interrupted, then the worker killed
    fallbacks: str = answers.DEFAULT_FALLBACKS  # comma list of hash, answer-is, last-number tried in order after
    #   \boxed{}; "none" = boxed only
    max_answer_chars: int = 1000  # longer extracted answers (or golds) are not parsed: status error
    worker_memory_mb: int = 2048  # address-space limit of each worker (0 = none); over it the check errors
    privileged_max_chars: int = 4000  # character budget of privileged_text (0 = no limit)
    privileged_max_tokens: int = 0  # token budget of privileged_text with `model`'s tokenizer (0 = not applied)
    # with C > 0 the token budget is also at most C − |prompt| − 300, and at least 128 (METHOD §9: 4096)
    privileged_context_tokens: int = 0
    privileged_keep_head: float = 1.0  # share of the token budget kept from the start; the rest from the end (§9: 0.25)
    privileged_cut_boxed: bool = False  # cut a peer's text after its last \boxed{} holding the answer (§9)
    model: str = DEFAULT_MODEL  # tokenizer of the token budget (HF folder or embedded name); unused without one
    privileged_from: str = "same"  # same (METHOD §4) | other: another problem's solution, a context-only control
    # without a correct peer: reference (the reference solution, else no teacher: §4) | assessment (the teacher sees
    # only the note on this rollout: §9)
    privileged_fallback: str = "reference"
    reward: str | None = None  # module:function or file.py:function deciding correctness (stages.verifier.reward);
    #   None = math-verify on the extracted answer
    overwrite: bool = False  # replace an existing output

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "workers", "max_answer_chars")
        check.above(0, "timeout")
        check.at_least(0, "worker_memory_mb", "privileged_max_chars", "privileged_max_tokens",
                       "privileged_context_tokens")
        check.between("privileged_keep_head", 0, 1)
        check.choice("privileged_from", PRIVILEGED_FROM)
        check.choice("privileged_fallback", PRIVILEGED_FALLBACKS)
        if self.reward is not None:
            from stages.verifier.reward import spec_problem

            problem = spec_problem(self.reward)
            check.require(problem is None, "reward", problem or "")
        try:
            answers.parse_fallbacks(self.fallbacks)
        except ValueError as exc:
            check.fail("fallbacks", str(exc).removeprefix("fallbacks: "))
        check.done()


# --- pure decisions --------------------------------------------------------------------------------------------

def group_stats(prompt_ids: Sequence[str], rewards: Sequence[float]) -> tuple[list[int], list[float]]:
    """Per row: size of its group (rows sharing prompt_id) and the group's mean reward."""
    sums: dict[str, float] = defaultdict(float)
    sizes: Counter = Counter(prompt_ids)
    for prompt_id, reward in zip(prompt_ids, rewards):
        sums[prompt_id] += reward
    return [sizes[p] for p in prompt_ids], [sums[p] / sizes[p] for p in prompt_ids]


def _stable_hash(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(list(parts)).encode()).digest()[:8], "big")


def pick_peer(seed: int, prompt_id: str, sample_idx: int, candidates: Sequence[int],
              exclude_self: bool = True) -> int | None:
    """Seeded choice among the correct peers' sample_idx, never `sample_idx` itself (unless `exclude_self` is false:
    the candidates are another problem's); None if there is none.

    The choice is sha256([seed, prompt_id, sample_idx]) mod the number of sorted candidates: stable across runs,
    processes and Python versions.
    """
    others = sorted(set(candidates) - ({sample_idx} if exclude_self else set()))
    if not others:
        return None
    return others[_stable_hash(seed, prompt_id, sample_idx) % len(others)]


def donor_prompts(prompt_ids: Sequence[str], seed: int) -> dict[str, str]:
    """privileged_from "other": each distinct prompt's donor, the next prompt in a seeded order of them (a cycle, so
    never itself and every prompt donates once); empty with fewer than two prompts."""
    order = sorted(set(prompt_ids), key=lambda p: (_stable_hash("donor", seed, p), p))
    if len(order) < 2:
        return {}
    return {prompt: order[(i + 1) % len(order)] for i, prompt in enumerate(order)}


def char_budget(max_chars: int) -> Callable[[str], str]:
    return (lambda text: text[:max_chars]) if max_chars > 0 else (lambda text: text)


def tokens_allowed(max_tokens: int, context_tokens: int, prompt_tokens: int) -> int:
    """The token budget of one row's privileged text: `max_tokens` (0 = none), and with `context_tokens` C > 0 at most
    C − prompt_tokens − 300 but at least 128 (METHOD §9: min(3072, 4096 − |prompt| − 300), at least 128)."""
    if context_tokens <= 0:
        return max_tokens
    bound = context_tokens - prompt_tokens - CONTEXT_RESERVE_TOKENS
    return max(min(max_tokens, bound) if max_tokens > 0 else bound, MIN_PRIVILEGED_TOKENS)


def token_budget(tokenizer, max_tokens: int, context_tokens: int = 0, keep_head: float = 1.0
                 ) -> Callable[..., str]:
    """cut(text, prompt_tokens=0): a text over its budget (`tokens_allowed`) as its first ⌊budget·keep_head⌋ tokens
    plus, when keep_head < 1, its last budget − ⌊budget·keep_head⌋, joined by "\n...\n"; cut at token offsets of
    the original text (so no re-tokenized spacing)."""

    def cut(text: str, prompt_tokens: int = 0) -> str:
        budget = tokens_allowed(max_tokens, context_tokens, prompt_tokens)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        if budget <= 0 or len(offsets) <= budget:
            return text
        head = int(budget * keep_head)
        tail = budget - head
        head_text = text[: offsets[head - 1][1]] if head else ""
        return head_text if tail == 0 else head_text + ELISION + text[offsets[len(offsets) - tail][0]:]

    return cut


def cut_after_boxed(text: str, gold: str | None, verified: str | None) -> str:
    """The text up to the end of its last `\boxed{}` whose content is the gold answer, else of the last one whose
    content is `verified` (the answer the checker found equal to the gold); the text unchanged when neither occurs
    (METHOD §9)."""
    spans = answers.boxed_spans(text)
    for wanted in (gold, verified):
        ends = [end for content, end in spans if wanted is not None and content == wanted.strip()]
        if ends:
            return text[: ends[-1]]
    return text


def privileged_contexts(prompt_ids: Sequence[str], sample_idxs: Sequence[int], correct: Sequence[bool],
                        responses: Sequence[str], solutions: Sequence[str | None], *, seed: int,
                        budget: Callable[..., str], other: bool = False, fallback: str = "reference",
                        prompt_lengths: Sequence[int] | None = None,
                        boxed_answers: Sequence[tuple[str | None, str | None]] | None = None
                        ) -> list[tuple[str | None, str, int | None]]:
    """(privileged_text, privileged_source, peer_sample_idx) of each row, METHOD §4, or from another problem with
    `other`, or with `fallback` assessment as §9 (see the module docstring). With `prompt_lengths` the budget is
    called as budget(text, prompt tokens of the row); with `boxed_answers` ((gold, verified answer) per row) a
    peer's text is cut after its answer's `\boxed{}` first (`cut_after_boxed`)."""
    peers: dict[str, dict[int, str]] = defaultdict(dict)
    references: dict[str, str] = {}
    for row, (prompt_id, sample_idx, ok, text, solution) in enumerate(
            zip(prompt_ids, sample_idxs, correct, responses, solutions)):
        stripped = strip_think(text) if ok else ""
        if stripped and boxed_answers is not None:
            stripped = cut_after_boxed(stripped, *boxed_answers[row])
        if stripped:
            peers[prompt_id].setdefault(int(sample_idx), stripped)
        if solution is not None and strip_think(solution):
            references.setdefault(prompt_id, strip_think(solution))
    donors = donor_prompts(prompt_ids, seed) if other else {}
    prefix = "other_" if other else ""
    contexts = []
    for row, (prompt_id, sample_idx) in enumerate(zip(prompt_ids, sample_idxs)):
        cut = (lambda text: budget(text)) if prompt_lengths is None else \
            (lambda text, row=row: budget(text, prompt_lengths[row]))
        source_id = donors.get(prompt_id) if other else prompt_id
        group = peers.get(source_id, {})
        peer = pick_peer(seed, prompt_id, int(sample_idx), list(group), exclude_self=not other)
        if peer is not None:
            contexts.append((cut(group[peer]), prefix + "peer", None if other else peer))
        elif fallback == "assessment":
            contexts.append((None, "assessment", None))
        elif source_id in references:
            contexts.append((cut(references[source_id]), prefix + "reference", None))
        else:
            contexts.append((None, "none", None))
    return contexts


# --- rows ------------------------------------------------------------------------------------------------------

def _budget(config: VerifyConfig, loaded) -> Callable[..., str]:
    """budget(text, prompt_tokens): the character budget, then the token budget (when either token option is set)."""
    by_chars = char_budget(config.privileged_max_chars)
    if config.privileged_max_tokens <= 0 and config.privileged_context_tokens <= 0:
        return lambda text, prompt_tokens=0: by_chars(text)
    if loaded is not None:
        tokenizer = loaded.tokenizer
    else:
        from stages.lm.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(config.model))
    by_tokens = token_budget(tokenizer, config.privileged_max_tokens, config.privileged_context_tokens,
                             config.privileged_keep_head)
    return lambda text, prompt_tokens=0: by_tokens(by_chars(text), prompt_tokens)


def check_reward(spec: str) -> str:
    """Import the `--reward` function here, before any work; returns the folder relative names resolve from."""
    search = str(Path.cwd())
    try:
        reward_functions.load_function(spec, search)
    except Exception as exc:  # noqa: BLE001 - an import of user code can raise anything; one line names it
        raise InputError(f"--reward {spec}: cannot load it ({type(exc).__name__}: {exc})") from None
    return search


def report_reward_failures(spec: str, checks: Sequence) -> None:
    """A `--reward` function that failed on rows: the first failure with its traceback as a warning; RuntimeError
    (the stage fails, nothing is written) when it failed on every row, instead of a file of zero rewards."""
    failed = [(row, check) for row, check in enumerate(checks) if check.status in ("error", "timeout")]
    if not failed:
        return
    row, first = failed[0]
    log.warning("--reward %s failed on %d of %d rows; row %d: %s", spec, len(failed), len(checks), row, first.detail)
    if len(failed) == len(checks):
        raise RuntimeError(f"--reward {spec}: failed on every row ({first.detail.splitlines()[0]}); it must return "
                           "a finite number (the reward) or True/False for each row (the first failure is logged "
                           "above)")


def verify_table(table: pa.Table, config: VerifyConfig, loaded=None,
                 on_progress: Callable[[int, int], None] | None = None) -> tuple[pa.Table, dict]:
    """Rollouts `table` → (VERIFIED table, stats): answer checks, group statistics and privileged contexts.

    The library entry of `run` and `stages.eval`; `loaded` lends its tokenizer to `privileged_max_tokens`. stats:
    status and failure-kind counts, rows, groups, reward_mean, privileged_source_counts, checks_s, verifier (the
    versions of `answers.VERIFIER_PACKAGES`).
    """
    fallbacks = answers.parse_fallbacks(config.fallbacks)
    search = check_reward(config.reward) if config.reward is not None else None
    table = schemas.conform(table, schemas.ROLLOUTS)
    budget = _budget(config, loaded)

    # --- answers
    responses = table.column("response_text").to_pylist()
    limits = dict(fallbacks=fallbacks, timeout=config.timeout, workers=config.workers,
                  memory_mb=config.worker_memory_mb, on_progress=on_progress)
    if config.reward is None:
        checks = answers.check_answers(responses, table.column("answer").to_pylist(),
                                       max_answer_chars=config.max_answer_chars, **limits)
    else:
        checks = answers.check_with_reward(table.to_pylist(), config.reward, search, **limits)
    if config.reward is not None:
        report_reward_failures(config.reward, checks)
    rewards = [check.reward for check in checks]

    # --- groups and privileged context
    prompt_ids = table.column("prompt_id").to_pylist()
    sizes, means = group_stats(prompt_ids, rewards)
    boxed = list(zip(table.column("answer").to_pylist(), [c.extracted_answer for c in checks])) \
        if config.privileged_cut_boxed else None
    contexts = privileged_contexts(prompt_ids, table.column("sample_idx").to_pylist(),
                                   [check.correct for check in checks], responses,
                                   table.column("solution").to_pylist(), seed=config.seed, budget=budget,
                                   other=config.privileged_from == "other", fallback=config.privileged_fallback,
                                   prompt_lengths=[len(ids) for ids in table.column("prompt_token_ids").to_pylist()],
                                   boxed_answers=boxed)

    # --- columns
    columns = {
        "extracted_answer": pa.array([c.extracted_answer for c in checks], pa.string()),
        "reward": pa.array(rewards, pa.float32()),
        "correct": pa.array([c.correct for c in checks], pa.bool_()),
        "verify_status": pa.array([c.status for c in checks], pa.string()),
        "group_size": pa.array(sizes, pa.int32()),
        "group_mean_reward": pa.array(means, pa.float32()),
        "privileged_text": pa.array([c[0] for c in contexts], pa.string()),
        "privileged_source": pa.array([c[1] for c in contexts], pa.string()),
        "peer_sample_idx": pa.array([c[2] for c in contexts], pa.int32()),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    stats = {
        **answers.summarize(checks),
        "rows": table.num_rows,
        "groups": len(set(prompt_ids)),
        "reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
        "privileged_source_counts": dict(Counter(c[1] for c in contexts)),
        "checks_s": round(sum(c.seconds for c in checks), 3),
        "reward_function": config.reward or "math-verify",
        "verifier": answers.verifier_versions(),  # the grader's versions: a grader upgrade moves scores
    }
    return table, stats


