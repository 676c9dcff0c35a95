"""Part files of a sharded stage output (`--shard I/N` writes ``OUT/part-0000I-of-0000N.parquet``) and the checks a
directory of them must pass before any stage reads it as one: all N parts present, one artifact and one config
(apart from per-part knobs), prompt ids disjoint across parts. Errors name the shard.

Also the lowest-level read of a Parquet file's schema and `antisd` metadata, which the checks need. This module
reads only schemas, metadata and prompt ids; `stages.common.io` reads tables.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from schemas import METADATA_KEY, SchemaError
from stages.common.errors import InputError

PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")



# Config keys that may differ between the parts of one output: the shard itself, and knobs that change how a part
# is computed but not its rows (a failed shard rerun with other threads or batch sizes is still the same output).
PER_PART_KEYS = frozenset({"shard", "overwrite", "threads", "device", "progress", "batch_size", "micro_batch_tokens",
                           "chunk_size"})

@dataclass(frozen=True)
class Shard:
    """This process's slice of the prompts: shard `index` of `count` (0-based), e.g. ``--shard 3/8``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        if text is None or text == "":
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise InputError(f"--shard: expected I/N such as 0/4, got '{text}'")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise InputError(f"--shard: need 0 <= I < N and N >= 1, got '{text}'")
        return cls(index, count)

    @property
    def is_whole(self) -> bool:
        return self.count == 1

    def select(self, keys: list[str]) -> list[int]:
        """Row positions of this shard: unique keys are dealt round-robin in order of first appearance."""
        order: dict[str, int] = {}
        for key in keys:
            order.setdefault(key, len(order))
        return [i for i, key in enumerate(keys) if order[key] % self.count == self.index]

    def part_name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}.parquet"


def read_schema(file: str | Path) -> pa.Schema:
    """The Arrow schema of one Parquet file; SchemaError naming it when it is not a readable Parquet file."""
    try:
        return pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SchemaError(f"{file}: not a readable Parquet file ({exc})") from None


def file_metadata(file: str | Path) -> dict:
    """The ``antisd`` JSON metadata of one Parquet file ({} when it has none)."""
    raw = read_schema(file).metadata or {}
    return json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else {}


def part_files(directory: Path) -> list[Path]:
    """Part files of a sharded dataset, checked complete: every index 0..N-1 present, one N."""
    parts = sorted(p for p in directory.iterdir() if PART_RE.match(p.name))
    if not parts:
        raise InputError(f"{directory}: directory holds no part-XXXXX-of-YYYYY.parquet files")
    counts = {int(PART_RE.match(p.name).group(2)) for p in parts}
    if len(counts) != 1:
        raise InputError(f"{directory}: part files disagree on the shard count: {sorted(counts)}")
    count = counts.pop()
    present = {int(PART_RE.match(p.name).group(1)) for p in parts}
    missing = [i for i in range(count) if i not in present]
    if missing:
        raise InputError(f"{directory}: missing shard(s) {', '.join(f'{i}/{count}' for i in missing)}")
    return parts


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
    metadata = [file_metadata(part) for part in parts]
    first_artifact = metadata[0].get("artifact")
    first_config = shared_config(metadata[0])
    for part, meta in zip(parts[1:], metadata[1:]):
        if meta.get("artifact") != first_artifact:
            raise InputError(f"{directory}: {shard_label(part)} is a {meta.get('artifact')} file, "
                             f"{shard_label(parts[0])} a {first_artifact} file")
        config = shared_config(meta)
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


def shared_config(metadata: dict) -> dict:
    """The config of a part without its per-part knobs, also inside a nested stage section (eval's parts record
    {"rollout": {...}, "verify": {...}})."""
    def shared(config: dict) -> dict:
        return {k: shared(v) if isinstance(v, dict) else v for k, v in config.items() if k not in PER_PART_KEYS}

    return shared(metadata.get("config") or {})


def _prompt_ids(part: Path) -> list[str]:
    try:
        return pq.read_table(part, columns=["prompt_id"]).column("prompt_id").to_pylist()
    except KeyError:
        raise schemas.SchemaError(f"{part}: missing column 'prompt_id'") from None


def output_path(out: str | Path, shard: Shard) -> Path:
    """Where a stage writes: `out` itself, or for a shard `out/part-i-of-N.parquet` (creating `out/`)."""
    out = Path(out)
    if shard.is_whole:
        return out
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: a sharded output must be a directory, but a file exists there")
    if not out.parent.exists():
        raise InputError(f"{out}: output directory {out.parent} does not exist")
    out.mkdir(exist_ok=True)
    return out / shard.part_name()
