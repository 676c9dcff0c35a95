"""`antisd score`: verified rollouts → scored rows with student/teacher log-probs, entropies and PMI (METHOD §1, §4).

For each row the same weights are run twice over the stored response token ids (never re-tokenized):
- student view: `prompt_token_ids` + `response_token_ids` → s_t = student_logprobs, student_entropy (the old policy);
- teacher view: encode(teacher_messages(problem, few_shot, privileged_text, correct)) + the same response ids
  → t_t = teacher_logprobs, H_t = teacher_entropy; pmi u_t = t_t − s_t (computed from the stored float32 values).
Rows with privileged_source == "none" get no teacher pass: teacher_* = the student values, pmi = 0,
teacher_prompt_length = the student prompt length, and they are left out of the median teacher entropy.
With `--reference MODEL` a third network (a frozen reference, same dtype and device) scores the student view only,
at the same temperature, into the optional `ref_logprobs` column (no entropy), for `update --kl-coef` (METHOD §3).

Log-probs and full-vocabulary entropies (nats) come from `stages.lm.logprobs.response_token_stats` (chunks of
positions, never [tokens × vocab] logits for a batch) under torch.inference_mode; sequences (student and teacher
views together) are sorted by length and grouped into micro-batches of at most `micro_batch_tokens` padded tokens.
Output rows keep the input order. Temperature: `--temperature`, else the first `temperature` key found in the input
file's metadata (breadth-first: rollout records its sampling parameters, verify carries them along), else 1.0; the
value used is stored in the metadata so `update` can use the same numerics.
File metadata: model path and revision, reference_model and reference_revision (None without --reference),
temperature, median_teacher_entropy (this file's rows: with --shard, a shard's median), token counts, tokens_per_s.
This module does not compute advantages or losses (`stages.method.objectives`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from stages.common import validation
from stages.common.io import (InputError, Shard, build_metadata, check_output, output_lock, output_path, read_artifact,
                       write_artifact)
from stages.lm.models import DTYPES

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("student_logprobs", "teacher_logprobs", "teacher_entropy", "student_entropy", "pmi",
                 "teacher_prompt_length")
REFERENCE_COLUMN = "ref_logprobs"  # schemas.OPTIONAL["scored"]: only with --reference
_ROW_COLUMNS = ["prompt_id", "sample_idx", "problem", "few_shot", "prompt_token_ids", "response_token_ids",
                "privileged_text", "privileged_source", "correct"]


@dataclass(frozen=True)
class ScoreConfig:
    """Options of `antisd score` (each is also the CLI option of the same name in kebab-case)."""

    verified: str  # input: a verified Parquet file (or a directory of parts)
    out: str  # output: scored Parquet path (a directory of parts with --shard)
    model: str = "smollm2-135m"  # the policy that sampled the rollouts: HF folder or embedded model name
    # a frozen reference policy (HF folder or embedded name) whose log-probs of the response tokens under the student
    # prompt are stored as ref_logprobs, for update --kl-coef; None = no reference pass and no ref_logprobs column
    reference: str | None = None
    temperature: float | None = None  # None = the input metadata's sampling temperature, else 1.0
    chunk_size: int = 64  # response positions per LM-head/log-softmax chunk
    micro_batch_tokens: int = 8192  # padded tokens (rows × longest sequence) per forward pass
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads (0 = torch default)
    shard: str | None = None  # "I/N": score only shard I of N of the prompts (rows grouped by prompt_id)
    overwrite: bool = False  # replace an existing output

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "chunk_size", "micro_batch_tokens")
        check.above(0, "temperature")
        check.at_least(0, "threads")
        check.choice("dtype", DTYPES)
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
    queue = [metadata]
    while queue:
        node = queue.pop(0)
        value = node.get("temperature")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
        queue += [v for v in node.values() if isinstance(v, dict)]
    return None


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


def build_views(rows: list[dict], tokenizer) -> list[View]:
    """Student view of every row, teacher view (METHOD §4 prompt + the same response ids) of rows with a source."""
    from stages.lm.prompts import encode, teacher_messages

    views = []
    for index, row in enumerate(rows):
        views.append(View(index, False, row["prompt_token_ids"], row["response_token_ids"]))
        if row["privileged_source"] != "none":
            messages = teacher_messages(row["problem"], row["few_shot"], row["privileged_text"], bool(row["correct"]))
            views.append(View(index, True, encode(tokenizer, messages), row["response_token_ids"]))
    return views


def micro_batches(views: list[View], budget: int) -> list[list[View]]:
    """Longest first; each batch holds as many views as fit rows × longest ≤ budget (at least one)."""
    batches: list[list[View]] = []
    for view in sorted(views, key=lambda v: (-v.length, v.row, v.teacher)):
        if batches and batches[-1][0].length * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(view)
        else:
            batches.append([view])
    return batches


def score_views(model, views: list[View], *, pad_id: int, temperature: float, chunk_size: int, budget: int,
                rows: list[dict], progress=None, with_entropy: bool = True, label: str = ""
                ) -> dict[tuple[int, bool], tuple[list[float], list[float] | None]]:
    """(row, teacher) → (log-probs, entropies or None) of the response tokens; RuntimeError naming a row on NaN/inf.

    with_entropy=False skips the full-vocabulary entropy (the reference pass); `label` names the network in errors.
    """
    import torch

    from stages.lm.logprobs import response_token_stats

    results = {}
    with torch.inference_mode():
        for batch in micro_batches(views, budget):
            logprobs, entropies = response_token_stats(
                model, [v.prompt_ids + v.response_ids for v in batch], [len(v.prompt_ids) for v in batch],
                pad_id=pad_id, temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
            for view, lp, ent in zip(batch, logprobs, entropies):
                if not (bool(torch.isfinite(lp).all()) and bool(torch.isfinite(ent).all())):
                    raise RuntimeError(f"non-finite log-probs or entropy in the {label}"
                                       f"{'teacher' if view.teacher else 'student'} view of {row_label(rows, view.row)}"
                                       "; nothing written")
                results[(view.row, view.teacher)] = (lp.float().cpu().tolist(),
                                                     ent.float().cpu().tolist() if with_entropy else None)
            if progress is not None:
                progress(sum(v.length for v in batch))
    return results


def assemble(rows: list[dict], views: list[View], results: dict) -> tuple[dict[str, list], list[float]]:
    """The six score columns in row order, and the teacher entropies that enter the median."""
    import numpy as np

    teacher_length = {v.row: len(v.prompt_ids) for v in views if v.teacher}
    columns: dict[str, list] = {name: [] for name in SCORE_COLUMNS}
    median_pool: list[float] = []
    for index, row in enumerate(rows):
        student_lp, student_ent = results[(index, False)]
        if index in teacher_length:
            teacher_lp, teacher_ent = results[(index, True)]
            pmi = (np.asarray(teacher_lp, np.float32) - np.asarray(student_lp, np.float32)).tolist()
            median_pool += teacher_ent
        else:  # no privileged context: the teacher view is the student view
            teacher_lp, teacher_ent, pmi = student_lp, student_ent, [0.0] * len(student_lp)
        columns["student_logprobs"].append(student_lp)
        columns["teacher_logprobs"].append(teacher_lp)
        columns["teacher_entropy"].append(teacher_ent)
        columns["student_entropy"].append(student_ent)
        columns["pmi"].append(pmi)
        columns["teacher_prompt_length"].append(teacher_length.get(index, len(row["prompt_token_ids"])))
    return columns, median_pool


def _median(values: list[float]) -> float | None:
    import torch

    from stages.method.objectives import masked_median

    if not values:
        return None
    tensor = torch.tensor(values, dtype=torch.float64)
    return masked_median(tensor, torch.ones_like(tensor, dtype=torch.bool))


class _Progress:
    """A rich bar on stderr counting forward tokens, with tokens/s and ETA (context manager; a callable tick)."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("score"), BarColumn(), TextColumn("{task.completed}/{task.total} tok"),
                            TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.task = self.bar.add_task("score", total=total, rate="-")
        self.start = time.perf_counter()
        self.done = 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, tokens: int) -> None:
        self.done += tokens
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, advance=tokens, rate=f"{rate:,.0f}")


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
                                          device=loaded.device)
        except InputError as exc:  # load_model names its argument --model; here it came from --reference
            raise InputError(str(exc).replace("--model", "--reference", 1)) from None
    if reference_loaded.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise InputError(f"--reference {config.reference}: its tokenizer differs from the policy's ({loaded.path}); "
                         "the reference must share the policy's vocabulary")
    return reference_loaded


def run(config: ScoreConfig, loaded=None, reference_loaded=None) -> Path:
    """Score `config.verified` with `config.model` (or the already-loaded `loaded`); return the output path.

    With config.reference, also score the student views with that frozen network (`reference_loaded` reuses one).
    """
    from stages.lm.models import load_model
    from stages.common.process import pick_device, set_threads

    # --- validate inputs (the options were checked when `config` was made)
    shard = Shard.parse(config.shard)
    out = check_output(output_path(config.out, shard), config.overwrite)
    with output_lock(out):
        table, in_meta = read_artifact(config.verified, "verified")
        stale = [c for c in (*SCORE_COLUMNS, REFERENCE_COLUMN) if c in table.column_names]
        table = table.drop_columns(stale)  # rescoring a scored file
        if not shard.is_whole:
            table = table.take(shard.select(table.column("prompt_id").to_pylist()))
            if table.num_rows == 0:
                raise InputError(f"{config.verified}: shard {shard.index}/{shard.count} holds no prompts")
        temperature = config.temperature or metadata_temperature(in_meta) or 1.0
        # --- load
        threads = set_threads(config.threads)
        if loaded is None:
            loaded = load_model(config.model, dtype=config.dtype, device=pick_device(config.device))
        reference = load_reference(config, loaded, reference_loaded)
        tokenizer, model = loaded.tokenizer, loaded.model
        networks = [model] + ([reference.model] if reference is not None else [])
        vocab_size = min([len(tokenizer)] + [network.get_input_embeddings().num_embeddings for network in networks])
        rows = table.select(_ROW_COLUMNS).to_pylist()
        check_rows(rows, vocab_size, config.verified)
        views = build_views(rows, tokenizer)
        reference_views = [v for v in views if not v.teacher] if reference is not None else []
        # --- compute
        forward_tokens = sum(v.length for v in views + reference_views)
        log.info("scoring %d rows (%d teacher views, %d reference views, %d forward tokens) with %s at temperature %g, "
                 "%d thread(s)", len(rows), sum(v.teacher for v in views), len(reference_views), forward_tokens,
                 loaded.path, temperature, threads)
        numerics = dict(pad_id=tokenizer.pad_token_id or 0, temperature=temperature, chunk_size=config.chunk_size,
                        budget=config.micro_batch_tokens, rows=rows)
        start = time.perf_counter()
        with _Progress(forward_tokens) as progress:
            results = score_views(model, views, progress=progress, **numerics)
            if reference is not None:  # log π_ref(y_t | x, y<t): the student views, same numerics, no entropy
                reference_results = score_views(reference.model, reference_views, progress=progress, with_entropy=False,
                                                label="reference's ", **numerics)
        seconds = time.perf_counter() - start
        columns, median_pool = assemble(rows, views, results)
        if reference is not None:
            columns[REFERENCE_COLUMN] = [reference_results[(index, False)][0] for index in range(len(rows))]
        # --- write
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values))
        response_tokens = sum(len(r["response_token_ids"]) for r in rows)
        metadata = build_metadata(
            "scored", replace(config, temperature=temperature), input=str(config.verified),
            model=str(loaded.path), model_revision=loaded.revision, temperature=temperature,
            reference_model=str(reference.path) if reference is not None else None,
            reference_revision=reference.revision if reference is not None else None,
            dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device), threads=threads,
            shard=f"{shard.index}/{shard.count}", rows=len(rows),
            privileged_sources=dict(Counter(r["privileged_source"] for r in rows)),
            median_teacher_entropy=_median(median_pool), teacher_entropy_tokens=len(median_pool),
            response_tokens=response_tokens, forward_tokens=forward_tokens,
            micro_batches=len(micro_batches(views, config.micro_batch_tokens))
            + len(micro_batches(reference_views, config.micro_batch_tokens)),
            seconds=round(seconds, 3), tokens_per_s=round(forward_tokens / max(seconds, 1e-9), 1))
        write_artifact(table, out, "scored", metadata)
        log.info("wrote %d scored rows to %s (median teacher entropy %s nats, %.0f tok/s)", len(rows), out,
                 metadata["median_teacher_entropy"], metadata["tokens_per_s"])
        return out
