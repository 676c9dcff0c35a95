"""The Arrow schemas that join the stages, and the checks every reader runs.

Each artifact (prompts → rollouts → verified → scored, plus eval rows) has one schema. Later schemas extend earlier
ones, so any stage's file can be opened in pandas/DuckDB and joined on (`prompt_id`, `sample_idx`). Every file also
carries a JSON blob under the metadata key ``antisd`` with the artifact name, schema version and the run's config.
A few columns are OPTIONAL (written on request, e.g. `ref_logprobs` by `score --reference`): checked when present.

This module only describes and checks; reading and writing files lives in `stages.common.io`.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"antisd"


class SchemaError(ValueError):
    """A file does not match the schema its reader expects (exit code 2 at the CLI)."""


FEW_SHOT_TYPE = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string())]))

PROMPTS = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),  # unique within a file, stable across runs
        pa.field("dataset", pa.string(), nullable=False),  # e.g. "arith", "gsm8k/train"
        pa.field("problem", pa.string(), nullable=False),  # problem statement shown to the model
        pa.field("answer", pa.string(), nullable=False),  # gold final answer (LaTeX or plain)
        pa.field("solution", pa.string()),  # reference worked solution, null if the dataset has none
        pa.field("few_shot", FEW_SHOT_TYPE),  # earlier chat turns shown before the problem (may be empty)
    ]
)

ROLLOUTS = pa.schema(
    list(PROMPTS)
    + [
        pa.field("sample_idx", pa.int32(), nullable=False),  # 0..n-1 within the prompt's group
        pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),  # exact ids the engine was fed
        pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),  # sampled ids, engine's own
        pa.field("response_text", pa.string(), nullable=False),  # detokenized response (special tokens skipped)
        pa.field("sampling_logprobs", pa.list_(pa.float32()), nullable=False),  # log-prob of each sampled id, after temperature/top-p
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" (EOS) or "length" (hit max-new-tokens)
        pa.field("response_length", pa.int32(), nullable=False),  # len(response_token_ids)
    ]
)

VERIFIED = pa.schema(
    list(ROLLOUTS)
    + [
        pa.field("extracted_answer", pa.string()),  # answer string pulled from the response; null if none
        pa.field("reward", pa.float32(), nullable=False),  # R: 0 or 1 (math-verify), any finite number (--reward)
        pa.field("correct", pa.bool_(), nullable=False),  # reward ≥ CORRECT_REWARD
        pa.field("verify_status", pa.string(), nullable=False),  # ok | no_answer | timeout | error
        pa.field("group_size", pa.int32(), nullable=False),  # rollouts of this prompt in the file
        pa.field("group_mean_reward", pa.float32(), nullable=False),  # mean reward of the group
        pa.field("privileged_text", pa.string()),  # verified solution shown to the teacher (METHOD §4); null if none
        pa.field("privileged_source", pa.string(), nullable=False),  # one of PRIVILEGED_SOURCES
        pa.field("peer_sample_idx", pa.int32()),  # sample_idx of the peer used, null unless source == peer
    ]
)

SCORED = pa.schema(
    list(VERIFIED)
    + [
        pa.field("student_logprobs", pa.list_(pa.float32()), nullable=False),  # s_t = log π_θ(y_t|x, y<t), old policy
        pa.field("teacher_logprobs", pa.list_(pa.float32()), nullable=False),  # t_t = log π_θ(y_t|x, c, y<t); = s_t if source none
        pa.field("teacher_entropy", pa.list_(pa.float32()), nullable=False),  # H_t, full-vocabulary teacher entropy (nats)
        pa.field("student_entropy", pa.list_(pa.float32()), nullable=False),  # full-vocabulary student entropy (nats)
        pa.field("pmi", pa.list_(pa.float32()), nullable=False),  # u_t = t_t − s_t; 0 where source is none
        pa.field("teacher_prompt_length", pa.int32(), nullable=False),  # tokens before the response in the teacher view
    ]
)

# `antisd update --advantages-out`: what the method did to each token of each response (METHOD §2, §9), one row per
# response of the scored file; not a stage of the chain (no later stage reads it)
ADVANTAGES = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_idx", pa.int32(), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),  # R_i as verified (before any overlong shaping)
        pa.field("privileged_source", pa.string(), nullable=False),  # what the teacher saw (PRIVILEGED_SOURCES)
        pa.field("trained", pa.bool_(), nullable=False),  # false: left out of the loss (update --overlong-filter)
        pa.field("seq_advantage", pa.float32(), nullable=False),  # A_seq_i (§2; Dr.GRPO without the std in §9)
        pa.field("lam", pa.float64(), nullable=False),  # λ_i: the step's λ (§5) or this response's (§9)
        pa.field("teacher_ppl", pa.float64()),  # tppl_i = exp(−mean t); null for an empty response
        pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("u", pa.list_(pa.float32()), nullable=False),  # u_t after the adaptive clip (u itself when off)
        pa.field("term", pa.list_(pa.float32()), nullable=False),  # r_t = f(u_t) before normalisation
        pa.field("term_normalized", pa.list_(pa.float32()), nullable=False),  # p_t after the z-score and length mask
        pa.field("advantage", pa.list_(pa.float32()), nullable=False),  # A_{i,t} = A_seq_i + λ_i·p_t
    ]
)

# Columns a file of an artifact may carry but need not: type-checked when present, kept by `conform`, never required.
OPTIONAL: dict[str, list[pa.Field]] = {
    "scored": [
        pa.field("ref_logprobs", pa.list_(pa.float32())),  # log π_ref(y_t|x, y<t) of a frozen score --reference
        # the teacher view's prompt ids (chat template applied; what the teacher saw); null without a teacher view.
        # Optional so that files scored before it existed still read.
        pa.field("teacher_prompt_token_ids", pa.list_(pa.int32())),
        # tppl_i = exp(−mean_t t_t) of the teacher view (METHOD §9; float64, what update reads); null if empty
        pa.field("teacher_ppl", pa.float64()),
    ],
}

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "rollouts": ROLLOUTS,
    "verified": VERIFIED,
    "scored": SCORED,
    "advantages": ADVANTAGES,
}

# A later artifact satisfies every earlier reader: `verify` accepts scored files too, and so on.
ARTIFACT_ORDER = ["prompts", "rollouts", "verified", "scored"]


def _type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual.equals(expected):
        return True
    # large_string/large_list written by other tools are accepted where the plain type is expected.
    if pa.types.is_string(expected) and (pa.types.is_large_string(actual) or pa.types.is_string_view(actual)):
        return True
    if pa.types.is_list(expected) and (pa.types.is_large_list(actual) or pa.types.is_list(actual)):
        return _type_matches(actual.value_type, expected.value_type)
    if pa.types.is_struct(expected) and pa.types.is_struct(actual):
        names = {actual.field(i).name: actual.field(i).type for i in range(actual.num_fields)}
        return all(
            expected.field(i).name in names and _type_matches(names[expected.field(i).name], expected.field(i).type)
            for i in range(expected.num_fields)
        )
    return False


def check_schema(actual: pa.Schema, expected: pa.Schema, source: str, artifact: str) -> None:
    """Raise SchemaError naming `source` and the first missing or mistyped column of `expected`.

    The artifact's OPTIONAL columns are type-checked when present; their absence is fine.
    """
    for field in expected:
        index = actual.get_field_index(field.name)
        if index < 0:
            raise SchemaError(f"{source}: missing column '{field.name}' (expected {field.type}) for a {artifact} file")
        _check_type(actual, field, source, artifact)
    for field in OPTIONAL.get(artifact, ()):
        if actual.get_field_index(field.name) >= 0:
            _check_type(actual, field, source, artifact)


def _check_type(actual: pa.Schema, field: pa.Field, source: str, artifact: str) -> None:
    got = actual.field(actual.get_field_index(field.name)).type
    if not _type_matches(got, field.type):
        raise SchemaError(f"{source}: column '{field.name}' has type {got}, expected {field.type} ({artifact} file)")


def conform(table: pa.Table, expected: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to exactly `expected` (extra columns dropped, order fixed).

    When `expected` is one of SCHEMAS, that artifact's OPTIONAL columns present in `table` are kept, after the others.
    """
    optional = next((OPTIONAL.get(name, []) for name, schema in SCHEMAS.items() if schema is expected), [])
    schema = pa.schema(list(expected) + [f for f in optional if f.name in table.column_names])
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema], schema=schema)


# --- row values ------------------------------------------------------------------------------------------------

# A log-prob is ≤ 0 by construction (log_softmax, or an engine's log-prob); the slack admits another engine's rounding
# and catches what matters: probabilities or negated log-probs written in its place.
LOGPROB_SLACK = 1e-3
# A verified row is `correct` iff its reward is at least this: math-verify's rewards are 0 and 1, and a `--reward`
# function's float reward marks a response correct (a peer solution the teacher may see, an eval hit) at full credit
CORRECT_REWARD = 1.0
FINISH_REASONS = ("stop", "length")
VERIFY_STATUSES = ("ok", "no_answer", "timeout", "error")
# peer / reference: this problem's (METHOD §4); other_*: another problem's (verify --privileged-from other, a control)
# assessment: no solution, the teacher sees only the note on this rollout (verify --privileged-fallback assessment, §9)
PRIVILEGED_SOURCES = ("peer", "reference", "other_peer", "other_reference", "none", "assessment")
TEXTLESS_SOURCES = ("assessment", "none")  # privileged_text is null for these
# per-token columns: (artifact that introduces them, must be finite, bound: ("max", x) or ("min", x) or None)
_TOKEN_RULES = {
    "sampling_logprobs": ("rollouts", False, ("max", LOGPROB_SLACK)),  # an engine may report −inf
    "student_logprobs": ("scored", True, ("max", LOGPROB_SLACK)),
    "teacher_logprobs": ("scored", True, ("max", LOGPROB_SLACK)),
    "ref_logprobs": ("scored", True, ("max", LOGPROB_SLACK)),
    "teacher_entropy": ("scored", True, ("min", -LOGPROB_SLACK)),
    "student_entropy": ("scored", True, ("min", -LOGPROB_SLACK)),
    "pmi": ("scored", True, None),
}


def _row_label(table: pa.Table, row: int) -> str:
    names = [n for n in ("prompt_id", "sample_idx") if n in table.column_names]
    where = ", ".join(f"{n} {table.column(n)[row].as_py()!r}" for n in names)
    return f"row {row}" + (f" ({where})" if where else "")


def _first(mask) -> int | None:
    """Index of the first true entry of a boolean Arrow array (nulls count as false), or None."""
    import pyarrow.compute as pc

    indices = pc.indices_nonzero(pc.fill_null(mask, False))
    return indices[0].as_py() if len(indices) else None


def check_values(table: pa.Table, artifact: str, source: str) -> None:
    """Raise SchemaError naming `source`, the column and the first bad row when a value breaks its column's rules.

    Checked where the column is present: no nulls in non-nullable columns (nor inside their lists); for rollouts and
    later files, sample_idx ≥ 0, one row per (prompt_id, sample_idx), finish_reason, response_length; for verified
    files, a finite reward agreeing with `correct` (reward ≥ CORRECT_REWARD), verify_status, privileged_source and its peer index; for scored
    files, per-token lists as long as the response, finite, log-probs ≤ 0 and entropies ≥ 0 (within LOGPROB_SLACK).
    """
    import pyarrow.compute as pc

    def fail(column: str, row: int, what: str):
        raise SchemaError(f"{source}: column '{column}', {_row_label(table, row)}: {what}")

    stage = ARTIFACT_ORDER.index(artifact) if artifact in ARTIFACT_ORDER else len(ARTIFACT_ORDER)
    expected = {f.name: f for f in SCHEMAS.get(artifact, pa.schema([]))}
    for name, field in expected.items():
        if name not in table.column_names or field.nullable:
            continue
        column = table.column(name)
        if column.null_count:
            fail(name, _first(pc.is_null(column)), "null in a column that must hold a value")
        if pa.types.is_list(field.type) and pa.types.is_primitive(field.type.value_type):
            values = pc.list_flatten(column)
            if values.null_count:
                parents = pc.list_parent_indices(column)
                fail(name, parents[_first(pc.is_null(values))].as_py(), "null inside the list")
    has = set(table.column_names)
    if stage >= ARTIFACT_ORDER.index("rollouts"):
        _check_rollout_values(table, has, fail)
    if stage >= ARTIFACT_ORDER.index("verified"):
        _check_verified_values(table, has, fail)
    for name, (introduced, finite, bound) in _TOKEN_RULES.items():
        if name in has and stage >= ARTIFACT_ORDER.index(introduced):
            _check_token_column(table, name, finite, bound, fail)


def _check_rollout_values(table: pa.Table, has: set, fail) -> None:
    import pyarrow.compute as pc

    if "sample_idx" in has:
        bad = _first(pc.less(table.column("sample_idx"), 0))
        if bad is not None:
            fail("sample_idx", bad, "negative")
        if "prompt_id" in has:
            seen: dict = {}
            for row, key in enumerate(zip(table.column("prompt_id").to_pylist(),
                                          table.column("sample_idx").to_pylist())):
                if key in seen:
                    fail("sample_idx", row, f"the same (prompt_id, sample_idx) as row {seen[key]}: a file holds "
                                            "each sample once (was it concatenated twice?)")
                seen[key] = row
    if "finish_reason" in has:
        bad = _first(pc.invert(pc.is_in(table.column("finish_reason"), pa.array(FINISH_REASONS))))
        if bad is not None:
            fail("finish_reason", bad, f"{table.column('finish_reason')[bad].as_py()!r} is not one of "
                                       f"{', '.join(FINISH_REASONS)}")
    if {"response_length", "response_token_ids"} <= has:
        lengths = pc.list_value_length(table.column("response_token_ids"))
        bad = _first(pc.not_equal(table.column("response_length"), pc.cast(lengths, pa.int32())))
        if bad is not None:
            fail("response_length", bad, f"{table.column('response_length')[bad].as_py()} for "
                                         f"{lengths[bad].as_py()} response_token_ids")


def _check_verified_values(table: pa.Table, has: set, fail) -> None:
    import pyarrow.compute as pc

    if "reward" in has:
        reward = table.column("reward")
        bad = _first(pc.invert(pc.is_finite(reward)))
        if bad is not None:
            fail("reward", bad, f"{reward[bad].as_py()!r}; a verified reward is a finite number")
        if "correct" in has:
            bad = _first(pc.not_equal(pc.greater_equal(reward, CORRECT_REWARD), table.column("correct")))
            if bad is not None:
                fail("correct", bad, f"{table.column('correct')[bad].as_py()} with reward {reward[bad].as_py()} "
                                     f"(correct is reward ≥ {CORRECT_REWARD:g})")
    for name, valid in (("verify_status", VERIFY_STATUSES), ("privileged_source", PRIVILEGED_SOURCES)):
        if name in has:
            bad = _first(pc.invert(pc.is_in(table.column(name), pa.array(valid))))
            if bad is not None:
                fail(name, bad, f"{table.column(name)[bad].as_py()!r} is not one of {', '.join(valid)}")
    if {"privileged_source", "peer_sample_idx"} <= has:
        peer = pc.equal(table.column("privileged_source"), "peer")
        bad = _first(pc.and_(peer, pc.is_null(table.column("peer_sample_idx"))))
        if bad is not None:
            fail("peer_sample_idx", bad, "null, but privileged_source is 'peer'")
    if {"privileged_source", "privileged_text"} <= has:
        with_text = pc.invert(pc.is_in(table.column("privileged_source"), pa.array(TEXTLESS_SOURCES)))
        bad = _first(pc.and_(with_text, pc.is_null(table.column("privileged_text"))))
        if bad is not None:
            fail("privileged_text", bad, f"null, but privileged_source is "
                                         f"{table.column('privileged_source')[bad].as_py()!r}")


def _check_token_column(table: pa.Table, name: str, finite: bool, bound, fail) -> None:
    import pyarrow.compute as pc

    column = table.column(name)
    if "response_token_ids" in table.column_names:
        lengths = pc.list_value_length(column)
        expected = pc.list_value_length(table.column("response_token_ids"))
        bad = _first(pc.not_equal(lengths, expected))
        if bad is not None:
            fail(name, bad, f"{lengths[bad].as_py()} values for {expected[bad].as_py()} response tokens")
    values = pc.list_flatten(column)
    if not len(values):
        return
    parents = pc.list_parent_indices(column)
    problems = []
    if finite:
        problems.append((pc.invert(pc.is_finite(values)), "non-finite value"))
    else:  # ±inf may be legitimate (an engine's −inf log-prob), NaN never is (and passes every comparison)
        problems.append((pc.is_nan(values), "NaN"))
    if bound is not None:
        side, limit = bound
        problems.append((pc.greater(values, limit) if side == "max" else pc.less(values, limit),
                         f"{'above' if side == 'max' else 'below'} {limit:g} (a log-prob is ≤ 0, an entropy ≥ 0)"))
    for mask, what in problems:
        index = _first(mask)
        if index is not None:
            fail(name, parents[index].as_py(), f"{what} at response token "
                 f"{index - pc.index(parents, parents[index]).as_py()} ({values[index].as_py()})")
