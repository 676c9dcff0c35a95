"""`antisd eval`: sample K responses per benchmark problem, verify them, report avg@K, pass@k, maj@K and more.

Pipeline: prompts (a built-in benchmark through `stages.data.build_rows`, or a prompts Parquet) → samples from
`stages.lm.sampling.sample` (same engines and per-sample seeds as `antisd rollout`) → verified by
`stages.verifier.rows.verify_table` (same extraction, sandbox and settings as `antisd verify`) → metrics
(`stages.verifier.scores`, over the pure functions of `stages.method.estimators`).

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

A suite (`--suite paper`, `stages.runs.suites`) evaluates several benchmarks, each with its own n, into a folder:
per benchmark the two files above (`<benchmark>.parquet`, `<benchmark>.summary.json`), then `summary.json` (each
avg@n with its interval and the average). A rerun skips each benchmark whose summary exists (same protocol and model,
else an error naming the file); with `--shard I/N` a run writes only `<benchmark>/part-I-of-N.parquet` files (the
problems dealt round-robin, samples seeded per problem, so the rows equal an unsharded run's), and a later unsharded
run samples any missing shards itself, then summarizes.

`evaluate_for_loop` is the entry `antisd loop` calls for its held-out evaluation (a prompts file, or a suite); it
resumes by returning the stored summary when the files exist. This module does no sampling or answer checking of its
own.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from functools import cache, partial
from pathlib import Path

from stages.common import validation
from stages.common.errors import InputError
from stages.common.io import atomic_write_json, build_metadata, check_output, output_lock, read_artifact, write_artifact
from stages.common.parts import Shard
from stages.lm import bundled
from stages.lm.datasets import SPLITS
from stages.lm.engine import SamplingSettings, is_engine, resolve_engine, sampled_path
from stages.lm.models import DEFAULT_MODEL, resolve_model
from stages.lm.sampling import RolloutConfig
from stages.method import estimators
from stages.runs import suites
from stages.runs.suites import summary_path
from stages.verifier.rows import VerifyConfig
from stages.verifier.scores import numeric, summarize, vote_key  # noqa: F401 - vote_key: part of eval's API

log = logging.getLogger(__name__)

BENCHMARKS = ("arith", *bundled.BENCHMARKS)


@dataclass(frozen=True)
class EvalConfig:
    """Options of `antisd eval` (each is the kebab-case CLI option of the same name)."""

    benchmark: str | None  # a built-in benchmark (BENCHMARKS) or a prompts Parquet file; None with `suite`
    out: str  # per-sample rows (Parquet), the summary beside them; with `suite` a folder (stages.runs.suites)
    model: str = DEFAULT_MODEL  # HF folder or embedded model name
    suite: str | None = None  # a suite of benchmarks (stages.runs.suites.SUITES) instead of `benchmark`
    # None: DEFAULT_PROTOCOL's (4, 0.7, 0.95, 512), or the suite's; a value given replaces it (for every benchmark)
    n: int | None = None  # samples per problem (K of avg@K, maj@K)
    temperature: float | None = None  # 0 = greedy (top-p then forced to 1)
    top_p: float | None = None  # nucleus sampling mass, in (0, 1]
    max_new_tokens: int | None = None  # response length cap; hitting it counts as truncated
    suite_n: str = ""  # suite: per-benchmark samples, BENCHMARK=N comma list (wins over n)
    shard: str | None = None  # suite: "I/N", this process's share of each benchmark's problems (part files)
    num: int = 0  # evaluate the first N problems (of each benchmark of a suite; 0 = all)
    split: str = "test"  # arith and gsm8k: train | test (the other benchmarks have only test; a suite uses test)
    seed: int = 0  # sampling seed and bootstrap seed
    # the sampling and checking knobs below mean what they mean for rollout (RolloutConfig) and verify
    # (VerifyConfig), whose defaults they take
    engine: str = RolloutConfig.engine
    dtype: str = RolloutConfig.dtype
    threads: int = RolloutConfig.threads
    batch_size: int = RolloutConfig.batch_size
    device: str = RolloutConfig.device
    system_prompt: str | None = RolloutConfig.system_prompt
    thinking: str = RolloutConfig.thinking
    chat_template: str | None = RolloutConfig.chat_template
    answer_instruction: str = RolloutConfig.answer_instruction
    prompt_template: str | None = RolloutConfig.prompt_template  # a YAML file of the four above (each set wins)
    workers: int = VerifyConfig.workers
    timeout: float = VerifyConfig.timeout
    fallbacks: str = VerifyConfig.fallbacks
    bootstrap_resamples: int = 1000  # resamples of the avg@K interval
    progress: bool = True  # progress bar on stderr (only on a terminal)
    overwrite: bool = False  # replace existing outputs

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "n", "max_new_tokens", "bootstrap_resamples")
        check.at_least(0, "num")
        check.choice("split", SPLITS)
        check.require((self.benchmark is None) != (self.suite is None), "benchmark",
                      "give either a benchmark or a suite (--suite), not both" if self.suite else "required")
        if self.suite is not None:
            check.choice("suite", suites.SUITES)
            check.require(self.split == "test", "split", "a suite evaluates its benchmarks' test problems")
        check.require(self.suite is not None or not (self.suite_n or self.shard), "suite_n" if self.suite_n else
                      "shard", "only with --suite (one benchmark: `antisd rollout --shard` and `verify`)")
        try:
            suites.parse_suite_n(self.suite_n, suites.SUITES.get(self.suite or ""))
        except ValueError as exc:
            check.fail("suite_n", str(exc))
        try:
            Shard.parse(self.shard)
        except InputError as exc:
            check.fail("shard", str(exc).removeprefix("--shard: "))
        if not check.problems:  # rollout's and verify's rules, under eval's option names
            check.absorb(lambda: _rollout_config(self, self.protocol(self.first_benchmark)))
            check.absorb(lambda: _verify_config(self))
        check.done()

    @property
    def first_benchmark(self) -> str:
        return suites.SUITES[self.suite].names[0] if self.suite else str(self.benchmark)

    def protocol(self, benchmark: str) -> suites.Protocol:
        """n, temperature, top-p and max tokens of `benchmark`: the options given, else the suite's or the default."""
        return suites.protocol_for(suites.SUITES[self.suite] if self.suite else None, benchmark, n=self.n,
                                   suite_n=self.suite_n, temperature=self.temperature, top_p=self.top_p,
                                   max_new_tokens=self.max_new_tokens)


# --- stage -----------------------------------------------------------------------------------------------------

def prompt_rows(benchmark: str, split: str, num: int) -> tuple[list[dict], str]:
    """The problems of `benchmark` (a built-in name or a prompts Parquet), first `num` kept; and a label for them."""
    from stages.lm.datasets import DataSource, build_rows
    from stages.lm.sampling import PROMPT_COLUMNS

    if num < 0:
        raise InputError(f"--num must be >= 0, got {num}")
    if benchmark in BENCHMARKS:
        rows = build_rows(DataSource(name=benchmark, split=split, num=num))
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
    from stages.lm.prompts import ChatOptions
    from stages.lm.sampling import open_engine, sample
    from stages.verifier.rows import verify_table

    engine_given = loaded is not None and is_engine(loaded)  # the loop's open engine: used as is, left open
    engine_name = loaded.name if engine_given else resolve_engine(rollout_config.engine)
    model_path = sampled_path(loaded) or resolve_model(rollout_config.model)
    threads = set_threads(rollout_config.threads)
    log.info("eval %s: %d problems × %d samples, temperature %g, top-p %g, max %d tokens, engine %s, model %s",
             benchmark, len(rows), rollout_config.n, rollout_config.temperature, rollout_config.top_p,
             rollout_config.max_new_tokens, engine_name, model_path)

    # --- sample
    started = time.perf_counter()
    chat = ChatOptions.from_knobs(rollout_config)
    engine = loaded if engine_given else open_engine(engine_name, rollout_config, Path(model_path), rows, loaded)
    try:
        rollouts, sample_stats = sample(engine, rows, SamplingSettings.from_config(rollout_config), label="eval",
                                        batch_size=rollout_config.batch_size, progress=rollout_config.progress, chat=chat)
    finally:
        if not engine_given:
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
        "verifier": verify_stats["verifier"],
    }

    # --- write: rows first, summary last (its presence marks a finished eval)
    metadata = build_metadata("verified", {"rollout": rollout_config, "verify": verify_config}, eval=summary,
                              chat=chat.record(), verifier=verify_stats["verifier"])
    write_artifact(table, out, "verified", metadata)
    atomic_write_json(summary_path(out), summary)
    log.info("eval %s: accuracy %.4f [%.4f, %.4f], pass@1 %.4f, length %.1f, truncated %.3f → %s", benchmark,
             metrics["accuracy"], metrics["accuracy_ci_low"], metrics["accuracy_ci_high"], metrics["pass@1"],
             metrics["length_mean"], metrics["truncated_frac"], out)
    return summary


def _rollout_config(config: EvalConfig, protocol: suites.Protocol, prompts: str | None = None,
                    out: str | None = None):
    greedy = protocol.temperature == 0
    return RolloutConfig(
        prompts=prompts or str(config.benchmark), out=out or config.out, model=config.model, n=protocol.n,
        temperature=protocol.temperature, top_p=1.0 if greedy else protocol.top_p,
        max_new_tokens=protocol.max_new_tokens, seed=config.seed,
        engine=config.engine, dtype=config.dtype, threads=config.threads, batch_size=config.batch_size,
        device=config.device, system_prompt=config.system_prompt, thinking=config.thinking,
        chat_template=config.chat_template, answer_instruction=config.answer_instruction,
        prompt_template=config.prompt_template, progress=config.progress, overwrite=True)


def _verify_config(config: EvalConfig, rollouts: str | None = None, out: str | None = None):
    return VerifyConfig(rollouts=rollouts or str(config.benchmark), out=out or config.out, seed=config.seed,
                        workers=config.workers, timeout=config.timeout, fallbacks=config.fallbacks, overwrite=True)


def run(config: EvalConfig, loaded=None) -> Path:
    """Validate, prepare prompts, sample, verify, write rows and summary; return the rows path (a suite: its folder)."""
    if config.suite is not None:
        return run_suite(config, loaded)
    # --- validate everything before any work (the options were checked when `config` was made)
    out = check_output(config.out, config.overwrite)
    check_output(summary_path(out), config.overwrite)
    with output_lock(out):
        rollout_config = _rollout_config(config, config.protocol(str(config.benchmark)))
        verify_config = _verify_config(config)
        rows, benchmark = prompt_rows(config.benchmark, config.split, config.num)
        log.debug("eval config: %s", asdict(config))
        _evaluate(rows, rollout_config, verify_config, out=out, benchmark=benchmark, seed=config.seed,
                  resamples=config.bootstrap_resamples, loaded=loaded)
        return out


def stored_summary(out_prefix: str, suite: str | None = None) -> dict | None:
    """A finished loop evaluation's metrics (its rows and summary; with `suite`, its folder's summary), else None."""
    if suite is not None:
        summary = suites.suite_folder(out_prefix, suite) / suites.SUMMARY_NAME
        return suites.loop_metrics(json.loads(summary.read_text())) if summary.exists() else None
    out = Path(f"{out_prefix}.parquet")
    done = out.exists() and summary_path(out).exists()
    return numeric(json.loads(summary_path(out).read_text())) if done else None


def run_suite(config: EvalConfig, loaded=None) -> Path:
    """Evaluate (or resume, or add a shard to) the suite folder `config.out`; return the folder."""
    from stages.common.process import pick_device
    from stages.lm.models import load_model

    # --- validate everything before any work
    folder = Path(config.out)
    if not folder.parent.is_dir():
        raise InputError(f"{folder}: output directory {folder.parent} does not exist")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: a file is there; a suite writes a folder")
    engine_name = resolve_engine(config.engine)
    model_path = str(loaded.path if loaded is not None else resolve_model(config.model))

    def configs(benchmark: str, out: str) -> tuple:
        return (_rollout_config(config, config.protocol(benchmark), benchmark, out),
                _verify_config(config, benchmark, out))

    suite = suites.SUITES[config.suite]
    jobs = [suites.BenchmarkJob(name, *prompt_rows(name, "test", config.num), partial(configs, name))
            for name in suite.names]
    folder.mkdir(exist_ok=True)

    @cache
    def model() -> object:  # the HF engine's model, loaded once for every benchmark, and only if one samples
        if loaded is not None or engine_name != "hf":
            return loaded
        return load_model(model_path, config.dtype, pick_device(config.device))

    shard = Shard.parse(config.shard)
    # shards of one folder run side by side (each locks its own parts); a whole run holds the folder
    with output_lock(folder if shard.is_whole else folder / shard.part_name()):
        suites.evaluate_suite(suite, jobs, folder, model_path=model_path,
                              evaluate=lambda *args, **kwargs: _evaluate(*args, loaded=model(), **kwargs),
                              seed=config.seed, resamples=config.bootstrap_resamples, shard=shard,
                              overwrite=config.overwrite)
    return folder


def evaluate_for_loop(*, model: str, prompts: str, out_prefix: str, n: int, temperature: float,
                      max_new_tokens: int, seed: int, rollout, verify, loaded=None, suite: str | None = None) -> dict:
    """The loop's held-out evaluation: write `<out_prefix>.parquet` + `.summary.json`, return the numeric metrics.

    `rollout`/`verify` are the run's RolloutConfig/VerifyConfig (`RunConfig.rollout`/`.verify`); n, temperature,
    max_new_tokens and seed override them, and top-p is 1 when greedy.
    `loaded` samples: a LoadedModel (HF) or the loop's open engine (vLLM, left open: no HF copy). A finished
    evaluation (`stored_summary`) is returned without sampling. With `suite` (`prompts`: its problems) see
    `_suite_for_loop`.
    """
    stored = stored_summary(out_prefix, suite)
    if stored is not None:
        return stored
    if suite is not None:
        return _suite_for_loop(suite, model=model, prompts=prompts, out_prefix=out_prefix, seed=seed,
                               rollout=rollout, verify=verify, loaded=loaded)
    out = Path(f"{out_prefix}.parquet")
    overrides = {"n": n, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed}
    if temperature == 0:
        overrides["top_p"] = 1.0
    rollout_config = replace(rollout, **overrides, model=model, prompts=str(prompts), out=str(out), overwrite=True)
    verify_config = replace(verify, rollouts=str(prompts), out=str(out), seed=seed, overwrite=True)
    rows, benchmark = prompt_rows(str(prompts), "test", 0)
    summary = _evaluate(rows, rollout_config, verify_config, out=out, benchmark=benchmark, seed=seed,
                        resamples=EvalConfig.bootstrap_resamples, loaded=loaded)
    return numeric(summary)


def _suite_for_loop(name: str, *, model: str, prompts: str, out_prefix: str, seed: int, rollout, verify,
                    loaded=None) -> dict:
    """Suite `name` on `model` into the folder `<out_prefix>-<name>` (resumed per benchmark), with the suite's
    protocol over the run's rollout/verify configs; returns `stages.runs.suites.loop_metrics` of its summary."""
    from stages.lm.sampling import PROMPT_COLUMNS

    folder = suites.suite_folder(out_prefix, name)
    suite = suites.get_suite(name)
    rows = read_artifact(prompts, "prompts")[0].select(PROMPT_COLUMNS).to_pylist()

    def configs(benchmark: str, out: str) -> tuple:
        protocol = suite.protocol(benchmark)
        sampling = {"n": protocol.n, "temperature": protocol.temperature, "top_p": protocol.top_p,
                    "max_new_tokens": protocol.max_new_tokens, "seed": seed}
        return (replace(rollout, **sampling, model=model, prompts=str(prompts), out=out, overwrite=True),
                replace(verify, rollouts=str(prompts), out=out, seed=seed, overwrite=True))

    jobs = [suites.BenchmarkJob(benchmark, [row for row in rows if row["dataset"] == benchmark], f"{benchmark}/test",
                                partial(configs, benchmark)) for benchmark in suite.names]
    folder.mkdir(exist_ok=True)
    summary = suites.evaluate_suite(suite, jobs, folder, evaluate=partial(_evaluate, loaded=loaded), seed=seed,
                                    model_path=str(sampled_path(loaded) or resolve_model(model)),
                                    resamples=EvalConfig.bootstrap_resamples)
    return suites.loop_metrics(summary)


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


def render_suite(summary: dict, console) -> None:
    """Print a suite summary as a rich table: each benchmark's avg@n with its interval, then the average."""
    from rich.table import Table

    table = Table(title=f"suite {summary['suite']} · {Path(str(summary['model'])).name}", show_header=True)
    for column, justify in (("benchmark", "left"), ("avg@n", "right"), ("95% CI", "right"),
                            ("problems × n", "right"), ("truncated", "right")):
        table.add_column(column, justify=justify)
    for name, entry in summary["per_benchmark"].items():
        table.add_row(name, f"avg@{entry['n']} {entry['accuracy']:.4f}",
                      f"[{entry['accuracy_ci_low']:.4f}, {entry['accuracy_ci_high']:.4f}]",
                      f"{entry['problems']} × {entry['n']}", f"{entry['truncated_frac']:.3f}")
    table.add_row("average", f"{summary['average']:.4f}",
                  f"[{summary['average_ci_low']:.4f}, {summary['average_ci_high']:.4f}]", "", "", style="bold")
    console.print(table)
