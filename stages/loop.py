"""`antisd loop`: drive rollout → verify → score → update (→ eval) for N steps, resumable after any kill.

The run directory's layout is described in `stages.runs.run_dir`; every file in it is one stage's ordinary output,
so any stage can be rerun by hand with the command recorded in `step_XXXX/commands.sh`.

Resume: a stage is done iff its output exists (all writes are atomic), so rerunning the same command continues at the
first unfinished stage; every seed derives from (run seed, step), so the result equals an uninterrupted run. The loop
does no math and no sampling itself: it calls the stages' `run` functions, reusing one loaded model for the rollout
and score of a step. With `record_only` (`--record-only`, each Slurm record job) it runs no stage: it records the
steps whose update is done (metrics, trackers, due evaluations, checkpoint pruning) and stops at the first that is not.

Engines and memory: what stays resident between stages (the policy, the reference, the vLLM engine, the trainer) and
the device's hand-over between phases belong to `stages.runs.resources.Resources`; this module says which stage runs
when. With vLLM one engine samples the rollouts and the held-out evaluations, moved to each step's weights as
`loop.weight_sync` says; the seconds spent are `timing_s/weight_sync`, each phase's peak memory/peak_gib/<phase>.
Score always uses the HF model (the trainer's numerics). On a GPU the run is first checked against the memory model
(`stages.runs.memory`) and refused when it cannot fit.

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
from stages.common.card import Card
from stages.common.errors import InputError
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
from stages.runs.resources import Resources, loop_plan, world_size_refusal
from stages.runs.run_dir import BASE_EVAL_NAME, EVAL_NAME, Run
from stages.runs.tracking import Trackers, check_wandb

log = logging.getLogger(__name__)


class StepRunner:
    """Runs the stages of one step in order, skipping finished ones; what stays resident between them (the trainer,
    the policy, the reference, the vLLM engine) and the device's hand-over belong to `resources`."""

    def __init__(self, config: LoopConfig, run: Run, view, engine: str = "hf", resources: Resources | None = None,
                 prompt_rows: list[dict] = ()):
        self.config, self.run, self.view = config, run, view
        self.settings = config.run.loop
        self.resources = resources or Resources(config, run, engine, prompt_rows=prompt_rows)

    def score(self, config, model: str):
        """Run score with the step's policy (score's dtype and device), and the kept reference when asked for."""
        from stages import score

        loaded = self.resources.policy(model, "score")
        if config.reference is None:
            return score.run(config, loaded=loaded)
        return score.run(config, loaded=loaded, reference_loaded=self.resources.reference(config.reference))

    def close(self) -> None:
        self.resources.close()

    def update(self, step: int, config) -> None:
        """Train step `step` with the resident trainer (opened on the first update: `_open_trainer`)."""
        from stages import update

        self.resources.train(step, config, self._open_trainer, update.step)

    def _open_trainer(self, step: int, config):
        """The trainer at the start of `step`: the newest full checkpoint before it (else the run's start), then the
        updates of the weights-only checkpoints after it replayed from their scored files (same bits on CPU; within
        the stated tolerance on CUDA: stages.update.replay)."""
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

    @staticmethod
    def _add_time(name: str, timings: dict, func, *args, **kwargs) -> None:
        """Run `func(*args, **kwargs)`, adding its seconds to timing_s/`name` (dynamic sampling's draws sum into
        rollout and verify)."""
        start = time.perf_counter()
        func(*args, **kwargs)
        timings[keys.timing(name)] = round(timings.get(keys.timing(name), 0.0) + time.perf_counter() - start, 3)

    def _timed(self, name: str, timings: dict, func):
        """Run `func()` as phase `name`: the device handed to it (resources), its seconds and peak memory recorded."""
        self.view.stage(name)
        start = time.perf_counter()
        with self.resources.phase(name, timings):
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
        loads_before = self.resources.load_seconds
        write_step_prompts(self.config, self.run, step, train_table)
        configs = step_configs(self.config, self.run, step)
        if not (self.run.checkpoint(step) / "config.json").exists():  # a finished step keeps the commands it ran
            write_commands(self.run, step, configs)
        if not paths["rollouts"].exists():
            self._timed("rollout", timings, lambda: rollout.run(
                configs["rollout"], loaded=self.resources.sampler(model, timings)))
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
            row.update({k: v for k, v in timings.items() if k in (keys.timing("eval"), keys.memory_peak("eval"))})
        row[keys.timing("step")] = round(time.perf_counter() - started, 3)
        row[keys.timing("model_load")] = round(self.resources.load_seconds - loads_before, 3)
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
                with self.resources.phase("rollout", timings):
                    self._add_time("rollout", timings, rollout.run, replace(
                        configs["rollout"], prompts=str(prompts), out=str(rollouts), seed=seeds["rollout"]),
                        loaded=self.resources.sampler(model, timings))
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
        """The held-out evaluation of `model`, sampled by the loop's own engine (vLLM: the same engine as the rollouts,
        no second engine and no HF copy; HF: the step's policy) unless its files exist already."""
        from stages import eval as eval_stage

        def evaluate():
            stored = eval_stage.stored_summary(str(out_prefix), self.settings.eval_suite)
            if stored is not None:  # a resumed run: no engine to wake for it
                return stored
            return eval_stage.evaluate_for_loop(
                model=str(model), prompts=str(prompts), out_prefix=str(out_prefix), n=self.settings.eval_n,
                temperature=self.settings.eval_temperature, max_new_tokens=self.settings.eval_max_new_tokens,
                seed=stage_seed(self.settings.seed, 0, "eval"), rollout_knobs=self.config.run.stages["rollout"],
                verify_knobs=self.config.run.stages["verify"], loaded=self.resources.sampler(str(model), timings),
                suite=self.settings.eval_suite)

        result = self._timed("eval", timings, evaluate)
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
    wandb for `loop.wandb`, or when the loop was launched as one rank of several."""
    from stages.lm.engine import resolve_engine

    refused = world_size_refusal()
    if refused:
        raise InputError(refused)
    check_wandb(config.loop.wandb)
    return resolve_engine(config.stages["rollout"].get("engine", "auto"))


def check_memory(config: LoopConfig, engine: str, card: Card, prompt_rows: list[dict]) -> None:
    """Refuse, before any work, a run whose update or sampling cannot fit the card (stages.runs.memory), with the
    figure and the ways out; nothing to check on CPU (no card size)."""
    from stages.runs.memory import refusal

    if card.total() is None or config.record_only:
        return
    plan = loop_plan(config, card, engine == "vllm", prompt_rows)
    refused = refusal(plan, f"loop.model {config.run.loop.model} on {card.device}")
    if refused:
        raise InputError(refused)
    log.info("memory plan of %s (%.1f GiB): update %.1f GiB (%s); sampling %.1f GiB (vLLM share %.2f)", card.device,
             plan.total_bytes / 2**30, plan.train.total / 2**30, plan.train.describe(), plan.sample_bytes / 2**30,
             plan.vllm_utilization)


def prompt_rows(config: LoopConfig) -> list[dict]:
    """The run's training prompts and, when it evaluates, its held-out ones (stored, else built in memory): what the
    memory plan and vLLM's context length are computed from."""
    from stages.lm.sampling import PROMPT_COLUMNS
    from stages.runs.plan import eval_prompts, run_prompts

    settings, root = config.run.loop, Path(config.out)
    tables = [run_prompts(settings.train, root / "train_prompts.parquet")]
    if settings.eval_every > 0:
        tables.append(eval_prompts(settings, root / "eval_prompts.parquet"))
    return [row for table in tables for row in table.select(PROMPT_COLUMNS).to_pylist()]


def run(config: LoopConfig, view=None, card: Card | None = None, vllm_opener=None) -> Path:
    """Run (or resume) the loop described by `config`; returns the run directory. `card` and `vllm_opener` replace
    the device's memory and the vLLM factory (the CPU tests' fakes)."""
    from stages.common.process import pick_device
    from stages.runs.view import LoopView

    config = with_run_variant(config)  # update.variant spelled out: a run made before variants existed stays paper
    engine = validate_settings(config.run)
    settings = config.run.loop
    card = card or Card.for_device(pick_device(config.run.stages["score"].get("device", "auto")))
    rows = prompt_rows(config) if engine == "vllm" or card.total() is not None else []
    check_memory(config, engine, card, rows)
    with opened_run(config) as (run_dir, manifest, train_table, eval_path):
        view = view or LoopView(settings.steps)
        resources = Resources(config, run_dir, engine, card=card, vllm_opener=vllm_opener, prompt_rows=rows)
        runner = StepRunner(config, run_dir, view, engine, resources)
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
