"""`antisd merge`: check the part files of a sharded stage output and join them into one file.

A sharded stage (`rollout`, `verify`, `score` with `--shard i/N`) writes ``OUT/part-0000i-of-0000N.parquet``. Every
stage already reads such a directory directly (`stages.common.io.read_artifact`); `merge` is for handing a single file to
other tools, and for checking a directory before trusting it. The checks, each a one-line error naming the shard:
all N parts present, every part the same artifact made with the same config (apart from its shard), and prompt ids
disjoint across parts (the groups of a prompt must live in one part, or group statistics are wrong).

The merged file has the parts' artifact schema, the rows in part order, and metadata: the fields every part agrees
on, counts summed over the parts (rows, tokens), for a scored file the batch median teacher entropy recomputed over
all rows (what `update`'s gate reads), plus ``merged_from`` (the directory, the count) and ``parts_metadata`` (each
part's own metadata). Other per-part figures (tokens/s, wall_s) are kept only in ``parts_metadata``. This module
changes no row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import schemas
from stages.common.errors import InputError
from stages.common.io import check_output, output_lock, read_artifact, read_metadata, write_artifact
from stages.common.parts import PART_RE, check_parts, shared_config

log = logging.getLogger(__name__)

# Metadata counts that add up over the parts.
SUMMED_KEYS = ("rows", "prompts", "response_tokens", "forward_tokens")


@dataclass(frozen=True)
class MergeConfig:
    """Options of `antisd merge`."""

    parts: str  # directory of part-XXXXX-of-YYYYY.parquet files
    out: str  # merged Parquet file
    overwrite: bool = False  # replace an existing --out


def merged_metadata(directory: Path, parts_metadata: list[dict], table=None) -> dict:
    """Fields every part agrees on (config without its shard), summed counts, provenance; for scored rows the median."""
    first = parts_metadata[0]
    shared = {k: v for k, v in first.items()
              if k != "config" and all(meta.get(k) == v for meta in parts_metadata[1:])}
    shared["config"] = shared_config(first)
    for key in SUMMED_KEYS:
        if all(isinstance(meta.get(key), int) for meta in parts_metadata):
            shared[key] = sum(meta[key] for meta in parts_metadata)
    if table is not None and first.get("artifact") == "scored" and first.get("entropy") is not False:
        from stages.method.gate import median_teacher_entropy

        has_teacher = [source != "none" for source in table.column("privileged_source").to_pylist()]
        shared["median_teacher_entropy"], shared["teacher_entropy_tokens"] = median_teacher_entropy(
            table.column("teacher_entropy").to_pylist(), has_teacher)
    shared["merged_from"] = {"directory": str(directory), "count": len(parts_metadata)}
    shared["parts_metadata"] = parts_metadata
    return shared


def run(config: MergeConfig, order: Sequence[tuple[str, int]] | None = None) -> Path:
    """Check the parts of `config.parts` and write them as one file to `config.out`; returns the output path.

    `order` ((prompt_id, sample_idx) keys, the loop's): the rows in that order, as the unsharded stage writes them,
    instead of part order; it must name every row of the parts and no other (ValueError otherwise)."""
    directory = Path(config.parts)
    out = check_output(config.out, config.overwrite)
    with output_lock(out):
        if out.resolve().parent == directory.resolve() and PART_RE.match(out.name):
            raise InputError(f"{out}: the merged file must not look like a part of {directory}")
        parts = check_parts(directory)
        parts_metadata = [read_metadata(part) for part in parts]
        artifact = parts_metadata[0].get("artifact")
        if artifact not in schemas.SCHEMAS:
            raise schemas.SchemaError(f"{parts[0]}: unknown artifact {artifact!r} in its metadata "
                                      f"(expected one of {', '.join(schemas.SCHEMAS)})")
        table, _ = read_artifact(directory, artifact)
        if order is not None:
            table = table.take(rows_in_order(table, order))
        write_artifact(table, out, artifact, merged_metadata(directory, parts_metadata, table))
        log.info("merged %d parts of %s (%d rows) into %s", len(parts), artifact, table.num_rows, out)
        return out


def rows_in_order(table, order: Sequence[tuple[str, int]]) -> list[int]:
    """Positions of `table`'s rows so that their (prompt_id, sample_idx) follow `order`, which must hold each row's
    key once and no other key."""
    keys = list(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))
    position = {key: index for index, key in enumerate(keys)}
    if len(position) != len(keys) or set(order) != set(position) or len(order) != len(keys):
        raise ValueError(f"merge: the parts hold {len(keys)} rows, the order names {len(order)}, not the same keys")
    return [position[key] for key in order]
