"""What a run needs of one GPU, computed from the model's config.json before anything is loaded: the memory model
behind `antisd loop`'s refusal, the loop's vLLM share (`rollout.gpu_memory_utilization` auto) and docs/memory.md.

Ψ = parameters (embeddings, attention with GQA and qk-norm, SwiGLU MLP, norms; the head counted once when tied).
Bytes per parameter on one of N ranks (DeepSpeed mixed precision with a client AdamW, stages.training.trainer):

    bf16 (GPU)     weights 2 (ZeRO-3: 2/N) · gradients 2 (ZeRO-2/3: 2/N) · fp32 master 4/N · Adam m, v 8/N ·
                   fp32 step gradients 4/N (made at the optimizer step from the bf16 ones)
    fp32 (CPU)     weights 4 · gradients 4 (ZeRO-2/3: 4/N) · Adam 8/N
    LoRA           the frozen base at 2 (bf16) or 4 bytes, the adapter's parameters as above
    offload        DeepSpeed's offload_optimizer: master, Adam and step gradients live in CPU memory

ZeRO-0 keeps all of it on every rank (N = 1 in the formulas). Activations of one micro-batch of T positions, bf16,
per layer and position: the two norms' inputs and outputs (4h), q, k, v, the qk-norm inputs and the attention output
(2q + 3kv + q for GQA), and the MLP's gate, up, activation and product (4i): 2 bytes each; with gradient
checkpointing only each layer's input (2h) stays, plus one layer recomputed. The fp32 LM head copy and its gradient
(8·V·h: stages.lm.logprobs.fp32_head) and the chunked logits (stages.lm.forward.LOGITS_BUDGET_BYTES) come on top.
A colocated vLLM engine holds `gpu_memory_utilization` × the card while it samples and (asleep, level 2) almost
nothing while score and update run; it needs its bf16 weights plus the KV cache of one longest sequence at least.

The figures are estimates for a refusal and a table (fragmentation, the CUDA context and NCCL buffers are covered by
stages.common.card.RESERVED_BYTES), not a guarantee; `memory/peak_gib/<phase>` in metrics.jsonl is what a run
measured. Pure: no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from stages.common.card import GIB, RESERVED_BYTES

LOGITS_BYTES = 4 * GIB  # stages.lm.forward.LOGITS_BUDGET_BYTES (chunked fp32 logits and temporaries)
VLLM_OVERHEAD_BYTES = 2 * GIB  # vLLM's activations, sampler and CUDA graphs beside its weights and KV cache
MAX_UTILIZATION = 0.9  # vLLM's own default: the most of a card the engine is given


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its memory (from config.json)."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qk_norm: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        config = config.get("text_config", config)
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return cls(config["vocab_size"], hidden, config["num_hidden_layers"], config["intermediate_size"], heads,
                   config.get("num_key_value_heads") or heads, config.get("head_dim") or hidden // heads,
                   bool(config.get("tie_word_embeddings", False)), config.get("model_type", "").startswith("qwen3"))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelShape":
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        attention = self.hidden * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden + (2 * self.head_dim if self.qk_norm
                                                                                     else 0)

    @property
    def params(self) -> int:
        """Ψ: every parameter, a tied head counted once."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden

    def lora_params(self, rank: int) -> int:
        """Parameters of rank-`rank` adapters on every linear layer but the head (all-linear)."""
        per_layer = (self.hidden + self.q_dim) + 2 * (self.hidden + self.kv_dim) + (self.q_dim + self.hidden) \
            + 2 * (self.hidden + self.intermediate) + (self.intermediate + self.hidden)
        return rank * per_layer * self.layers

    def activation_bytes(self, positions: int, checkpointing: bool) -> int:
        """Activations kept for backward of one micro-batch of `positions` (bf16, see the module docstring)."""
        per_position = 4 * self.hidden + 2 * self.q_dim + 3 * self.kv_dim + self.q_dim + 4 * self.intermediate
        if checkpointing:
            return 2 * positions * (self.layers * self.hidden + per_position)
        return 2 * positions * self.layers * per_position

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_dim * 2  # keys and values, bf16


# config.json values of the published models (Qwen/Qwen3-4B-Instruct-2507, Qwen/Qwen3-8B): the docs' tables
PUBLISHED_SHAPES = {
    "Qwen3-4B": ModelShape(vocab=151_936, hidden=2560, layers=36, intermediate=9728, heads=32, kv_heads=8,
                           head_dim=128, tied=True, qk_norm=True),
    "Qwen3-8B": ModelShape(vocab=151_936, hidden=4096, layers=36, intermediate=12_288, heads=32, kv_heads=8,
                           head_dim=128, tied=False, qk_norm=True),
}


@dataclass(frozen=True)
class TrainSetup:
    """How the update trains (the loop's update section, resolved)."""

    world_size: int = 1
    zero_stage: int = 2
    bf16: bool = True  # DeepSpeed mixed precision (GPU); False: fp32 weights (CPU)
    lora_rank: int = 0
    gradient_checkpointing: bool = True
    micro_batch_tokens: int = 2048  # positions per forward/backward (a longer sequence goes alone)
    longest_sequence: int = 0  # the longest prompt + response the step can hold
    offload_optimizer: bool = False


@dataclass(frozen=True)
class Breakdown:
    """Bytes per GPU by component; `total` is their sum."""

    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.parts.items() if value)


def trainer_bytes(shape: ModelShape, setup: TrainSetup, training: bool) -> Breakdown:
    """The trainer's bytes on one GPU: its resident state between steps (`training` False: weights, master, Adam),
    or its peak inside the update (`training` True: + gradients, fp32 step gradients, activations, fp32 head)."""
    n, stage = setup.world_size, setup.zero_stage
    trained = shape.lora_params(setup.lora_rank) if setup.lora_rank else shape.params
    frozen = shape.params if setup.lora_rank else 0
    weight_bytes = 2 if setup.bf16 else 4

    def shard(count: int, stage_from: int) -> float:
        return count / n if stage >= stage_from else count

    optimizer_place = 0 if setup.offload_optimizer else 1
    parts = {
        "weights": weight_bytes * (shard(trained, 3) + frozen),
        "fp32 master": (4 * shard(trained, 1) if setup.bf16 else 0) * optimizer_place,
        "Adam m, v": 8 * shard(trained, 1) * optimizer_place,
    }
    if training:
        positions = max(setup.micro_batch_tokens, setup.longest_sequence)
        parts["gradients"] = weight_bytes * shard(trained, 2)
        parts["fp32 step gradients"] = (4 * shard(trained, 1) if setup.bf16 else 0) * optimizer_place
        parts["activations"] = shape.activation_bytes(positions, setup.gradient_checkpointing)
        parts["fp32 head + logits"] = (8 * shape.vocab * shape.hidden if setup.bf16 else 0) + LOGITS_BYTES
    return Breakdown({name: int(value) for name, value in parts.items()})


def vllm_min_bytes(shape: ModelShape, longest_sequence: int, overhead: int = VLLM_OVERHEAD_BYTES,
                   tensor_parallel: int = 1) -> int:
    """The least a vLLM engine can start with on each of its `tensor_parallel` GPUs: its share of the bf16 weights
    and of the KV cache of one longest sequence, and its overhead."""
    shared = 2 * shape.params + shape.kv_bytes_per_token() * max(longest_sequence, 1)
    return shared // tensor_parallel + overhead


@dataclass(frozen=True)
class Plan:
    """The per-GPU peak of a loop's phases and the vLLM share it leaves (0 when there is no vLLM)."""

    shape: ModelShape
    setup: TrainSetup
    total_bytes: int
    train: Breakdown
    resident: Breakdown  # what the trainer holds while vLLM samples (nothing when it is not resident)
    vllm_utilization: float
    vllm_min: int
    reserved: int = RESERVED_BYTES
    vllm_sleeps: bool = True  # asleep (level 2) or closed while the update trains; else its share stays

    @property
    def usable(self) -> int:
        return self.total_bytes - self.reserved

    @property
    def train_bytes(self) -> int:
        return self.train.total + (0 if self.vllm_sleeps else int(self.vllm_utilization * self.total_bytes))

    @property
    def sample_bytes(self) -> int:
        return self.resident.total + int(self.vllm_utilization * self.total_bytes)

    @property
    def peak(self) -> int:
        return max(self.train_bytes, self.sample_bytes)

    @property
    def fits(self) -> bool:
        vllm_ok = self.vllm_utilization == 0 or self.vllm_utilization * self.total_bytes >= self.vllm_min
        return self.train_bytes <= self.usable and self.sample_bytes <= self.usable and vllm_ok


def utilization_beside(total_bytes: int, resident_bytes: int, reserved: int = RESERVED_BYTES) -> float:
    """The vLLM share (`gpu_memory_utilization`) that fits beside `resident_bytes`: the rest of the usable card,
    rounded down to 0.05, at most MAX_UTILIZATION (TRL colocates at 0.3 and verl at 0.5 of the card beside a resident
    trainer; here the share is what the trainer's own state leaves, so a LoRA run gets a larger KV cache)."""
    share = (total_bytes - reserved - resident_bytes) / total_bytes
    return max(0.0, min(MAX_UTILIZATION, int(share * 20) / 20))


def plan(shape: ModelShape, setup: TrainSetup, total_bytes: int, *, vllm: bool, resident_trainer: bool,
         utilization: float = 0.0, reserved: int = RESERVED_BYTES, vllm_sleeps: bool = True,
         vllm_overhead: int = VLLM_OVERHEAD_BYTES, tensor_parallel: int = 1) -> Plan:
    """The plan of a loop on one GPU of `total_bytes` (one of setup.world_size ranks; vLLM over `tensor_parallel`
    GPUs); `utilization` 0 = auto (`utilization_beside`)."""
    train = trainer_bytes(shape, setup, training=True)
    resident = trainer_bytes(shape, setup, training=False) if resident_trainer else Breakdown()
    if vllm and not utilization:
        utilization = utilization_beside(total_bytes, resident.total, reserved)
    return Plan(shape, setup, total_bytes, train, resident, utilization if vllm else 0.0,
                vllm_min_bytes(shape, setup.longest_sequence, vllm_overhead, tensor_parallel) if vllm else 0, reserved,
                vllm_sleeps)


def refusal(plan_: Plan, label: str) -> str | None:
    """A one-line reason why `plan_` does not fit, with the figures and the ways out; None when it fits."""
    if plan_.fits:
        return None
    gib = plan_.total_bytes / GIB
    if plan_.train_bytes > plan_.usable:
        awake = "" if plan_.vllm_sleeps else f" + vLLM's {plan_.vllm_utilization:.2f} of the card (loop.vllm_sleep off)"
        what = f"the update needs {plan_.train.total / GIB:.1f} GiB per GPU ({plan_.train.describe()}){awake}"
    elif plan_.vllm_utilization * plan_.total_bytes < plan_.vllm_min:
        what = (f"vLLM needs {plan_.vllm_min / GIB:.1f} GiB (bf16 weights + the KV cache of one longest sequence) but "
                f"gets {plan_.vllm_utilization:.2f} of the card beside the trainer's "
                f"{plan_.resident.total / GIB:.1f} GiB")
    else:
        what = (f"sampling needs {plan_.sample_bytes / GIB:.1f} GiB (the resident trainer's "
                f"{plan_.resident.total / GIB:.1f} + vLLM's {plan_.vllm_utilization:.2f} of the card)")
    return (f"{label}: {what}, more than the {plan_.usable / GIB:.1f} GiB usable of one {gib:.1f} GiB GPU; ways out: "
            f"{'; '.join(ways_out(plan_))}")


def ways_out(plan_: Plan) -> list[str]:
    """What would make `plan_` fit, each with its figure (the update's per-GPU need after the change)."""
    setup, shape_free = plan_.setup, []
    if not setup.lora_rank:
        shape_free.append(("update.lora_rank=64", replace(setup, lora_rank=64)))
    if not setup.gradient_checkpointing:
        shape_free.append(("update.gradient_checkpointing=true", replace(setup, gradient_checkpointing=True)))
    if not setup.offload_optimizer:
        shape_free.append(("optimizer offload (update.deepspeed_config with zero_optimization.offload_optimizer "
                           "{device: cpu})", replace(setup, offload_optimizer=True)))
    if setup.world_size < 8:
        shape_free.append(("8 GPUs: torchrun --nproc-per-node 8 -m antisd_cli loop … (ZeRO-2 over 8 ranks)",
                           replace(setup, world_size=8)))
    return [f"{text} → {trainer_bytes(plan_.shape, changed, True).total / GIB:.1f} GiB"
            for text, changed in shape_free] + (["loop.resident_trainer=false (the card is the trainer's or vLLM's, "
                                                  "in turn)"] if plan_.resident.total else [])


def train_setup(update, *, device: str, world_size: int, longest_sequence: int) -> TrainSetup:
    """The TrainSetup of an UpdateConfig (a run's `RunConfig.update`) on `device`: its ZeRO stage (else its DeepSpeed
    JSON's, else 2), bf16 on GPU unless float32, its LoRA rank, gradient checkpointing (by default on GPU), micro
    batch and optimizer offload."""
    from stages.training.batch import read_deepspeed_file, zero_stage
    from stages.training.config import resolved_gradient_checkpointing

    user = read_deepspeed_file(update.deepspeed_config)
    offload = user.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    return TrainSetup(world_size, zero_stage(update), update.dtype != "float32" and str(device).startswith("cuda"),
                      update.lora_rank, resolved_gradient_checkpointing(update.gradient_checkpointing, device),
                      update.micro_batch_tokens, longest_sequence, offload)
