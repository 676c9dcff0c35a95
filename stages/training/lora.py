"""LoRA adapters for the update (`update.lora_rank` > 0), through PEFT.

The trainer trains only the adapter's A and B matrices; the base weights stay frozen as they were loaded. A LoRA
checkpoint folder holds both forms of the same policy:

    CKPT/model.safetensors …   the merged weights W + (α/r)·B·A: what rollout (HF or vLLM), score and eval load,
                               so the teacher view of `score` runs with the same adapter as the student view
    CKPT/adapter/              the PEFT adapter (adapter_config.json, adapter_model.safetensors), loadable with
                               `PeftModel.from_pretrained(base, CKPT/adapter)`; what the next update trains on

With `lora_merge` off the folder holds no weights of its own (config, tokenizer, adapter): every stage that loads it
merges the adapter into its base in memory (`stages.lm.models.load_model`; the same bits in fp32), vLLM refuses it.

The run state keeps the base folder (`lora_base`) and the adapter's shape (`lora`), so a continued run loads the
original base plus the adapter (never the merged weights plus the adapter again). The merged weights are computed
out of place (W + ΔW per adapted layer), so saving never rounds the base weights the trainer keeps.
"""

from __future__ import annotations

from pathlib import Path

from stages.common.errors import InputError
from stages.lm.models import ADAPTER_DIR

BASE_KEY = "lora_base"  # run-state key: the folder of the frozen base weights
SHAPE_KEY = "lora"  # run-state key: rank, alpha, dropout, target modules


def shape(config) -> dict:
    """The adapter's shape as stored in the run state (what must match to continue an adapter)."""
    return {"rank": config.lora_rank, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": config.lora_target_modules}


def target_modules(spec: str):
    """`all-linear` (PEFT: every linear layer but the output head) or a comma list of module names."""
    return spec if spec == "all-linear" else [name.strip() for name in spec.split(",") if name.strip()]


def base_and_adapter(model_dir: Path, state: dict | None) -> tuple[Path, Path | None]:
    """The base weights' folder and the adapter to continue (None: a fresh adapter) for a trainer opened on
    `model_dir`: a LoRA checkpoint continues its adapter on its recorded base; any other folder is the base."""
    adapter = model_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        return model_dir, None
    base = (state or {}).get(BASE_KEY)
    if not base:
        raise InputError(f"--model {model_dir}: holds a LoRA adapter but its run state names no base model "
                         f"({BASE_KEY}); pass --state with the run's antisd_state.json")
    if not (Path(base) / "config.json").is_file():
        raise InputError(f"--model {model_dir}: its LoRA base model {base} is gone (the adapter trains on it)")
    return Path(base), adapter


def check_state(config, state: dict | None, model_dir: Path, zero_stage: int) -> None:
    """A LoRA checkpoint continues only as the same adapter (or as full training from its merged weights with a
    fresh optimizer); full-training optimizer state cannot continue as LoRA and back; LoRA needs ZeRO ≤ 2 (the merge
    reads whole weights), whether the stage comes from --zero-stage or the DeepSpeed JSON."""
    if config.lora_rank and zero_stage == 3:
        raise InputError("--lora-rank: LoRA is not available with ZeRO-3 (the DeepSpeed config's stage); use ZeRO-2, "
                         "the adapter's optimizer state is small")
    saved = (state or {}).get(SHAPE_KEY)
    has_optimizer = (model_dir / "deepspeed").is_dir()
    if config.lora_rank and saved and saved != shape(config):
        raise InputError(f"--model {model_dir}: its LoRA adapter is {saved}, this update asks {shape(config)}; use "
                         "the same --lora-* options, or start from the base model")
    if has_optimizer and bool(saved) != bool(config.lora_rank):
        kind = "a LoRA adapter's" if saved else "full training's"
        raise InputError(f"--model {model_dir}: its optimizer state is {kind}, this update is "
                         f"{'LoRA' if config.lora_rank else 'full training'}; move {model_dir / 'deepspeed'} away "
                         "to start a fresh optimizer")


def check_targets(model_dir: Path, spec: str) -> None:
    """InputError unless every module name of a comma-list `spec` names linear layers of the model in `model_dir`
    (built on the meta device: no weights are read). `all-linear` always fits."""
    if spec == "all-linear":
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        network = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir, trust_remote_code=False),
                                                     trust_remote_code=False)
    present = {name.rsplit(".", 1)[-1] for name, module in network.named_modules()
               if isinstance(module, torch.nn.Linear)}
    missing = [name for name in target_modules(spec) if name not in present]
    if missing:
        raise InputError(f"--lora-target-modules {spec}: no linear layer named {', '.join(missing)} in {model_dir} "
                         f"(it has {', '.join(sorted(present))})")


def attach(network, config, adapter: Path | None):
    """(the causal LM with LoRA layers injected, its PeftModel): a fresh adapter, or `adapter` continued. The LM is
    what the trainer runs (the same module tree as before, some Linear layers wrapped); the PeftModel saves it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        peft_model = PeftModel.from_pretrained(network, str(adapter), is_trainable=True)
    else:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=target_modules(config.lora_target_modules), bias="none",
                          task_type="CAUSAL_LM")
        try:
            peft_model = get_peft_model(network, lora)
        except ValueError as exc:
            raise InputError(f"--lora-target-modules {config.lora_target_modules}: {str(exc).splitlines()[0]}") \
                from None
    return peft_model.base_model.model, peft_model


def merged_state_dict(policy) -> dict:
    """The plain model's state dict with every adapted layer's weight replaced by W + ΔW (out of place)."""
    import torch
    from peft.tuners.lora import LoraLayer

    merged = {}
    with torch.no_grad():
        for name, module in policy.named_modules():
            if isinstance(module, LoraLayer):
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                merged[f"{name}.weight"] = module.get_base_layer().weight.detach() + delta
        for key, tensor in policy.state_dict().items():
            if "lora_" in key or (".base_layer." in key and key.replace(".base_layer", "") in merged):
                continue
            merged.setdefault(key.replace(".base_layer", ""), tensor)
    return merged


def adapter_state_dict(peft_model) -> dict:
    """The adapter's tensors under the names its adapter_model.safetensors holds."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


def save_adapter(peft_model, folder: Path, base: Path) -> None:
    """Write the PEFT adapter into `folder`/adapter, naming `base` as its base model."""
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(str(folder / ADAPTER_DIR))
