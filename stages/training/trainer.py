"""The policy inside a DeepSpeed engine plus the entropy gate: one optimizer step (or `ppo_epochs` × mini-batches of
them) on a `Batch`, and the checkpoint it writes.

Multi-process (deepspeed/torchrun/srun): every rank reads the whole scored file, so group advantages, the gate's
median and the loss normalizers are global without communication; each rank trains on its token-balanced share of
each mini-batch, padded with zero-loss micro-batches to the same count so ZeRO's per-backward collectives line up.
DeepSpeed averages gradients over ranks, so each rank's loss is multiplied by the world size: the gradient is then
the 1-process one. Rank 0 alone writes the HF folder, state and metrics; every rank writes its ZeRO shard.

The new policy's log-probs come from `stages.lm.forward`, the forward and numerics `score` used. Not here:
reading or checking files (stages.update, stages.training.batch), the math (stages.method), the checkpoint format
(stages.training.checkpoint), process groups (stages.training.distributed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

from stages.common import metrics as keys
from stages.common.errors import InputError
from stages.lm.forward import FullSequences, Numerics
from stages.lm.models import quiet_transformers
from stages.method.variants import PRE_VARIANT
from stages.training import checkpoint, distributed, lora
from stages.training.batch import Batch, is_finite, mean_or_none, pad_rows
from stages.training.config import UpdateConfig, method_settings, resolve_variant, resolved_gradient_checkpointing
from stages.training.micro import MicroBatch, rank_micro_batches
from stages.training.schedule import lr_at
from stages.training.signals import StepLambda, advantage_parts, has_learning_signal, load_gate, make_gate, step_signals

log = logging.getLogger(__name__)

STATE_VERSION = 1


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

    from stages.lm.forward import pieces_logprobs

    class PolicyLogprobs(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pieces: list, numerics):
            """Response-token log-probs of every piece (SharedPrefix or FullSequences), concatenated: [Σ T_i]."""
            return pieces_logprobs(self.model, pieces, numerics)

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
                 device: str, deepspeed_user: dict | None = None):
        from stages.lm.models import load_tokenizer, model_revision

        config = resolve_variant(config, state)
        self.config, self.env, self.device, self.model_dir = config, env, device, model_dir
        self.precision = _precision(config.dtype, device)
        dropped = {"data_cursor"} | (set() if config.lora_rank else {lora.BASE_KEY, lora.SHAPE_KEY})  # old / stale
        self.carried = {k: v for k, v in (state or {}).items() if k not in dropped}
        self.on_tokens = None  # called with the tokens of each micro-batch this rank trains (update's progress)
        self.replayed_steps = 0  # steps stages.update.replay re-ran since this trainer opened
        self.step = int(self.carried.get("step", 0))
        self.model_revision = model_revision(model_dir)
        self.gate = make_gate(config)  # the entropy gate (METHOD §5) or the perplexity gate (§9)
        if "gate" in self.carried:
            load_gate(self.gate, self.carried["gate"])
        # check_state allowed a switch of method or variant; states written before variants existed are paper's
        self.switched_method = self.carried.get("method") not in (None, config.method) or \
            ("gate" in self.carried and self.carried.get("variant", PRE_VARIANT) != config.variant)
        if "rng" in self.carried:
            checkpoint.restore_rng(self.carried["rng"])
        else:
            from stages.common.process import seed_everything

            seed_everything(config.seed)
        self.lora_base, self.peft_model = None, None  # set by _load_module with update.lora_rank > 0
        self.tokenizer = load_tokenizer(model_dir)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.policy = self._load_module()  # the HF causal LM; the engine wraps it in PolicyLogprobs
        self.policy.config.use_cache = False
        self.gradient_checkpointing = resolved_gradient_checkpointing(config.gradient_checkpointing, device)
        self.share_prefix = config.share_prefix and not self.gradient_checkpointing
        if config.share_prefix and self.gradient_checkpointing:
            log.info("gradient checkpointing is on: the update runs full sequences (no shared prefixes)")
        if self.gradient_checkpointing:
            _enable_activation_checkpointing(self.policy)
        self.policy.to(device).train()
        module = _logprob_module(self.policy)
        trainable = [p for p in module.parameters() if p.requires_grad]  # all of them without LoRA
        ds_precision = "fp32" if self.precision == "autocast-bf16" else self.precision
        ds_config = distributed.deepspeed_config(deepspeed_user or {}, config.zero_stage, config.grad_clip,
                                                 env.world_size, ds_precision, overlap_comm=device.startswith("cuda"))
        optimizer = distributed.client_optimizer(trainable, config.lr, config.weight_decay, ds_config, device)
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        started = time.perf_counter()
        with distributed.launcher_env(env):
            self.engine = distributed.create_engine(module, optimizer, ds_config, env, device)
            self.resumed_optimizer = checkpoint.load_engine_state(self.engine, model_dir, strict=not config.lora_rank,
                                                                  trust=config.trust_checkpoint)
        log.info("DeepSpeed ZeRO-%d engine ready in %.1fs (%s, %d rank(s), optimizer %s)", self.zero_stage,
                 time.perf_counter() - started, self.precision, env.world_size,
                 "resumed" if self.resumed_optimizer else "fresh")
        self.configure(config)

    def configure(self, config: UpdateConfig) -> None:
        """Take the options of the step about to run (a resident trainer serves several: out, seed and the
        re-calibration request change; the model, method and numerics do not)."""
        config = resolve_variant(config, self.carried)
        self.config = config  # lr and weight decay go into the optimizer at the start of each step (_train_step)
        switched, self.switched_method = self.switched_method, False  # a method switch re-calibrates once
        if self.gate.request_recalibration(config.recalibrate_gate, force=switched):
            log.info("gate: re-calibrating over the next %d steps (%s)", config.warmup_steps,
                     f"method {self.carried.get('method')} ({self.carried.get('variant', PRE_VARIANT)}) → "
                     f"{config.method} ({config.variant})" if switched else "--recalibrate-gate")

    def scheduled_lr(self) -> float:
        """The learning rate of the update step about to run (`stages.training.schedule`, by the run's step)."""
        config = self.config
        return lr_at(self.step, config.lr, config.lr_schedule, config.lr_warmup_steps, config.lr_decay_steps,
                     config.lr_min_ratio)

    def _set_hyperparameters(self) -> float:
        lr = self.scheduled_lr()
        for group in self.engine.optimizer.param_groups:  # the options win over the saved hyper-parameters
            group["lr"], group["weight_decay"] = lr, self.config.weight_decay
        return lr

    def _load_module(self):
        """The policy in the dtype DeepSpeed trains it in (fp32 on CPU): the model's weights, or with LoRA its base plus
        the adapter (fresh or continued)."""
        import torch
        from transformers import AutoModelForCausalLM

        from stages.lm.models import attention_kwargs, checked_logits_path

        quiet_transformers()
        weights_dir, adapter = self.model_dir, None
        if self.config.lora_rank:
            weights_dir, adapter = lora.base_and_adapter(self.model_dir, self.carried)
            self.lora_base = weights_dir.resolve()
        # DeepSpeed's bf16/fp16 modes cast the module to 16 bits and build the fp32 master from those weights: loading
        # in that dtype gives the same master without a full fp32 copy first (4 bytes/parameter on the host)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        network = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype, trust_remote_code=False,
                                                       **attention_kwargs(self.config.attn_implementation))
        network = checked_logits_path(network, f"--model {self.config.model}")
        if self.config.lora_rank:
            network, self.peft_model = lora.attach(network, self.config, adapter)
            log.info("LoRA rank %d on %s: %d of %d parameters train", self.config.lora_rank, weights_dir,
                     sum(p.numel() for p in network.parameters() if p.requires_grad),
                     sum(p.numel() for p in network.parameters()))
        return network

    def numerics(self, temperature: float) -> Numerics:
        """The forward's numerics at `temperature`: score's (stages.lm.forward), without the entropy."""
        from stages.lm.forward import chunk_positions

        vocab = self.policy.config.get_text_config().vocab_size
        return Numerics(self.pad_id, temperature, chunk_positions(self.config.logprob_chunk, self.device, vocab),
                        with_entropy=False)

    def _autocast(self):
        import torch

        if self.precision == "autocast-bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # one step ---------------------------------------------------------------------------------------------------

    def train_step(self, batch: Batch, signals=None) -> dict:
        """Gate → advantages → ppo_epochs × mini-batches of optimizer steps. Returns the step's metrics row.
        `signals`: what `step_signals(batch)` returned, when the caller needed them first (the gate then has
        advanced already)."""
        with distributed.launcher_env(self.env):  # ZeRO-3 reads LOCAL_RANK from the environment in forward
            return self._train_step(batch, signals)

    def step_signals(self, batch: Batch) -> tuple[dict, StepLambda, object, object, list[int]]:
        """Advance the gate by this step: (data metrics, λ, sequence advantages [N], overlong shaping or None, the
        rows that carry a loss). The trainer's step calls it; so does `update --advantages-out` before training."""
        return step_signals(self.gate, self.config, batch)

    def _train_step(self, batch: Batch, signals=None) -> dict:
        import torch

        config = self.config
        self.policy.train()  # the loop lends the policy to rollout and score in eval mode between steps
        started = time.perf_counter()
        step = self.step
        lr = self._set_hyperparameters()
        data_metrics, lam, seq_adv, shaping, trained = signals or self.step_signals(batch)
        self._check_gate_agrees()
        sums = dict.fromkeys(("loss", "clip", "clip_dual", "u_clipped", "kl", "kl_ref", "tokens", "seq_tokens"), 0.0)
        grad_norms: list[float] = []
        generator = torch.Generator().manual_seed(_seed_for(config.seed, step))
        size = config.mini_batch_size or max(len(trained), 1)
        signal = has_learning_signal(config, batch, seq_adv, lam, trained)
        if not signal and self.env.is_main:
            log.warning("update step %d: no learning signal (every advantage is 0: each group's rewards are equal "
                        "and λ = 0), so no optimizer step: the checkpoint keeps the weights and the run state "
                        "advances (metric %s)", step, keys.NO_SIGNAL)
        for _ in range(config.ppo_epochs if signal else 0):
            order = [trained[i] for i in torch.randperm(len(trained), generator=generator).tolist()] \
                if size < len(trained) else trained
            for begin in range(0, len(trained), size):
                grad_norms.append(self._optimizer_step(batch, order[begin : begin + size], seq_adv, lam, sums))
        loss, clip, clip_dual, u_clipped, kl, kl_ref, tokens, seq_tokens = distributed.all_reduce_sum(
            [sums[k] for k in ("loss", "clip", "clip_dual", "u_clipped", "kl", "kl_ref", "tokens", "seq_tokens")],
            self.device)
        elapsed = time.perf_counter() - started
        self.step += 1
        return {
            keys.STEP: step,
            **data_metrics,
            keys.OVERLONG_PENALTY_MEAN: float(shaping.mean()) if shaping is not None and len(shaping) else None,
            keys.OVERLONG_FILTERED: len(batch) - len(trained) if config.overlong_filter else None,
            **lam.metrics,
            keys.PMI_CLIPPED_FRAC: u_clipped / tokens if tokens and lam.sigma_ref is not None else None,
            keys.PG_LOSS: loss / max(len(grad_norms), 1),
            keys.CLIP_FRAC: clip / tokens if tokens else None,
            keys.CLIP_FRAC_DUAL: clip_dual / tokens if tokens and config.dual_clip > 0 else None,
            keys.APPROX_KL: kl / tokens if tokens else None,
            keys.KL_REF: kl_ref / tokens if tokens and batch.ref_logprobs is not None else None,
            keys.GRAD_NORM: mean_or_none([g for g in grad_norms if g is not None]),
            keys.NO_SIGNAL: int(not signal),
            keys.LR: lr,
            keys.UPDATE_TOK_S: seq_tokens / elapsed if elapsed > 0 and seq_tokens else None,
        }

    def _check_gate_agrees(self) -> None:
        """Every rank computed the gate from the whole scored file, so its state (the calibration of METHOD §5/§9
        included) must be the same on all of them; a difference would train the ranks on different advantages."""
        digest = hashlib.sha256(json.dumps(self.gate.state_dict(), sort_keys=True).encode()).digest()
        if not distributed.same_on_every_rank(int.from_bytes(digest[:7], "little"), self.device):
            raise RuntimeError(f"update step {self.step}: the ranks hold different gate states (calibration); "
                               "no checkpoint written")

    def _optimizer_step(self, batch: Batch, rows: list[int], seq_adv, lam: StepLambda, sums: dict) -> float | None:
        """One optimizer step on `rows` (all ranks' share): normalizer over all of them, this rank's micro-batches."""
        from stages.method.losses import step_normalizer

        config, env = self.config, self.env
        if not any(batch.response_ids[i] for i in rows):
            return None  # no response token: nothing to learn (the same decision on every rank)
        normalizer = step_normalizer(config.loss_agg, [len(batch.response_ids[i]) for i in rows],
                                     config.max_response_tokens or None)
        micro = rank_micro_batches(batch.prompt_ids, batch.response_ids, rows, env.world_size, env.rank,
                                   config.micro_batch_tokens, self.share_prefix)
        count = distributed.all_reduce_max(len(micro), self.device)
        for k in range(count):
            if k < len(micro):
                loss, problem = self._micro_loss(batch, micro[k], seq_adv, lam, normalizer, sums)
                sums["seq_tokens"] += sum(len(batch.prompt_ids[i]) + len(batch.response_ids[i])
                                          for i in micro[k].rows)
            else:
                loss, problem = self._idle_loss(), None
            if distributed.all_reduce_max(int(problem is not None), self.device):
                raise RuntimeError(problem or "another rank met a non-finite log-prob or loss; no checkpoint written")
            self.engine.backward(loss * env.world_size, scale_wrt_gas=False)  # DeepSpeed averages over ranks
            if self.on_tokens is not None and k < len(micro):
                self.on_tokens(sum(len(batch.prompt_ids[i]) + len(batch.response_ids[i]) for i in micro[k].rows))
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        if norm is not None and not is_finite(norm):
            raise RuntimeError(f"non-finite gradient norm ({norm}) at update step {self.step}; no checkpoint written")
        return norm

    def _micro_loss(self, batch: Batch, micro: MicroBatch, seq_adv, lam: StepLambda, normalizer: float, sums: dict):
        """PPO-clip (+ β·k3 to the reference) loss of one micro-batch, divided by the step's global normalizer, and a
        problem or None."""
        import torch
        from torch.nn.utils.rnn import pad_sequence

        from stages.method.losses import aggregate, kl_penalty, policy_loss, truncated_is_weights

        config, rows = self.config, micro.rows
        lengths = [len(batch.response_ids[i]) for i in rows]
        with self._autocast():
            flat = self.engine(micro.pieces, self.numerics(batch.temperature))  # [Σ T_i]
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
        advantages = advantage_parts(config, seq_adv[rows].to(self.device), pmi, mask, lam.rows(rows),
                                     lam.sigma_ref).advantages  # [B, T]
        if lam.sigma_ref is not None:  # tokens the adaptive clip drops (METHOD §9 step 3)
            sums["u_clipped"] += float(((pmi.abs() > config.u_clip_k * lam.sigma_ref) & mask).sum())
        if (batch.is_correction or config.is_correction) == "token":  # auto: resolved by the file's sampler
            sampling = pad_rows([batch.sampling_logprobs[i] for i in rows], width).to(self.device)
            advantages = advantages * truncated_is_weights(old, sampling, config.is_cap)
        loss, stats = policy_loss(logprobs, old, advantages, mask, config.clip_low, config.clip_high,
                                  config.loss_agg, normalizer, dual_clip=config.dual_clip)
        if batch.ref_logprobs is not None:
            ref = pad_rows([batch.ref_logprobs[i] for i in rows], width).to(self.device)  # [B, T]
            kl_ref = kl_penalty(logprobs, ref, mask)  # [B, T], 0 outside the mask
            if config.kl_coef > 0:
                loss = loss + config.kl_coef * aggregate(kl_ref, mask, config.loss_agg, normalizer)
            sums["kl_ref"] += float(kl_ref.detach().sum())
        if not bool(torch.isfinite(loss)):
            return None, f"rows {', '.join(batch.names[i] for i in rows)}: non-finite loss ({float(loss)})"
        sums["loss"] += stats.pg_loss
        sums["clip"] += stats.clip_frac * stats.tokens
        sums["clip_dual"] += stats.clip_frac_dual * stats.tokens
        sums["kl"] += stats.approx_kl * stats.tokens
        sums["tokens"] += stats.tokens
        return loss, None

    def _idle_loss(self):
        """A zero loss through every parameter, for a rank with no micro-batch left (keeps ZeRO's collectives even)."""
        with self._autocast():
            logprobs = self.engine([FullSequences([[self.pad_id, self.pad_id]], [1])],
                                   Numerics(self.pad_id, 1.0, 1, with_entropy=False))  # [1]
        return logprobs.sum() * 0.0

    # persistence ------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The run state to store next to the weights (keys a caller added to the state it read are carried)."""
        return {**self.carried, "version": STATE_VERSION, "step": self.step, "method": self.config.method,
                "variant": self.config.variant, "update_settings": method_settings(self.config),
                "gate": self.gate.state_dict(), "rng": checkpoint.rng_state(), "seed": self.config.seed,
                "world_size": self.env.world_size, "zero_stage": self.zero_stage,
                "parent_revision": self.model_revision,
                **({lora.BASE_KEY: str(self.lora_base), lora.SHAPE_KEY: lora.shape(self.config)}
                   if self.config.lora_rank else {})}

    def hf_state_dict(self) -> dict:
        """The weights a checkpoint's HF folder holds: the policy's, or with LoRA the merged W + ΔW."""
        return lora.merged_state_dict(self.policy) if self.peft_model is not None else self.policy.state_dict()

    def save(self, out: Path, metrics: dict, optimizer_state: bool = True) -> Path:
        """Write the checkpoint `out`; the trainer then continues from it (its revision is the next parent)."""
        from stages.lm.models import model_revision

        with distributed.launcher_env(self.env):
            checkpoint.save(out, self.engine, self.policy, self.tokenizer, self.state(), metrics, self.env,
                            self.zero_stage, optimizer_state=optimizer_state, peft_model=self.peft_model,
                            lora_base=self.lora_base, lora_merge=self.config.lora_merge)
        self.model_dir, self.model_revision = Path(out), model_revision(out)
        return out

    def serves_inference(self) -> bool:
        """Whether the policy module can sample and score as it is: full weights in this process (ZeRO ≤ 2), and no
        LoRA (its unmerged x·W + x·ΔW differs from the checkpoint's merged weights in the last bits, and a resumed run
        reads the checkpoint: lending it would make a resume differ). Its dtype (fp32 on CPU, DeepSpeed's bf16 on GPU)
        is the borrower's to check (stages.runs.resources)."""
        return self.zero_stage < 3 and self.peft_model is None

    def close(self) -> None:
        """Release the engine: its hooks live in autograd (C++), so without destroy() Python never frees it."""
        self.engine.destroy()


