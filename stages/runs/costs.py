"""The cost of one training step at scale, per way of running it, computed (not measured) from the model's shape
(`stages.runs.memory.ModelShape`) and stated hardware figures: seconds of generation, score and update on N GPUs,
model loads, state bytes read and written, jobs queued. For docs/benchmarks.md (`python bench/step.py --costs`),
README's "Scaling out" and `antisd loop`'s choice between the resident ranks and the per-stage Slurm chain.

Compute (both ways alike): generation is decode-bound, so a step lasts as long as its longest response, each decode
step reading an engine's weights (2Ψ / TP bytes) and the KV cache of its sequences at a share of HBM bandwidth;
score runs the student and teacher views, 2Ψ FLOPs per token each, and the update 8Ψ per token (forward, backward
and the forward gradient checkpointing recomputes), at a share (MFU) of the bf16 peak; attention's own FLOPs (~5 % at
1–2k contexts) and prefill (< 2 %) are left out.

What differs (per step):
- resident ranks (`torchrun … loop`, one job for the run): nothing is loaded (weights move to vLLM in memory, the
  engine wakes from sleep), rank 0 writes the weights-only checkpoint (2Ψ bytes) every step and the full state
  (weights + 14Ψ: bf16 module, fp32 master, Adam m and v) every loop.checkpoint_every steps; no job is queued.
- the Slurm chain (`--launcher slurm`): five jobs queued one after the other (rollout, verify, score, update,
  record), every GPU job a fresh process (Python, CUDA, the model read), vLLM started from scratch, and the update
  job reads the full state and writes it again every step (each update is its own process). A node reads each file
  once (its page cache serves its other ranks).
Every figure is an estimate for a choice, with its assumptions in `Hardware` and `Batch`; `metrics.jsonl` holds
what a run measured. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.runs.memory import ModelShape

STATE_BYTES_PER_PARAM = 14  # DeepSpeed's full state beside the HF weights: bf16 module 2 + fp32 master 4 + Adam 8


@dataclass(frozen=True)
class Hardware:
    """Stated figures of one GPU per rank and its node (not measured here)."""

    name: str = "H100 SXM 80 GB"
    bf16_flops: float = 989e12  # dense bf16 peak per GPU
    mfu: float = 0.35  # of the peak reached by score's and the update's passes (RL trainers report 30–45 %)
    hbm_bytes_per_s: float = 3.35e12
    decode_efficiency: float = 0.5  # of HBM bandwidth a decode step reaches with ~32 sequences per engine
    disk_bytes_per_s: float = 2e9  # one node's read or write rate to the shared filesystem
    vllm_start_s: float = 60.0  # a fresh vLLM engine of a 4B model: weights, profiling, CUDA graphs
    process_start_s: float = 20.0  # a fresh GPU job's process: Python, torch, CUDA context, DeepSpeed
    wake_s: float = 2.0  # a sleeping vLLM engine woken (weights, then KV cache) and put to sleep again
    queue_s: float = 30.0  # the scheduler's latency per job on an idle cluster (minutes to hours on a busy one)


@dataclass(frozen=True)
class Batch:
    """One step of the paper's setting: 32 prompts × 8 samples, responses up to 2,048 tokens (~1,000 on average)."""

    prompts: int = 32
    samples: int = 8
    prompt_tokens: int = 200
    teacher_prompt_tokens: int = 300  # the teacher view's prompt: the problem with the verified solution
    response_mean: int = 1000
    response_max: int = 2048
    checkpoint_every: int = 5  # loop.checkpoint_every: full state every k steps (resident ranks)

    @property
    def rows(self) -> int:
        return self.prompts * self.samples


@dataclass(frozen=True)
class StepCost:
    """One step's seconds and traffic on `gpus` GPUs (module docstring)."""

    generation_s: float
    score_s: float
    update_s: float
    overhead_s: float  # loads, starts, wakes, queueing and the checkpoint I/O
    model_loads: int  # processes that read the model from disk
    read_bytes: float
    written_bytes: float
    jobs: int

    @property
    def total_s(self) -> float:
        return self.generation_s + self.score_s + self.update_s + self.overhead_s


def compute_seconds(shape: ModelShape, batch: Batch, gpus: int, hw: Hardware,
                    tensor_parallel: int = 1) -> tuple[float, float, float]:
    """(generation, score, update) seconds of one step on `gpus` GPUs (module docstring)."""
    engines = gpus // tensor_parallel
    sequences = batch.rows / engines
    context = batch.prompt_tokens + batch.response_mean / 2  # the mean context over a response's decode steps
    step_bytes = (2 * shape.params + shape.kv_bytes_per_token() * sequences * context) / tensor_parallel
    generation = batch.response_max * step_bytes / (hw.hbm_bytes_per_s * hw.decode_efficiency)
    student = batch.rows * batch.response_mean + batch.prompts * batch.prompt_tokens  # prompts shared per group
    teacher = batch.rows * batch.response_mean + batch.prompts * batch.teacher_prompt_tokens
    rate = gpus * hw.bf16_flops * hw.mfu
    return generation, 2 * shape.params * (student + teacher) / rate, 8 * shape.params * student / rate


def resident_step(shape: ModelShape, batch: Batch, gpus: int, hw: Hardware = Hardware()) -> StepCost:
    """A step of `antisd loop` as `gpus` resident ranks (one node's disk for the checkpoints), amortized over
    batch.checkpoint_every steps."""
    weights, state = 2 * shape.params, STATE_BYTES_PER_PARAM * shape.params
    written = weights + state / batch.checkpoint_every
    return StepCost(*compute_seconds(shape, batch, gpus, hw), overhead_s=hw.wake_s + written / hw.disk_bytes_per_s,
                    model_loads=0, read_bytes=0.0, written_bytes=written, jobs=0)


def slurm_chain_step(shape: ModelShape, batch: Batch, gpus: int, hw: Hardware = Hardware()) -> StepCost:
    """A step of `antisd loop --launcher slurm` with rollout and score over `gpus` array tasks and the update on
    `gpus` ranks: five jobs in a row, every GPU process reading the model, the update job reading and writing the
    full state (module docstring)."""
    weights, state = 2 * shape.params, STATE_BYTES_PER_PARAM * shape.params
    read = gpus * weights * 3 + state  # rollout, score and update ranks read the weights; the update, its state
    node_read = 3 * weights + state  # what one node reads once its page cache serves the other ranks
    written = weights + state
    jobs = 5  # rollout, verify, score, update, record
    overhead = (jobs * hw.queue_s + hw.vllm_start_s + 3 * hw.process_start_s
                + (node_read + written) / hw.disk_bytes_per_s)
    return StepCost(*compute_seconds(shape, batch, gpus, hw), overhead_s=overhead, model_loads=3 * gpus,
                    read_bytes=read, written_bytes=written, jobs=jobs)


def table(shape: ModelShape, label: str, gpus: int = 8, batch: Batch = Batch(), hw: Hardware = Hardware()) -> str:
    """The two ways side by side as a markdown table (docs/benchmarks.md, `bench/step.py --costs`)."""
    ways = {"resident ranks (`torchrun --nproc-per-node 8 … loop`)": resident_step(shape, batch, gpus, hw),
            "Slurm chain (`--launcher slurm`)": slurm_chain_step(shape, batch, gpus, hw)}
    lines = [f"{label}, {gpus} × {hw.name}, {batch.prompts} prompts × {batch.samples} samples, responses ≤ "
             f"{batch.response_max:,} (~{batch.response_mean:,}) tokens; per step:", "",
             "| way | generation s | score s | update s | loads, starts, I/O, queue s | step s | models read | "
             "GB read | GB written | jobs queued |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for way, cost in ways.items():
        lines.append(f"| {way} | {cost.generation_s:.1f} | {cost.score_s:.1f} | {cost.update_s:.1f} | "
                     f"{cost.overhead_s:.1f} | **{cost.total_s:.0f}** | {cost.model_loads} | "
                     f"{cost.read_bytes / 1e9:.0f} | {cost.written_bytes / 1e9:.1f} | {cost.jobs} |")
    return "\n".join(lines) + "\n"
