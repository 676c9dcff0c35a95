"""`antisd update`: one policy step (GRPO, SD, AntiSD or RKL-ascent) on scored rollouts, trained with DeepSpeed.

Reads scored rows (schemas.SCORED) and a checkpoint (a HF folder, with DeepSpeed state and antisd_state.json when it
was written by a previous update), sets λ from the entropy gate (METHOD §5), builds per-token advantages (§2), runs
PPO-clip (§3), plus kl_coef · k3 KL to a frozen reference when --kl-coef > 0 (the reference's log-probs come from
`score --reference`, column ref_logprobs), through a DeepSpeed engine (ZeRO 0–3) and writes the next checkpoint
atomically, with one row of the §6 metrics. The command reads validate → read → train → write; the trainer is
`stages.training.trainer`, the options `stages.training.config`, the checks of the state, revision and rows
`stages.training.batch`. No reference model is loaded here: its log-probs are data in the scored file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from stages.common import metrics as keys
from stages.common.errors import InputError
from stages.common.io import output_lock, read_artifact
from stages.training import checkpoint, distributed
from stages.training.batch import (
    batch_from_table,
    check_reference,
    check_revision,
    check_state,
    check_teacher,
    read_deepspeed_file,
)
from stages.training.config import UpdateConfig
from stages.training.trainer import Trainer

log = logging.getLogger(__name__)


def run(config: UpdateConfig) -> Path:
    """Validate → read → train one step → write CKPT_NEXT atomically. Returns the output folder."""
    from stages.lm.models import resolve_model

    started = time.perf_counter()
    env = distributed.env_from(os.environ)
    model_dir = resolve_model(config.model)
    out = checkpoint.check_target(config.out, config.overwrite)
    with output_lock(out) if env.is_main else contextlib.nullcontext():  # rank 0 writes the folder into place
        return _run_locked(config, env, model_dir, out, started)


def _run_locked(config: UpdateConfig, env: distributed.DistEnv, model_dir: Path, out: Path, started: float) -> Path:
    from stages.common.process import set_threads

    if out.resolve() == model_dir.resolve():
        raise InputError(f"--out {out}: must differ from --model (checkpoints are never updated in place)")
    checkpoint.check_free_space(out, checkpoint.estimate_bytes(model_dir))
    state_path = config.state or checkpoint.default_state_path(model_dir)
    state = checkpoint.read_state(state_path)
    deepspeed_user = read_deepspeed_file(config.deepspeed_config)
    stage = config.zero_stage if config.zero_stage is not None else \
        deepspeed_user.get("zero_optimization", {}).get("stage", 2)
    check_state(config, state, model_dir, env.world_size, stage)
    table, metadata = read_artifact(config.scored, "scored")
    check_reference(config, table)
    check_revision(config, metadata, model_dir)
    check_teacher(config, metadata)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    temperature = float(metadata.get("temperature") or 1.0)  # score's numerics: s_t at the sampling temperature
    batch = batch_from_table(table, str(config.scored), vocab_size, temperature, metadata.get("teacher") is not False)
    threads = set_threads(config.threads)
    if env.is_main:
        log.info("update: %d rows, method %s, temperature %g, %d rank(s), %d thread(s), state %s", len(batch),
                 config.method, temperature, env.world_size, threads, state_path or "fresh")

    device = distributed.training_device(env)
    distributed.init_process_group(env, device)
    trainer = Trainer(config, model_dir, state, env, device, deepspeed_user)
    try:
        metrics = trainer.train_step(batch)
        metrics[keys.timing("update")] = time.perf_counter() - started
        trainer.save(out, metrics)
    finally:
        trainer.close()
    if env.is_main:
        log.info("update step %d: reward %.3f, λ %.3f, loss %.4g, grad norm %s, %.0f tok/s → %s", metrics[keys.STEP],
                 metrics[keys.REWARD_MEAN], metrics[keys.GATE_LAMBDA], metrics[keys.PG_LOSS], metrics[keys.GRAD_NORM],
                 metrics[keys.UPDATE_TOK_S] or 0.0, out)
    return out
