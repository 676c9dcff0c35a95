"""The Arrow schemas that join the stages, and the checks every reader runs.

Each artifact (prompts → rollouts → verified → scored, plus eval rows) has one schema. Later schemas extend earlier
ones, so any stage's file can be opened in pandas/DuckDB and joined on (`prompt_id`, `sample_idx`). Every file also
carries a JSON blob under the metadata key ``antisd`` with the artifact name, schema version and the run's config.
A few columns are OPTIONAL (written on request, e.g. `ref_logprobs` by `score --reference`): checked when present.

This module only describes and checks; reading and writing files lives in `stages.io`.
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
        pa.field("reward", pa.float32(), nullable=False),  # verified reward R in {0, 1}
        pa.field("correct", pa.bool_(), nullable=False),  # reward == 1
        pa.field("verify_status", pa.string(), nullable=False),  # ok | no_answer | timeout | error
        pa.field("group_size", pa.int32(), nullable=False),  # rollouts of this prompt in the file
        pa.field("group_mean_reward", pa.float32(), nullable=False),  # mean reward of the group
        pa.field("privileged_text", pa.string()),  # verified solution shown to the teacher (METHOD §4); null if none
        pa.field("privileged_source", pa.string(), nullable=False),  # peer | reference | none
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

# Columns a file of an artifact may carry but need not: type-checked when present, kept by `conform`, never required.
OPTIONAL: dict[str, list[pa.Field]] = {
    "scored": [
        pa.field("ref_logprobs", pa.list_(pa.float32())),  # log π_ref(y_t|x, y<t) of a frozen score --reference
    ],
}

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "rollouts": ROLLOUTS,
    "verified": VERIFIED,
    "scored": SCORED,
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
