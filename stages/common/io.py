"""Checked reads and atomic writes of stage artifacts, shared by every stage.

Reads accept a Parquet file or a directory of part files (``part-00000-of-00004.parquet`` …, from `--shard`), check
the schema and name the file and column on error. Writes go to ``<name>.tmp`` and are renamed into place, so a killed
stage never leaves a truncated file under the real name; no write follows a symbolic link it did not make (temp
files are created exclusively, locks opened with O_NOFOLLOW, a link at the output name is replaced, not written
through). This module does no computation on the rows.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from schemas import METADATA_KEY, SCHEMA_VERSION, SchemaError
from stages.common.errors import InputError
from stages.common.parts import check_parts, file_metadata, part_files, read_schema

log = logging.getLogger(__name__)


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_metadata(path: str | Path) -> dict:
    """The ``antisd`` JSON metadata of a Parquet file (or of the first part of a directory)."""
    path = Path(path)
    return file_metadata(part_files(path)[0] if path.is_dir() else path)


def metadata_nodes(metadata: dict):
    """The dicts of a file's metadata, breadth-first (its own keys before the inputs' metadata it carries)."""
    queue = [metadata]
    while queue:
        node = queue.pop(0)
        yield node
        queue += [v for v in node.values() if isinstance(v, dict)]


def carried_step(metadata: dict) -> dict:
    """{"step": k} when an input file's metadata names the loop step it belongs to (the loop writes it into each
    step's prompts, and every stage carries it to its output), else {}."""
    step = metadata.get("step")
    return {"step": step} if isinstance(step, int) and not isinstance(step, bool) else {}


def recorded_model(metadata: dict, artifact: str) -> str | None:
    """The model a file's metadata chain says produced its `artifact` step (the rollouts' sampler, the scored file's
    scorer): that node's `model`, or `model_path` as rollouts wrote it before the keys were one; None if unrecorded."""
    for node in metadata_nodes(metadata):
        if node.get("artifact") == artifact:
            model = node.get("model") or node.get("model_path")
            if isinstance(model, str) and model:
                return model
    return None


def model_of(metadata: dict, artifact: str, source: str, made: str) -> str:
    """A stage run without --model: the model `source`'s metadata records for its `artifact` step (`recorded_model`),
    logged; InputError when it records none (`made`: how that model made the file, for the message)."""
    import logging

    model = recorded_model(metadata, artifact)
    if model is None:
        raise InputError(f"{source}: its metadata records no model {made}; name it with --model")
    logging.getLogger("stages").info("%s: --model not given: the model its metadata records, %s", source, model)
    return model


def read_artifact(path: str | Path, artifact: str, columns: list[str] | None = None) -> tuple[pa.Table, dict]:
    """Read `path` (file or directory of parts) as `artifact`, check its schema; return (table, metadata).

    A file of a later stage is accepted where an earlier one is expected (its extra columns are kept).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        files = check_parts(path)  # complete, one artifact and config, disjoint prompt ids
    else:
        files = [path]
    tables = []
    for file in files:
        schema = read_schema(file)
        metadata = json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))
        found = metadata.get("artifact")
        if found in schemas.ARTIFACT_ORDER and schemas.ARTIFACT_ORDER.index(found) < schemas.ARTIFACT_ORDER.index(artifact):
            raise SchemaError(f"{file}: this is a {found} file; a {artifact} file is needed (run the stage before)")
        schemas.check_schema(schema, schemas.SCHEMAS[artifact], str(file), artifact)
        try:
            tables.append(pq.read_table(file, columns=columns))
        except (pa.ArrowInvalid, OSError) as exc:
            raise SchemaError(f"{file}: corrupt Parquet data ({exc})") from None
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    if table.num_rows == 0:
        raise InputError(f"{path}: file has no rows")
    metadata = read_metadata(path)
    own = metadata.get("artifact")
    schemas.check_values(table, own if own in schemas.SCHEMAS else artifact, str(path))
    return table, metadata


def check_output(path: str | Path, overwrite: bool, kind: str = "file") -> Path:
    """Validate an output path before any work starts: its folder exists and is a folder, it is new unless
    `overwrite`, and what is there is of the same `kind` (a file, or a folder) as what will replace it."""
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"{path}: output directory {path.parent} does not exist")
    if not path.parent.is_dir():
        raise InputError(f"{path}: {path.parent} is a file, not a directory")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: output exists (pass --overwrite to replace it)")
    if path.exists() and path.is_dir() != (kind == "folder"):
        found = "a folder" if path.is_dir() else "a file"
        raise InputError(f"{path}: {found} is there; --overwrite replaces a {kind} with a {kind}, never {found}")
    return path


def lock_path(path: str | Path) -> Path:
    """The lock file of an output `path` (file or folder): `.NAME.lock` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on writing `path` (an output file or folder, or a run directory) for the block.

    A second writer gets an InputError naming the holder's pid at once, instead of both writing and one losing.
    The lock is `flock` on `.NAME.lock` beside `path`: the kernel drops it when its process dies, so a kill -9
    leaves no stale lock (the file may stay; it is then simply taken over). Creating the lock file is also the
    early test that the output folder is writable. On a filesystem without flock the block runs unlocked (warned).
    """
    path = Path(path)
    lock = lock_path(path)
    while True:
        fd = _open_lock(lock, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(f"{path}: another process (pid {holder}) is writing it; wait for it to finish or use "
                             "another output path") from None
        except OSError as exc:  # ENOLCK/EOPNOTSUPP: a filesystem mounted without lock support
            os.close(fd)
            log.warning("%s: cannot lock %s (%s); going on without a lock", path, lock, exc.strerror)
            yield path
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by a releasing holder meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.unlink(lock)  # while still holding it: a waiter that opened the old file sees it gone and retries
        os.close(fd)


def _open_lock(lock: Path, path: Path) -> int:
    """Open (or create) the lock file without following a link, and refuse one that is not a plain file of its own:
    taking the lock truncates it, which must never reach a file the link points to (or shares its inode with)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path}: its lock {lock} is a symbolic link; antisd never writes through a link it did "
                             "not make (remove the link)") from None
        raise InputError(f"{path}: cannot write in {path.parent} ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise InputError(f"{path}: its lock {lock} is not a plain file of its own (a hard link or a special file); "
                         "remove it")
    return fd


def remove_entry(path: Path) -> None:
    """Remove whatever is at `path` itself (a file, a leftover temp folder, or a link: the link, never its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle on a new `NAME.tmp` beside `path`, renamed over `path` when the block ends without error (and
    removed when it raises). The temp file is created exclusively and never through a link (a leftover or a planted
    link at `NAME.tmp` is removed first); the rename replaces a link at `path` itself instead of writing through it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    remove_entry(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def build_metadata(artifact: str, config: Any, **extra: Any) -> dict:
    from stages import __version__
    return {
        "artifact": artifact,
        "schema_version": SCHEMA_VERSION,
        "antisd_version": __version__,
        "created_unix": time.time(),
        "config": to_jsonable(config),
        **to_jsonable(extra),
    }


def write_artifact(table: pa.Table, path: str | Path, artifact: str, metadata: dict) -> Path:
    """Write `table` with `artifact`'s schema and `metadata` to `path` atomically (tmp file + rename).

    With a sharded output (`path` a directory that is meant to hold parts) pass the part file's path.
    """
    path = Path(path)
    table = schemas.conform(table, schemas.SCHEMAS[artifact]) if artifact in schemas.SCHEMAS else table
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps({**metadata, "artifact": artifact}).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_output(path) as handle:
        pq.write_table(table, handle, compression="zstd")
    return path


def read_json_object(path: str | Path, label: str | None = None) -> dict:
    """The JSON object in `path`; InputError "LABEL: …" (LABEL defaults to the path) when missing, unparsable or not
    an object."""
    label = label or str(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{label}: a directory, expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{label}: not a JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{label}: expected a JSON object")
    return data


def read_text_file(path: str | Path, label: str | None = None) -> str:
    """The UTF-8 text of a user's file; InputError "LABEL: …" (LABEL defaults to the path) when it is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise InputError(f"{label or path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); convert the "
                         "file to UTF-8") from None


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_new_files(folder: str | Path) -> None:
    """Give a finished output folder the modes that plain file creation gives (0666/0777 minus the umask).

    Temp folders (mkdtemp: 0700) and some writers (safetensors: 0600) make files only their owner can read; on a
    shared cluster the other accounts of a project must be able to read the weights.
    """
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as handle:
        handle.write(text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")
