"""The sampling-engine interface every engine implements (`Engine`), what it samples with (`SamplingSettings`) and
returns (`Completion`), the per-sample seeds, and the choice of engine.

Engines: `stages.lm.engine_hf.HFEngine` (transformers generate on a loaded model) and
`stages.lm.engine_vllm.VLLMEngine` (imported only when chosen). This module imports neither torch nor vllm.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from stages.common.errors import InputError

ENGINES = ("auto", "vllm", "hf")


@dataclass(frozen=True)
class SamplingSettings:
    """What an engine needs to sample: the subset of RolloutConfig that defines the distribution (its defaults live
    there: build it with `from_config`)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    @classmethod
    def from_config(cls, config) -> "SamplingSettings":
        """From a RolloutConfig (or anything with its n, temperature, top_p, max_new_tokens and seed)."""
        return cls(config.n, config.temperature, config.top_p, config.max_new_tokens, config.seed)


@dataclass
class Completion:
    """One sampled response as an engine returns it."""

    response_token_ids: list[int]
    sampling_logprobs: list[float]
    finish_reason: str  # "stop" | "length"


def _digest_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_seed(seed: int, prompt_id: str, sample_idx: int) -> int:
    """The generator seed of one sample (HF engine): a hash of (seed, prompt_id, sample_idx)."""
    return _digest_seed("sample", seed, prompt_id, sample_idx)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The request seed of one prompt's n samples (vLLM derives its n children from it)."""
    return _digest_seed("prompt", seed, prompt_id) & 0x7FFFFFFF


def prompt_batches(lengths: Sequence[int], n: int, batch_rows: int) -> list[list[int]]:
    """Prompt positions, longest prompt first (ties by position), cut into batches of whole groups: max(1,
    batch_rows // n) prompts of n samples each. The HF engine samples batch by batch, and the ranks of a loop deal
    these batches (stages.runs.ranks), so a rank computes exactly the batches of the unsharded run: the prompts of
    any set of whole batches, sorted and cut again, give those batches back (all but the last batch are full)."""
    order = sorted(range(len(lengths)), key=lambda p: (-lengths[p], p))
    per_batch = max(1, batch_rows // n)
    return [order[begin:begin + per_batch] for begin in range(0, len(order), per_batch)]


def vllm_available() -> bool:
    return "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None


def resolve_engine(name: str) -> str:
    """auto → vllm when importable, else hf; an explicit vllm that is not installed is an input error."""
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise InputError("--engine vllm: vllm is not installed (pip install 'antisd[vllm]', or 'antisd[cpu-fast]')")
    return name


class Engine:
    """What `stages.lm.sampling.sample` needs of an engine; HFEngine and VLLMEngine implement it."""

    name: str  # "hf" | "vllm", recorded in the rollouts metadata
    default_batch_size: int  # rows (prompts × n) per call when --batch-size is 0
    tokenizer: object  # the HF tokenizer that built the prompt ids (and decodes the responses)
    model_path: Path
    revision: str  # stages.lm.models.model_revision of model_path
    dtype_name: str

    def generate(self, prompt_ids: list[list[int]], prompt_keys: list[str], settings: SamplingSettings,
                 batch_size: int = 0, on_progress: Callable[[list[int], int], None] | None = None
                 ) -> list[list[Completion]]:
        """`settings.n` completions per prompt, in sample order, each seeded from (settings.seed, its prompt key,
        its sample index) so that it depends on nothing else; `on_progress(prompt indices of finished rows, tokens)`
        after each chunk of `batch_size` rows."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine owns (an HFEngine owns nothing: its model belongs to the caller)."""


def sampled_path(loaded) -> Path | None:
    """The model folder of what samples: an open engine's model_path, a LoadedModel's path, or None."""
    if loaded is None:
        return None
    return loaded.model_path if is_engine(loaded) else loaded.path


def is_engine(obj) -> bool:
    """True for an engine (an `Engine`, or anything with its interface), False for a LoadedModel."""
    return isinstance(obj, Engine) or (hasattr(obj, "generate") and hasattr(obj, "model_path")
                                       and hasattr(obj, "tokenizer"))
