"""The scores of a verified table, as `antisd eval` reports them (its module docstring defines each): avg@K with a
95% bootstrap interval over problems, pass@k, maj@K (votes grouped by a textual key), mean length, truncated and
no-answer fractions, and each problem's count of correct samples (`correct_per_problem`, from which pass@k for any
k ≤ n is recomputed without the rows). Also the summary of a table sampled in shards, from its parts' summaries.

Pure apart from reading the table's columns; the formulas are `stages.method.estimators`'. This module samples and
checks nothing.
"""

from __future__ import annotations

import re

import pyarrow as pa

from stages.method import comparison, estimators

_LATEX_SPACING_RE = re.compile(r"\\left|\\right|\\[,;:! ]|\s+")
RUN_FACTS = ("benchmark", "model", "model_revision", "engine", "dtype", "threads", "sampling", "verifier")


def vote_key(answer: str | None) -> str | None:
    """The maj@K grouping key of an extracted answer: spacing removed, `dfrac`/`tfrac` → `frac`, outer `$`/`.` cut.

    Deliberately only textual: equivalent answers written differently (``0.5`` vs ``\\frac{1}{2}``) are separate
    votes. None (no answer) stays None and does not vote.
    """
    if answer is None:
        return None
    key = _LATEX_SPACING_RE.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    key = key.strip("$").rstrip(".")
    return key or None


def group_by_problem(prompt_ids: list[str], sample_idxs: list[int]) -> list[list[int]]:
    """Row positions of each problem, problems in order of first appearance, samples by sample_idx."""
    groups: dict[str, list[int]] = {}
    for position, prompt_id in enumerate(prompt_ids):
        groups.setdefault(prompt_id, []).append(position)
    return [sorted(rows, key=lambda row: sample_idxs[row]) for rows in groups.values()]


def summarize(table: pa.Table, *, seed: int = 0, resamples: int = 1000) -> dict:
    """Flat metrics of a verified table (see `stages.eval`), plus `correct_per_problem` {prompt_id: c}."""
    column = {name: table.column(name).to_pylist() for name in
              ("prompt_id", "sample_idx", "correct", "extracted_answer", "response_length", "finish_reason",
               "verify_status")}
    groups = group_by_problem(column["prompt_id"], column["sample_idx"])
    correct = [[bool(column["correct"][row]) for row in rows] for rows in groups]
    keys = [[vote_key(column["extracted_answer"][row]) for row in rows] for rows in groups]
    sizes = [len(rows) for rows in groups]
    n = min(sizes)
    accuracies = estimators.problem_accuracies(correct)
    low, high = estimators.bootstrap_interval(accuracies, seed=seed, resamples=resamples)
    accuracy = sum(accuracies) / len(accuracies)
    samples = table.num_rows
    metrics = {
        "problems": len(groups),
        "samples": samples,
        "n": n,
        "correct": sum(sum(c) for c in correct),
        "accuracy": accuracy,
        f"avg@{n}": accuracy,
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
    }
    counts = [(size, sum(c)) for size, c in zip(sizes, correct)]
    for k in estimators.k_values(n):
        metrics[f"pass@{k}"] = estimators.mean_pass_at_k(counts, k)
    metrics[f"maj@{n}"] = estimators.maj_at_k(keys, correct)
    metrics["length_mean"] = sum(column["response_length"]) / samples
    metrics["truncated_frac"] = sum(reason == "length" for reason in column["finish_reason"]) / samples
    metrics["no_answer_frac"] = sum(status == "no_answer" for status in column["verify_status"]) / samples
    metrics["correct_per_problem"] = {column["prompt_id"][rows[0]]: sum(c) for rows, c in zip(groups, correct)}
    return metrics


def pass_at_k_values(summary: dict) -> dict[int, float]:
    """{k: pass@k} of an eval summary: every k = 1…n from its `correct_per_problem` counts when it has them
    (`comparison.pass_at_k_curve`, unbiased), else the values it stores, k = 1, 2, 4, …, n (older summaries)."""
    n, counts = summary["n"], summary.get("correct_per_problem")
    if counts:
        return dict(enumerate(comparison.pass_at_k_curve(list(counts.values()), n), start=1))
    return {k: summary[f"pass@{k}"] for k in estimators.k_values(n) if f"pass@{k}" in summary}


def numeric(summary: dict) -> dict:
    """The flat numeric metrics of a summary (what the loop logs as eval/<key>)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def merged_summary(part_summaries: list[dict], table: pa.Table, *, seed: int, resamples: int) -> dict:
    """The summary of the whole `table` sampled in parts: its metrics recomputed from all rows, the run facts of the
    first part (the parts were checked to share them), seconds and status counts summed, and the engine throughput
    over all parts (total response tokens ÷ total generate time)."""
    tokens = [part["length_mean"] * part["samples"] for part in part_summaries]
    seconds = sum(count / part["tokens_per_s"] for count, part in zip(tokens, part_summaries) if part["tokens_per_s"])
    statuses: dict[str, int] = {}
    for part in part_summaries:
        for status, count in part["verify_status_counts"].items():
            statuses[status] = statuses.get(status, 0) + count
    return {
        **summarize(table, seed=seed, resamples=resamples),
        **{key: part_summaries[0].get(key) for key in RUN_FACTS},
        "tokens_per_s": round(sum(tokens) / seconds, 2) if seconds else 0.0,
        "wall_s": round(sum(part["wall_s"] for part in part_summaries), 3),
        "verify_status_counts": statuses,
        "shards": len(part_summaries),
    }
