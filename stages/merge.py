"""`antisd merge`: check the part files of a sharded stage output and join them into one file.

A sharded stage (`rollout`, `verify`, `score` with `--shard i/N`) writes ``OUT/part-0000i-of-0000N.parquet``. Every
stage already reads such a directory directly (`stages.common.io.read_artifact`); `merge` is for handing a single file to
other tools, and for checking a directory before trusting it. The checks, each a one-line error naming the shard:
all N parts present, every part the same artifact made with the same config (apart from its shard), and prompt ids
disjoint across parts (the groups of a prompt must live in one part, or group statistics are wrong).

The merged file has the parts' artifact schema, the rows in part order, and metadata: the fields every part agrees
on, counts summed over the parts (rows, tokens), for a scored file the batch median teacher entropy recomputed over
all rows (what `update`'s gate reads), plus ``merged_from`` (the directory, the count) and ``parts_metadata`` (each
part's own metadata). Other per-part figures (tokens/s, seconds) are kept only in ``parts_metadata``. This module
changes no row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

import schemas
from stages.common.io import (PART_RE, InputError, check_output, output_lock, part_files, read_artifact,
                       read_metadata, write_artifact)

log = logging.getLogger(__name__)

# Config keys that may differ between the parts of one output: the shard itself, and knobs that change how a part
# is computed but not its rows (a failed shard rerun with other threads or batch sizes is still the same output).
PER_PART_KEYS = frozenset({"shard", "overwrite", "threads", "device", "progress", "batch_size", "micro_batch_tokens",
                           "chunk_size"})
# Metadata counts that add up over the parts.
SUMMED_KEYS = ("rows", "prompts", "response_tokens", "forward_tokens")


@dataclass(frozen=True)
class MergeConfig:
    """Options of `antisd merge`."""

    parts: str  # directory of part-XXXXX-of-YYYYY.parquet files
    out: str  # merged Parquet file
    overwrite: bool = False  # replace an existing --out


def shard_label(part: Path) -> str:
    """``part-00002-of-00004.parquet`` → ``shard 2/4 (part-00002-of-00004.parquet)``."""
    match = PART_RE.match(part.name)
    return f"shard {int(match.group(1))}/{int(match.group(2))} ({part.name})" if match else part.name


def missing_shards(directory: str | Path, count: int) -> list[int]:
    """Indices i in 0..count-1 whose ``part-i-of-count`` file is absent (all of them if the directory is absent)."""
    directory = Path(directory)
    return [i for i in range(count)
            if not (directory / f"part-{i:05d}-of-{count:05d}.parquet").exists()]


def find_overlap(prompt_ids_by_part: list[tuple[str, list[str]]]) -> tuple[str, str, str] | None:
    """The first prompt id found in two parts, as (prompt_id, first part label, second part label); None if disjoint."""
    owner: dict[str, str] = {}
    for label, prompt_ids in prompt_ids_by_part:
        for prompt_id in dict.fromkeys(prompt_ids):
            if prompt_id in owner and owner[prompt_id] != label:
                return prompt_id, owner[prompt_id], label
            owner.setdefault(prompt_id, label)
    return None


def check_parts(directory: str | Path) -> list[Path]:
    """Check a directory of parts: complete, one artifact, one config, disjoint prompt ids. Returns the part files.

    Raises InputError naming the missing shard, or the two shards that share a prompt id, or the odd part out.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory of part files")
    parts = part_files(directory)  # complete: every index 0..N-1 present, one N
    metadata = [read_metadata(part) for part in parts]
    first_artifact = metadata[0].get("artifact")
    first_config = _shared_config(metadata[0])
    for part, meta in zip(parts[1:], metadata[1:]):
        if meta.get("artifact") != first_artifact:
            raise InputError(f"{directory}: {shard_label(part)} is a {meta.get('artifact')} file, "
                             f"{shard_label(parts[0])} a {first_artifact} file")
        config = _shared_config(meta)
        if config != first_config:
            keys = sorted(k for k in set(config) | set(first_config) if config.get(k) != first_config.get(k))
            raise InputError(f"{directory}: {shard_label(part)} was made with a different config than "
                             f"{shard_label(parts[0])} ({', '.join(keys)})")
    overlap = find_overlap([(shard_label(part), _prompt_ids(part)) for part in parts])
    if overlap is not None:
        prompt_id, first, second = overlap
        raise InputError(f"{directory}: prompt id '{prompt_id}' appears in {first} and in {second}; "
                         "the parts come from different shardings")
    return parts


def _shared_config(metadata: dict) -> dict:
    return {k: v for k, v in (metadata.get("config") or {}).items() if k not in PER_PART_KEYS}


def _prompt_ids(part: Path) -> list[str]:
    try:
        return pq.read_table(part, columns=["prompt_id"]).column("prompt_id").to_pylist()
    except KeyError:
        raise schemas.SchemaError(f"{part}: missing column 'prompt_id'") from None


def merged_metadata(directory: Path, parts_metadata: list[dict], table=None) -> dict:
    """Fields every part agrees on (config without its shard), summed counts, provenance; for scored rows the median."""
    first = parts_metadata[0]
    shared = {k: v for k, v in first.items()
              if k != "config" and all(meta.get(k) == v for meta in parts_metadata[1:])}
    shared["config"] = _shared_config(first)
    for key in SUMMED_KEYS:
        if all(isinstance(meta.get(key), int) for meta in parts_metadata):
            shared[key] = sum(meta[key] for meta in parts_metadata)
    if table is not None and first.get("artifact") == "scored":
        from stages.method.gate import median_teacher_entropy

        has_teacher = [source != "none" for source in table.column("privileged_source").to_pylist()]
        shared["median_teacher_entropy"], shared["teacher_entropy_tokens"] = median_teacher_entropy(
            table.column("teacher_entropy").to_pylist(), has_teacher)
    shared["merged_from"] = {"directory": str(directory), "count": len(parts_metadata)}
    shared["parts_metadata"] = parts_metadata
    return shared


def run(config: MergeConfig) -> Path:
    """Check the parts of `config.parts` and write them as one file to `config.out`; returns the output path."""
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
        write_artifact(table, out, artifact, merged_metadata(directory, parts_metadata, table))
        log.info("merged %d parts of %s (%d rows) into %s", len(parts), artifact, table.num_rows, out)
        return out
