"""`antisd loop`: drive rollout → verify → score → update (→ eval) for N steps, resumable after any kill.

The run directory's layout is described in `stages.runs.run_dir`; every file in it is one stage's ordinary output,
so any stage can be rerun by hand with the command recorded in `step_XXXX/commands.sh`.

Resume: a stage is done iff its output exists (all writes are atomic), so rerunning the same command continues at the
first unfinished stage; every seed derives from (run seed, step), so the result equals an uninterrupted run. The loop
does no math and no sampling itself: it calls the stages' `run` functions, reusing one loaded model for the rollout
and score of a step. With `record_only` (`--record-only`, each Slurm record job) it runs no stage: it records the
steps whose update is done (metrics, trackers, due evaluations, checkpoint pruning) and stops at the first that is not.

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
import os
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from stages.common import metrics as keys
from stages.common.io import atomic_write_json
from stages.runs import config as run_config
from stages.runs.config import LoopConfig
from stages.runs.plan import (
    draw_dir,
    eval_due,
    opened_run,
    stage_seed,
    step_configs,
    with_run_variant,
    write_commands,
    write_step_prompts,
)
from stages.runs.run_dir import BASE_EVAL_NAME, EVAL_NAME, Run
from stages.runs.tracking import Trackers, check_wandb

log = logging.getLogger(__name__)


class StepRunner:
    """Runs the stages of one step in order, skipping finished ones; keeps the trainer, and the model the next
    stages sample and score with, from step to step."""

    def __init__(self, config: LoopConfig, run: Run, view, engine: str = "hf"):
        self.config, self.run, self.view = config, run, view
        self.settings = config.run.loop
        self._loaded = None  # (model path, LoadedModel) reused by rollout, score and eval of the same weights
        self._reference = None  # (model path, LoadedModel): score's frozen reference, loaded once, kept across steps
        self.load_seconds = 0.0  # model loads from disk and vLLM weight syncs, the loop's own I/O overhead
        self.vllm = None  # engine_vllm.LoopEngine, opened by the first vLLM rollout
        self.use_vllm = engine == "vllm"
        self.trainer = None  # training.trainer.Trainer kept across steps (opened by the first update to run)

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
        from stages.common.process import pick_device
        from stages.lm.models import load_model

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
        timings[keys.timing("weight_sync")] = round(timings.get(keys.timing("weight_sync"), 0.0) + seconds, 3)
        self.load_seconds += seconds

    def close_engine(self) -> None:
        if self.vllm is not None:
            self.vllm.close()

    def close(self) -> None:
        self.close_engine()
        self.close_trainer()

    def close_trainer(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None

    # --- the resident trainer ----------------------------------------------------------------------------------

    def update(self, step: int, config) -> None:
        """Train step `step` with the trainer kept from the step before (opened here on the first update), then lend
        its weights to the next step's rollout and score (HF engine, ZeRO ≤ 2: no reload, no copy)."""
        from stages import update

        if self.trainer is None:
            self._loaded = None  # the trainer loads its own copy; do not keep two on a small machine
            self.trainer = self._open_trainer(step, config)
        update.step(self.trainer, config)
        if not self.settings.resident_trainer:
            self.close_trainer()
            self._loaded = None  # the next step loads the checkpoint just written
        elif self.trainer.serves_inference():
            self._loaded = (str(self.run.checkpoint(step)), self._policy_view(step))
        else:
            self._loaded = None

    def _open_trainer(self, step: int, config):
        """The trainer at the start of `step`: the newest full checkpoint before it (else the run's start), then the
        updates of the weights-only checkpoints after it replayed from their scored files (same bits: tested)."""
        from stages import update
        from stages.lm.models import resolve_model
        from stages.training import distributed

        full = self.run.full_checkpoint_before(step)
        start = str(self.run.checkpoint(full)) if full is not None else self.settings.model
        first = 0 if full is None else full + 1  # the trainer opens as that step's (its seed draws a fresh adapter)
        start_config = replace(config if first == step else step_configs(self.config, self.run, first)["update"],
                               model=start)
        env = distributed.env_from(os.environ)
        model_dir = resolve_model(start)
        state, deepspeed_user = update.read_start(start_config, env, model_dir)
        trainer = update.open_trainer(start_config, env, model_dir, state, deepspeed_user)
        for replayed in range(first, step):
            update.replay(trainer, step_configs(self.config, self.run, replayed)["update"])
        return trainer

    def _policy_view(self, step: int):
        """The trainer's policy as a LoadedModel of checkpoint `step` (eval mode; the trainer sets train mode)."""
        from stages.lm.models import LoadedModel

        trainer = self.trainer
        trainer.policy.eval()
        return LoadedModel(self.run.checkpoint(step), trainer.model_revision, trainer.tokenizer, trainer.policy,
                           str(trainer.device), next(trainer.policy.parameters()).dtype)

    @staticmethod
    def _add_time(name: str, timings: dict, func, *args, **kwargs) -> None:
        """Run `func(*args, **kwargs)`, adding its seconds to timing_s/`name` (dynamic sampling's draws sum into
        rollout and verify)."""
        start = time.perf_counter()
        func(*args, **kwargs)
        timings[keys.timing(name)] = round(timings.get(keys.timing(name), 0.0) + time.perf_counter() - start, 3)

    def _timed(self, name: str, timings: dict, func):
        self.view.stage(name)
        start = time.perf_counter()
        result = func()
        timings[keys.timing(name)] = round(time.perf_counter() - start, 3)
        return result

    def step(self, step: int, train_table: pa.Table, eval_prompts: Path | None) -> dict:
        from stages import rollout, verify
        started = time.perf_counter()
        settings, stage_dir = self.settings, self.run.step_dir(step)
        stage_dir.mkdir(exist_ok=True)
        model = self.run.model_for_step(step, settings.model)
        paths = self.run.step_paths(step)
        timings: dict = {}
        loads_before = self.load_seconds
        write_step_prompts(self.config, self.run, step, train_table)
        configs = step_configs(self.config, self.run, step)
        if not (self.run.checkpoint(step) / "config.json").exists():  # a finished step keeps the commands it ran
            write_commands(self.run, step, configs)
        if not paths["rollouts"].exists():
            source = self.rollout_source(model, train_table, timings)
            self._timed("rollout", timings, lambda: rollout.run(configs["rollout"], loaded=source))
            if self.vllm is not None:
                self._count_sync(timings, self.vllm.put_aside())  # free the memory score and update train in
        if not paths["verified"].exists() and settings.dynamic_sampling:
            self.view.stage("verify")
            self.draw_groups(step, configs, model, train_table, timings)
        elif not paths["verified"].exists():
            self._timed("verify", timings, lambda: verify.run(configs["verify"]))
        if not paths["scored"].exists():
            self._timed("score", timings, lambda: self.score(configs["score"], model))
        if not (self.run.checkpoint(step) / "config.json").exists():
            self._timed("update", timings, lambda: self.update(step, configs["update"]))
        row = self._metrics(step, paths, timings)
        if eval_due(self.settings, step) and eval_prompts is not None:
            row.update(self.evaluate(self.run.checkpoint(step), eval_prompts, stage_dir / EVAL_NAME, timings))
            row.update({k: v for k, v in timings.items() if k == keys.timing("eval")})
        row[keys.timing("step")] = round(time.perf_counter() - started, 3)
        row[keys.timing("model_load")] = round(self.load_seconds - loads_before, 3)
        row[keys.LOAD_FRACTION] = round(row[keys.timing("model_load")] / max(row[keys.timing("step")], 1e-9), 4)
        return row

    def draw_groups(self, step: int, configs: dict, model: str, train_table: pa.Table, timings: dict) -> None:
        """Dynamic sampling (stages.runs.dynamic): verify draw 0 (the step's rollouts), draw further prompts while
        too few groups are mixed, then write the step's verified.parquet from the kept groups. Resumable: every
        draw's files are kept, and a draw whose file exists is not run again."""
        from stages import rollout, verify
        from stages.common.io import build_metadata, read_artifact, read_metadata, write_artifact
        from stages.runs import dynamic

        settings, per_step = self.settings, self.settings.prompts_per_step
        tables, used, draw = [], set(), 0
        while True:
            folder = draw_dir(self.run, step, draw)
            folder.mkdir(parents=True, exist_ok=True)
            prompts, rollouts, verified = (folder / f"{name}.parquet" for name in ("prompts", "rollouts", "verified"))
            seeds = {name: stage_seed(settings.seed, step, f"{name}/draw{draw}") for name in ("rollout", "verify")}
            if draw == 0:
                prompts, rollouts, seeds = self.run.step_paths(step)["prompts"], Path(configs["rollout"].out), {}
            elif not prompts.exists():
                rows = dynamic.refill_indices(train_table.num_rows, per_step, used, seeds["rollout"])
                if not rows:
                    break  # every training prompt has been drawn in this step
                write_artifact(train_table.take(rows), prompts, "prompts",
                               build_metadata("prompts", {"step": step, "draw": draw, "rows": rows}))
            used |= set(read_metadata(prompts)["config"]["rows"])
            if not rollouts.exists():
                source = self.rollout_source(model, train_table, timings)
                self._add_time("rollout", timings, rollout.run, replace(
                    configs["rollout"], prompts=str(prompts), out=str(rollouts), seed=seeds["rollout"]), loaded=source)
                if self.vllm is not None:
                    self._count_sync(timings, self.vllm.put_aside())
            if not verified.exists():
                self._add_time("verify", timings, verify.run, replace(
                    configs["verify"], rollouts=str(rollouts), out=str(verified),
                    **({"seed": seeds["verify"]} if seeds else {})))
            tables.append(read_artifact(verified, "verified")[0])
            if not dynamic.needs_more(tables, per_step, settings.max_draws):
                break
            draw += 1
        table, record = dynamic.select(tables, per_step)
        metadata = read_artifact(draw_dir(self.run, step, 0) / "verified.parquet", "verified")[1]
        write_artifact(table, self.run.step_paths(step)["verified"], "verified", {**metadata, "dynamic_sampling": record})
        log.info("step %d dynamic sampling: %d draw(s), %d of %d groups mixed, %d kept", step, record["draws"],
                 record["groups_mixed"], record["groups_drawn"], record["groups_kept"])

    def evaluate(self, model, prompts: Path, out_prefix: Path, timings: dict) -> dict:
        from stages import eval as eval_stage
        self.close_engine()  # evaluation opens its own engine
        result = self._timed("eval", timings, lambda: eval_stage.evaluate_for_loop(
            model=str(model), prompts=str(prompts), out_prefix=str(out_prefix), n=self.settings.eval_n,
            temperature=self.settings.eval_temperature, max_new_tokens=self.settings.eval_max_new_tokens,
            seed=stage_seed(self.settings.seed, 0, "eval"), rollout_knobs=self.config.run.stages["rollout"],
            verify_knobs=self.config.run.stages["verify"], loaded=self.loaded(str(model)),
            suite=self.settings.eval_suite))
        return {keys.evaluation(k): v for k, v in result.items()}

    def _metrics(self, step: int, paths: dict, timings: dict) -> dict:
        from stages.common.io import read_metadata
        row = json.loads((self.run.checkpoint(step) / "metrics.json").read_text())
        row[keys.STEP] = step
        drawn = read_metadata(paths["verified"]).get("dynamic_sampling")
        if drawn:
            from stages.runs.dynamic import step_metrics

            row.update(step_metrics(drawn))
        for name, key in (("rollouts", keys.ROLLOUT_TOK_S), ("scored", keys.SCORE_TOK_S)):
            tokens_per_s = read_metadata(paths[name]).get("tokens_per_s")
            if tokens_per_s is not None:
                row[key] = tokens_per_s
        row.update(timings)
        return row


def validate_settings(config: run_config.RunConfig) -> str:
    """The rollout engine the loop uses (vllm or hf, `auto` resolved); InputError when vllm is asked but missing, or
    wandb for `loop.wandb`."""
    from stages.lm.engine import resolve_engine

    check_wandb(config.loop.wandb)
    return resolve_engine(config.stages["rollout"].get("engine", "auto"))


def loop_engine(config: run_config.RunConfig, model_path: Path, train_table: pa.Table):
    """The run's LoopEngine: rollout dtype, run seed, GPU sleep mode (inplace with loop.vllm_sleep), and a context
    length that fits the longest training prompt + rollout.max_new_tokens (so one engine serves every step)."""
    from stages.common.process import pick_device
    from stages.lm.engine_vllm import LoopEngine, VLLMEngine
    from stages.lm.models import torch_dtype
    from stages.lm.prompts import ChatOptions
    from stages.lm.sampling import PROMPT_COLUMNS, RolloutConfig, _max_model_len

    knobs = config.stages["rollout"]
    dtype = str(torch_dtype(knobs.get("dtype", "auto"), pick_device())).replace("torch.", "")
    max_model_len = _max_model_len(model_path, train_table.select(PROMPT_COLUMNS).to_pylist(),
                                   knobs.get("max_new_tokens", RolloutConfig.max_new_tokens),
                                   ChatOptions.from_knobs(knobs))
    sleep_mode = config.loop.vllm_sleep and config.loop.weight_sync == "inplace"  # reload closes it instead
    inplace = config.loop.weight_sync == "inplace"
    return LoopEngine(lambda folder: VLLMEngine(folder, dtype=dtype, seed=config.loop.seed, max_model_len=max_model_len,
                                                sleep_mode=sleep_mode, inplace_sync=inplace), config.loop.weight_sync)


def run(config: LoopConfig, view=None) -> Path:
    """Run (or resume) the loop described by `config`; returns the run directory."""
    from stages.runs.view import LoopView

    config = with_run_variant(config)  # update.variant spelled out: a run made before variants existed stays paper
    engine = validate_settings(config.run)
    settings = config.run.loop
    with opened_run(config) as (run_dir, manifest, train_table, eval_path):
        view = view or LoopView(settings.steps)
        runner = StepRunner(config, run_dir, view, engine)
        trackers = Trackers(run_dir.root, config.run.to_dict(), config.run.digest(), tensorboard=settings.tensorboard,
                            wandb_project=settings.wandb, wandb_mode=settings.wandb_mode)
        try:
            _run_steps(config, run_dir, manifest, runner, view, trackers, train_table, eval_path)
        finally:
            runner.close()
            trackers.close()
        run_dir.rebuild_metrics(settings.steps)
    return run_dir.root


def _run_steps(config: LoopConfig, run_dir: Run, manifest: dict, runner: StepRunner, view, trackers,
               train_table: pa.Table, eval_path: Path | None) -> None:
    settings = config.run.loop
    with view:
        base_record = run_dir.root / f"{BASE_EVAL_NAME}.json"
        if eval_path is not None and not base_record.exists():
            base = runner.evaluate(settings.model, eval_path, run_dir.root / BASE_EVAL_NAME, {})
            atomic_write_json(base_record, base)
        view.baseline(json.loads(base_record.read_text()) if eval_path else {})
        for step in range(settings.steps):
            metrics_path = run_dir.step_dir(step) / "metrics.json"
            if metrics_path.exists():
                view.row(json.loads(metrics_path.read_text()))
                continue
            if config.record_only and not (run_dir.checkpoint(step) / "config.json").exists():
                break  # `--record-only` (the Slurm record job): this step's stages are not done yet
            view.begin(step)
            row = runner.step(step, train_table, eval_path)
            atomic_write_json(metrics_path, row)
            manifest["finished"] = sorted(set(manifest["finished"]) | {step})
            manifest["latest_checkpoint"] = str(run_dir.checkpoint(step))
            run_dir.write_manifest(manifest)
            run_dir.rebuild_metrics(settings.steps)
            trackers.log(row)
            run_dir.prune_checkpoints(step, settings.keep_checkpoints)
            view.row(row)
