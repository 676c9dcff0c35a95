"""The step plan both launchers execute (what a step *is*), and the opening of a run directory.

A step's prompts are a seeded cursor over the training set (`step_prompt_indices`); its four stage configs carry the
run's knobs plus the paths and seeds the loop owns (`step_configs`), and `commands.sh` spells them as `antisd`
commands. `opened_run` checks what a run needs, then creates or reopens its directory under a lock. The local loop
(`stages.loop`) runs these configs in-process; the Slurm launcher (`stages.runs.slurm`) renders them as jobs.
"""

from __future__ import annotations

import hashlib
import random
import shlex
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from stages.common.errors import InputError
from stages.common.io import (
    atomic_write_text,
    build_metadata,
    output_lock,
    read_artifact,
    read_json_object,
    to_jsonable,
    write_artifact,
)
from stages.lm import datasets
from stages.method.variants import PRE_VARIANT
from stages.runs import config as run_config
from stages.runs.config import LoopConfig
from stages.runs.run_dir import Run, config_changes, manifest_section


def stage_seed(seed: int, step: int, stage: str) -> int:
    """A per-(step, stage) seed, stable across processes (no Python hash())."""
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


def data_config(spec: datasets.DataSource, path: Path) -> datasets.PrepareConfig:
    return datasets.PrepareConfig.of(spec, path)


def run_prompts(spec: datasets.DataSource, path: Path) -> pa.Table:
    """The run's stored prompts at `path` when it exists (a resumed run keeps its data), else `spec`'s, in memory."""
    if path.exists():
        return read_artifact(path, "prompts")[0]
    return datasets.prompts_table(data_config(spec, path))


def eval_prompts(settings: run_config.LoopSettings, path: Path) -> pa.Table:
    """The held-out problems: the run's stored file, else loop.eval_suite's benchmarks, else loop.eval's set."""
    if settings.eval_suite is not None and not path.exists():
        from stages.runs.suites import prompts_table

        return prompts_table(settings.eval_suite)
    return run_prompts(settings.eval, path)


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
    existing = next(parent for parent in root.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise InputError(f"--out {root}: {existing} is a file, not a directory")
    check_model(config.run)
    check_start_state(config.run)
    check_update_settings(config.run)
    settings = config.run.loop
    paths = {"train": root / "train_prompts.parquet", "eval": root / "eval_prompts.parquet"}
    train_table = run_prompts(settings.train, paths["train"])
    check_batch_fits(train_table.num_rows, settings.prompts_per_step)
    eval_table = eval_prompts(settings, paths["eval"]) if settings.eval_every > 0 else None
    root.mkdir(parents=True, exist_ok=True)  # `--out runs/NAME` needs no `mkdir runs` first
    with output_lock(root):
        run, manifest = init_run(config)
        eval_source = ({"suite": settings.eval_suite} if settings.eval_suite
                       else data_config(settings.eval, paths["eval"]))
        for name, table, source in (("train", train_table, data_config(settings.train, paths["train"])),
                                    ("eval", eval_table, eval_source)):
            if table is not None and not paths[name].exists():
                datasets.write_prompts(table, source, paths[name])
        yield run, manifest, train_table, paths["eval"] if eval_table is not None else None


def init_run(config: LoopConfig) -> tuple[Run, dict]:
    """Reopen (or start) the manifest of `config.out`; refuse to resume a run made with another config unless forced.

    The finished steps and the latest checkpoint are read off the step folders, so a manifest whose last write was
    lost (a crash between a step's metrics.json and run.json) is repaired here.
    """
    root = Path(config.out)
    run = Run(root.absolute())  # the manifest, commands.sh and stage configs name absolute paths: rerun from anywhere
    manifest = run.read_manifest()
    config = replace(config, run=with_variant(config.run, manifest))
    digest = config.run.digest()
    if manifest is None:
        manifest = {"config": config.run.to_dict(), "config_digest": digest}
    elif manifest["config_digest"] != digest:
        defaults = run_config.resolve({}).to_dict()
        defaults["update"]["variant"] = PRE_VARIANT  # a run made before variants existed ran the paper's text
        changed = config_changes(manifest["config"], config.run.to_dict(), defaults=defaults)
        blocking = [key for key in changed if key not in run_config.RESUMABLE_CHANGES]
        if blocking and not config.force:  # more steps or other speed settings are a resume, not a different run
            raise InputError(f"--out {root}: run was made with a different config ({', '.join(blocking)}); "
                             "use a new --out or pass --force")
        manifest["config"], manifest["config_digest"] = config.run.to_dict(), digest
    else:
        manifest["config"] = config.run.to_dict()
    manifest["update_settings"] = update_settings(config.run)
    manifest["finished"] = run.finished_steps()
    manifest["latest_checkpoint"] = str(run.checkpoint(manifest["finished"][-1])) if manifest["finished"] else None
    atomic_write_text(root / "config.yaml", run_config.dump_yaml(config.run))
    run.write_manifest(manifest)
    return run, manifest


def run_variant(config: run_config.RunConfig, manifest: dict | None) -> str:
    """The variant a run computes with: update.variant when the run config sets it; else, resuming, the run
    directory's own (its manifest's; paper for a run made before variants existed, whose manifest lacks the key);
    else the starting checkpoint's (its run state's, as `antisd update` would continue it); else the default
    (official)."""
    from stages.method.variants import DEFAULT_VARIANT
    from stages.training.checkpoint import STATE_FILE
    from stages.training.config import state_variant

    if config.update.variant is not None:
        return config.update.variant
    if manifest is not None:
        return manifest_section(manifest, "update").get("variant") or PRE_VARIANT
    state_file = Path(config.loop.model) / STATE_FILE
    start = state_variant(read_json_object(state_file, str(state_file))) if state_file.is_file() else None
    return start or DEFAULT_VARIANT


def with_variant(config: run_config.RunConfig, manifest: dict | None) -> run_config.RunConfig:
    """`config` with update.variant spelled out (`run_variant`), so config.yaml, run.json and every step's commands
    say which variant produced the run."""
    return config.with_values("update", variant=run_variant(config, manifest))


def with_run_variant(config: LoopConfig) -> LoopConfig:
    """`config` with its run's variant spelled out, reading the run directory's manifest (if any) to find it."""
    return replace(config, run=with_variant(config.run, Run(Path(config.out)).read_manifest()))


def update_settings(config: run_config.RunConfig) -> dict:
    """The resolved update options of the run (every variant knob at its value; stages.training.config)."""
    from stages.training.config import method_settings

    return to_jsonable(method_settings(config.update))


def prompt_settings(config: run_config.RunConfig, section: str) -> dict:
    """The verify or score options the run's variant sets (METHOD §9's teacher prompt; the entropies only where the
    entropy gate reads them), minus those the run config sets itself."""
    from stages.method.variants import PROMPT_PRESETS

    preset = dict(PROMPT_PRESETS[run_variant(config, None)][section])
    if section == "score":
        preset["entropy"] = update_settings(config)["gate_statistic"] == "entropy"
    elif preset.get("privileged_max_tokens") or preset.get("privileged_context_tokens"):
        preset["model"] = config.loop.model  # the token budget counts the policy's tokens
    return {key: value for key, value in preset.items() if not config.sets(section, key)}


def resolved_settings(config: run_config.RunConfig) -> dict:
    """Every setting of the run at the value a step uses (`--print-config`): the loop's, and each stage's but the
    paths and seeds the loop fills, with the variant's presets applied (METHOD §9) and update's knobs resolved."""
    from stages.training.config import resolve_variant

    stages = {"rollout": config.rollout, "verify": replace(config.verify, **prompt_settings(config, "verify")),
              "score": replace(config.score, **prompt_settings(config, "score")),
              "update": resolve_variant(config.update)}
    return {"loop": to_jsonable(config.loop),
            **{section: {key: value for key, value in to_jsonable(stage).items()
                         if key not in run_config.STAGE_SECTIONS[section][2]} for section, stage in stages.items()}}


def write_step_prompts(config: LoopConfig, run: Run, step: int, train_table: pa.Table) -> Path:
    """RUN/step_XXXX/prompts.parquet: the rows of the seeded cursor for `step` (kept if it exists)."""
    path = run.step_paths(step)["prompts"]
    if not path.exists():
        settings = config.run.loop
        rows = step_prompt_indices(train_table.num_rows, settings.prompts_per_step, step, settings.seed)
        write_artifact(train_table.take(rows), path, "prompts",
                       build_metadata("prompts", {"step": step, "rows": rows}, step=step))
    return path


def stage_config(config: LoopConfig, section: str, **paths):
    """The stage `section`'s Config: the run's knobs for it plus the paths and seed the loop owns."""
    return replace(config.run.stage(section), **paths)


def score_reference(config: run_config.RunConfig) -> str | None:
    """The frozen reference score runs: score.reference, else the base model when update.kl_coef > 0, else None.

    Filled in here (not in the RunConfig), so a run config without a KL term keeps its digest.
    """
    if config.score.reference is not None:
        return config.score.reference
    return config.loop.model if config.update.kl_coef > 0 else None


def eval_due(settings: run_config.LoopSettings, step: int) -> bool:
    """Whether the held-out evaluation runs after `step`: every `eval_every` steps and after the last."""
    every = settings.eval_every
    return every > 0 and ((step + 1) % every == 0 or step == settings.steps - 1)


def step_state(run_dir: Run, step: int, record_only: bool) -> str:
    """finished (its metrics.json exists), stop (`--record-only` and its update is not done) or run."""
    if run_dir.done(step, "step"):
        return "finished"
    if record_only and not run_dir.done(step, "update"):
        return "stop"
    return "run"


def full_checkpoint_at(settings: run_config.LoopSettings, step: int) -> bool:
    """Whether step `step` writes the optimizer state: every loop.checkpoint_every steps and the last step, or every
    step when the trainer is not kept in memory (the next step starts from the files)."""
    return not settings.resident_trainer or (step + 1) % settings.checkpoint_every == 0 or step == settings.steps - 1


def uses_teacher(config: run_config.RunConfig) -> bool:
    """Whether score runs the teacher pass: for a method that reads u (grpo does not), or when the run config sets
    `score.teacher: true` (a grpo run that logs the teacher's entropy and u, e.g. to replay the gate on it)."""
    from stages.method.terms import get_term

    return get_term(config.update.method).uses_teacher or (config.sets("score", "teacher") and config.score.teacher)


def step_configs(config: LoopConfig, run: Run, step: int) -> dict:
    """The four stage Configs of `step` (paths, model, seeds); the local loop and the Slurm launcher share them."""
    config = replace(config, run=with_variant(config.run, run.read_manifest()))  # the run's variant, spelled out
    settings, paths = config.run.loop, {k: str(v) for k, v in run.step_paths(step).items()}
    model = run.model_for_step(step, settings.model)
    return {
        "rollout": stage_config(config, "rollout", model=model, prompts=paths["prompts"], out=paths["rollouts"],
                                seed=stage_seed(settings.seed, step, "rollout")),
        "verify": replace(stage_config(config, "verify", rollouts=paths["rollouts"],
                                       out=str(draw_dir(run, step, 0) / "verified.parquet")
                                       if settings.dynamic_sampling else paths["verified"],
                                       seed=stage_seed(settings.seed, step, "verify")),
                          **prompt_settings(config.run, "verify")),
        "score": replace(stage_config(config, "score", model=model, verified=paths["verified"], out=paths["scored"]),
                         reference=score_reference(config.run), teacher=uses_teacher(config.run),
                         **prompt_settings(config.run, "score")),
        "update": stage_config(config, "update", model=model, scored=paths["scored"], out=str(run.checkpoint(step)),
                               seed=stage_seed(settings.seed, step, "update"),
                               optimizer_state=full_checkpoint_at(settings, step)),
    }


def draw_dir(run: Run, step: int, draw: int) -> Path:
    """RUN/step_XXXX/draws/D: the files of dynamic sampling's draw D (stages.runs.dynamic)."""
    return run.step_dir(step) / "draws" / str(draw)


def write_commands(run: Run, step: int, configs: dict) -> None:
    """RUN/step_XXXX/commands.sh: the `antisd` command of each stage of the step, to rerun one by hand."""
    lines = [cli_command(name, cfg) for name, cfg in configs.items()]
    if Path(configs["verify"].out) != run.step_paths(step)["verified"]:
        lines.insert(2, "# loop.dynamic_sampling: the loop draws further groups into draws/D/ and writes "
                        "verified.parquet (the kept groups) itself (stages.runs.dynamic)")
    atomic_write_text(run.step_dir(step) / "commands.sh",
                      "#!/usr/bin/env bash\n# Rerun any stage of this step by hand.\n" + "\n".join(lines) + "\n")


def check_update_settings(config: run_config.RunConfig) -> None:
    """What the first update would refuse only after step 0's rollout, verify and score: an overlong buffer that
    does not fit the rollouts' token budget, LoRA with ZeRO-3 (also from the DeepSpeed JSON), LoRA target modules
    the model does not have."""
    update, rollout = config.update, config.rollout
    buffer = update.overlong_buffer
    limit = update.overlong_max_tokens or rollout.max_new_tokens
    if buffer and buffer >= limit:
        raise InputError(f"update.overlong_buffer {buffer}: must be below the response limit {limit} (rollout."
                         "max_new_tokens, or update.overlong_max_tokens)")
    if not update.lora_rank:
        return
    from stages.lm.engine import resolve_engine
    from stages.lm.models import resolve_model

    if not update.lora_merge and resolve_engine(rollout.engine) == "vllm":
        raise InputError("update.lora_merge false: vLLM rollouts need the merged weights; set rollout.engine hf or "
                         "update.lora_merge true")
    from stages.training import lora
    from stages.training.batch import zero_stage

    if zero_stage(update) == 3:
        raise InputError("update.lora_rank: LoRA is not available with ZeRO-3 (update.deepspeed_config's stage); use "
                         "ZeRO-2, the adapter's optimizer state is small")
    lora.check_targets(resolve_model(config.loop.model), update.lora_target_modules)


def check_model(config: run_config.RunConfig) -> None:
    """loop.model must resolve (a folder, the embedded model, a Hub id in the cache) before the run directory is
    stamped with the config: a run refused for a typo must not make the corrected command look like another run."""
    from stages.lm.models import resolve_model

    try:
        resolve_model(config.loop.model)
    except InputError as exc:
        raise InputError(str(exc).replace("--model", "loop.model", 1)) from None


def check_start_state(config: run_config.RunConfig) -> None:
    """A starting checkpoint's run state must be of update.method, unless update.switch_method: step 0's update
    would refuse it, after its rollout, verify and score (on Slurm: after the GPU jobs)."""
    from stages.training.checkpoint import STATE_FILE

    state_file = Path(config.loop.model) / STATE_FILE
    if not state_file.is_file():
        return
    method, switch = config.update.method, config.update.switch_method
    state = read_json_object(state_file, str(state_file))
    written_by = state.get("method")
    if written_by not in (None, method) and not switch:
        raise InputError(f"loop.model {config.loop.model}: its run state was written by method {written_by}, not "
                         f"{method}; set update.switch_method=true to continue it as {method} (the gate then "
                         "re-calibrates H_warm)")
    variant, written_in = run_variant(config, None), state.get("variant", PRE_VARIANT if "gate" in state else None)
    if written_in not in (None, variant) and not switch:
        raise InputError(f"loop.model {config.loop.model}: its run state was written by the {written_in} variant, "
                         f"not {variant}; set update.variant={written_in} to continue it, or "
                         f"update.switch_method=true to continue it as {variant} (the gate then calibrates afresh)")
