"""Reading a user's dataset file into plain records: JSONL, Parquet, a Hugging Face `datasets` folder or cached name,
and the fields of a record by dotted path. Every problem is a one-line InputError naming the file, line or row. This
module knows nothing of prompts or answers (`stages.lm.datasets` builds the prompt rows).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.common.errors import InputError


def read_parquet_records(path: Path) -> list[dict]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: line {line_no} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}); convert the file to UTF-8") from None
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}: line {line_no} is not JSON ({exc.msg})") from None
    return records


def checked_few_shot(value, where: str) -> list[dict]:
    """A row's few-shot turns as [{user, assistant}] (None or a missing field: none); anything else is refused."""
    if value is None:
        return []
    if hasattr(value, "tolist"):  # a numpy array from a Parquet list column
        value = value.tolist()
    if not isinstance(value, list):
        raise InputError(f"{where}: few-shot turns must be a list of {{user, assistant}}, got {type(value).__name__}")
    turns = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict) or set(turn) != {"user", "assistant"}:
            raise InputError(f"{where}: turn {k} must have exactly the keys user and assistant")
        if not all(isinstance(turn[key], str) and turn[key].strip() for key in ("user", "assistant")):
            raise InputError(f"{where}: turn {k}: user and assistant must be non-empty strings")
        turns.append({"user": turn["user"], "assistant": turn["assistant"]})
    return turns


def hf_records(source: str, split: str) -> list[dict]:
    """The rows of split `split` of a Hugging Face dataset: a `save_to_disk` folder, a folder of data files, or a
    Hub dataset name from the datasets cache (offline when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)."""
    try:
        import datasets as hf_datasets
    except ImportError:
        raise InputError("data prepare hf: needs the datasets package (pip install 'antisd[hf]')") from None
    from stages.lm.models import hub_offline

    if hub_offline():
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    folder = Path(source).expanduser()
    if not folder.exists() and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
        raise InputError(f"--path {source}: no such folder (a save_to_disk folder, a folder of data files, or a Hub "
                         "dataset name ORG/NAME from the datasets cache)")
    try:
        if folder.is_dir() and any((folder / name).exists() for name in ("dataset_dict.json", "state.json")):
            loaded = hf_datasets.load_from_disk(str(folder))
            if isinstance(loaded, hf_datasets.DatasetDict):
                if split not in loaded:
                    raise InputError(f"--path {source}: no split {split!r} (has {', '.join(loaded)})")
                loaded = loaded[split]
        else:
            loaded = hf_datasets.load_dataset(source, split=split)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds (missing, offline, bad split): one line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "" if folder.exists() else " (no local folder of that name either)"
        raise InputError(f"--path {source} --split {split}: cannot load it{where} ({type(exc).__name__}: "
                         f"{message})") from None
    return loaded.to_list()


def field_value(record: dict, field: str | None):
    """The value of `field` in `record`, None when it is absent: a top-level key named `field` (dots and all), else
    a dotted path whose parts are keys or integer list indices (`reward_model.ground_truth`, `prompt.0.content`,
    `prompt.-1.content`: the last turn's content)."""
    if not field:
        return None
    if field in record:
        return record[field]
    node = record
    for part in field.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and re.fullmatch(r"-?\d+", part) and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def field_present(record: dict, field: str) -> bool:
    """Whether `field` (as `field_value` reads it) names a key that is there, whatever its value (null included)."""
    head, _, last = field.rpartition(".")
    if field in record or not head:
        return field in record
    parent = field_value(record, head)
    return isinstance(parent, dict) and last in parent
