"""Atomic policy checkpoints: a Hugging Face folder plus the DeepSpeed engine state and the run state.

Layout of a checkpoint folder CKPT (what `update --out` writes and `update --model` reads):

    CKPT/config.json, generation_config.json, model.safetensors   weights, loadable by transformers and vLLM
    CKPT/tokenizer.json, tokenizer_config.json, chat_template.jinja
    CKPT/deepspeed/                                               DeepSpeed engine + ZeRO optimizer state (every rank's)
    CKPT/antisd_state.json                                        step, method, gate state, RNG, data cursor
    CKPT/metrics.json                                             the METHOD §6 metrics row of the step that made it

Atomicity: all ranks write into `.CKPT.tmp` next to the target; rank 0 fsyncs every file and renames the folder into
place, so an interrupted or failed write (disk full) never leaves a partial folder under the final name, and the
previous checkpoint is never touched. With `overwrite`, the old folder is moved aside, the new one renamed in, and
the old one deleted. This module decides nothing about training; it saves and restores what it is given.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from stages.common.errors import InputError
from stages.common.io import check_output, read_json_object, remove_entry, share_like_new_files, to_jsonable
from stages.common.stack import import_deepspeed
from stages.lm.compat import make_portable
from stages.training import distributed

log = logging.getLogger(__name__)

STATE_FILE = "antisd_state.json"
METRICS_FILE = "metrics.json"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "engine"


def temp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


def check_target(out: str | Path, overwrite: bool) -> Path:
    """Validate the output folder before any work: its parent exists, and it is new unless `overwrite`."""
    return check_output(out, overwrite, kind="folder")


# Bytes a checkpoint holds per parameter on top of its HF weights: the DeepSpeed module copy plus the fp32 master
# weights and Adam's two moments (SmolLM2-135M in fp32: 0.54 GB weights + 2.0 GB deepspeed/ measured, ~18.6 B/param).
_STATE_BYTES_PER_PARAM = 16
_RUN_FILES_BYTES = 1 << 20  # antisd_state.json and metrics.json: a few KB; 1 MiB of headroom
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def estimate_bytes(model_dir: Path, optimizer_state: bool = True) -> int:
    """A conservative estimate of the size of a training checkpoint of the model in `model_dir`: its weights, every
    other file the folder holds (tokenizer, chat template, configs: a Qwen tokenizer is ~11 MB), the run state and
    metrics, plus the optimizer state when `optimizer_state`."""
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) or \
        sum(f.stat().st_size for f in model_dir.glob("*.bin"))
    other = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file() and f.suffix not in (".safetensors", ".bin"))
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    stored = _DTYPE_BYTES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), 4)
    return weights + other + _RUN_FILES_BYTES + (weights // stored * _STATE_BYTES_PER_PARAM if optimizer_state else 0)


def check_free_space(out: Path, needed_bytes: int) -> None:
    """Refuse before any training work when `out`'s filesystem cannot hold the checkpoint (a failed write would
    otherwise cost the whole step; it would still leave nothing partial behind)."""
    free = shutil.disk_usage(out.parent).free
    if free < needed_bytes:
        raise InputError(f"--out {out}: the checkpoint needs about {needed_bytes / 2**30:.2f} GiB (weights and "
                         f"optimizer state) but {free / 2**30:.2f} GiB is free there; free space (a loop keeps "
                         "loop.keep_checkpoints of them) or write elsewhere")


def read_state(path: str | Path | None) -> dict | None:
    """The JSON run state at `path`, or None when `path` is None."""
    if path is None:
        return None
    return read_json_object(path, f"--state {path}")


def default_state_path(model_dir: Path) -> Path | None:
    path = model_dir / STATE_FILE
    return path if path.is_file() else None


def engine_state_dir(model_dir: Path) -> Path | None:
    """The DeepSpeed state folder of a checkpoint, or None when it has none (fresh optimizer)."""
    path = model_dir / DEEPSPEED_DIR
    return path if (path / DEEPSPEED_TAG).is_dir() else None


def load_engine_state(engine, model_dir: Path, strict: bool = True, trust: bool = False) -> bool:
    """Restore module, ZeRO optimizer and engine counters from `model_dir/deepspeed` (all ranks call this); not
    `strict` for a LoRA engine, whose saved module state holds the trainable (adapter) parameters only.

    DeepSpeed unpickles its files in full (`weights_only=False`), which runs whatever code a crafted file names. Unless
    `trust`, every file goes through `torch.load(weights_only=True)` with DeepSpeed's own state classes allowed
    (`safe_deepspeed_load`); a file that holds anything else is an InputError naming it and the option."""
    path = engine_state_dir(model_dir)
    if path is None:
        return False
    if not trust:
        engine.checkpoint_engine.load = safe_deepspeed_load
    load_path, _ = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_module_strict=strict,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load the engine state")
    return True


def deepspeed_state_classes() -> list:
    """The classes DeepSpeed pickles into its checkpoint files besides tensors and containers (ZeRO 0-3, fp32 and
    bf16, seen in every checkpoint the tests write); each is plain data, harmless to construct."""
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_deepspeed_load(path: str, map_location=None):
    """`torch.load` of one DeepSpeed checkpoint file without running code: weights_only, plus DeepSpeed's classes."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(deepspeed_state_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"the global {named.group(1)}" if named else str(exc).strip().splitlines()[0]
        raise InputError(f"{path}: loading it would run Python code it names ({what}); if you trust whoever wrote "
                         "this checkpoint, pass --trust-checkpoint (update.trust_checkpoint)") from None


def rng_state() -> dict:
    """torch CPU and Python RNG states as JSON-able values (stored in antisd_state.json)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    python_state = np.array(internal, dtype=np.uint32).tobytes()  # 624 Mersenne words + position
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": {"version": version, "state": base64.b64encode(python_state).decode(), "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on GPU (LoRA dropout) draws from these
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    python_state = np.frombuffer(base64.b64decode(state["python"]["state"]), dtype=np.uint32)
    random.setstate((state["python"]["version"], tuple(int(x) for x in python_state), state["python"]["gauss"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())
                                      for s in cuda])


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _write_hf(folder: Path, module, tokenizer, state_dict, weights: bool = True) -> None:
    """The Hugging Face part: weights (safetensors; not without `weights`), config, generation config, tokenizer
    with its chat template."""
    use_cache = module.config.use_cache
    module.config.use_cache = True  # training turns the KV cache off; inference engines want it on
    try:
        if not weights:
            module.config.save_pretrained(folder)
            if getattr(module, "generation_config", None) is not None:
                module.generation_config.save_pretrained(folder)
        elif state_dict is None:
            module.save_pretrained(folder)
        else:
            module.save_pretrained(folder, state_dict=state_dict)
    finally:
        module.config.use_cache = use_cache
    tokenizer.save_pretrained(folder)
    make_portable(folder)  # loadable by transformers 4.x too (stages.lm.compat)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to `out`; an existing `out` (overwrite) is moved aside first, then deleted. A
    link at `out` is replaced by the folder: the link goes, the folder it points to is never touched."""
    old = out.parent / f".{out.name}.old"
    remove_entry(old)
    if os.path.lexists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    remove_entry(old)


def save(out: Path, engine, policy, tokenizer, state: dict, metrics: dict, env: distributed.DistEnv,
         zero_stage: int, prefix: str = "model.", optimizer_state: bool = True, peft_model=None,
         lora_base: Path | None = None, lora_merge: bool = True) -> Path:
    """Write the checkpoint folder `out` atomically. Every rank must call this (DeepSpeed saves per-rank shards).

    Without `optimizer_state` the folder holds the weights, tokenizer, run state and metrics only (no deepspeed/):
    enough to sample, score and evaluate it, and to continue from it with a fresh optimizer; the loop writes such
    folders between its full ones and replays the steps after the last full one on resume.

    `policy` is the HF causal LM inside the engine's module, registered there under `prefix`. With `peft_model`
    (LoRA) the HF part holds the merged weights and CKPT/adapter the adapter on `lora_base` (stages.training.lora);
    deepspeed/ then keeps the trainable parameters only; without `lora_merge` the HF part has no weights.

    Raises the error of a failed write (e.g. OSError ENOSPC) on the rank that hit it, RuntimeError on the others;
    in both cases the temp folder is removed and `out` does not exist (with overwrite: is the untouched old folder).
    """
    out = Path(out)
    tmp = temp_dir_for(out)
    if env.is_main:
        remove_entry(tmp)  # left by a killed run (or a link planted there: removed, never followed)
        tmp.mkdir()
    distributed.barrier()
    error: Exception | None = None
    try:
        if optimizer_state:
            engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                   exclude_frozen_parameters=peft_model is not None)
        # ZeRO-3 holds each parameter in shards: gather the full weights (a collective, so every rank calls it).
        state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
        if env.is_main:
            if state_dict is not None:
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if peft_model is not None:
                from stages.training import lora

                state_dict = lora.merged_state_dict(policy) if lora_merge else None
                lora.save_adapter(peft_model, tmp, lora_base)
            _write_hf(tmp, policy, tokenizer, state_dict, weights=peft_model is None or lora_merge)
            _write_json(tmp / STATE_FILE, state)
            _write_json(tmp / METRICS_FILE, metrics)
            share_like_new_files(tmp)
            _fsync_tree(tmp)
    except Exception as exc:  # noqa: BLE001  (cleaned up and re-raised below, after the ranks agree)
        error = exc
    failed = distributed.all_reduce_max(int(error is not None), str(engine.device))
    if failed:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        if error is not None:
            raise error
        raise RuntimeError(f"{out}: another rank failed to write its part of the checkpoint")
    if env.is_main:
        _publish(tmp, out)
    distributed.barrier()
    return out


WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded save: which shard holds each tensor


def stored_weights(folder: Path) -> dict | None:
    """The HF weights of checkpoint `folder` by name: model.safetensors, or every shard that
    model.safetensors.index.json names (save_pretrained shards a large model); None when it has neither."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file():
        return load_file(str(folder / WEIGHTS_FILE))
    if not (folder / WEIGHTS_INDEX).is_file():
        return None
    index = read_json_object(folder / WEIGHTS_INDEX, str(folder / WEIGHTS_INDEX))
    weights: dict = {}
    for shard in sorted(set(index.get("weight_map", {}).values())):
        weights.update(load_file(str(folder / shard)))
    return weights


# Replayed weights vs the checkpoint's. CPU kernels are deterministic: a replay gives the same bits. CUDA's are not
# (atomic adds in backward, split-K matmuls), so a replayed step's gradient differs by float noise, and Adam turns any
# gradient into a step of at most ~lr·(1−β1)/√(1−β2) ≈ 3.2·lr per weight (its first step; ≈ lr later): two replays
# whose noise flips a sign differ by ≤ 2 × 3.2·lr < 8·lr per step, and the stored dtype rounds both (one ulp,
# eps·|w|). So on CUDA each weight may differ by eps(dtype)·|w| + 8·lr·k after the k-th replayed step. That catches a
# wrong start, a wrong or missing file, non-finite weights and a learning rate off by a large factor; it cannot tell a
# replay on another scored file at a small lr (its step is as small as the noise) — exactness is CPU-only.
REPLAY_STEP_BOUND = 8.0


def replay_tolerance(device: str, lr: float, steps: int) -> tuple[float, float]:
    """(relative in ulps of the stored dtype, absolute) tolerance of a replay's weights on `device`: (0, 0) on CPU."""
    if not str(device).startswith("cuda"):
        return 0.0, 0.0
    return 1.0, REPLAY_STEP_BOUND * lr * steps


def replay_differences(stored: dict, current: dict, tolerance: tuple[float, float]) -> tuple[list[str], float]:
    """Names of the tensors of `stored` that `current` does not reproduce within `tolerance` (`replay_tolerance`),
    and the largest |Δ| seen."""
    import torch

    ulps, absolute = tolerance
    differ, largest = [], 0.0
    for name, tensor in stored.items():
        mine = current[name].detach().cpu()
        if ulps == 0 and absolute == 0:
            same = bool((mine == tensor).all())
            gap = 0.0 if same else float((mine.float() - tensor.float()).abs().max())
        else:
            delta = (mine.float() - tensor.float()).abs()
            bound = ulps * torch.finfo(tensor.dtype).eps * tensor.float().abs() + absolute
            gap = float(delta.max()) if delta.numel() else 0.0
            same = bool(torch.isfinite(mine.float()).all()) and bool((delta <= bound).all())
        largest = max(largest, gap)
        if not same:
            differ.append(name)
    return differ, largest
