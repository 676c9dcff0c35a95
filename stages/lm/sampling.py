"""Sampling of rollouts: `RolloutConfig` (the options of `antisd rollout`), the choice of prompt rows, the engine
that samples them, and `sample()`, which turns prompt rows into ROLLOUTS rows. `antisd rollout`, `eval`, `loop` and
`analyze --prompts` share it.

Row conventions: `response_token_ids` are the engine's ids (never re-tokenized) and end with the EOS id when
finish_reason is "stop" (the trainer must learn to stop); `response_text` is their decoding without special
tokens; `sampling_logprobs[k]` is the log-prob of response token k under the distribution it was drawn from (after
temperature and top-p; at temperature 0, greedy, the unscaled model's log-prob). This module writes no file.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

import schemas
from stages.common import validation
from stages.common.errors import InputError
from stages.common.parts import Shard
from stages.lm.engine import ENGINES, Completion, SamplingSettings, is_engine
from stages.lm.models import ATTN_IMPLEMENTATIONS, DEFAULT_MODEL, DTYPES
from stages.lm.prompts import INSTRUCTION, PLAIN, THINKING, ChatOptions, read_prompt_template

PROMPT_COLUMNS = [field.name for field in schemas.PROMPTS]


@dataclass(frozen=True)
class RolloutConfig:
    """Options of `antisd rollout` (each is the kebab-case CLI option of the same name)."""

    prompts: str  # prompts Parquet (file or directory of parts)
    out: str  # output Parquet; with --shard a directory that receives part-i-of-N.parquet
    model: str = DEFAULT_MODEL  # HF folder or embedded model name
    n: int = 8  # samples per prompt (the GRPO group size)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass, in (0, 1]
    max_new_tokens: int = 256  # response length cap (finish_reason "length" when hit)
    seed: int = 0  # sampling seed; with the HF engine same seed ⇒ same rows
    engine: str = "auto"  # auto (vllm when importable, else hf) | vllm | hf
    max_prompts: int = 0  # keep the first N prompts of the file, before sharding (0 = all)
    shard: str | None = None  # "I/N": this process's share of the prompts
    dtype: str = "auto"  # auto = float32 on CPU (faster there and matches the trainer), bfloat16 on GPU
    threads: int = 0  # torch CPU threads (0 = OMP_NUM_THREADS if set, else the cores this process may use)
    batch_size: int = 0  # rows (prompts × samples, whole groups) per engine call; 0 = default (hf 64, vllm 1024)
    device: str = "auto"  # HF engine device: auto (cuda if available) | cpu | cuda
    attn_implementation: str = "auto"  # HF: auto (transformers' default, sdpa) | sdpa | eager | flash_attention_2
    # vLLM on GPU: the share of the card it takes (weights + KV cache); None: vLLM's 0.9 when alone, in `loop` what the
    # memory plan leaves beside the resident trainer (stages.runs.memory)
    gpu_memory_utilization: float | None = None
    # vLLM: GPUs one engine spans (tensor parallel); in a loop of N ranks, each group of this many consecutive ranks
    # shares one engine (N a multiple of it)
    tensor_parallel_size: int = 1
    # HF engine: a group's prompt is prefilled once per batch and its cache repeated (vLLM caches prefixes itself)
    share_prefix: bool = True
    system_prompt: str | None = None  # a system turn before the few-shot turns (both views; score reads it back)
    thinking: str = "default"  # chat template enable_thinking (Qwen3): default | on | off
    chat_template: str | None = None  # None: the tokenizer's | plain (Question:/Answer: text) | a Jinja file
    answer_instruction: str = INSTRUCTION  # appended to every problem (both views; "" = none)
    # a YAML file of the four above and the teacher view's framing text (`prompts.read_prompt_template`); each of the
    # four set to other than its default overrides the file's value; the resolved options go to the metadata
    prompt_template: str | None = None
    progress: bool = True  # rich progress bar on stderr (shown only when stderr is a terminal)
    overwrite: bool = False  # replace an existing output

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "n", "max_new_tokens", "tensor_parallel_size")
        check.at_least(0, "temperature", "max_prompts", "threads", "batch_size")
        check.between("top_p", 0, 1, low_open=True)
        check.choice("engine", ENGINES)
        check.choice("dtype", DTYPES)
        check.choice("attn_implementation", ATTN_IMPLEMENTATIONS)
        check.between("gpu_memory_utilization", 0, 1, low_open=True)
        check.choice("thinking", THINKING)
        check.require(self.chat_template in (None, PLAIN) or Path(self.chat_template).is_file(), "chat_template",
                      f"{self.chat_template}: no such file (give a Jinja file, or 'plain')")
        try:
            read_prompt_template(self.prompt_template)
        except InputError as exc:
            check.fail("prompt_template", str(exc))
        check.done()


def select_prompts(table: pa.Table, source: str, max_prompts: int, shard: Shard) -> list[dict]:
    """The prompt rows this run samples: first `max_prompts`, then this shard's share; prompt ids must be unique."""
    rows = table.select(PROMPT_COLUMNS).to_pylist()
    ids = [row["prompt_id"] for row in rows]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{source}: prompt_id '{duplicate}' occurs more than once (a prompts file has one row per prompt)")
    if max_prompts:
        rows = rows[:max_prompts]
    return [rows[i] for i in shard.select([row["prompt_id"] for row in rows])]


@contextmanager
def progress_bar(total_samples: int, enabled: bool, label: str = "rollout"):
    """Yield `on_progress(prompt indices of finished samples, tokens)`: the samples done of `total_samples`, with
    tokens/s and ETA (`stages.common.progress`: a bar on a terminal, a record every 30 s in a log file)."""
    from stages.common.progress import counted_progress

    with counted_progress(label, total_samples, unit="samples", enabled=enabled) as advance:
        yield lambda prompt_indices, tokens: advance(len(prompt_indices), tokens)


def as_engine(loaded_or_engine):
    """An engine from a LoadedModel (wrapped in HFEngine) or an engine, returned unchanged."""
    if is_engine(loaded_or_engine):
        return loaded_or_engine
    if not hasattr(loaded_or_engine, "model") or not hasattr(loaded_or_engine, "tokenizer"):
        raise TypeError("expected a stages.lm.models.LoadedModel or an Engine (HFEngine, VLLMEngine)")
    from stages.lm.engine_hf import HFEngine

    return HFEngine(loaded_or_engine)


def sample(loaded_or_engine, prompt_rows: list[dict], settings: SamplingSettings, *, batch_size: int = 0,
           progress: bool = False, chat: ChatOptions = ChatOptions(), label: str = "rollout"
           ) -> tuple[pa.Table, dict]:
    """Sample `settings.n` responses for each prompt row; return (ROLLOUTS table, stats); `label` names the progress.

    Rows come out in prompt order, then sample_idx. Stats: samples, response_tokens, generate_s, tokens_per_s
    (response tokens per second of engine time), finish_stop, finish_length.
    """
    engine = as_engine(loaded_or_engine)
    tokenizer = engine.tokenizer
    prompt_ids = student_prompt_ids(tokenizer, prompt_rows, chat)
    keys = [row["prompt_id"] for row in prompt_rows]
    start = time.perf_counter()
    completions: list[list[Completion]] = []
    if prompt_rows:
        with progress_bar(len(prompt_rows) * settings.n, progress, label) as on_progress:
            completions = engine.generate(prompt_ids, keys, settings, batch_size, on_progress)
    generate_s = time.perf_counter() - start
    out_rows = []
    for row, ids, group in zip(prompt_rows, prompt_ids, completions):
        texts = tokenizer.batch_decode([c.response_token_ids for c in group], skip_special_tokens=True)
        for sample_idx, (completion, text) in enumerate(zip(group, texts)):
            out_rows.append({
                **{column: row[column] for column in PROMPT_COLUMNS},
                "sample_idx": sample_idx,
                "prompt_token_ids": ids,
                "response_token_ids": completion.response_token_ids,
                "response_text": text,
                "sampling_logprobs": completion.sampling_logprobs,
                "finish_reason": completion.finish_reason,
                "response_length": len(completion.response_token_ids),
            })
    tokens = sum(row["response_length"] for row in out_rows)
    stats = {
        "samples": len(out_rows),
        "response_tokens": tokens,
        "generate_s": round(generate_s, 3),
        "tokens_per_s": round(tokens / generate_s, 2) if generate_s > 0 else 0.0,
        "finish_stop": sum(row["finish_reason"] == "stop" for row in out_rows),
        "finish_length": sum(row["finish_reason"] == "length" for row in out_rows),
    }
    return pa.Table.from_pylist(out_rows, schema=schemas.ROLLOUTS), stats


def student_prompt_ids(tokenizer, prompt_rows: list[dict], chat: ChatOptions = ChatOptions()) -> list[list[int]]:
    """The token ids the engines sample after: each row's student view (problem, few-shot turns, chat options)."""
    from stages.lm.prompts import encode, student_messages

    return [encode(tokenizer, student_messages(row["problem"], row["few_shot"], chat.answer_instruction), chat)
            for row in prompt_rows]


def open_engine(engine: str, config: RolloutConfig, model_path: Path, rows: list[dict], loaded=None):
    """Build the chosen engine for sampling `rows`; the HF engine reuses `loaded` when given."""
    from stages.common.process import pick_device

    device = pick_device(config.device)
    if engine == "vllm":
        from stages.lm.engine_vllm import VLLMEngine
        from stages.lm.models import torch_dtype

        dtype = str(torch_dtype(config.dtype, device)).replace("torch.", "")
        parallel = {"tensor_parallel_size": config.tensor_parallel_size} if config.tensor_parallel_size > 1 else {}
        return VLLMEngine(model_path, dtype=dtype, seed=config.seed,
                          gpu_memory_utilization=config.gpu_memory_utilization, **parallel,
                          max_model_len=_max_model_len(model_path, rows, config.max_new_tokens,
                                                       ChatOptions.from_knobs(config)))
    from stages.lm.engine_hf import HFEngine
    from stages.lm.models import load_model

    return HFEngine(loaded if loaded is not None else load_model(model_path, config.dtype, device,
                                                                 config.attn_implementation),
                    share_prefill=config.share_prefix)


def _max_model_len(model_path: Path, rows: list[dict], max_new_tokens: int, chat: ChatOptions = ChatOptions()) -> int:
    """vLLM's context length for this run: the longest encoded prompt + max_new_tokens."""
    from stages.lm.models import load_tokenizer

    return max((len(ids) for ids in student_prompt_ids(load_tokenizer(model_path), rows, chat)), default=1) + \
        max_new_tokens
