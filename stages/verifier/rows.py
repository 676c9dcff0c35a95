"""Verified rows (schemas.VERIFIED) from rollouts, every row kept: `VerifyConfig` (the options of `antisd verify`) and
`verify_table`, which `antisd verify` and `antisd eval` share.

Per row: the extracted final answer, reward R ∈ {0, 1}, `correct`, `verify_status` (ok | no_answer | timeout | error,
from `stages.verifier.answers.check_answers`, which runs every check in killable worker processes), the group statistics of
its prompt (rows sharing `prompt_id` in this file), and the privileged context of METHOD §4:
1. `peer`: a correct rollout of the same group other than this one, picked by a stable hash of
   (seed, prompt_id, sample_idx) (never Python's `hash()`), its `<think>…</think>` stripped; peers whose text is
   empty after stripping are skipped;
2. else `reference`: the prompt's reference `solution` (when not null or blank);
3. else `none` (privileged_text null: the score stage gives this rollout no teacher term).
The text is cut to its first `privileged_max_chars` characters, then (if `privileged_max_tokens` > 0) to its first
`privileged_max_tokens` tokens of `model`'s tokenizer, cut at a token boundary of the original text (the head is
kept: the text reads as a solution from its start). This module reads and writes no file (`stages.verify`) and builds no teacher prompt (`stages.lm.prompts`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import pyarrow as pa

import schemas
from stages.common import validation
from stages.lm.prompts import strip_think
from stages.verifier import answers


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
    model: str = "smollm2-135m"  # tokenizer for privileged_max_tokens (HF folder or embedded name); unused if 0
    overwrite: bool = False  # replace an existing output

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "workers", "max_answer_chars")
        check.above(0, "timeout")
        check.at_least(0, "worker_memory_mb", "privileged_max_chars", "privileged_max_tokens")
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


def pick_peer(seed: int, prompt_id: str, sample_idx: int, candidates: Sequence[int]) -> int | None:
    """Seeded choice among the correct peers' sample_idx, never `sample_idx` itself; None if there is none.

    The choice is sha256([seed, prompt_id, sample_idx]) mod the number of sorted candidates: stable across runs,
    processes and Python versions.
    """
    others = sorted(set(candidates) - {sample_idx})
    if not others:
        return None
    key = json.dumps([seed, prompt_id, sample_idx]).encode()
    return others[int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % len(others)]


def char_budget(max_chars: int) -> Callable[[str], str]:
    return (lambda text: text[:max_chars]) if max_chars > 0 else (lambda text: text)


def token_budget(tokenizer, max_tokens: int) -> Callable[[str], str]:
    """Keep the first `max_tokens` tokens of a text, cut at the end offset of the last kept token."""

    def cut(text: str) -> str:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        return text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]

    return cut


def privileged_contexts(prompt_ids: Sequence[str], sample_idxs: Sequence[int], correct: Sequence[bool],
                        responses: Sequence[str], solutions: Sequence[str | None], *, seed: int,
                        budget: Callable[[str], str]) -> list[tuple[str | None, str, int | None]]:
    """(privileged_text, privileged_source, peer_sample_idx) of each row, METHOD §4 (see the module docstring)."""
    peers: dict[str, dict[int, str]] = defaultdict(dict)
    for prompt_id, sample_idx, ok, text in zip(prompt_ids, sample_idxs, correct, responses):
        stripped = strip_think(text) if ok else ""
        if stripped:
            peers[prompt_id].setdefault(int(sample_idx), stripped)
    contexts = []
    for prompt_id, sample_idx, solution in zip(prompt_ids, sample_idxs, solutions):
        group = peers.get(prompt_id, {})
        peer = pick_peer(seed, prompt_id, int(sample_idx), list(group))
        if peer is not None:
            contexts.append((budget(group[peer]), "peer", peer))
        elif solution is not None and strip_think(solution):
            contexts.append((budget(strip_think(solution)), "reference", None))
        else:
            contexts.append((None, "none", None))
    return contexts


# --- rows ------------------------------------------------------------------------------------------------------

def _budget(config: VerifyConfig, loaded) -> Callable[[str], str]:
    by_chars = char_budget(config.privileged_max_chars)
    if config.privileged_max_tokens <= 0:
        return by_chars
    if loaded is not None:
        tokenizer = loaded.tokenizer
    else:
        from stages.lm.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(config.model))
    by_tokens = token_budget(tokenizer, config.privileged_max_tokens)
    return lambda text: by_tokens(by_chars(text))


def verify_table(table: pa.Table, config: VerifyConfig, loaded=None,
                 on_progress: Callable[[int, int], None] | None = None) -> tuple[pa.Table, dict]:
    """Rollouts `table` → (VERIFIED table, stats): answer checks, group statistics and privileged contexts.

    The library entry of `run` and `stages.eval`; `loaded` lends its tokenizer to `privileged_max_tokens`. stats:
    status and failure-kind counts, rows, groups, reward_mean, privileged_source_counts, checks_s.
    """
    fallbacks = answers.parse_fallbacks(config.fallbacks)
    table = schemas.conform(table, schemas.ROLLOUTS)
    budget = _budget(config, loaded)

    # --- answers
    responses = table.column("response_text").to_pylist()
    checks = answers.check_answers(responses, table.column("answer").to_pylist(), fallbacks=fallbacks,
                                   timeout=config.timeout, workers=config.workers,
                                   max_answer_chars=config.max_answer_chars, memory_mb=config.worker_memory_mb,
                                   on_progress=on_progress)
    rewards = [1.0 if check.correct else 0.0 for check in checks]

    # --- groups and privileged context
    prompt_ids = table.column("prompt_id").to_pylist()
    sizes, means = group_stats(prompt_ids, rewards)
    contexts = privileged_contexts(prompt_ids, table.column("sample_idx").to_pylist(),
                                   [check.correct for check in checks], responses,
                                   table.column("solution").to_pylist(), seed=config.seed, budget=budget)

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
    }
    return table, stats


