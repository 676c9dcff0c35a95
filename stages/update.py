"""`antisd update`: one policy step (GRPO, SD, AntiSD or RKL-ascent) on scored rollouts, trained with DeepSpeed.

Reads scored rows (schemas.SCORED) and a checkpoint (a HF folder, with DeepSpeed state and antisd_state.json when it
was written by a previous update), sets λ from the entropy gate (METHOD §5), builds per-token advantages (§2), runs
PPO-clip (§3), plus kl_coef · k3 KL to a frozen reference when --kl-coef > 0 (the reference's log-probs come from
`score --reference`, column ref_logprobs), through a DeepSpeed engine (ZeRO 0–3) and writes the next checkpoint
atomically, with one row of the §6 metrics. The new policy's log-probs come from `stages.lm.logprobs.response_token_stats`,
the numerics `score` used.

Multi-process (deepspeed/torchrun/srun): every rank reads the whole scored file, so group advantages, the gate's
median and the loss normalizers are global without communication; each rank trains on its token-balanced share of
each mini-batch, padded with zero-loss micro-batches to the same count so ZeRO's per-backward collectives line up.
DeepSpeed averages gradients over ranks, so each rank's loss is multiplied by the world size: the gradient is then
the 1-process one. Rank 0 alone writes the HF folder, state and metrics; every rank writes its ZeRO shard.

Not here: option/input validation, scored rows → Batch and the data's own metrics (stages.training.batch), the math
(stages.objectives/gate), the log-prob numerics (stages.lm.logprobs), the checkpoint format (stages.training.checkpoint),
process groups (stages.training.distributed). No reference model is loaded here: its log-probs are data in the scored file.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from stages.training import checkpoint

from stages.training import distributed

from stages.common import validation
from stages.common.io import InputError, output_lock, read_artifact
from stages.lm.models import quiet_transformers
from stages.training.batch import (  # noqa: F401  (METHODS, teacher_median: kept importable from stages.update)
    METHODS, Batch, batch_from_table, batch_metrics, check_reference, check_revision, check_state,
    is_finite, mean_or_none, pad_rows, read_deepspeed_file, teacher_median, truncated_is_weights)

log = logging.getLogger(__name__)

GATED_BY_DEFAULT = {"grpo": False, "sd": False, "antisd": True, "rkl-ascent": True}  # METHOD §5 Decision
STATE_VERSION = 1


@dataclass(frozen=True)
class UpdateConfig:
    """Options of `antisd update` (one optimizer step per batch by default: strictly on-policy)."""

    scored: str  # scored Parquet file or directory of parts (schemas.SCORED)
    out: str  # output checkpoint folder (HF + deepspeed/ + antisd_state.json + metrics.json)
    model: str = "smollm2-135m"  # current policy: HF folder (a previous update's --out) or embedded model name
    method: str = "antisd"  # grpo | sd | antisd | rkl-ascent (METHOD §2)
    lam_max: float = 0.5  # λ_max; λ = g·λ_max
    warmup_steps: int = 5  # W: gated steps with λ = 0 that calibrate H_warm
    gate_down: float = 0.93  # τ_down = gate_down · H_warm
    gate: str = "auto"  # auto (antisd, rkl-ascent gated; sd, grpo ungated) | on | off
    # measure H_warm again over the next W steps; one-shot: a step whose run state was written by a step that had it
    # set does not restart the warm-up (so a loop with it set re-calibrates once, at its first step)
    recalibrate_gate: bool = False
    lr: float = 1e-6  # AdamW learning rate (constant)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    clip_low: float = 0.2  # PPO ε_low
    clip_high: float = 0.2  # PPO ε_high (clip-higher when > clip_low)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    max_response_tokens: int = 0  # seq-mean-token-sum's constant T (0 = longest response of the step)
    adv_eps: float = 1e-6  # ε in A = (R − mean)/(std + ε)
    adv_scale: str = "group"  # group (divide by the group std) | none (Dr.GRPO)
    ppo_epochs: int = 1  # passes over the batch
    mini_batch_size: int = 0  # sequences per optimizer step (0 = whole batch: one step)
    micro_batch_tokens: int = 2048  # padded tokens per forward/backward on one rank
    logprob_chunk: int = 64  # response positions per LM-head chunk (memory bound of the log-softmax)
    kl_coef: float = 0.0  # β of β·k3 KL to a frozen reference (0 = none; > 0 needs ref_logprobs: score --reference)
    is_correction: str = "off"  # off | token: truncated IS weight min(exp(s − sampling_logprob), is_cap)
    is_cap: float = 2.0  # cap of the truncated IS weight
    deepspeed_config: str | None = None  # DeepSpeed JSON overlaid on the built-in ZeRO-2 default
    zero_stage: int | None = None  # ZeRO stage 0-3 (None: the config file's, else 2)
    state: str | None = None  # run-state JSON (default: <model>/antisd_state.json if present, else fresh)
    dtype: str = "auto"  # auto: fp32 weights on CPU, DeepSpeed bf16 on GPU | float32 | bfloat16 | float16 (GPU)
    gradient_checkpointing: bool = True  # recompute layer activations in backward (less memory)
    threads: int = 0  # torch CPU threads (0 = torch default)
    seed: int = 0  # seeds mini-batch order; RNG state is restored from the run state when present
    # continue a run state written by another method (a GRPO checkpoint as AntiSD: the paper's continual run): its
    # step, RNG and optimizer carry on, and the gate re-calibrates H_warm over the next W steps
    switch_method: bool = False
    force: bool = False  # accept a scored file whose old log-probs came from another model revision
    overwrite: bool = False  # replace an existing --out folder

    def __post_init__(self):
        from stages.method.objectives import AGGREGATIONS

        check = validation.Checks(self)
        check.choice("method", METHODS)
        check.choice("gate", ("auto", "on", "off"))
        check.choice("loss_agg", AGGREGATIONS)
        check.choice("adv_scale", ("group", "none"))
        check.choice("is_correction", ("off", "token"))
        check.choice("dtype", ("auto", "float32", "bfloat16", "float16"))
        check.at_least(1, "ppo_epochs", "micro_batch_tokens", "warmup_steps", "logprob_chunk", "is_cap")
        check.at_least(0, "lr", "weight_decay", "grad_clip", "clip_low", "clip_high", "lam_max", "mini_batch_size",
                       "max_response_tokens", "adv_eps", "kl_coef", "threads")
        check.between("gate_down", 0, 1, low_open=True)
        if self.zero_stage is not None:
            check.choice("zero_stage", (0, 1, 2, 3))
        check.done()


# --- training ---------------------------------------------------------------------------------------------------

def _precision(dtype: str, device: str) -> str:
    """fp32 | bf16 | fp16 (DeepSpeed mixed precision) | autocast-bf16 (fp32 weights, bf16 matmuls: CPU)."""
    if device == "cpu":
        if dtype == "float16":
            raise InputError("--dtype float16: not supported on CPU (use float32 or bfloat16)")
        return "autocast-bf16" if dtype == "bfloat16" else "fp32"
    return {"auto": "bf16", "bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[dtype]


def _seed_for(seed: int, step: int) -> int:
    return int.from_bytes(hashlib.sha256(f"update:{seed}:{step}".encode()).digest()[:8], "little") % (2**63)


def _logprob_module(policy):
    """Wrap the causal LM so that DeepSpeed's engine(...) runs our log-prob computation as its forward.

    Going through engine.forward (not the bare module) keeps ZeRO's micro-step bookkeeping right: under ZeRO-3 a
    second backward would otherwise overwrite the first one's gradient partitions instead of adding to them.
    """
    import torch

    from stages.lm.logprobs import response_token_stats

    class PolicyLogprobs(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, sequences, starts, pad_id: int, temperature: float, chunk_size: int):
            logprobs, _ = response_token_stats(self.model, sequences, starts, pad_id=pad_id, temperature=temperature,
                                               chunk_size=chunk_size, with_entropy=False)
            return torch.cat(logprobs)  # [Σ T_i]

    return PolicyLogprobs(policy)


def _enable_activation_checkpointing(module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.24 name
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class Trainer:
    """The policy inside a DeepSpeed engine plus the gate: what lives across steps in one process."""

    def __init__(self, config: UpdateConfig, model_dir: Path, state: dict | None, env: distributed.DistEnv,
                 device: str, loaded=None, deepspeed_user: dict | None = None):
        import torch

        from stages.lm.models import load_tokenizer, model_revision
        from stages.method.objectives import EntropyGate

        self.config, self.env, self.device, self.model_dir = config, env, device, model_dir
        self.precision = _precision(config.dtype, device)
        self.carried = dict(state or {})
        self.step = int(self.carried.get("step", 0))
        self.model_revision = model_revision(model_dir)
        gated = GATED_BY_DEFAULT[config.method] if config.gate == "auto" else config.gate == "on"
        self.gate = EntropyGate(config.warmup_steps, config.gate_down, config.lam_max, gated)
        if "gate" in self.carried:
            self._load_gate(self.carried["gate"])
        switched = self.carried.get("method") not in (None, config.method)  # check_state allowed it
        if self.gate.request_recalibration(config.recalibrate_gate, force=switched):
            log.info("gate: re-calibrating H_warm over the next %d steps (%s)", config.warmup_steps,
                     f"method {self.carried['method']} → {config.method}" if switched else "--recalibrate-gate")
        if "rng" in self.carried:
            checkpoint.restore_rng(self.carried["rng"])
        else:
            from stages.common.process import seed_everything

            seed_everything(config.seed)
        self.tokenizer = loaded.tokenizer if loaded is not None else load_tokenizer(model_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.policy = self._load_module(loaded)  # the HF causal LM; the engine wraps it in PolicyLogprobs
        self.policy.config.use_cache = False
        if config.gradient_checkpointing:
            _enable_activation_checkpointing(self.policy)
        self.policy.to(device).train()
        module = _logprob_module(self.policy)
        optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        ds_precision = "fp32" if self.precision == "autocast-bf16" else self.precision
        ds_config = distributed.deepspeed_config(deepspeed_user or {}, config.zero_stage, config.grad_clip,
                                                 env.world_size, ds_precision)
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        started = time.perf_counter()
        with distributed.launcher_env(env):
            self.engine = distributed.create_engine(module, optimizer, ds_config, env, device)
            self.resumed_optimizer = checkpoint.load_engine_state(self.engine, model_dir)
        for group in self.engine.optimizer.param_groups:  # the command line wins over the saved hyper-parameters
            group["lr"], group["weight_decay"] = config.lr, config.weight_decay
        log.info("DeepSpeed ZeRO-%d engine ready in %.1fs (%s, %d rank(s), optimizer %s)", self.zero_stage,
                 time.perf_counter() - started, self.precision, env.world_size,
                 "resumed" if self.resumed_optimizer else "fresh")

    def _load_gate(self, gate_state: dict) -> None:
        saved = {k: gate_state.get(k) for k in ("warmup_steps", "down", "lam_max", "gated")}
        mine = {k: getattr(self.gate, k) for k in saved}
        if saved != mine:
            log.warning("gate settings differ from the run state's %s; using %s", saved, mine)
        self.gate.load_state_dict(gate_state, strict=False)

    def _load_module(self, loaded):
        import torch
        from transformers import AutoModelForCausalLM

        from stages.lm.models import checked_logits_path

        if loaded is not None and Path(loaded.path).resolve() == self.model_dir.resolve() \
                and next(loaded.model.parameters()).dtype == torch.float32:
            return copy.deepcopy(loaded.model)  # train a copy: the caller's model keeps serving until we are done
        quiet_transformers()
        network = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        return checked_logits_path(network, f"--model {self.config.model}")

    def _autocast(self):
        import torch

        if self.precision == "autocast-bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # one step ---------------------------------------------------------------------------------------------------

    def train_step(self, batch: Batch) -> dict:
        """Gate → advantages → ppo_epochs × mini-batches of optimizer steps. Returns the step's metrics row."""
        with distributed.launcher_env(self.env):  # ZeRO-3 reads LOCAL_RANK from the environment in forward
            return self._train_step(batch)

    def _train_step(self, batch: Batch) -> dict:
        import torch

        from stages.method.objectives import group_advantages

        config = self.config
        started = time.perf_counter()
        step = self.step
        data_metrics = batch_metrics(batch)
        lam = self.gate.update(data_metrics["teacher/entropy_median"])
        lam = 0.0 if config.method == "grpo" else lam
        seq_adv = group_advantages(torch.tensor(batch.rewards), batch.group_ids, eps=config.adv_eps,
                                   scale=config.adv_scale)  # [N]
        sums = dict.fromkeys(("loss", "clip", "kl", "kl_ref", "tokens", "seq_tokens"), 0.0)
        grad_norms: list[float] = []
        generator = torch.Generator().manual_seed(_seed_for(config.seed, step))
        size = config.mini_batch_size or len(batch)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(batch), generator=generator).tolist() if size < len(batch) \
                else list(range(len(batch)))
            for begin in range(0, len(batch), size):
                grad_norms.append(self._optimizer_step(batch, order[begin : begin + size], seq_adv, lam, sums))
        loss, clip, kl, kl_ref, tokens, seq_tokens = distributed.all_reduce_sum(
            [sums["loss"], sums["clip"], sums["kl"], sums["kl_ref"], sums["tokens"], sums["seq_tokens"]], self.device)
        elapsed = time.perf_counter() - started
        self.step += 1
        gate_h_warm = self.gate.h_warm
        return {
            "step": step,
            **data_metrics,
            "gate/open": int(self.gate.open),
            "gate/lambda": lam,
            "gate/h_warm": gate_h_warm,
            "actor/pg_loss": loss / max(len(grad_norms), 1),
            "actor/clip_frac": clip / tokens if tokens else None,
            "actor/approx_kl": kl / tokens if tokens else None,
            "actor/kl_ref": kl_ref / tokens if tokens and batch.ref_logprobs is not None else None,
            "actor/grad_norm": mean_or_none([g for g in grad_norms if g is not None]),
            "actor/lr": config.lr,
            "throughput/update_tok_s": seq_tokens / elapsed if elapsed > 0 else None,
        }

    def _optimizer_step(self, batch: Batch, rows: list[int], seq_adv, lam: float, sums: dict) -> float | None:
        """One optimizer step on `rows` (all ranks' share): normalizer over all of them, this rank's micro-batches."""
        from stages.method.objectives import step_normalizer

        config, env = self.config, self.env
        if not any(batch.response_ids[i] for i in rows):
            return None  # no response token: nothing to learn (the same decision on every rank)
        normalizer = step_normalizer(config.loss_agg, [len(batch.response_ids[i]) for i in rows],
                                     config.max_response_tokens or None)
        totals = {i: len(batch.prompt_ids[i]) + len(batch.response_ids[i]) for i in rows}
        share = distributed.split_by_tokens([totals[i] for i in rows], env.world_size)[env.rank]
        mine = [rows[j] for j in share if batch.response_ids[rows[j]]]
        micro = distributed.pack_micro_batches(mine, totals, config.micro_batch_tokens)
        count = distributed.all_reduce_max(len(micro), self.device)
        for k in range(count):
            if k < len(micro):
                loss, problem = self._micro_loss(batch, micro[k], seq_adv, lam, normalizer, sums)
                sums["seq_tokens"] += sum(totals[i] for i in micro[k])
            else:
                loss, problem = self._idle_loss(), None
            if distributed.all_reduce_max(int(problem is not None), self.device):
                raise RuntimeError(problem or "another rank met a non-finite log-prob or loss; no checkpoint written")
            self.engine.backward(loss * env.world_size, scale_wrt_gas=False)  # DeepSpeed averages over ranks
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        if norm is not None and not is_finite(norm):
            raise RuntimeError(f"non-finite gradient norm ({norm}) at update step {self.step}; no checkpoint written")
        return norm

    def _micro_loss(self, batch: Batch, rows: list[int], seq_adv, lam: float, normalizer: float, sums: dict):
        """PPO-clip (+ β·k3 to the reference) loss of one micro-batch, divided by the step's global normalizer, and a
        problem or None."""
        import torch
        from torch.nn.utils.rnn import pad_sequence

        from stages.method.objectives import aggregate, kl_penalty, policy_loss, token_advantages

        config = self.config
        sequences = [batch.prompt_ids[i] + batch.response_ids[i] for i in rows]
        starts = [len(batch.prompt_ids[i]) for i in rows]
        lengths = [len(batch.response_ids[i]) for i in rows]
        with self._autocast():
            flat = self.engine(sequences, starts, self.pad_id, batch.temperature, config.logprob_chunk)  # [Σ T_i]
        new_logprobs = torch.split(flat, lengths)
        for i, values in zip(rows, new_logprobs):
            if not bool(torch.isfinite(values).all()):
                bad = int((~torch.isfinite(values)).nonzero()[0])
                return None, f"row {batch.names[i]}: the policy gives a non-finite log-prob at response token {bad}"
        logprobs = pad_sequence([v.float() for v in new_logprobs], batch_first=True)  # [B, T]
        width = logprobs.shape[1]
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(self.device)  # [B, T]
        old = pad_rows([batch.student_logprobs[i] for i in rows], width).to(self.device)  # [B, T]
        pmi = pad_rows([batch.pmi[i] for i in rows], width).to(self.device)  # [B, T]
        advantages = token_advantages(config.method, seq_adv[rows].to(self.device), pmi, mask, lam)  # [B, T]
        if config.is_correction == "token":
            sampling = pad_rows([batch.sampling_logprobs[i] for i in rows], width).to(self.device)
            advantages = advantages * truncated_is_weights(old, sampling, config.is_cap)
        loss, metrics = policy_loss(logprobs, old, advantages, mask, config.clip_low, config.clip_high,
                                    config.loss_agg, normalizer)
        if batch.ref_logprobs is not None:
            ref = pad_rows([batch.ref_logprobs[i] for i in rows], width).to(self.device)  # [B, T]
            kl_ref = kl_penalty(logprobs, ref, mask)  # [B, T], 0 outside the mask
            if config.kl_coef > 0:
                loss = loss + config.kl_coef * aggregate(kl_ref, mask, config.loss_agg, normalizer)
            sums["kl_ref"] += float(kl_ref.detach().sum())
        if not bool(torch.isfinite(loss)):
            return None, f"rows {', '.join(batch.names[i] for i in rows)}: non-finite loss ({float(loss)})"
        sums["loss"] += metrics["actor/pg_loss"]
        sums["clip"] += metrics["actor/pg_clipfrac"] * metrics["actor/tokens"]
        sums["kl"] += metrics["actor/ppo_kl_k3"] * metrics["actor/tokens"]
        sums["tokens"] += metrics["actor/tokens"]
        return loss, None

    def _idle_loss(self):
        """A zero loss through every parameter, for a rank with no micro-batch left (keeps ZeRO's collectives even)."""
        with self._autocast():
            logprobs = self.engine([[self.pad_id, self.pad_id]], [1], self.pad_id, 1.0, 1)  # [1]
        return logprobs.sum() * 0.0

    # persistence ------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The run state to store next to the weights (keys the loop added, such as data_cursor, are carried)."""
        return {**self.carried, "version": STATE_VERSION, "step": self.step, "method": self.config.method,
                "gate": self.gate.state_dict(), "rng": checkpoint.rng_state(),
                "data_cursor": self.carried.get("data_cursor"), "seed": self.config.seed,
                "world_size": self.env.world_size, "zero_stage": self.zero_stage,
                "parent_revision": self.model_revision}

    def save(self, out: Path, metrics: dict) -> Path:
        with distributed.launcher_env(self.env):
            return checkpoint.save(out, self.engine, self.policy, self.tokenizer, self.state(), metrics, self.env,
                                   self.zero_stage)

    def close(self) -> None:
        """Release the engine: its hooks live in autograd (C++), so without destroy() Python never frees it."""
        self.engine.destroy()


# --- the stage --------------------------------------------------------------------------------------------------

def run(config: UpdateConfig, loaded=None) -> Path:
    """Validate → read → train one step → write CKPT_NEXT atomically. Returns the output folder.

    `loaded` (a stages.lm.models.LoadedModel of --model, fp32) is reused instead of reading the weights again; after a
    successful update its model holds the new weights and its path/revision point at the new checkpoint.
    """
    from stages.lm.models import resolve_model

    started = time.perf_counter()
    env = distributed.env_from(os.environ)
    model_dir = resolve_model(config.model)
    out = checkpoint.check_target(config.out, config.overwrite)
    with output_lock(out) if env.is_main else contextlib.nullcontext():  # rank 0 writes the folder into place
        return _run_locked(config, env, model_dir, out, loaded, started)


def _run_locked(config: UpdateConfig, env: distributed.DistEnv, model_dir: Path, out: Path, loaded, started: float
                ) -> Path:
    from stages.lm.models import model_revision
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
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    temperature = float(metadata.get("temperature") or 1.0)  # score's numerics: s_t at the sampling temperature
    batch = batch_from_table(table, str(config.scored), vocab_size, temperature)
    threads = set_threads(config.threads)
    if env.is_main:
        log.info("update: %d rows, method %s, temperature %g, %d rank(s), %d thread(s), state %s", len(batch),
                 config.method, temperature, env.world_size, threads, state_path or "fresh")

    device = distributed.training_device(env)
    distributed.init_process_group(env, device)
    trainer = Trainer(config, model_dir, state, env, device, loaded, deepspeed_user)
    try:
        metrics = trainer.train_step(batch)
        metrics["timing_s/update"] = time.perf_counter() - started
        trainer.save(out, metrics)
        if loaded is not None and Path(loaded.path).resolve() == model_dir.resolve():
            _refresh_loaded(loaded, trainer, out)
            loaded.revision = model_revision(out)
    finally:
        trainer.close()
    if env.is_main:
        log.info("update step %d: reward %.3f, λ %.3f, loss %.4g, grad norm %s, %.0f tok/s → %s", metrics["step"],
                 metrics["reward/mean"], metrics["gate/lambda"], metrics["actor/pg_loss"], metrics["actor/grad_norm"],
                 metrics["throughput/update_tok_s"] or 0.0, out)
    return out


def _refresh_loaded(loaded, trainer: Trainer, out: Path) -> None:
    """Give the caller's in-process model the new weights without reading them back from disk (ZeRO ≤ 2)."""
    import torch

    if trainer.zero_stage == 3 or next(loaded.model.parameters()).dtype != torch.float32:
        from transformers import AutoModelForCausalLM

        loaded.model = AutoModelForCausalLM.from_pretrained(out, dtype=next(loaded.model.parameters()).dtype)
        loaded.model.to(loaded.device).eval()
    else:
        with torch.no_grad():
            loaded.model.load_state_dict(trainer.policy.state_dict())
    loaded.path = out
