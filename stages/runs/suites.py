"""Evaluation suites: named sets of benchmarks with their sampling protocol (`antisd eval --suite NAME`, the loop's
`loop.eval_suite`), the layout of a suite's folder, and the suite summary.

Suites (the paper: arXiv 2605.11609; the authors' launcher `recipe/antisd/_launchers/launch_short.sh`, METHOD §9):
- `paper`: the paper's table: AIME 2024, AIME 2025, AIME 2026 and HMMT February 2025 at avg@32, MinervaMath at
  avg@4, temperature 0.7, top-p 0.95, up to 32,768 new tokens (the launcher's `val_kwargs.response_length`).
- `aime25-check`: the authors' in-training check, AIME 2025 mean@4 (`val_kwargs.n=4`, every `test_freq=10` steps),
  with the paper's sampling (the launcher takes its validation temperature from a config file the vendored copy
  lacks, and verl's own default is greedy, so the paper's evaluation protocol stands in).
Options override a suite's protocol: n for every benchmark or per benchmark, temperature, top-p, max tokens.

A suite folder holds, per benchmark, `<benchmark>.parquet` (verified rows, one per sample) and
`<benchmark>.summary.json` (as `antisd eval --benchmark` writes them), `<benchmark>/part-I-of-N.parquet` for a
sharded run, and `summary.json`, written last: each benchmark's avg@n with its 95% bootstrap interval over problems,
and the suite average (the unweighted mean of the benchmarks' avg@n) with a stratified bootstrap interval.
This module samples nothing (`stages.eval` does).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from stages.common.errors import InputError
from stages.common.io import (
    atomic_write_json,
    build_metadata,
    read_artifact,
    read_json_object,
    read_metadata,
    write_artifact,
)
from stages.common.parts import PART_RE, Shard, missing_shards, part_files
from stages.method import estimators
from stages.verifier import scores

SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class Protocol:
    """How a benchmark is sampled: samples per problem and the sampling settings."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int


DEFAULT_PROTOCOL = Protocol(n=4, temperature=0.7, top_p=0.95, max_new_tokens=512)  # `antisd eval --benchmark`


@dataclass(frozen=True)
class Suite:
    """Benchmarks (name, samples per problem) evaluated with one sampling protocol."""

    name: str
    benchmarks: tuple[tuple[str, int], ...]
    temperature: float
    top_p: float
    max_new_tokens: int
    description: str

    def protocol(self, benchmark: str) -> Protocol:
        return Protocol(dict(self.benchmarks)[benchmark], self.temperature, self.top_p, self.max_new_tokens)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.benchmarks)


PAPER_LENGTH = 32768
SUITES = {
    "paper": Suite("paper", (("aime24", 32), ("aime25", 32), ("aime26", 32), ("hmmt_feb25", 32), ("minervamath", 4)),
                   0.7, 0.95, PAPER_LENGTH, "the paper's table: AIME24/25/26, HMMT Feb 2025 avg@32, MinervaMath avg@4"),
    "aime25-check": Suite("aime25-check", (("aime25", 4),), 0.7, 0.95, PAPER_LENGTH,
                          "the authors' in-training check: AIME 2025 mean@4"),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise InputError(f"--suite {name}: no such suite (known: {', '.join(SUITES)})")
    return SUITES[name]


def parse_suite_n(text: str, suite: Suite | None) -> dict[str, int]:
    """`aime24=8,minervamath=2` → {benchmark: n}; every name must be a benchmark of `suite`, every n >= 1."""
    found: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        match = re.fullmatch(r"([a-z0-9_]+)\s*=\s*(\d+)", item)
        if not match or int(match[2]) < 1:
            raise ValueError(f"expected BENCHMARK=N (N >= 1), comma separated, got {item!r}")
        if suite is None or match[1] not in suite.names:
            known = ", ".join(suite.names) if suite else "none without --suite"
            raise ValueError(f"{match[1]} is not a benchmark of the suite (its benchmarks: {known})")
        found[match[1]] = int(match[2])
    return found


def protocol_for(suite: Suite | None, benchmark: str | None, *, n: int | None = None, suite_n: str = "",
                 temperature: float | None = None, top_p: float | None = None,
                 max_new_tokens: int | None = None) -> Protocol:
    """The protocol of `benchmark`: the suite's (or DEFAULT_PROTOCOL without a suite), each option given replacing
    its value; `suite_n`'s entry for the benchmark wins over `n`."""
    base = suite.protocol(benchmark) if suite is not None else DEFAULT_PROTOCOL
    per_benchmark = parse_suite_n(suite_n, suite).get(benchmark) if suite_n else None
    return Protocol(per_benchmark or n or base.n, base.temperature if temperature is None else temperature,
                    base.top_p if top_p is None else top_p, max_new_tokens or base.max_new_tokens)


def rows_path(folder: str | Path, benchmark: str) -> Path:
    """Where a suite folder keeps `benchmark`'s rows (its summary goes beside it, `<benchmark>.summary.json`)."""
    return Path(folder) / f"{benchmark}.parquet"


def summary_path(out: str | Path) -> Path:
    """Where the summary of rows file `out` goes: `<out stem>.summary.json` next to it."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


def suite_folder(prefix: str | Path, suite: str) -> Path:
    """The folder of suite `suite` evaluated under `prefix` (e.g. RUN/step_XXXX/eval): `RUN/step_XXXX/eval-paper`."""
    return Path(f"{prefix}-{suite}")


def prompts_table(name: str) -> pa.Table:
    """The test problems of every benchmark of suite `name`, one prompts table (`dataset` = the benchmark)."""
    from stages.lm.datasets import DataSource
    from stages.lm.datasets import prompts_table as prepared

    return pa.concat_tables([prepared(DataSource(name=benchmark, split="test"))
                             for benchmark in get_suite(name).names])


def suite_summary(suite: Suite, summaries: dict[str, dict], *, seed: int, resamples: int) -> dict:
    """The suite summary from each benchmark's eval summary (needs `correct_per_problem` and `n` in each).

    average = (1/B)·Σ_b avg@n_b; its interval resamples each benchmark's problems within that benchmark
    (`estimators.stratified_bootstrap_interval`, seeded by `seed`).
    """
    per_benchmark, accuracies = {}, []
    for name in suite.names:
        summary = summaries[name]
        accuracies.append([c / summary["n"] for c in summary["correct_per_problem"].values()])
        per_benchmark[name] = benchmark_entry(summary, summary_path(rows_path("", name)).name)
    low, high = estimators.stratified_bootstrap_interval(accuracies, seed=seed, resamples=resamples)
    first = summaries[suite.names[0]]
    return {
        "suite": suite.name,
        "benchmarks": list(suite.names),
        "average": sum(entry["accuracy"] for entry in per_benchmark.values()) / len(per_benchmark),
        "average_ci_low": low,
        "average_ci_high": high,
        "per_benchmark": per_benchmark,
        "model": first["model"],
        "sampling": {name: summaries[name]["sampling"] for name in suite.names},
        "verifier": first.get("verifier"),
    }


def benchmark_entry(summary: dict, file: str) -> dict:
    """A benchmark's entry in a suite summary, from its eval summary (found at `file`, a name beside the suite's)."""
    n = summary["n"]
    return {"n": n, "problems": summary["problems"], f"avg@{n}": summary["accuracy"], "accuracy": summary["accuracy"],
            "accuracy_ci_low": summary["accuracy_ci_low"], "accuracy_ci_high": summary["accuracy_ci_high"],
            "truncated_frac": summary.get("truncated_frac"), "file": file}


def loop_metrics(summary: dict) -> dict:
    """The numbers the loop logs as `eval/<key>`: `accuracy` (= the suite average, so held-out curves read the same
    with or without a suite), `average`, and `<benchmark>/accuracy`, `<benchmark>/avg@n` of each benchmark."""
    metrics = {"accuracy": summary["average"], "average": summary["average"]}
    for name, entry in summary["per_benchmark"].items():
        metrics[f"{name}/accuracy"] = entry["accuracy"]
        metrics[f"{name}/avg@{entry['n']}"] = entry["accuracy"]
    return metrics


# --- running a suite folder (sampling is the caller's `evaluate`) --------------------------------------------------

@dataclass(frozen=True)
class BenchmarkJob:
    """One benchmark of a suite run: its problems, their label, and its stage configs for an output path."""

    name: str
    rows: list[dict]
    label: str  # e.g. aime25/test
    configs: Callable[[str], tuple]  # out (a rows file, or a parts folder) → (RolloutConfig, VerifyConfig)


# evaluate(rows, rollout_config, verify_config, *, out, benchmark, seed, resamples) → summary, writing out and its
# summary: `stages.eval`'s evaluation, passed in (a sub-package never imports a command)
Evaluate = Callable[..., dict]


def evaluate_suite(suite: Suite, jobs: list[BenchmarkJob], folder: Path, *, evaluate: Evaluate, model_path: str,
                   seed: int, resamples: int, shard: Shard = Shard(), overwrite: bool = False) -> dict | None:
    """Evaluate (or resume) every benchmark of `suite` into `folder` and write its summary.json; return it.

    A benchmark whose summary exists is read back, after a check that it was made with the same sampling, model and
    problems (InputError naming the file otherwise; all checked before any sampling). With a shard, only this
    shard's part of each benchmark is written and None is returned; an unsharded run over a folder of parts samples
    the missing shards, merges the parts (rows in problem order) and summarizes them.
    """
    for job in jobs:
        if not job.rows:
            raise InputError(f"{job.label}: no problems to evaluate (a run's held-out file made for another "
                             "evaluation holds none of this suite's benchmarks)")
        if shard.count > len(job.rows):
            raise InputError(f"--shard {shard.index}/{shard.count}: {job.name} has only {len(job.rows)} problems")
        if not overwrite:
            _stored(job, folder, model_path)
    common = dict(evaluate=evaluate, model_path=model_path, seed=seed, resamples=resamples, overwrite=overwrite)
    if not shard.is_whole:
        for job in jobs:
            _evaluate_part(job, folder, shard, **common)
        return None
    summaries = {job.name: _benchmark(job, folder, **common) for job in jobs}
    summary = suite_summary(suite, summaries, seed=seed, resamples=resamples)
    atomic_write_json(Path(folder) / SUMMARY_NAME, summary)
    return summary


def _benchmark(job: BenchmarkJob, folder: Path, *, evaluate, model_path, seed, resamples, overwrite) -> dict:
    out = rows_path(folder, job.name)
    stored = None if overwrite else _stored(job, folder, model_path)
    if stored is not None:
        return stored
    parts = Path(folder) / job.name
    count = _part_count(parts)
    if count is None or overwrite:
        return evaluate(job.rows, *job.configs(str(out)), out=out, benchmark=job.label, seed=seed,
                        resamples=resamples)
    for index in missing_shards(parts, count):
        _evaluate_part(job, folder, Shard(index, count), evaluate=evaluate, model_path=model_path, seed=seed,
                       resamples=resamples, overwrite=False)
    table, _ = read_artifact(parts, "verified")  # complete, one config, disjoint problems (stages.common.parts)
    order = {row["prompt_id"]: i for i, row in enumerate(job.rows)}  # the unsharded run's row order
    ids, samples = table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()
    table = table.take(sorted(range(table.num_rows), key=lambda i: (order[ids[i]], samples[i])))
    metadata = [read_metadata(part) for part in part_files(parts)]
    summary = scores.merged_summary([m["eval"] for m in metadata], table, seed=seed, resamples=resamples)
    rollout_config, verify_config = job.configs(str(parts))
    write_artifact(table, out, "verified", build_metadata(
        "verified", {"rollout": rollout_config, "verify": verify_config}, eval=summary, chat=metadata[0].get("chat"),
        verifier=summary["verifier"], merged_from={"directory": str(parts), "count": count}))
    atomic_write_json(summary_path(out), summary)
    return summary


def _evaluate_part(job: BenchmarkJob, folder: Path, shard: Shard, *, evaluate, model_path, seed, resamples,
                   overwrite) -> None:
    parts = Path(folder) / job.name
    part = parts / shard.part_name()
    rows = [job.rows[i] for i in shard.select([row["prompt_id"] for row in job.rows])]
    if not overwrite and summary_path(rows_path(folder, job.name)).exists():
        return  # the whole benchmark is done (checked by `_stored`)
    if part.exists() and not overwrite:
        _check_same(part, read_metadata(part).get("eval", {}), job, model_path, len(rows))
        return
    parts.mkdir(exist_ok=True)
    evaluate(rows, *job.configs(str(parts)), out=part, benchmark=job.label, seed=seed, resamples=resamples)


def _part_count(parts: Path) -> int | None:
    """N of the part files in `parts` (None when it holds none or does not exist); InputError for several N."""
    counts = {int(PART_RE.match(p.name).group(2)) for p in parts.iterdir() if PART_RE.match(p.name)} \
        if parts.is_dir() else set()
    if len(counts) > 1:
        raise InputError(f"{parts}: part files of {len(counts)} shard counts ({sorted(counts)}); remove the folder "
                         "or finish the shards of one count")
    return counts.pop() if counts else None


def _stored(job: BenchmarkJob, folder: Path, model_path: str) -> dict | None:
    """The stored summary of `job` in `folder` (checked to match it), else None; parts found are checked too."""
    out = rows_path(folder, job.name)
    if out.exists() and summary_path(out).exists():
        summary = read_json_object(summary_path(out))
        _check_same(summary_path(out), summary, job, model_path, len(job.rows))
        return summary
    parts = Path(folder) / job.name
    count = _part_count(parts)
    if count is not None:
        for index in range(count):
            part = parts / Shard(index, count).part_name()
            if part.exists():
                shard_rows = len(Shard(index, count).select([row["prompt_id"] for row in job.rows]))
                _check_same(part, read_metadata(part).get("eval", {}), job, model_path, shard_rows)
    return None


def _check_same(path: Path, summary: dict, job: BenchmarkJob, model_path: str, problems: int) -> None:
    """InputError naming `path` when its summary was made with other sampling, model or problems than `job`."""
    from stages.lm.engine import SamplingSettings

    rollout_config, _ = job.configs(str(path))
    expected = {"sampling": asdict(SamplingSettings.from_config(rollout_config)), "model": str(model_path),
                "problems": problems, "benchmark": job.label}
    changed = [f"{key} {summary.get(key)!r}, now {value!r}" for key, value in expected.items()
               if summary.get(key) != value]
    if changed:
        raise InputError(f"{path}: made with another {'; '.join(changed)} (use another --out, or --overwrite)")
