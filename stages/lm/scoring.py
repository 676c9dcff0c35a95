"""Scoring computations of METHOD §1/§4 on verified rows: the student and teacher views of each row, their per-token
log-probs and entropies in micro-batches, and the scored columns; plus `ScoreConfig`, the options of `antisd score`.

Every row's student view is its stored `prompt_token_ids` + `response_token_ids`; a row with privileged context also
gets a teacher view, encode(teacher_messages(problem, few_shot, privileged_text, correct)) + the same response ids
(never re-tokenized). Views of all rows, student and teacher alike, are packed longest-first into micro-batches of at
most `micro_batch_tokens` padded tokens (`stages.lm.logprobs.pack_by_tokens`). This module reads and writes no file
(`stages.score` does) and computes no advantage or loss (`stages.method`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stages.common import validation
from stages.common.errors import InputError
from stages.common.io import metadata_nodes
from stages.lm.models import ATTN_IMPLEMENTATIONS, DTYPES
from stages.lm.prompts import TEACHER_LAYOUTS

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("student_logprobs", "teacher_logprobs", "teacher_entropy", "student_entropy", "pmi",
                 "teacher_prompt_length")
TEACHER_PPL_COLUMN = "teacher_ppl"  # schemas.OPTIONAL["scored"]: written by every score run since METHOD §9
REFERENCE_COLUMN = "ref_logprobs"  # schemas.OPTIONAL["scored"]: only with --reference
TEACHER_PROMPT_COLUMN = "teacher_prompt_token_ids"  # schemas.OPTIONAL["scored"]: written by every score run
_ROW_COLUMNS = ["prompt_id", "sample_idx", "problem", "few_shot", "prompt_token_ids", "response_token_ids",
                "privileged_text", "privileged_source", "correct"]


@dataclass(frozen=True)
class ScoreConfig:
    """Options of `antisd score` (each is also the CLI option of the same name in kebab-case)."""

    verified: str  # input: a verified Parquet file (or a directory of parts)
    out: str  # output: scored Parquet path (a directory of parts with --shard)
    # the policy that sampled the rollouts: HF folder, embedded model name or Hub id; None: the one the input's
    # rollouts record (their metadata), so rescoring another checkpoint's rollouts needs no flag to be right
    model: str | None = None
    # a frozen reference policy (HF folder or embedded name) whose log-probs of the response tokens under the student
    # prompt are stored as ref_logprobs, for update --kl-coef; None = no reference pass and no ref_logprobs column
    reference: str | None = None
    temperature: float | None = None  # None = the input metadata's sampling temperature, else 1.0
    chunk_size: int | None = None  # response positions per LM-head/log-softmax chunk (None: by device, lm.forward)
    micro_batch_tokens: int = 8192  # positions per forward pass (padded rows × longest, a shared prefix counted once)
    share_prefix: bool = True  # run a group's common prompt prefix once for its views (same numbers, fewer tokens)
    # the teacher pass (t, H, u); off for a method that does not read u (grpo): the teacher columns then repeat the
    # student's, pmi is 0 and the file's metadata says teacher: false. The loop sets it from the method, unless the
    # run config says score.teacher: true (a grpo run that logs the teacher's entropy and u)
    teacher: bool = True
    # the teacher prompt's last line (METHOD §4); None: the rollouts' (their prompt template's, else
    # prompts.TEACHER_INSTRUCTION); "" = left out
    teacher_instruction: str | None = None
    # the teacher turn's layout: paper (METHOD §4) | official (§9: other line breaks); see prompts.teacher_user_text
    teacher_layout: str = "paper"
    peer_assessment: bool = True  # the assessment line also when a solution is shown (§4); False: only without (§9)
    # the full-vocabulary entropies (teacher_entropy, student_entropy); false stores 0 there and records entropy:
    # false (what §9 needs: λ and the gate read the teacher perplexity), sparing the softmax over the vocabulary
    entropy: bool = True
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "auto"  # auto (transformers' default: sdpa) | sdpa | eager | flash_attention_2
    threads: int = 0  # torch CPU threads (0 = OMP_NUM_THREADS if set, else the cores this process may use)
    shard: str | None = None  # "I/N": score only shard I of N of the prompts (rows grouped by prompt_id)
    overwrite: bool = False  # replace an existing output

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "chunk_size", "micro_batch_tokens")
        check.above(0, "temperature")
        check.at_least(0, "threads")
        check.choice("dtype", DTYPES)
        check.choice("attn_implementation", ATTN_IMPLEMENTATIONS)
        check.choice("teacher_layout", TEACHER_LAYOUTS)
        check.done()


@dataclass(frozen=True)
class View:
    """One forward sequence: row `row` under the student or teacher prompt."""

    row: int
    teacher: bool
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def metadata_temperature(metadata: dict) -> float | None:
    """The first positive `temperature` value found breadth-first in a file's metadata, or None."""
    for node in metadata_nodes(metadata):
        value = node.get("temperature")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def metadata_top_p(metadata: dict) -> float:
    """The rollouts' top-p: the first `top_p` found breadth-first in a file's metadata, else 1."""
    for node in metadata_nodes(metadata):
        value = node.get("top_p")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
            return float(value)
    return 1.0


def warn_logprob_mismatch(mean: float | None, metadata: dict, source: str, model: str) -> None:
    """A warning when the old log-probs s_t (of `model`) sit further from the sampler's than one model's numerics
    explain (`stages.method.losses.logprob_mismatch_limit`), naming the model the rollouts record."""
    from stages.common.io import recorded_model
    from stages.method.losses import logprob_mismatch_limit

    limit = logprob_mismatch_limit(metadata_top_p(metadata))
    if mean is not None and mean > limit:
        log.warning("%s: the log-probs of %s differ from the rollouts' sampling log-probs by %.3g nats per token on "
                    "average (above %.3g = ln 2 − ln top-p, more than one model's numerics): the rollouts record the "
                    "model %s; score and update with that one (--model)", source, model, mean, limit,
                    recorded_model(metadata, "rollouts") or "(none recorded)")


def row_label(rows: list[dict], index: int) -> str:
    row = rows[index]
    return f"row {index} (prompt_id {row['prompt_id']!r}, sample_idx {row['sample_idx']})"


def check_rows(rows: list[dict], vocab_size: int, source: str) -> None:
    """Bad input stops before any compute: token ids outside the vocabulary, an empty prompt (the file's values were
    checked on read: `schemas.check_values`)."""
    for index, row in enumerate(rows):
        for column in ("prompt_token_ids", "response_token_ids"):
            bad = [i for i in row[column] if not 0 <= i < vocab_size]
            if bad:
                raise InputError(f"{source}: {row_label(rows, index)}: {column} holds id {bad[0]} outside the "
                                 f"tokenizer's vocabulary (size {vocab_size}); was it sampled by another model?")
        if not row["prompt_token_ids"]:
            raise InputError(f"{source}: {row_label(rows, index)}: empty prompt_token_ids")


def metadata_chat(metadata: dict):
    """The ChatOptions the rollouts were rendered with: the first `chat` record found breadth-first in a file's
    metadata (rollout, eval and score write one; the rollouts' metadata travels in every later file's), else the first
    config with `system_prompt`/`thinking` (files from before the record), else the defaults."""
    from stages.lm.prompts import ChatOptions

    nodes = list(metadata_nodes(metadata))
    node = next((n["chat"] for n in nodes if isinstance(n.get("chat"), dict)), None)
    node = node or next((n for n in nodes if "system_prompt" in n or "thinking" in n), None)
    return ChatOptions() if node is None else ChatOptions.from_knobs(node)


def build_views(rows: list[dict], tokenizer, teacher: bool = True, instruction: str | None = None,
                chat=None, layout: str = "paper", peer_assessment: bool = True) -> list[View]:
    """Student view of every row, teacher view (METHOD §4 prompt, or §9's with `layout` official, ending with
    `instruction`, None: the chat options', + the same response ids) of rows with a source (none at all without
    `teacher`), rendered with the rollouts' `chat` options."""
    from stages.lm.prompts import ChatOptions, encode, teacher_messages

    chat = chat or ChatOptions()
    views = []
    for index, row in enumerate(rows):
        views.append(View(index, False, row["prompt_token_ids"], row["response_token_ids"]))
        if teacher and row["privileged_source"] != "none":
            messages = teacher_messages(row["problem"], row["few_shot"], row["privileged_text"], bool(row["correct"]),
                                        instruction, chat, layout, peer_assessment)
            views.append(View(index, True, encode(tokenizer, messages, chat), row["response_token_ids"]))
    return views


def micro_batches(views: list[View], budget: int) -> list[list[View]]:
    """The views packed by `pack_by_tokens` (longest first, rows × longest ≤ budget, at least one per batch)."""
    from stages.lm.logprobs import pack_by_tokens

    return [[views[i] for i in batch] for batch in pack_by_tokens([v.length for v in views], budget)]


@dataclass(frozen=True)
class ViewBatch:
    """One forward pass: `views` as a `stages.lm.forward` piece (their common prefix shared, or full sequences)."""

    views: list[View]
    piece: object  # stages.lm.shared_prefix.SharedPrefix | stages.lm.forward.FullSequences

    @property
    def tokens(self) -> int:
        """Positions this pass computes (what its cost scales with)."""
        return self.piece.tokens


def full_sequences(views: list[View]) -> ViewBatch:
    from stages.lm.forward import FullSequences

    return ViewBatch(views, FullSequences([v.prompt_ids + v.response_ids for v in views],
                                          [len(v.prompt_ids) for v in views]))


def plan_batches(views: list[View], rows: list[dict], budget: int, share_prefix: bool) -> list[ViewBatch]:
    """The forward passes that score `views`: with `share_prefix`, the views of one prompt and kind (student or
    teacher) share their common prompt prefix, cut to fit `budget`; else `micro_batches` of full sequences."""
    from stages.lm.shared_prefix import share, split

    if not share_prefix:
        return [full_sequences(batch) for batch in micro_batches(views, budget)]
    groups: dict[tuple, list[View]] = {}
    for view in views:
        groups.setdefault((rows[view.row]["prompt_id"], view.teacher), []).append(view)
    batches = []
    for members in groups.values():
        start = 0
        for piece in split(share([v.prompt_ids for v in members], [v.response_ids for v in members]), budget):
            batches.append(ViewBatch(members[start:start + len(piece)], piece))
            start += len(piece)
    return batches


def score_views(model, batches: list[ViewBatch], *, numerics, rows: list[dict], progress=None, label: str = ""
                ) -> dict[tuple[int, bool], tuple[list[float], list[float] | None]]:
    """(row, teacher) → (log-probs, entropies) of the response tokens; RuntimeError naming a row on NaN/inf.

    `numerics` (stages.lm.forward.Numerics) with_entropy=False skips the full-vocabulary entropy (the reference
    pass, score --no-entropy): the entropies are then 0; `label` names the network in errors.
    """
    import torch

    from stages.lm.forward import piece_token_stats

    results = {}
    with torch.inference_mode():
        for batch in batches:
            logprobs, entropies = piece_token_stats(model, batch.piece, numerics)
            for view, lp, ent in zip(batch.views, logprobs, entropies):
                if not (bool(torch.isfinite(lp).all()) and bool(torch.isfinite(ent).all())):
                    raise RuntimeError(f"non-finite log-probs or entropy in the {label}"
                                       f"{'teacher' if view.teacher else 'student'} view of {row_label(rows, view.row)}"
                                       "; nothing written")
                results[(view.row, view.teacher)] = (lp.float().cpu().tolist(), ent.float().cpu().tolist())
            if progress is not None:
                progress(sum(v.length for v in batch.views))
    return results


def assemble(rows: list[dict], views: list[View], results: dict) -> dict[str, list]:
    """The six score columns in row order."""
    import numpy as np

    teacher_length = {v.row: len(v.prompt_ids) for v in views if v.teacher}
    columns: dict[str, list] = {name: [] for name in SCORE_COLUMNS}
    for index, row in enumerate(rows):
        student_lp, student_ent = results[(index, False)]
        if index in teacher_length:
            teacher_lp, teacher_ent = results[(index, True)]
            pmi = (np.asarray(teacher_lp, np.float32) - np.asarray(student_lp, np.float32)).tolist()
        else:  # no privileged context (or no teacher pass): the teacher view is the student view
            teacher_lp, teacher_ent, pmi = student_lp, student_ent, [0.0] * len(student_lp)
        columns["student_logprobs"].append(student_lp)
        columns["teacher_logprobs"].append(teacher_lp)
        columns["teacher_entropy"].append(teacher_ent)
        columns["student_entropy"].append(student_ent)
        columns["pmi"].append(pmi)
        columns["teacher_prompt_length"].append(teacher_length.get(index, len(row["prompt_token_ids"])))
    return columns


def teacher_prompts(rows: list[dict], views: list[View]) -> list[list[int] | None]:
    """Each row's teacher prompt ids, None for a row without a teacher view."""
    by_row = {v.row: v.prompt_ids for v in views if v.teacher}
    return [by_row.get(index) for index in range(len(rows))]


def load_reference(config: ScoreConfig, loaded, reference_loaded=None):
    """The frozen --reference network (None without it), in the policy's dtype on its device.

    `reference_loaded` (a LoadedModel of config.reference) is used instead of loading it again. InputError when its
    tokenizer differs from the policy's: the stored response ids must mean the same tokens to both.
    """
    from stages.lm.models import load_model

    if config.reference is None:
        return None
    if reference_loaded is None:
        try:
            reference_loaded = load_model(config.reference, dtype=str(loaded.dtype).replace("torch.", ""),
                                          attn_implementation=config.attn_implementation,
                                          device=loaded.device)
        except InputError as exc:  # load_model names its argument --model; here it came from --reference
            raise InputError(str(exc).replace("--model", "--reference", 1)) from None
    if reference_loaded.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise InputError(f"--reference {config.reference}: its tokenizer differs from the policy's ({loaded.path}); "
                         "the reference must share the policy's vocabulary")
    return reference_loaded


