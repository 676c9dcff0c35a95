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

Ranks: launched as N processes (`torchrun --nproc-per-node N -m antisd_cli loop …`, or `srun` + one `torchrun` per
node), every rank keeps its part resident (its ZeRO shard of the trainer, its policy or vLLM engine) and the step's
files stay the same files: rank 0 holds the run directory and decides what is done, rollout and score are written as
one part per rank and merged by rank 0, verify runs on rank 0, the update trains on all ranks, the evaluation samples
on all of them (`stages.runs.ranks`). With one process nothing of that runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from stages.common import metrics as keys
from stages.common.card import Card
from stages.common.io import atomic_write_json
from stages.runs import config as run_config
from stages.runs.config import LoopConfig
from stages.runs.plan import (
    eval_due,
    opened_run,
    stage_seed,
    step_configs,
    step_state,
    with_run_variant,
    write_commands,
    write_step_prompts,
)
from stages.runs.ranks import Ranks, prompt_count, prompt_order, row_order, throughput
from stages.runs.resources import Resources, check_memory, prompt_rows
from stages.runs.run_dir import BASE_EVAL_NAME, EVAL_NAME, Run
from stages.runs.shared_sampling import rollout_share, sample_shared
from stages.runs.tracking import Trackers, check_wandb
from stages.training import distributed

log = logging.getLogger(__name__)


class StepRunner:
    """Runs the stages of one step in order, skipping finished ones; what stays resident between them (the trainer,
    the policy, the reference, the vLLM engine) and the device's hand-over belong to `resources`."""

    def __init__(self, config: LoopConfig, run: Run, view, engine: str = "hf", resources: Resources | None = None,
                 prompt_rows: list[dict] = (), ranks: Ranks | None = None):
        self.config, self.run, self.view = config, run, view
        self.settings = config.run.loop
        self.ranks = ranks or Ranks()
        self.resources = resources or Resources(config, run, engine, prompt_rows=prompt_rows, ranks=self.ranks)

    def rollout(self, config, model: str, timings: dict) -> None:
        """Sample `config` with the step's sampler: here, or with N ranks one part per engine group (its share of the
        unsharded run's batches: `stages.runs.shared_sampling`), merged by rank 0 in prompt order."""
        from stages import rollout
        from stages.lm.engine import is_engine

        loaded = self.resources.sampler(model, timings)
        if self.ranks.count == 1:
            rollout.run(config, loaded=loaded)
            return
        engine = loaded.name if is_engine(loaded) else "hf"
        share = rollout_share(config, loaded.tokenizer, engine, self.ranks.samplers, self.ranks.sampler)

        def work(shard, parts: Path, write: bool) -> None:
            out = parts if write else parts / f".rank-{self.ranks.rank}"  # a tensor-parallel rank's same calls
            rollout.run(replace(config, out=str(out), shard=f"{shard.index}/{shard.count}"), loaded=loaded,
                        share=share)
            if not write:
                shutil.rmtree(out)

        self.ranks.sharded(Path(config.out), work, _merger(lambda: prompt_order(config)), by_sampler=True,
                           expected=lambda shard: rollout_share(config, loaded.tokenizer, engine, shard.count,
                                                                shard.index))

    def score(self, config, model: str) -> None:
        """Run score with the step's policy (score's dtype and device), and the kept reference when asked for; with N
        ranks each scores its prompts (`score --shard r/N`) and rank 0 merges them in the verified file's order."""
        from stages import score

        loaded = self.resources.policy(model, "score")
        kept = {} if config.reference is None else {"reference_loaded": self.resources.reference(config.reference)}
        if self.ranks.count == 1:
            score.run(config, loaded=loaded, **kept)
            return

        def work(shard, parts: Path, write: bool) -> None:
            score.run(replace(config, out=str(parts), shard=f"{shard.index}/{shard.count}"), loaded=loaded, **kept)

        self.ranks.sharded(Path(config.out), work, _merger(lambda: row_order(config.verified)),
                           count=lambda: min(self.ranks.count, prompt_count(config.verified)))

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
        from stages import verify
        started = time.perf_counter()
        settings = self.settings
        model = self.run.model_for_step(step, settings.model)
        paths = self.run.step_paths(step)
        timings: dict = {}
        loads_before = self.resources.load_seconds
        configs = step_configs(self.config, self.run, step)
        done = self.ranks.from_main(lambda: self._prepare(step, train_table, configs))
        if not done["rollout"]:
            self._timed("rollout", timings, lambda: self.rollout(configs["rollout"], model, timings))
        if not done["verify"] and settings.dynamic_sampling:
            self.view.stage("verify")
            self.draw_groups(step, configs, model, train_table, timings)
        elif not done["verify"]:
            self._timed("verify", timings, lambda: self.ranks.together(
                lambda: verify.run(configs["verify"]) if self.ranks.is_main else None))
        if not done["score"]:
            self._timed("score", timings, lambda: self.score(configs["score"], model))
        if not done["update"]:
            self._timed("update", timings, lambda: self.update(step, configs["update"]))
        row = self._metrics(step, paths, timings) if self.ranks.is_main else {}
        if eval_due(self.settings, step) and eval_prompts is not None:
            row.update(self.evaluate(self.run.checkpoint(step), eval_prompts, self.run.step_dir(step) / EVAL_NAME,
                                     timings))
            row.update({k: v for k, v in timings.items() if k in (keys.timing("eval"), keys.memory_peak("eval"))})
        row[keys.timing("step")] = round(time.perf_counter() - started, 3)
        row[keys.timing("model_load")] = round(self.resources.load_seconds - loads_before, 3)
        row[keys.LOAD_FRACTION] = round(row[keys.timing("model_load")] / max(row[keys.timing("step")], 1e-9), 4)
        return row

    def _prepare(self, step: int, train_table: pa.Table, configs: dict) -> dict:
        """Rank 0: the step's folder, prompts and commands.sh; which of its outputs exist (a stage is done iff its
        output exists)."""
        self.run.step_dir(step).mkdir(exist_ok=True)
        write_step_prompts(self.config, self.run, step, train_table)
        done = {stage: self.run.done(step, stage) for stage in ("rollout", "verify", "score", "update")}
        if not done["update"]:  # a finished step keeps the commands it ran
            write_commands(self.run, step, configs)
        return done

    def draw_groups(self, step: int, configs: dict, model: str, train_table: pa.Table, timings: dict) -> None:
        """Dynamic sampling (stages.runs.dynamic): verify draw 0 (the step's rollouts), draw further prompts while
        too few groups are mixed, then write the step's verified.parquet from the kept groups. Resumable: every
        draw's files are kept, and a draw whose file exists is not run again. Rank 0 keeps the books (the draws'
        prompts, verify, whether to draw again); every rank samples its share of each draw."""
        from stages import verify
        from stages.runs.dynamic import Draws

        draws = Draws(self.run, step, self.settings, train_table, Path(configs["rollout"].out))  # rank 0's books

        def verify_draw(rollouts: str, out: str, seed: int | None) -> None:
            self._add_time("verify", timings, verify.run, replace(configs["verify"], rollouts=rollouts, out=out,
                                                                  **({} if seed is None else {"seed": seed})))

        draw = 0
        while (files := self.ranks.from_main(lambda: draws.plan(draw))) is not None:
            if not files["sampled"]:
                with self.resources.phase("rollout", timings):
                    self._add_time("rollout", timings, self.rollout, replace(
                        configs["rollout"], prompts=files["prompts"], out=files["rollouts"],
                        seed=draws.seed(draw, "rollout")), model, timings)
            if not self.ranks.from_main(lambda: draws.verified(draw, verify_draw)):
                break
            draw += 1
        self.ranks.from_main(draws.write)

    def evaluate(self, model, prompts: Path, out_prefix: Path, timings: dict) -> dict:
        """The held-out evaluation of `model`, sampled by the loop's own engine (vLLM: the same engine as the rollouts,
        no second engine and no HF copy; HF: the step's policy) unless its files exist already. With N ranks every
        rank samples its share (`stages.runs.ranks.SharedEngine`); rank 0 verifies, writes and returns the numbers,
        the others return {}."""
        from stages import eval as eval_stage

        def evaluate():
            stored = self.ranks.from_main(lambda: eval_stage.stored_summary(str(out_prefix), self.settings.eval_suite))
            if stored is not None:  # a resumed run: no engine to wake for it
                return stored
            return sample_shared(self.ranks, self.resources.sampler(str(model), timings), lambda loaded: (
                eval_stage.evaluate_for_loop(
                    model=str(model), prompts=str(prompts), out_prefix=str(out_prefix), n=self.settings.eval_n,
                    temperature=self.settings.eval_temperature, max_new_tokens=self.settings.eval_max_new_tokens,
                    seed=stage_seed(self.settings.seed, 0, "eval"), rollout=self.config.run.rollout,
                    verify=self.config.run.verify, loaded=loaded, suite=self.settings.eval_suite)),
                share_prefix=self.config.run.rollout.share_prefix)

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
            tokens_per_s = throughput(read_metadata(paths[name]))
            if tokens_per_s is not None:
                row[key] = tokens_per_s
        row.update(timings)
        return row


def _merger(order):
    """merge(parts, out) for `Ranks.sharded`: `antisd merge` of the parts, rows in `order()` (the unsharded stage's)."""
    from stages import merge

    return lambda parts, out: merge.run(merge.MergeConfig(parts=str(parts), out=str(out)), order=order())


def validate_settings(config: run_config.RunConfig, env: distributed.DistEnv = distributed.DistEnv(),
                      record_only: bool = False, out: str | None = None) -> str:
    """The rollout engine the loop uses (vllm or hf, `auto` resolved); InputError when vllm is asked but missing, or
    wandb for `loop.wandb`, or what a launch of several ranks cannot run (stages.runs.ranks.check_launch)."""
    from stages.lm.engine import resolve_engine
    from stages.runs.ranks import check_launch

    check_wandb(config.loop.wandb)
    engine = resolve_engine(config.rollout.engine)
    check_launch(config, env, engine, record_only, out)
    return engine


def run(config: LoopConfig, view=None, card: Card | None = None, vllm_opener=None) -> Path:
    """Run (or resume) the loop described by `config`, as this process alone or as one of the ranks its launcher
    started; returns the run directory. `card` and `vllm_opener` replace the device's memory and the vLLM factory
    (the CPU tests' fakes)."""
    from stages.runs.ranks import open_ranks

    config = with_run_variant(config)  # update.variant spelled out: a run made before variants existed stays paper
    env = distributed.env_from(os.environ)
    engine = validate_settings(config.run, env, config.record_only, config.out)
    ranks = open_ranks(config.run, env, engine)
    try:
        return _run_ranks(config, ranks, engine, view, card, vllm_opener)
    finally:
        ranks.close()


def _run_ranks(config: LoopConfig, ranks: Ranks, engine: str, view, card: Card | None, vllm_opener) -> Path:
    """The run as this process's rank: rank 0 opens the run directory under its lock, every rank runs the steps."""
    from stages.common.process import pick_device
    from stages.runs.ranks import reopened_run
    from stages.runs.view import LoopView

    settings = config.run.loop
    card = card or Card.for_device(pick_device(config.run.score.device))
    rows = prompt_rows(config) if engine == "vllm" or card.total() is not None else []
    check_memory(config, engine, card, rows, ranks)
    with ranks.main_holds(lambda: opened_run(config)) as opened:
        run_dir, manifest, train_table, eval_path = opened or reopened_run(config)
        if not ranks.is_main:
            view = LoopView(settings.steps, stream=open(os.devnull, "w"))  # rank 0 shows the run
        view = view or LoopView(settings.steps)
        resources = Resources(config, run_dir, engine, card=card, vllm_opener=vllm_opener, prompt_rows=rows,
                              ranks=ranks)
        runner = StepRunner(config, run_dir, view, engine, resources, ranks=ranks)
        trackers = Trackers(run_dir.root, config.run.to_dict(), config.run.digest(), tensorboard=settings.tensorboard,
                            wandb_project=settings.wandb, wandb_mode=settings.wandb_mode) if ranks.is_main else None
        try:
            _run_steps(config, run_dir, manifest, runner, view, trackers, train_table, eval_path)
        finally:
            runner.close()
            if trackers is not None:
                trackers.close()
        if ranks.is_main:
            run_dir.rebuild_metrics(settings.steps)
    return run_dir.root


def _run_steps(config: LoopConfig, run_dir: Run, manifest: dict | None, runner: StepRunner, view, trackers,
               train_table: pa.Table, eval_path: Path | None) -> None:
    """The steps still to run, each decided by rank 0 (finished, stop: record-only, or run) and run by every rank;
    rank 0 records each finished step (metrics, manifest, trackers, pruning)."""
    settings, ranks = config.run.loop, runner.ranks
    with view:
        base_record = run_dir.base_record
        if eval_path is not None and not ranks.from_main(base_record.exists):
            base = runner.evaluate(settings.model, eval_path, run_dir.root / BASE_EVAL_NAME, {})
            if ranks.is_main:
                trackers.log_base(base)  # before the record: a resume that finds the record has logged it
                atomic_write_json(base_record, base)
        if ranks.is_main:
            view.baseline(json.loads(base_record.read_text()) if eval_path else {})
        for step in range(settings.steps):
            metrics_path = run_dir.step_dir(step) / "metrics.json"
            state = ranks.from_main(lambda: step_state(run_dir, step, config.record_only))
            if state == "finished":
                if ranks.is_main:
                    view.row(json.loads(metrics_path.read_text()))
                continue
            if state == "stop":
                break  # `--record-only` (the Slurm record job): this step's stages are not done yet
            view.begin(step)
            row = runner.step(step, train_table, eval_path)
            if ranks.is_main:
                atomic_write_json(metrics_path, row)
                manifest["finished"] = sorted(set(manifest["finished"]) | {step})
                manifest["latest_checkpoint"] = str(run_dir.checkpoint(step))
                run_dir.write_manifest(manifest)
                run_dir.rebuild_metrics(settings.steps)
                trackers.log(row)
                run_dir.prune_checkpoints(step, settings.keep_checkpoints)
                view.row(row)
