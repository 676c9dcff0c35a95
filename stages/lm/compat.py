"""Hugging Face folders that the transformers versions users have can load, not only the one that wrote them.

transformers 5 writes the RoPE base only inside `rope_parameters` and names the tokenizer class `TokenizersBackend`;
transformers 4.x reads `rope_theta` at the top level (without it, silently its default 10000: a Llama-3/SmolLM2
checkpoint with base 100000 then computes other positions) and does not know that class (the tokenizer fails to
load). `make_portable` adds the 4.x spellings next to the 5.x ones; both versions then read the same model
(the oldest version checked: OLDEST_CHECKED, by scripts/check_checkpoint_compat.py).

Also the KV-cache keyword of a forward: transformers ≥ 5.24 names it `cache` (and its outputs `.cache`), deprecating
`past_key_values` (removal announced for 5.40); older 5.x releases (5.17 on the GPU image, what vLLM wheels pin) know
only `past_key_values`. `cache_kwargs` and `output_cache` pick the spelling the installed version has.
"""

from __future__ import annotations

import inspect
import json
from functools import lru_cache
from pathlib import Path

OLDEST_CHECKED = "4.57.1"
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # 4.x's name of the tokenizers-backed class; 5.x keeps it


def portable_config(config: dict) -> dict:
    """config.json with the top-level `rope_theta` (and `rope_scaling` of a non-default RoPE) that 4.x reads."""
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
    return config


def portable_tokenizer_config(config: dict) -> dict:
    """tokenizer_config.json with a tokenizer class that 4.x knows."""
    config = dict(config)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    return config


def make_portable(folder: Path) -> None:
    """Rewrite `folder`'s config.json and tokenizer_config.json in place (before the folder is published)."""
    for name, convert in (("config.json", portable_config), ("tokenizer_config.json", portable_tokenizer_config)):
        path = Path(folder) / name
        if path.is_file():
            data = json.loads(path.read_text())
            converted = convert(data)
            if converted != data:
                path.write_text(json.dumps(converted, indent=2, sort_keys=True) + "\n")


@lru_cache(maxsize=None)
def _cache_keyword(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """{keyword: cache} for `module`'s forward: `cache` where the installed transformers has it, else
    `past_key_values` (transformers < 5.24)."""
    return {_cache_keyword(type(module)): cache}


def output_cache(output):
    """The KV cache a forward returned (`output.cache`, or `output.past_key_values` before transformers 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
