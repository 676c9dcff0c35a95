"""`antisd update`: one policy step (GRPO, SD, AntiSD or RKL-ascent) on scored rollouts, trained with DeepSpeed.

Reads scored rows (schemas.SCORED) and a checkpoint (a HF folder, with DeepSpeed state and antisd_state.json when it
was written by a previous update), sets λ from the entropy gate (METHOD §5), builds per-token advantages (§2), runs
PPO-clip (§3), plus kl_coef · k3 KL to a frozen reference when --kl-coef > 0 (the reference's log-probs come from
`score --reference`, column ref_logprobs), through a DeepSpeed engine (ZeRO 0–3) and writes the next checkpoint
atomically, with one row of the §6 metrics. The command reads validate → read → train → write; the trainer is
`stages.training.trainer`, the options `stages.training.config`, the checks of the state, revision and rows
`stages.training.batch`. No reference model is loaded here: its log-probs are data in the scored file.

`--variant` (METHOD §9) sets the default of every knob where the paper's text and the authors' code differ; the
config is resolved (`stages.training.config.resolve_variant`) before anything else. `--advantages-out FILE` writes
what the step trains on per response and token (schemas.ADVANTAGES; `stages.training.signals`); with `--no-train`
that is all it does: no model, engine or checkpoint, the gate advanced from the run state and not saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from stages.common import metrics as keys
from stages.common.errors import InputError
from stages.common.io import build_metadata, check_output, output_lock, read_artifact, write_artifact
from stages.lm.scoring import warn_logprob_mismatch
from stages.method.losses import logprob_mismatch
from stages.method.terms import get_term
from stages.training import checkpoint, distributed, lora
from stages.training.batch import (
    batch_from_table,
    check_reference,
    check_revision,
    check_state,
    check_state_method,
    check_teacher,
    check_zero3_ranks,
    overlong_limit,
    read_deepspeed_file,
    resolved_is_correction,
)
from stages.training.config import UpdateConfig, method_settings, resolve_variant
from stages.training.trainer import Trainer

log = logging.getLogger(__name__)


def run(config: UpdateConfig) -> Path:
    """Validate → read → train one step → write CKPT_NEXT atomically. Returns the output folder."""
    from stages.lm.models import resolve_model

    started = time.perf_counter()
    env = distributed.env_from(os.environ)
    config = with_scored_model(config)
    model_dir = resolve_model(config.model)
    if not config.train:
        return dry_run(config, model_dir)
    if config.advantages_out:
        check_output(config.advantages_out, config.overwrite)
    out = checkpoint.check_target(config.out, config.overwrite)
    with output_lock(out) if env.is_main else contextlib.nullcontext():  # rank 0 writes the folder into place
        state, deepspeed_user = read_start(config, env, model_dir)
        config = resolve_variant(config, state)
        batch = read_batch(config, env, model_dir, out)
        trainer = open_trainer(config, env, model_dir, state, deepspeed_user)
        try:
            return train_and_save(trainer, batch, config, out, started)
        finally:
            trainer.close()


def with_scored_model(config: UpdateConfig) -> UpdateConfig:
    """update without --model: the model the scored file records (its scorer, whose log-probs are the step's old
    policy: training another model would make every PPO ratio start away from 1); InputError when it records none."""
    from stages.common.io import model_of, read_metadata

    if config.model is not None:
        return config
    metadata = read_metadata(config.scored) if Path(config.scored).exists() else {}
    return replace(config, model=model_of(metadata, "scored", config.scored, "it was scored with"))


def step(trainer: Trainer, config: UpdateConfig) -> Path:
    """One update with a trainer kept from the previous step (the loop's resident trainer): the same checks of the
    scored file and the same step as `run`, without reloading the weights, the optimizer or the run state."""
    from stages.lm.models import resolve_model

    started = time.perf_counter()
    config = resolve_variant(config, trainer.carried)
    out = checkpoint.check_target(config.out, config.overwrite)
    with output_lock(out) if trainer.env.is_main else contextlib.nullcontext():
        batch = read_batch(config, trainer.env, resolve_model(config.model), out)
        trainer.configure(config)
        return train_and_save(trainer, batch, config, out, started)


def read_start(config: UpdateConfig, env: distributed.DistEnv, model_dir: Path) -> tuple[dict | None, dict]:
    """The run state and DeepSpeed JSON a trainer starts from, checked against this run."""
    state = checkpoint.read_state(config.state or checkpoint.default_state_path(model_dir))
    deepspeed_user = read_deepspeed_file(config.deepspeed_config)
    stage = distributed.resolved_zero_stage(config.zero_stage, deepspeed_user)
    check_zero3_ranks(stage, env.world_size)
    check_state(config, state, model_dir, env.world_size, stage)
    lora.check_state(config, state, model_dir, stage)
    return state, deepspeed_user


def read_batch(config: UpdateConfig, env: distributed.DistEnv, model_dir: Path, out: Path | None):
    """The scored rows of this step as a Batch, after every check that needs no model (InputError, exit 2); `out`
    None: no checkpoint is written (--no-train)."""
    if out is not None and out.resolve() == model_dir.resolve():
        raise InputError(f"--out {out}: must differ from --model (checkpoints are never updated in place)")
    if out is not None:
        checkpoint.check_free_space(out, checkpoint.estimate_bytes(model_dir, config.optimizer_state))
    table, metadata = read_artifact(config.scored, "scored")
    check_reference(config, table)
    check_revision(config, metadata, model_dir)
    check_teacher(config, metadata)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    temperature = float(metadata.get("temperature") or 1.0)  # score's numerics: s_t at the sampling temperature
    entropy = metadata.get("entropy") is not False
    if not entropy and config.gate_statistic == "entropy" and get_term(config.method).uses_teacher:
        raise InputError(f"{config.scored}: scored without entropies (score --no-entropy), but the entropy gate "
                         f"(--gate-statistic entropy, variant {config.variant}) reads the teacher entropy; score it "
                         "again with --entropy, or use --gate-statistic perplexity")
    batch = batch_from_table(table, str(config.scored), vocab_size, temperature, metadata.get("teacher") is not False,
                             overlong_limit(config, metadata), entropy)
    batch.is_correction = resolved_is_correction(config.is_correction, metadata)
    if env.is_main:
        warn_logprob_mismatch(logprob_mismatch(batch.student_logprobs, batch.sampling_logprobs)[0], metadata,
                              f"update {config.scored}", str(metadata.get("model") or config.model))
    return batch


def open_trainer(config: UpdateConfig, env: distributed.DistEnv, model_dir: Path, state: dict | None,
                 deepspeed_user: dict) -> Trainer:
    """The process group (joined or created) and a Trainer of `model_dir`'s weights, optimizer and state."""
    from stages.common.process import set_threads

    threads = set_threads(config.threads)
    device = distributed.training_device(env)
    distributed.init_process_group(env, device, config.comm_timeout_minutes)
    if env.is_main:
        log.info("update: method %s, %d rank(s), %d thread(s), starting from %s (state %s)", config.method,
                 env.world_size, threads, model_dir, "fresh" if state is None else f"step {state.get('step')}")
    return Trainer(config, model_dir, state, env, device, deepspeed_user)


def train_and_save(trainer: Trainer, batch, config: UpdateConfig, out: Path, started: float) -> Path:
    from stages.common.progress import token_progress

    # this rank's share of the sequence tokens the step runs through (each ppo epoch once)
    total = config.ppo_epochs * sum(len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids))
    signals = trainer.step_signals(batch)
    gate_state = trainer.gate.state_dict()  # after this step's gate decision: what --advantages-out records
    with token_progress("update", total // trainer.env.world_size,
                        enabled=config.progress and trainer.env.is_main) as advance:
        trainer.on_tokens = advance
        try:
            metrics = trainer.train_step(batch, signals)
        finally:
            trainer.on_tokens = None
    metrics[keys.timing("update")] = time.perf_counter() - started
    trainer.save(out, metrics, optimizer_state=config.optimizer_state)
    if config.advantages_out is not None and trainer.env.is_main:
        _, lam, seq_adv, _, trained = signals
        write_advantages(config, batch, seq_adv, lam, trained, step=metrics[keys.STEP], gate=gate_state)
    if trainer.env.is_main:
        trained = "no optimizer step (no learning signal)" if metrics[keys.NO_SIGNAL] else \
            f"loss {metrics[keys.PG_LOSS]:.4g}, grad norm {_figure(metrics[keys.GRAD_NORM])}, " \
            f"{metrics[keys.UPDATE_TOK_S] or 0.0:,.0f} tok/s"
        log.info("update step %d: %d rows, reward %.3f, λ %s, %s → %s%s", metrics[keys.STEP], len(batch),
                 metrics[keys.REWARD_MEAN], _figure(metrics[keys.GATE_LAMBDA]), trained, out,
                 "" if config.optimizer_state else " (weights and run state only)")
    return out


def _figure(value: float | None) -> str:
    """A metric in a log line: 4 significant digits, or – when the step has none."""
    return "–" if value is None else f"{value:.4g}"


def write_advantages(config: UpdateConfig, batch, seq_adv, lam, trained: list[int], step: int, gate: dict) -> Path:
    """--advantages-out: the step's per-response and per-token advantages (schemas.ADVANTAGES), with the variant,
    the resolved settings, the gate's metrics and its state after the step in the metadata."""
    from stages.training.signals import advantages_table

    table = advantages_table(config, batch, seq_adv, lam, trained)
    metadata = build_metadata("advantages", method_settings(config), inputs={"scored": str(config.scored)},
                              model=config.model,
                              step=step,
                              variant=config.variant, method=config.method, gate_metrics=lam.metrics, gate=gate,
                              trained=config.train)
    write_artifact(table, config.advantages_out, "advantages", metadata)
    log.info("wrote the advantages of %d responses (step %d, variant %s) to %s", len(batch), step, config.variant,
             config.advantages_out)
    return Path(config.advantages_out)


def dry_run(config: UpdateConfig, model_dir: Path) -> Path:
    """--no-train: the advantages the step would train on, from the run state's gate (not saved), no model."""
    from stages.training.signals import load_gate, make_gate, step_signals

    check_output(config.advantages_out, config.overwrite)
    state = checkpoint.read_state(config.state or checkpoint.default_state_path(model_dir))
    check_state_method(config, state)
    config = resolve_variant(config, state)
    batch = read_batch(config, distributed.env_from({}), model_dir, None)
    gate = make_gate(config)
    if state is not None and "gate" in state:
        loaded = load_gate(gate, state["gate"])
        switched = state.get("method") not in (None, config.method) or not loaded
        gate.request_recalibration(config.recalibrate_gate, force=switched)
    _, lam, seq_adv, _, trained = step_signals(gate, config, batch)
    return write_advantages(config, batch, seq_adv, lam, trained, step=int((state or {}).get("step", 0)),
                            gate=gate.state_dict())


def replay(trainer: Trainer, config: UpdateConfig) -> None:
    """Re-run a finished step from its scored file (a resume after the newest full checkpoint) and check that it
    gives the weights its weights-only checkpoint holds; nothing is written. InputError when that checkpoint is
    missing, RuntimeError when the weights differ: bit for bit on CPU, beyond `checkpoint.replay_tolerance` on CUDA
    (whose kernels are not deterministic)."""
    from stages.lm.models import model_revision, resolve_model

    folder = Path(config.out)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: the checkpoint of a step to replay is missing (deleted by hand, or pruned by an "
                         "earlier antisd, whose pruning could delete it); move this step's folder and the later ones "
                         "aside and rerun: those steps are recomputed from the same seeds")
    config = resolve_variant(config, trainer.carried)
    batch = read_batch(config, trainer.env, resolve_model(config.model), folder)
    trainer.configure(config)
    lr = trainer.scheduled_lr()
    trainer.train_step(batch)
    trainer.replayed_steps += 1
    stored, current = _stored_weights(trainer, folder)
    tolerance = checkpoint.replay_tolerance(str(trainer.device), lr, trainer.replayed_steps)
    differ, largest = checkpoint.replay_differences(stored, current, tolerance)
    if differ:
        raise RuntimeError(f"{config.out}: replaying the step gives other weights than its checkpoint ({differ[0]}, "
                           f"and {len(differ) - 1} more; max |Δ| {largest:.3g}, tolerance {tolerance}); the run "
                           "cannot be resumed exactly")
    trainer.model_dir, trainer.model_revision = folder, model_revision(folder)
    if trainer.env.is_main:
        log.info("replayed update step %d from %s: same weights as its checkpoint (max |Δ| %.3g)", trainer.step - 1,
                 config.scored, largest)


def _stored_weights(trainer: Trainer, folder: Path) -> tuple[dict, dict]:
    """(the tensors a checkpoint folder stores, the trainer's tensors of the same names): the HF weights (one file or
    the shards of a sharded save), or a LoRA checkpoint's adapter when it was written without merged weights."""
    from safetensors.torch import load_file

    weights = checkpoint.stored_weights(folder)
    if weights is not None:
        return weights, trainer.hf_state_dict()
    adapter = folder / lora.ADAPTER_DIR / "adapter_model.safetensors"
    if trainer.peft_model is not None and adapter.is_file():
        return load_file(str(adapter)), lora.adapter_state_dict(trainer.peft_model)
    raise InputError(f"{folder}: no model.safetensors{' nor adapter/' if trainer.peft_model is not None else ''} to "
                     "check the replayed step against")
