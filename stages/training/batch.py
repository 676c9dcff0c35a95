"""The data side of `antisd update`: input validation, scored rows → `Batch`, per-batch statistics.

Checks the run state against this run (method, world size, ZeRO stage), the scored file's model revision and the
user's DeepSpeed JSON (InputError, exit 2), and that --kl-coef > 0 has the reference's `ref_logprobs`; turns a scored
Arrow table into a `Batch` of Python lists, checking token ids against the model (InputError; the values themselves
were checked on read); computes the METHOD §6 statistics of the data itself (`batch_metrics`), the gate's
teacher-entropy median (§5). The options are checked by `UpdateConfig` itself.

Not here: the model, DeepSpeed engine and optimizer steps (stages.training.trainer), the math (stages.method),
micro-batch packing (stages.lm.logprobs) and rank shares (stages.training.distributed), reading files
(stages.common.io).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from stages.common import metrics as keys
from stages.common.errors import InputError
from stages.common.io import read_json_object
from stages.training import checkpoint

if TYPE_CHECKING:
    from stages.training.config import UpdateConfig

REFERENCE_COLUMN = "ref_logprobs"  # optional scored column (schemas.OPTIONAL)


@dataclass
class Batch:
    """Validated scored rows as Python lists, one entry per row."""

    names: list[str]  # "prompt_id/sample_idx", for messages
    group_ids: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    student_logprobs: list[list[float]]  # s_t (old policy)
    sampling_logprobs: list[list[float]]
    pmi: list[list[float]]  # u_t
    teacher_entropy: list[list[float]]
    student_entropy: list[list[float]]
    rewards: list[float]
    correct: list[bool]
    privileged_source: list[str]
    finish_reason: list[str]
    temperature: float = 1.0  # the temperature `score` computed s_t at; the new log-probs use the same
    teacher_scored: bool = True  # false for a file scored with `score --no-teacher` (teacher columns = student's)
    ref_logprobs: list[list[float]] | None = None  # log π_ref(y_t) of a frozen reference (score --reference), if any
    max_new_tokens: int | None = None  # the rollouts' token budget (their metadata), for the overlong penalty
    teacher_ppl: list[float | None] | None = None  # tppl_i = exp(−mean t) (METHOD §9); None for an empty response
    entropy_scored: bool = True  # false for a file scored with `score --no-entropy` (entropy columns hold 0)
    is_correction: str | None = None  # update.is_correction resolved for this file (`resolved_is_correction`)

    def __len__(self) -> int:
        return len(self.names)


# --- validation -------------------------------------------------------------------------------------------------

def check_reference(config: UpdateConfig, table: pa.Table) -> None:
    """--kl-coef > 0 needs the frozen reference's log-probs, which `score --reference MODEL` stores."""
    if config.kl_coef > 0 and REFERENCE_COLUMN not in table.column_names:
        raise InputError(f"{config.scored}: --kl-coef {config.kl_coef} needs the column {REFERENCE_COLUMN}, which this "
                         "file lacks; score it with `antisd score --reference MODEL`")


def read_deepspeed_file(path: str | None) -> dict:
    if path is None:
        return {}
    return read_json_object(path, f"--deepspeed-config {path}")


def zero_stage(config: UpdateConfig) -> int:
    """The ZeRO stage an update of `config` runs: its zero_stage, else its DeepSpeed JSON's, else 2."""
    from stages.training.distributed import resolved_zero_stage

    return resolved_zero_stage(config.zero_stage, read_deepspeed_file(config.deepspeed_config))


def check_state_method(config: UpdateConfig, state: dict | None) -> None:
    """A run state continues with its own method and variant (a variant given that differs from the state's is
    refused), unless --switch-method (the gate then calibrates afresh). A state written before variants existed is
    the paper variant's (`stages.training.config.state_variant`)."""
    from stages.training.config import state_variant

    if state is None or config.switch_method:
        return
    if state.get("method") not in (None, config.method):
        raise InputError(f"run state: written by method {state['method']}, not {config.method} (pass "
                         f"--switch-method to continue it as {config.method}; the gate then re-calibrates)")
    variant = state_variant(state)
    if variant not in (None, config.variant) and config.variant is not None:
        before = " (before variants existed: such states are paper's)" if "variant" not in state else ""
        raise InputError(f"run state: written by variant {variant}{before}, not {config.variant}; pass --variant "
                         f"{variant} to continue it, or --switch-method to continue it as {config.variant} (the gate "
                         "then calibrates afresh)")


def check_state(config: UpdateConfig, state: dict | None, model_dir: Path, world_size: int, stage: int) -> None:
    if state is None:
        return
    check_state_method(config, state)
    if checkpoint.engine_state_dir(model_dir) is None:
        return
    saved = (state.get("world_size"), state.get("zero_stage"))
    if saved != (world_size, stage) and None not in saved:
        raise InputError(f"{model_dir / checkpoint.DEEPSPEED_DIR}: optimizer state of {saved[0]} rank(s) with ZeRO-"
                         f"{saved[1]}, this run has {world_size} with ZeRO-{stage}; match them, or move that folder "
                         "away to start a fresh optimizer")


def check_zero3_ranks(stage: int, world_size: int) -> None:
    """ZeRO-3 on several ranks is refused: every module call is an all-gather, and ranks make different numbers of
    them (their micro-batches hold different pieces, chunks and length passes; in a loop, also score's and
    sampling's forwards), so they would hang. ZeRO-2 holds the paper's setting (a 4B model's full training on 8
    GPUs: docs/memory.md)."""
    if stage == 3 and world_size > 1:
        raise InputError(f"ZeRO-3 on {world_size} ranks: the ranks' forwards make different numbers of module calls "
                         "(each an all-gather under ZeRO-3), which would hang; use --zero-stage 2 (it holds a 4B "
                         "model's full training on 8 GPUs: docs/memory.md; LoRA or more GPUs for larger ones)")


def check_teacher(config: UpdateConfig, metadata: dict) -> None:
    """A method that reads u needs a file scored with the teacher pass (not `score --no-teacher`)."""
    from stages.method.terms import get_term

    if get_term(config.method).uses_teacher and metadata.get("teacher") is False:
        raise InputError(f"{config.scored}: scored without the teacher pass (score --no-teacher), but --method "
                         f"{config.method} reads u = t − s; score it again with the teacher")


def check_revision(config: UpdateConfig, metadata: dict, model_dir: Path) -> None:
    """Refuse a scored file whose old log-probs came from another model revision, unless --force."""
    from stages.lm.models import model_revision

    scored_revision = metadata.get("model_revision")
    if not scored_revision or config.force:
        return
    here = model_revision(model_dir)
    if scored_revision != here:
        scored_by = metadata.get("model_path") or metadata.get("model", "?")
        raise InputError(f"{config.scored}: scored with model revision {scored_revision} ({scored_by}), but --model "
                         f"{config.model} is {here} (pass --force to train on it anyway)")


def overlong_limit(config: UpdateConfig, metadata: dict) -> int | None:
    """L_max of the overlong penalty: --overlong-max-tokens, else the rollouts' max_new_tokens found in the scored
    file's metadata; None when the penalty is off. InputError when neither gives one, or the buffer does not fit."""
    from stages.common.io import metadata_nodes

    if config.overlong_buffer == 0:
        return None
    limit = config.overlong_max_tokens or next(
        (n["max_new_tokens"] for n in metadata_nodes(metadata) if isinstance(n.get("max_new_tokens"), int)), None)
    if limit is None:
        raise InputError(f"{config.scored}: --overlong-buffer needs the rollouts' max_new_tokens, which its metadata "
                         "lacks; pass --overlong-max-tokens")
    if config.overlong_buffer >= limit:
        raise InputError(f"--overlong-buffer {config.overlong_buffer}: must be below the response limit {limit}")
    return limit


def sampler_of(metadata: dict) -> tuple[str, str] | None:
    """(engine, dtype) the rollouts behind a file were sampled with: the first metadata node holding both, breadth-
    first (the rollouts' own record; their config's "auto" values sit one level deeper), or None."""
    from stages.common.io import metadata_nodes

    node = next((n for n in metadata_nodes(metadata) if isinstance(n.get("engine"), str)
                 and isinstance(n.get("dtype"), str)), None)
    return None if node is None else (node["engine"], node["dtype"])


def resolved_is_correction(value: str, metadata: dict) -> str:
    """update.is_correction for a scored file: `auto` is token when its rollouts came from another forward than the
    trainer's (vLLM, as TRL defaults it on; or a 16-bit sampler, whose kernels round differently), off for the HF
    engine in fp32, where the sampler is the trainer's own forward (|Δ log-prob| ~1e-6, docs/vllm-cpu.md) and for a
    file whose sampler is not recorded."""
    if value != "auto":
        return value
    sampler = sampler_of(metadata)
    return "token" if sampler is not None and (sampler[0] == "vllm" or sampler[1] != "float32") else "off"


def batch_from_table(table: pa.Table, source: str, vocab_size: int, temperature: float = 1.0,
                     teacher_scored: bool = True, max_new_tokens: int | None = None,
                     entropy_scored: bool = True) -> Batch:
    """Columns → lists, checking that prompts are not empty and token ids fit the model's vocabulary (InputError).

    The per-token columns' lengths and values were checked when the file was read (`schemas.check_values`). The
    teacher perplexity is the file's `teacher_ppl` column, or for a file scored before it existed computed from
    teacher_logprobs by the same function (`stages.method.perplexity.teacher_perplexity`).
    """
    from stages.lm.scoring import TEACHER_PPL_COLUMN
    from stages.method.perplexity import teacher_perplexity

    col = {name: table.column(name).to_pylist() for name in (
        "prompt_id", "sample_idx", "prompt_token_ids", "response_token_ids", "student_logprobs", "sampling_logprobs",
        "pmi", "teacher_entropy", "student_entropy", "reward", "correct", "privileged_source", "finish_reason")}
    if REFERENCE_COLUMN in table.column_names:
        col[REFERENCE_COLUMN] = table.column(REFERENCE_COLUMN).to_pylist()
    names = [f"{p}/{s}" for p, s in zip(col["prompt_id"], col["sample_idx"])]
    for row, name in enumerate(names):
        where = f"{source}: row {row} ({name})"
        if not col["prompt_token_ids"][row]:
            raise InputError(f"{where}: empty prompt_token_ids")
        ids = col["prompt_token_ids"][row] + col["response_token_ids"][row]
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise InputError(f"{where}: token id {max(ids) if max(ids) >= 0 else min(ids)} outside the model's "
                             f"vocabulary of {vocab_size} (scored with another tokenizer?)")
    if TEACHER_PPL_COLUMN in table.column_names:
        teacher_ppl = table.column(TEACHER_PPL_COLUMN).to_pylist()
    else:
        teacher_ppl = [teacher_perplexity(lp) for lp in table.column("teacher_logprobs").to_pylist()]
    return Batch(names, col["prompt_id"], col["prompt_token_ids"], col["response_token_ids"], col["student_logprobs"],
                 col["sampling_logprobs"], col["pmi"], col["teacher_entropy"], col["student_entropy"],
                 [float(r) for r in col["reward"]], [bool(c) for c in col["correct"]], col["privileged_source"],
                 col["finish_reason"], temperature, teacher_scored, col.get(REFERENCE_COLUMN), max_new_tokens,
                 teacher_ppl, entropy_scored)


def is_finite(value) -> bool:
    return value is not None and value - value == 0  # false for NaN and ±inf


# --- pure per-step quantities -----------------------------------------------------------------------------------

def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def teacher_rows(batch: Batch) -> list[bool]:
    """Which rows had a teacher view (u measured): scored with the teacher pass and a privileged source."""
    return [batch.teacher_scored and source != "none" for source in batch.privileged_source]


def batch_metrics(batch: Batch) -> dict:
    """The METHOD §6 statistics of the data itself (rewards, lengths, entropies, PMI, sources, rollout mismatch)."""
    import torch

    from stages.method.gate import median_teacher_entropy
    from stages.method.losses import logprob_mismatch, token_stats

    groups: dict[str, list[float]] = {}
    for gid, reward in zip(batch.group_ids, batch.rewards):
        groups.setdefault(gid, []).append(reward)
    lengths = [len(r) for r in batch.response_ids]
    has_teacher = teacher_rows(batch)
    ppl = [p for p, teacher in zip(batch.teacher_ppl or [], has_teacher) if teacher and p is not None]
    flat_u = torch.tensor([x for u, teacher in zip(batch.pmi, has_teacher) if teacher for x in u], dtype=torch.float64)
    pmi = token_stats(flat_u, torch.ones_like(flat_u, dtype=torch.bool)) if flat_u.numel() else None
    mismatch_mean, mismatch_max = logprob_mismatch(batch.student_logprobs, batch.sampling_logprobs)
    sources = batch.privileged_source
    return {
        keys.REWARD_MEAN: mean_or_none(batch.rewards),
        keys.REWARD_ACCURACY: mean_or_none([float(c) for c in batch.correct]),
        keys.REWARD_ZERO_VARIANCE_FRAC: mean_or_none([float(max(r) == min(r)) for r in groups.values()]),
        keys.LENGTH_MEAN: mean_or_none([float(x) for x in lengths]),
        keys.LENGTH_MAX: max(lengths),
        keys.TRUNCATED_FRAC: mean_or_none([float(f == "length") for f in batch.finish_reason]),
        keys.TEACHER_ENTROPY_MEDIAN: median_teacher_entropy(batch.teacher_entropy, has_teacher)[0]
        if batch.entropy_scored else None,
        keys.STUDENT_ENTROPY_MEAN: mean_or_none([h for ents in batch.student_entropy for h in ents])
        if batch.entropy_scored else None,
        keys.TEACHER_PPL_MEAN: mean_or_none(ppl),
        keys.PMI_U_MEAN: pmi.u_mean if pmi else None,
        keys.PMI_ANTISD_TERM_MEAN: pmi.antisd_term_mean if pmi else None,
        keys.PMI_NEG_FRAC: pmi.neg_frac if pmi else None,
        **{key: sources.count(source) for source, key in keys.PRIVILEGED.items()},
        keys.LOGPROB_MISMATCH_MEAN: mismatch_mean,
        keys.LOGPROB_MISMATCH_MAX: mismatch_max,
    }


def pad_rows(rows: list[list[float]], width: int):
    """Right-pad float lists with 0 into [B, width] float32."""
    import torch

    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, values in enumerate(rows):
        out[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out
