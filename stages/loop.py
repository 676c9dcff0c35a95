"""`antisd loop`: drive rollout → verify → score → update (→ eval) for N steps, resumable after any kill.

The run directory's layout is described in `stages.runs.run_dir`; every file in it is one stage's ordinary output,
so any stage can be rerun by hand with the command recorded in `step_XXXX/commands.sh`.

Resume: a stage is done iff its output exists (all writes are atomic), so rerunning the same command continues at the
first unfinished stage; every seed derives from (run seed, step), so the result equals an uninterrupted run. The loop
does no math and no sampling itself: it calls the stages' `run` functions, reusing one loaded model for the rollout
and score of a step.

Engines: with the HF engine the rollout samples with that loaded model. When `rollout.engine` resolves to vllm the
process keeps one vLLM engine (`stages.lm.engine_vllm.LoopEngine`) that each step's rollout uses after moving it to the
step's weights (`loop.weight_sync`: `reload` opens a fresh engine on the checkpoint, `inplace` loads the checkpoint
into the open one; on GPU with `loop.vllm_sleep` it sleeps while score and update train); the seconds spent are
`timing_s/weight_sync`. Score always uses the HF model (the trainer's numerics). Evaluation opens its own engine, so
the loop closes its vLLM engine first (two engines do not fit one card).

Reference KL: with update.kl_coef > 0 every step's score also runs a frozen reference (score.reference, else the base
model loop.model) for ref_logprobs; the process loads it once and keeps it across steps.
"""

from __future__ import annotations

import json
import logging
import random
import shlex
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from stages.runs import config as run_config
from stages import data as data_stage
from stages.common.io import (InputError, atomic_write_json, atomic_write_text, build_metadata, output_lock, read_artifact,
                       read_json_object, to_jsonable, write_artifact)
from stages.runs.run_dir import Run, config_changes

log = logging.getLogger(__name__)

STAGES = ("prompts", "rollout", "verify", "score", "update", "eval")


@dataclass(frozen=True)
class LoopConfig:
    """Options of `antisd loop` (the run's knobs are in the RunConfig)."""

    out: str  # run directory
    run: run_config.RunConfig
    force: bool = False  # resume even if the directory was made with a different config
    stop_after: str | None = None  # tests: stop after this stage of the last step ("rollout", ...)


def stage_seed(seed: int, step: int, stage: str) -> int:
    """A per-(step, stage) seed, stable across processes (no Python hash())."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{stage}".encode()).digest()[:4], "little")


def step_prompt_indices(total: int, per_step: int, step: int, seed: int) -> list[int]:
    """Rows of the training prompts used at `step`: a seeded permutation per epoch, cut into whole steps.

    An epoch holds total // per_step steps; the total % per_step rows its shuffle leaves over are not used in that
    epoch (like a DataLoader's drop_last), so a step never holds a prompt twice. The first epoch's steps are the
    permutation read in order. A step needs per_step ≤ total (InputError otherwise).
    """
    check_batch_fits(total, per_step)
    epoch, index = divmod(step, total // per_step)
    order = list(range(total))
    random.Random(stage_seed(seed, epoch, "epoch")).shuffle(order)
    return order[index * per_step : (index + 1) * per_step]


def check_batch_fits(total: int, per_step: int) -> None:
    if per_step > total:
        raise InputError(f"loop.prompts_per_step {per_step}: the training set has only {total} prompts (a step holds "
                         "distinct prompts; lower prompts_per_step or use more loop.train prompts)")


def data_config(spec: run_config.DataSpec, path: Path) -> data_stage.PrepareConfig:
    return data_stage.PrepareConfig(name=spec.name, out=str(path), split=spec.split, num=spec.num, seed=spec.seed,
                                    few_shot=spec.few_shot, path=spec.path)


def run_prompts(spec: run_config.DataSpec, path: Path) -> pa.Table:
    """The run's stored prompts at `path` when it exists (a resumed run keeps its data), else `spec`'s, in memory."""
    if path.exists():
        return read_artifact(path, "prompts")[0]
    return data_stage.prompts_table(data_config(spec, path))


def cli_command(stage: str, config) -> str:
    """The `antisd` command equivalent to running `stage` with `config` (recorded for reruns by hand)."""
    parts = ["antisd", stage]
    for key, value in to_jsonable(config).items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


@contextmanager
def opened_run(config: LoopConfig) -> Iterator[tuple[Run, dict, pa.Table, Path | None]]:
    """Check everything the run needs, then create or reopen its directory and hold its lock for the block.

    Yields (run, manifest, training prompts, held-out prompts path or None). Nothing is written before the config,
    the engine and the prompt sets have passed their checks (the config was checked when it was resolved); a second
    `antisd loop` (or Slurm rendering) on the same directory is refused while this one holds it.
    """
    root = Path(config.out)
    if not root.parent.is_dir():
        raise InputError(f"--out {root}: parent directory {root.parent} does not exist")
    check_start_state(config.run)
    settings = config.run.loop
    paths = {"train": root / "train_prompts.parquet", "eval": root / "eval_prompts.parquet"}
    train_table = run_prompts(settings.train, paths["train"])
    check_batch_fits(train_table.num_rows, settings.prompts_per_step)
    eval_table = run_prompts(settings.eval, paths["eval"]) if settings.eval_every > 0 else None
    root.mkdir(exist_ok=True)
    with output_lock(root):
        run, manifest = init_run(config)
        for name, table, spec in (("train", train_table, settings.train), ("eval", eval_table, settings.eval)):
            if table is not None and not paths[name].exists():
                data_stage.write_prompts(table, data_config(spec, paths[name]), paths[name])
        yield run, manifest, train_table, paths["eval"] if eval_table is not None else None


def init_run(config: LoopConfig) -> tuple[Run, dict]:
    """Reopen (or start) the manifest of `config.out`; refuse to resume a run made with another config unless forced.

    The finished steps and the latest checkpoint are read off the step folders, so a manifest whose last write was
    lost (a crash between a step's metrics.json and run.json) is repaired here.
    """
    root = Path(config.out)
    run = Run(root)
    manifest = run.read_manifest()
    digest = config.run.digest()
    if manifest is None:
        manifest = {"config": config.run.to_dict(), "config_digest": digest}
    elif manifest["config_digest"] != digest:
        changed = config_changes(manifest["config"], config.run.to_dict())
        if changed == ["loop.steps"]:
            pass  # extending (or shortening) a run is a resume, not a different run
        elif not config.force:
            raise InputError(f"--out {root}: run was made with a different config ({', '.join(changed)}); "
                             "use a new --out or pass --force")
        manifest["config"], manifest["config_digest"] = config.run.to_dict(), digest
    else:
        manifest["config"] = config.run.to_dict()
    manifest["finished"] = run.finished_steps()
    manifest["latest_checkpoint"] = str(run.checkpoint(manifest["finished"][-1])) if manifest["finished"] else None
    atomic_write_text(root / "config.yaml", run_config.dump_yaml(config.run))
    run.write_manifest(manifest)
    return run, manifest


def write_step_prompts(config: LoopConfig, run: Run, step: int, train_table: pa.Table) -> Path:
    """RUN/step_XXXX/prompts.parquet: the rows of the seeded cursor for `step` (kept if it exists)."""
    path = run.step_paths(step)["prompts"]
    if not path.exists():
        settings = config.run.loop
        rows = step_prompt_indices(train_table.num_rows, settings.prompts_per_step, step, settings.seed)
        write_artifact(train_table.take(rows), path, "prompts", build_metadata("prompts", {"step": step, "rows": rows}))
    return path


def stage_config(config: LoopConfig, section: str, **paths):
    """The stage `section`'s Config: the run's knobs for it plus the paths and seed the loop owns."""
    return run_config.stage_class(section)(**config.run.stages[section], **paths)


def score_reference(config: run_config.RunConfig) -> str | None:
    """The frozen reference score runs: score.reference, else the base model when update.kl_coef > 0, else None.

    Filled in here (not in the RunConfig), so a run config without a KL term keeps its digest.
    """
    given = config.stages["score"].get("reference")
    if given is not None:
        return given
    return config.loop.model if config.stages["update"].get("kl_coef", 0.0) > 0 else None


def step_configs(config: LoopConfig, run: Run, step: int) -> dict:
    """The four stage Configs of `step` (paths, model, seeds); the local loop and the Slurm launcher share them."""
    settings, paths = config.run.loop, {k: str(v) for k, v in run.step_paths(step).items()}
    model = run.model_for_step(step, settings.model)
    return {
        "rollout": stage_config(config, "rollout", model=model, prompts=paths["prompts"], out=paths["rollouts"],
                                seed=stage_seed(settings.seed, step, "rollout")),
        "verify": stage_config(config, "verify", rollouts=paths["rollouts"], out=paths["verified"],
                               seed=stage_seed(settings.seed, step, "verify")),
        "score": replace(stage_config(config, "score", model=model, verified=paths["verified"], out=paths["scored"]),
                         reference=score_reference(config.run)),
        "update": stage_config(config, "update", model=model, scored=paths["scored"], out=str(run.checkpoint(step)),
                               seed=stage_seed(settings.seed, step, "update")),
    }


def write_commands(run: Run, step: int, configs: dict) -> None:
    """RUN/step_XXXX/commands.sh: the `antisd` command of each stage of the step, to rerun one by hand."""
    lines = [cli_command(name, cfg) for name, cfg in configs.items()]
    atomic_write_text(run.step_dir(step) / "commands.sh",
                      "#!/usr/bin/env bash\n# Rerun any stage of this step by hand.\n" + "\n".join(lines) + "\n")


class StepRunner:
    """Runs the stages of one step in order, skipping finished ones; keeps the last loaded model for reuse."""

    def __init__(self, config: LoopConfig, run: Run, view, engine: str = "hf"):
        self.config, self.run, self.view = config, run, view
        self.settings = config.run.loop
        self._loaded = None  # (model path, LoadedModel) reused by rollout, score and eval of the same weights
        self._reference = None  # (model path, LoadedModel): score's frozen reference, loaded once, kept across steps
        self.load_seconds = 0.0  # model loads from disk and vLLM weight syncs, the loop's own I/O overhead
        self.vllm = None  # engine_vllm.LoopEngine, opened by the first vLLM rollout
        self.use_vllm = engine == "vllm"

    def loaded(self, model: str):
        from stages.lm.models import resolve_model

        key = str(resolve_model(model))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the old weights before loading the new ones
            self._loaded = (key, self._load(key))
        return self._loaded[1]

    def reference(self, model: str):
        """The frozen reference `model`, loaded like the policy (same dtype and device) on first use only."""
        from stages.lm.models import resolve_model

        key = str(resolve_model(model))
        if self._reference is None or self._reference[0] != key:
            self._reference = None
            self._reference = (key, self._load(key))
        return self._reference[1]

    def _load(self, key: str):
        from stages.lm.models import load_model
        from stages.common.process import pick_device

        start = time.perf_counter()
        rollout = self.config.run.stages["rollout"]
        device = pick_device(rollout.get("device", "auto")) if "device" in rollout else pick_device()
        loaded = load_model(key, dtype=rollout.get("dtype", "auto"), device=device)
        self.load_seconds += time.perf_counter() - start
        return loaded

    def score(self, config, model: str):
        """Run score with the step's loaded policy, and the kept reference when the config asks for one."""
        from stages import score
        if config.reference is None:
            return score.run(config, loaded=self.loaded(model))
        return score.run(config, loaded=self.loaded(model), reference_loaded=self.reference(config.reference))

    def rollout_source(self, model: str, train_table: pa.Table, timings: dict):
        """What the step's rollout samples with: `model`'s HF model, or the loop's vLLM engine holding its weights."""
        from stages.lm.models import resolve_model

        if not self.use_vllm:
            return self.loaded(model)
        if self.vllm is None:
            self.vllm = loop_engine(self.config.run, resolve_model(model), train_table)
        engine, seconds = self.vllm.use(resolve_model(model))
        self._count_sync(timings, seconds)
        return engine

    def _count_sync(self, timings: dict, seconds: float) -> None:
        timings["timing_s/weight_sync"] = round(timings.get("timing_s/weight_sync", 0.0) + seconds, 3)
        self.load_seconds += seconds

    def close_engine(self) -> None:
        if self.vllm is not None:
            self.vllm.close()

    def _timed(self, name: str, timings: dict, func):
        self.view.stage(name)
        start = time.perf_counter()
        result = func()
        timings[f"timing_s/{name}"] = round(time.perf_counter() - start, 3)
        return result

    def step(self, step: int, train_table: pa.Table, eval_prompts: Path | None) -> dict:
        from stages import rollout, update, verify
        started = time.perf_counter()
        settings, stage_dir = self.settings, self.run.step_dir(step)
        stage_dir.mkdir(exist_ok=True)
        model = self.run.model_for_step(step, settings.model)
        paths = self.run.step_paths(step)
        timings: dict = {}
        loads_before = self.load_seconds
        write_step_prompts(self.config, self.run, step, train_table)
        configs = step_configs(self.config, self.run, step)
        write_commands(self.run, step, configs)
        if not paths["rollouts"].exists():
            source = self.rollout_source(model, train_table, timings)
            self._timed("rollout", timings, lambda: rollout.run(configs["rollout"], loaded=source))
            if self.vllm is not None:
                self._count_sync(timings, self.vllm.put_aside())  # free the memory score and update train in
        if not paths["verified"].exists():
            self._timed("verify", timings, lambda: verify.run(configs["verify"]))
        if not paths["scored"].exists():
            self._timed("score", timings, lambda: self.score(configs["score"], model))
        if not (self.run.checkpoint(step) / "config.json").exists():
            self._loaded = None  # the trainer holds its own copy; do not keep two on a small machine
            self._timed("update", timings, lambda: update.run(configs["update"]))
        row = self._metrics(step, paths, timings)
        if self._should_eval(step) and eval_prompts is not None:
            row.update(self.evaluate(self.run.checkpoint(step), eval_prompts, stage_dir / "eval", timings))
            row.update({k: v for k, v in timings.items() if k == "timing_s/eval"})
        row["timing_s/step"] = round(time.perf_counter() - started, 3)
        row["timing_s/model_load"] = round(self.load_seconds - loads_before, 3)
        row["overhead/load_fraction"] = round(row["timing_s/model_load"] / max(row["timing_s/step"], 1e-9), 4)
        return row

    def _should_eval(self, step: int) -> bool:
        every = self.settings.eval_every
        return every > 0 and ((step + 1) % every == 0 or step == self.settings.steps - 1)

    def evaluate(self, model, prompts: Path, out_prefix: Path, timings: dict) -> dict:
        from stages import eval as eval_stage
        self.close_engine()  # evaluation opens its own engine
        result = self._timed("eval", timings, lambda: eval_stage.evaluate_for_loop(
            model=str(model), prompts=str(prompts), out_prefix=str(out_prefix), n=self.settings.eval_n,
            temperature=self.settings.eval_temperature, max_new_tokens=self.settings.eval_max_new_tokens,
            seed=stage_seed(self.settings.seed, 0, "eval"), rollout_knobs=self.config.run.stages["rollout"],
            verify_knobs=self.config.run.stages["verify"], loaded=self.loaded(str(model))))
        return {f"eval/{k}": v for k, v in result.items()}

    def _metrics(self, step: int, paths: dict, timings: dict) -> dict:
        from stages.common.io import read_metadata

        row = json.loads((self.run.checkpoint(step) / "metrics.json").read_text())
        row["step"] = step
        for name, key in (("rollouts", "rollout"), ("scored", "score")):
            tokens_per_s = read_metadata(paths[name]).get("tokens_per_s")
            if tokens_per_s is not None:
                row[f"throughput/{key}_tok_s"] = tokens_per_s
        row.update(timings)
        return row


def validate_settings(config: run_config.RunConfig) -> str:
    """The rollout engine the loop uses (vllm or hf, `auto` resolved); InputError when vllm is asked but missing."""
    from stages.rollout import resolve_engine

    return resolve_engine(config.stages["rollout"].get("engine", "auto"))


def check_start_state(config: run_config.RunConfig) -> None:
    """A starting checkpoint's run state must be of update.method, unless update.switch_method: step 0's update
    would refuse it, after its rollout, verify and score (on Slurm: after the GPU jobs)."""
    from stages.training.checkpoint import STATE_FILE
    from stages.update import UpdateConfig

    state_file = Path(config.loop.model) / STATE_FILE
    if not state_file.is_file():
        return
    knobs = config.stages["update"]
    method = knobs.get("method", UpdateConfig.method)
    written_by = read_json_object(state_file, str(state_file)).get("method")
    if written_by not in (None, method) and not knobs.get("switch_method", UpdateConfig.switch_method):
        raise InputError(f"loop.model {config.loop.model}: its run state was written by method {written_by}, not "
                         f"{method}; set update.switch_method=true to continue it as {method} (the gate then "
                         "re-calibrates H_warm)")


def loop_engine(config: run_config.RunConfig, model_path: Path, train_table: pa.Table):
    """The run's LoopEngine: rollout dtype, run seed, GPU sleep mode (inplace with loop.vllm_sleep), and a context
    length that fits the longest training prompt + rollout.max_new_tokens (so one engine serves every step)."""
    from stages.lm.engine_vllm import LoopEngine, VLLMEngine
    from stages.lm.models import torch_dtype
    from stages.rollout import PROMPT_COLUMNS, RolloutConfig, _max_model_len
    from stages.common.process import pick_device

    knobs = config.stages["rollout"]
    dtype = str(torch_dtype(knobs.get("dtype", "auto"), pick_device())).replace("torch.", "")
    max_model_len = _max_model_len(model_path, train_table.select(PROMPT_COLUMNS).to_pylist(),
                                   knobs.get("max_new_tokens", RolloutConfig.max_new_tokens))
    sleep_mode = config.loop.vllm_sleep and config.loop.weight_sync == "inplace"  # reload closes it instead
    return LoopEngine(lambda folder: VLLMEngine(folder, dtype=dtype, seed=config.loop.seed, max_model_len=max_model_len,
                                                sleep_mode=sleep_mode), config.loop.weight_sync)


def _tensorboard_writer(run: Run, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run.root / "tensorboard"))


def run(config: LoopConfig, view=None) -> Path:
    """Run (or resume) the loop described by `config`; returns the run directory."""
    from stages.runs.view import LoopView

    engine = validate_settings(config.run)
    settings = config.run.loop
    with opened_run(config) as (run_dir, manifest, train_table, eval_path):
        view = view or LoopView(settings.steps)
        runner = StepRunner(config, run_dir, view, engine)
        writer = _tensorboard_writer(run_dir, settings.tensorboard)
        try:
            _run_steps(config, run_dir, manifest, runner, view, writer, train_table, eval_path)
        finally:
            runner.close_engine()
        run_dir.rebuild_metrics(settings.steps)
    return run_dir.root


def _run_steps(config: LoopConfig, run_dir: Run, manifest: dict, runner: StepRunner, view, writer,
               train_table: pa.Table, eval_path: Path | None) -> None:
    settings = config.run.loop
    with view:
        if eval_path is not None and not (run_dir.root / "eval_base.json").exists():
            base = runner.evaluate(settings.model, eval_path, run_dir.root / "eval_base", {})
            atomic_write_json(run_dir.root / "eval_base.json", base)
        view.baseline(json.loads((run_dir.root / "eval_base.json").read_text()) if eval_path else {})
        for step in range(settings.steps):
            metrics_path = run_dir.step_dir(step) / "metrics.json"
            if metrics_path.exists():
                view.row(json.loads(metrics_path.read_text()))
                continue
            view.begin(step)
            row = runner.step(step, train_table, eval_path)
            atomic_write_json(metrics_path, row)
            manifest["finished"] = sorted(set(manifest["finished"]) | {step})
            manifest["latest_checkpoint"] = str(run_dir.checkpoint(step))
            run_dir.write_manifest(manifest)
            run_dir.rebuild_metrics(settings.steps)
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "step":
                        writer.add_scalar(key, value, step)
                writer.flush()
            run_dir.prune_checkpoints(step, settings.keep_checkpoints)
            view.row(row)
