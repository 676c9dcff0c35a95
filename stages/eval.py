"""`antisd eval`: sample K responses per benchmark problem, verify them, report avg@K, pass@k, maj@K and more.

Pipeline: prompts (a built-in benchmark through `stages.data.build_rows`, or a prompts Parquet) → samples from
`stages.lm.sampling.sample` (same engines and per-sample seeds as `antisd rollout`) → verified by
`stages.verifier.rows.verify_table` (same extraction, sandbox and settings as `antisd verify`) → metrics from the pure
functions of `stages.method.estimators`.

Outputs, both written atomically, the rows first and the summary last (so an existing summary implies complete rows):
- `OUT` (e.g. `eval.parquet`): one row per sample with the schemas.VERIFIED columns, artifact "verified", so
  `inspect`, `analyze` and `score` read it. The columns come from `stages.verifier.rows.verify_table`, as in
  `antisd verify`, privileged contexts (METHOD §4) included. The metadata holds the config and summary.
- `<OUT stem>.summary.json` (e.g. `eval.summary.json`): flat metrics plus the run's description.

Metrics (n = samples per problem, c = correct ones): `accuracy` = `avg@n` (mean of c/n over problems) with a 95%
percentile-bootstrap interval over problems (`accuracy_ci_low/high`, seeded by `--seed`); `pass@k` (unbiased) for
k = 1, 2, 4, … < n and n; `maj@n` (majority vote; answers grouped by `vote_key`, a whitespace/LaTeX-spacing
normalized string, so ``0.5`` and ``\\frac{1}{2}`` vote separately; no-answer samples do not vote; ties go to the
answer seen first); `length_mean` (response tokens, EOS included); `truncated_frac` (finish_reason "length");
`no_answer_frac`. With temperature 0 (greedy) top-p is forced to 1.

`evaluate_for_loop` is the entry `antisd loop` calls for its held-out evaluation; it resumes by returning the stored
summary when both files exist. This module does no sampling or answer checking of its own.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from stages.common import validation
from stages.common.errors import InputError
from stages.common.io import atomic_write_json, build_metadata, check_output, output_lock, read_artifact, write_artifact
from stages.lm.datasets import SPLITS
from stages.lm.models import DEFAULT_MODEL
from stages.lm.prompts import INSTRUCTION
from stages.method import estimators
from stages.verifier.answers import DEFAULT_FALLBACKS

log = logging.getLogger(__name__)

BENCHMARKS = ("arith", "gsm8k", "math500", "aime24", "amc23")


@dataclass(frozen=True)
class EvalConfig:
    """Options of `antisd eval` (each is the kebab-case CLI option of the same name)."""

    benchmark: str  # arith | gsm8k | math500 | aime24 | amc23, or a prompts Parquet file
    out: str  # per-sample rows (Parquet); the summary goes to <out stem>.summary.json
    model: str = DEFAULT_MODEL  # HF folder or embedded model name
    n: int = 4  # samples per problem (K of avg@K, maj@K)
    temperature: float = 0.7  # 0 = greedy (top-p then forced to 1)
    top_p: float = 0.95  # nucleus sampling mass, in (0, 1]
    max_new_tokens: int = 512  # response length cap; hitting it counts as truncated
    num: int = 0  # evaluate the first N problems (0 = all)
    split: str = "test"  # arith and gsm8k: train | test (the other benchmarks have only test)
    seed: int = 0  # sampling seed and bootstrap seed
    engine: str = "auto"  # auto (vllm when importable, else hf) | vllm | hf
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU
    threads: int = 0  # torch CPU threads (0 = OMP_NUM_THREADS if set, else the cores this process may use)
    batch_size: int = 0  # rows per engine call (0 = engine default)
    device: str = "auto"  # HF engine device: auto | cpu | cuda
    system_prompt: str | None = None  # as rollout's: a system turn before the problem
    thinking: str = "default"  # as rollout's: the chat template's enable_thinking (default | on | off)
    chat_template: str | None = None  # as rollout's: None (the tokenizer's) | plain | a Jinja file
    answer_instruction: str = INSTRUCTION  # as rollout's: appended to every problem ("" = none)
    prompt_template: str | None = None  # as rollout's: a YAML file of the four above (each set here overrides it)
    workers: int = 2  # answer-check worker processes
    timeout: float = 5.0  # seconds per answer check
    fallbacks: str = DEFAULT_FALLBACKS  # answer extraction fallbacks after \boxed{} (see `antisd verify`)
    bootstrap_resamples: int = 1000  # resamples of the avg@K interval
    progress: bool = True  # progress bar on stderr (only on a terminal)
    overwrite: bool = False  # replace existing outputs

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "n", "bootstrap_resamples")
        check.at_least(0, "num")
        check.choice("split", SPLITS)
        check.absorb(lambda: _rollout_config(self))  # rollout's and verify's rules, under eval's option names
        check.absorb(lambda: _verify_config(self))
        check.done()


def summary_path(out: str | Path) -> Path:
    """Where the summary of rows file `out` goes: `<out stem>.summary.json` next to it."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


# --- pure decisions and metrics --------------------------------------------------------------------------------

_LATEX_SPACING_RE = re.compile(r"\\left|\\right|\\[,;:! ]|\s+")


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
    """Flat metrics of a verified table (see the module docstring); pure apart from reading the table's columns."""
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
    return metrics


def numeric(summary: dict) -> dict:
    """The flat numeric metrics of a summary (what the loop logs as eval/<key>)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --- stage -----------------------------------------------------------------------------------------------------

def prompt_rows(benchmark: str, split: str, num: int) -> tuple[list[dict], str]:
    """The problems of `benchmark` (a built-in name or a prompts Parquet), first `num` kept; and a label for them."""
    from stages.lm.datasets import PrepareConfig, build_rows
    from stages.lm.sampling import PROMPT_COLUMNS

    if num < 0:
        raise InputError(f"--num must be >= 0, got {num}")
    if benchmark in BENCHMARKS:
        rows = build_rows(PrepareConfig(name=benchmark, out="", split=split, num=num))
        return rows, f"{benchmark}/{split}"
    path = Path(benchmark)
    if not path.exists():
        raise InputError(f"--benchmark {benchmark}: not a built-in benchmark ({', '.join(BENCHMARKS)}) "
                         "and no such prompts file")
    table, _ = read_artifact(path, "prompts")
    rows = table.select(PROMPT_COLUMNS).to_pylist()
    return (rows[:num] if num else rows), str(path)


def _evaluate(rows: list[dict], rollout_config, verify_config, *, out: Path, benchmark: str, seed: int,
              resamples: int, loaded=None) -> dict:
    """Sample, verify, summarize and write rows + summary; return the summary. Shared by `run` and the loop."""
    from stages.common.process import set_threads
    from stages.lm.engine import SamplingSettings, is_engine, resolve_engine
    from stages.lm.models import resolve_model
    from stages.lm.prompts import ChatOptions
    from stages.lm.sampling import open_engine, sample
    from stages.verifier.rows import verify_table

    engine_given = loaded is not None and is_engine(loaded)
    engine_name = loaded.name if engine_given else resolve_engine(rollout_config.engine)
    model_path = (loaded.model_path if engine_given else loaded.path) if loaded is not None \
        else resolve_model(rollout_config.model)
    threads = set_threads(rollout_config.threads)
    log.info("eval %s: %d problems × %d samples, temperature %g, top-p %g, max %d tokens, engine %s, model %s",
             benchmark, len(rows), rollout_config.n, rollout_config.temperature, rollout_config.top_p,
             rollout_config.max_new_tokens, engine_name, model_path)

    # --- sample
    started = time.perf_counter()
    chat = ChatOptions.from_knobs(rollout_config)
    engine = loaded if engine_given else open_engine(engine_name, rollout_config, Path(model_path), rows, loaded)
    try:
        rollouts, sample_stats = sample(engine, rows, SamplingSettings.from_config(rollout_config),
                                                batch_size=rollout_config.batch_size,
                                                progress=rollout_config.progress, chat=chat)
    finally:
        if not engine_given:  # the loop's engine stays open for its next rollout
            engine.close()

    # --- verify and summarize
    table, verify_stats = verify_table(rollouts, verify_config, engine)  # lends its tokenizer
    metrics = summarize(table, seed=seed, resamples=resamples)
    wall_s = time.perf_counter() - started
    summary = {
        **metrics,
        "tokens_per_s": sample_stats["tokens_per_s"],
        "wall_s": round(wall_s, 3),
        "benchmark": benchmark,
        "model": str(model_path),
        "model_revision": engine.revision,
        "engine": engine.name,
        "dtype": engine.dtype_name,
        "threads": threads,
        "sampling": asdict(SamplingSettings.from_config(rollout_config)),
        "verify_status_counts": verify_stats["status_counts"],
    }

    # --- write: rows first, summary last (its presence marks a finished eval)
    metadata = build_metadata("verified", {"rollout": rollout_config, "verify": verify_config}, eval=summary,
                              chat=chat.record())
    write_artifact(table, out, "verified", metadata)
    atomic_write_json(summary_path(out), summary)
    log.info("eval %s: accuracy %.4f [%.4f, %.4f], pass@1 %.4f, length %.1f, truncated %.3f → %s", benchmark,
             metrics["accuracy"], metrics["accuracy_ci_low"], metrics["accuracy_ci_high"], metrics["pass@1"],
             metrics["length_mean"], metrics["truncated_frac"], out)
    return summary


def _rollout_config(config: EvalConfig):
    from stages.lm.sampling import RolloutConfig

    greedy = config.temperature == 0
    return RolloutConfig(
        prompts=config.benchmark, out=config.out, model=config.model, n=config.n, temperature=config.temperature,
        top_p=1.0 if greedy else config.top_p, max_new_tokens=config.max_new_tokens, seed=config.seed,
        engine=config.engine, dtype=config.dtype, threads=config.threads, batch_size=config.batch_size,
        device=config.device, system_prompt=config.system_prompt, thinking=config.thinking,
        chat_template=config.chat_template, answer_instruction=config.answer_instruction,
        prompt_template=config.prompt_template, progress=config.progress, overwrite=True)


def _verify_config(config: EvalConfig):
    from stages.verifier.rows import VerifyConfig

    return VerifyConfig(rollouts=config.benchmark, out=config.out, seed=config.seed, workers=config.workers,
                        timeout=config.timeout, fallbacks=config.fallbacks, overwrite=True)


def run(config: EvalConfig, loaded=None) -> Path:
    """Validate, prepare prompts, sample, verify, write rows and summary; return the rows path."""
    # --- validate everything before any work (the options were checked when `config` was made)
    out = check_output(config.out, config.overwrite)
    check_output(summary_path(out), config.overwrite)
    with output_lock(out):
        rollout_config, verify_config = _rollout_config(config), _verify_config(config)
        rows, benchmark = prompt_rows(config.benchmark, config.split, config.num)
        log.debug("eval config: %s", asdict(config))
        _evaluate(rows, rollout_config, verify_config, out=out, benchmark=benchmark, seed=config.seed,
                  resamples=config.bootstrap_resamples, loaded=loaded)
        return out


def stored_summary(out_prefix: str) -> dict | None:
    """The numeric metrics of a finished loop evaluation at `out_prefix` (rows and summary both written), else None."""
    out = Path(f"{out_prefix}.parquet")
    stored = summary_path(out)
    if out.exists() and stored.exists():
        return numeric(json.loads(stored.read_text()))
    return None


def evaluate_for_loop(*, model: str, prompts: str, out_prefix: str, n: int, temperature: float,
                      max_new_tokens: int, seed: int, rollout_knobs: dict, verify_knobs: dict, loaded=None) -> dict:
    """The loop's held-out evaluation: write `<out_prefix>.parquet` + `.summary.json`, return the numeric metrics.

    `rollout_knobs`/`verify_knobs` are the run config's rollout/verify sections (RolloutConfig/VerifyConfig keyword
    arguments without paths); n, temperature, max_new_tokens and seed override them, and top-p is 1 when greedy.
    `loaded` is what samples: a LoadedModel (HF engine) or an open engine the loop keeps (its vLLM engine, holding
    `model`'s weights: no HF copy of the policy is loaded, and the engine is left open). When both outputs exist (a
    resumed run) the stored summary is returned without sampling.
    """
    from stages.lm.sampling import RolloutConfig
    from stages.verifier.rows import VerifyConfig

    out = Path(f"{out_prefix}.parquet")
    stored = stored_summary(out_prefix)
    if stored is not None:
        return stored
    overrides = {"n": n, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    if temperature == 0:
        overrides["top_p"] = 1.0
    rollout_config = RolloutConfig(**{**rollout_knobs, **overrides, "model": model, "prompts": str(prompts),
                                      "out": str(out), "overwrite": True})
    verify_config = VerifyConfig(**{**verify_knobs, "rollouts": str(prompts), "out": str(out), "seed": seed,
                                    "overwrite": True})
    rows, benchmark = prompt_rows(str(prompts), "test", 0)
    summary = _evaluate(rows, rollout_config, verify_config, out=out, benchmark=benchmark, seed=seed,
                        resamples=EvalConfig.bootstrap_resamples, loaded=loaded)
    return numeric(summary)


# --- report ----------------------------------------------------------------------------------------------------

def render(summary: dict, console) -> None:
    """Print the summary as a rich table (metric, value) on `console`."""
    from rich.table import Table

    n = summary["n"]
    title = (f"{summary['benchmark']} · {Path(str(summary['model'])).name} · {summary['problems']} problems × {n} "
             f"samples (T={summary['sampling']['temperature']:g}, top-p={summary['sampling']['top_p']:g})")
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"avg@{n}", f"{summary['accuracy']:.4f}  95% CI [{summary['accuracy_ci_low']:.4f}, "
                              f"{summary['accuracy_ci_high']:.4f}]")
    for k in estimators.k_values(n):
        table.add_row(f"pass@{k}", f"{summary[f'pass@{k}']:.4f}")
    table.add_row(f"maj@{n}", f"{summary[f'maj@{n}']:.4f}")
    table.add_row("correct / samples", f"{summary['correct']} / {summary['samples']}")
    table.add_row("mean response length", f"{summary['length_mean']:.1f} tokens")
    table.add_row("truncated", f"{summary['truncated_frac']:.3f}")
    table.add_row("no answer", f"{summary['no_answer_frac']:.3f}")
    table.add_row("tokens/s", f"{summary['tokens_per_s']:.1f}")
    console.print(table)
