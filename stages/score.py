"""`antisd score`: verified rollouts → scored rows with student/teacher log-probs, entropies and PMI (METHOD §1, §4).

For each row the same weights are run twice over the stored response token ids (never re-tokenized):
- student view: `prompt_token_ids` + `response_token_ids` → s_t = student_logprobs, student_entropy (the old policy);
- teacher view: encode(teacher_messages(problem, few_shot, privileged_text, correct)) + the same response ids
  → t_t = teacher_logprobs, H_t = teacher_entropy; pmi u_t = t_t − s_t (computed from the stored float32 values).
The teacher prompt's framing text (headers, notes, last line) and the chat options are the rollouts' (the `chat`
record in the input's metadata chain, their prompt template's values included); `--teacher-instruction` replaces the
last line; `--teacher-layout official` and `--no-peer-assessment` give the teacher turn of METHOD §9, and a row of
source `assessment` (verify --privileged-fallback assessment) gets a teacher view with the note only. Rows with
privileged_source == "none" get no teacher pass: teacher_* = the student values, pmi = 0,
teacher_prompt_length = the student prompt length, and they are left out of the median teacher entropy. With
`--no-teacher` (what `loop` passes for a method that does not read u, such as grpo) no row gets one, and the
metadata records teacher: false.
With `--reference MODEL` a third network (a frozen reference, same dtype and device) scores the student view only,
at the same temperature, into the optional `ref_logprobs` column (no entropy), for `update --kl-coef` (METHOD §3).

Every row with a teacher view gets its teacher perplexity tppl = exp(−mean t) in the optional `teacher_ppl` column
(METHOD §9; null without one). `--no-entropy` skips the full-vocabulary entropies (stored as 0, metadata entropy:
false; no median teacher entropy): what §9 needs, since its λ and gate read tppl.
Log-probs and full-vocabulary entropies (nats) are computed in chunks of positions (never [tokens × vocab] logits for
a batch) under torch.inference_mode. By default the views of one prompt run as one unit whose common prompt prefix is
computed once (`stages.lm.shared_prefix`): the student views share the whole prompt, the teacher views the few-shot
turns and the problem; `--no-share-prefix` runs every view as a full sequence, in micro-batches of at most
`micro_batch_tokens` padded tokens. Both give the same numbers to float rounding (tested to 1e-5).
Output rows keep the input order. Temperature: `--temperature`, else the first `temperature` key found in the input
file's metadata (breadth-first: rollout records its sampling parameters, verify carries them along), else 1.0; the
value used is stored in the metadata so `update` can use the same numerics.
File metadata: model path and revision, reference_model and reference_revision (None without --reference),
temperature, median_teacher_entropy (this file's rows: with --shard, a shard's median), token counts (sequence_tokens:
prompt + response of every view; forward_tokens: the positions actually computed), tokens_per_s (sequence tokens).
The views, micro-batches and columns are computed by `stages.lm.scoring`; this module reads, checks and writes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from stages.common.errors import InputError
from stages.common.io import (
    build_metadata,
    carried_step,
    check_output,
    model_of,
    output_lock,
    read_artifact,
    write_artifact,
)
from stages.common.parts import Shard, output_path
from stages.lm.forward import Numerics, chunk_positions
from stages.lm.scoring import (
    _ROW_COLUMNS,
    REFERENCE_COLUMN,
    SCORE_COLUMNS,
    TEACHER_PPL_COLUMN,
    TEACHER_PROMPT_COLUMN,
    ScoreConfig,
    assemble,
    build_views,
    check_rows,
    load_reference,
    metadata_chat,
    metadata_temperature,
    plan_batches,
    score_views,
    teacher_prompts,
    warn_logprob_mismatch,
)

log = logging.getLogger(__name__)


def run(config: ScoreConfig, loaded=None, reference_loaded=None) -> Path:
    """Score `config.verified` with `config.model` (or the already-loaded `loaded`); return the output path.

    With config.reference, also score the student views with that frozen network (`reference_loaded` reuses one).
    """
    from stages.common.process import pick_device, set_threads
    from stages.common.progress import token_progress
    from stages.lm.models import load_model
    from stages.method.gate import median_teacher_entropy
    from stages.method.losses import logprob_mismatch
    from stages.method.perplexity import teacher_perplexity

    # --- validate inputs (the options were checked when `config` was made)
    shard = Shard.parse(config.shard)
    out = check_output(output_path(config.out, shard), config.overwrite)
    with output_lock(out):
        table, in_meta = read_artifact(config.verified, "verified")
        stale = [c for c in (*SCORE_COLUMNS, REFERENCE_COLUMN, TEACHER_PROMPT_COLUMN, TEACHER_PPL_COLUMN)
                 if c in table.column_names]
        table = table.drop_columns(stale)  # rescoring a scored file
        if not shard.is_whole:
            table = table.take(shard.select(table.column("prompt_id").to_pylist()))
            if table.num_rows == 0:
                raise InputError(f"{config.verified}: shard {shard.index}/{shard.count} holds no prompts")
        temperature = config.temperature or metadata_temperature(in_meta) or 1.0
        if config.model is None:  # the model that sampled the rollouts (the one lent, or the one they record)
            config = replace(config, model=str(loaded.path) if loaded is not None else
                             model_of(in_meta, "rollouts", config.verified, "its rollouts were sampled with"))
        # --- load
        threads = set_threads(config.threads)
        if loaded is None:
            loaded = load_model(config.model, dtype=config.dtype, device=pick_device(config.device),
                                attn_implementation=config.attn_implementation)
        reference = load_reference(config, loaded, reference_loaded)
        tokenizer, model = loaded.tokenizer, loaded.model
        networks = [model] + ([reference.model] if reference is not None else [])
        vocab_size = min([len(tokenizer)] + [network.get_input_embeddings().num_embeddings for network in networks])
        rows = table.select(_ROW_COLUMNS).to_pylist()
        check_rows(rows, vocab_size, config.verified)
        chat = metadata_chat(in_meta)  # the chat options (prompt template included) the rollouts were rendered with
        if config.teacher_instruction is not None:
            chat = replace(chat, teacher_instruction=config.teacher_instruction)
        views = build_views(rows, tokenizer, teacher=config.teacher, chat=chat, layout=config.teacher_layout,
                            peer_assessment=config.peer_assessment)
        reference_views = [v for v in views if not v.teacher] if reference is not None else []
        # --- compute
        batches = plan_batches(views, rows, config.micro_batch_tokens, config.share_prefix)
        reference_batches = plan_batches(reference_views, rows, config.micro_batch_tokens, config.share_prefix)
        sequence_tokens = sum(v.length for v in views + reference_views)
        forward_tokens = sum(b.tokens for b in batches + reference_batches)
        log.info("scoring %d rows (%d teacher views, %d reference views, %d sequence tokens in %d forward positions) "
                 "with %s at temperature %g, %d thread(s)", len(rows), sum(v.teacher for v in views),
                 len(reference_views), sequence_tokens, forward_tokens, loaded.path, temperature, threads)
        numerics = Numerics(tokenizer.pad_token_id or 0, temperature, chunk_positions(
            config.chunk_size, str(loaded.device), model.config.get_text_config().vocab_size))
        start = time.perf_counter()
        with token_progress("score", sequence_tokens) as progress:
            results = score_views(model, batches, numerics=replace(numerics, with_entropy=config.entropy), rows=rows,
                                  progress=progress)
            if reference is not None:  # log π_ref(y_t | x, y<t): the student views, same numerics, no entropy
                reference_results = score_views(reference.model, reference_batches, progress=progress, rows=rows,
                                                numerics=replace(numerics, with_entropy=False), label="reference's ")
        seconds = time.perf_counter() - start
        columns = assemble(rows, views, results)
        mismatch, _ = logprob_mismatch(columns["student_logprobs"], table.column("sampling_logprobs").to_pylist())
        warn_logprob_mismatch(mismatch, in_meta, f"score {config.verified}", str(loaded.path))
        teacher_rows = [config.teacher and row["privileged_source"] != "none" for row in rows]
        median, median_tokens = median_teacher_entropy(columns["teacher_entropy"], teacher_rows) \
            if config.entropy else (None, 0)
        teacher_ppl = [teacher_perplexity(lp) if teacher else None
                       for lp, teacher in zip(columns["teacher_logprobs"], teacher_rows)]
        if reference is not None:
            columns[REFERENCE_COLUMN] = [reference_results[(index, False)][0] for index in range(len(rows))]
        # --- write
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values))
        table = table.append_column(TEACHER_PROMPT_COLUMN, pa.array(teacher_prompts(rows, views), pa.list_(pa.int32())))
        table = table.append_column(TEACHER_PPL_COLUMN, pa.array(teacher_ppl, pa.float64()))
        response_tokens = sum(len(r["response_token_ids"]) for r in rows)
        metadata = build_metadata(
            "scored", replace(config, temperature=temperature), **carried_step(in_meta),
            inputs={"verified": str(config.verified)},
            model=str(loaded.path), model_revision=loaded.revision, temperature=temperature, teacher=config.teacher,
            entropy=config.entropy,
            chat=chat.record(),
            reference_model=str(reference.path) if reference is not None else None,
            reference_revision=reference.revision if reference is not None else None,
            dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device), threads=threads,
            shard=f"{shard.index}/{shard.count}", rows=len(rows),
            privileged_sources=dict(Counter(r["privileged_source"] for r in rows)),
            median_teacher_entropy=median, teacher_entropy_tokens=median_tokens,
            response_tokens=response_tokens, sequence_tokens=sequence_tokens, forward_tokens=forward_tokens,
            micro_batches=len(batches) + len(reference_batches), logprob_mismatch_mean=mismatch,
            wall_s=round(seconds, 3), tokens_per_s=round(sequence_tokens / max(seconds, 1e-9), 1))
        write_artifact(table, out, "scored", metadata)
        log.info("wrote %d scored rows to %s (median teacher entropy %s, %.0f tok/s)", len(rows), out,
                 "not computed" if median is None else f"{median:.4g} nats", metadata["tokens_per_s"])
        return out
