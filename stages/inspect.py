"""`antisd inspect`: describe any stage's Parquet file (rows, schema, metadata, column stats, sample rows), or a run.

Works on every artifact (prompts, rollouts, verified, scored, eval, `update --advantages-out`) and on directories of
part files; a scored row with --row shows the decoded views, an advantages row its tokens beside u, the term before
and after normalisation and the final advantage. On a run folder of `antisd loop` (it holds run.json) it shows the
steps table with its notes (`stages.runs.view`) and each step's files. It renders with rich and computes only
summaries; it never modifies the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

import schemas
from stages.common.errors import InputError
from stages.common.io import read_artifact, read_metadata
from stages.common.parts import part_files, read_schema

LIST_PREVIEW = 8


@dataclass(frozen=True)
class InspectConfig:
    """Options of `antisd inspect`."""

    path: str
    samples: int = 3  # sample rows to render
    row: int | None = None  # show this row in full instead of samples (scored rows: decoded views, per-token s/t/u/H)
    as_json: bool = False  # print the summary as JSON on stdout
    model: str | None = None  # tokenizer that decodes a --row's prompts and tokens; None = the file's model


def _detect_artifact(metadata: dict, schema: pa.Schema) -> str:
    if metadata.get("artifact") in schemas.SCHEMAS:
        return metadata["artifact"]
    for artifact in reversed(schemas.ARTIFACT_ORDER):
        if all(schema.get_field_index(f.name) >= 0 for f in schemas.SCHEMAS[artifact]):
            return artifact
    raise InputError("file matches no antisd schema (prompts, rollouts, verified, scored)")


def _percentiles(values: pa.Array) -> dict:
    import numpy as np

    data = values.to_numpy(zero_copy_only=False).astype(float)
    if data.size == 0:
        return {}
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    return {"mean": float(data.mean()), "min": float(data.min()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(data.max())}


def _rounded(stats):
    """Column summaries with 4 significant digits (json.dumps would print 17)."""
    if isinstance(stats, dict):
        return {k: _rounded(v) for k, v in stats.items()}
    return float(f"{stats:.4g}") if isinstance(stats, float) else stats


def column_stats(table: pa.Table) -> dict:
    """Per-column summaries: numeric percentiles, list lengths, value counts of low-cardinality strings."""
    stats: dict[str, dict] = {}
    for name in table.column_names:
        column = table.column(name)
        kind = column.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            stats[name] = {"nulls": column.null_count, **_percentiles(column.drop_null())}
        elif pa.types.is_boolean(kind):
            stats[name] = {"true": int(pc.sum(column).as_py() or 0), "false": int(pc.sum(pc.invert(column)).as_py() or 0)}
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            stats[name] = {"length": _percentiles(pc.list_value_length(column).drop_null())}
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            counts = pc.value_counts(column.drop_null()).to_pylist()
            if len(counts) <= 8:
                stats[name] = {"values": {c["values"]: c["counts"] for c in counts}, "nulls": column.null_count}
            else:
                stats[name] = {"distinct": len(counts), "nulls": column.null_count}
    return stats


def summarize(config: InspectConfig) -> dict:
    path = Path(config.path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    metadata = read_metadata(path)
    probe = read_schema(path if path.is_file() else part_files(path)[0])
    try:
        artifact = _detect_artifact(metadata, probe)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    table, _ = read_artifact(path, artifact)
    return {"path": str(path), "artifact": artifact, "rows": table.num_rows, "metadata": metadata,
            "schema": {f.name: str(f.type) for f in table.schema}, "stats": column_stats(table), "table": table}


def _value(value) -> str:
    """A value as shown: floats with 4 significant digits (inside lists too), the rest as str."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def _cell(value) -> str:
    if isinstance(value, list):
        head = ", ".join(_value(v) for v in value[:LIST_PREVIEW])
        return f"[{head}{', …' if len(value) > LIST_PREVIEW else ''}] ({len(value)})"
    text = _value(value)
    return text if len(text) <= 300 else text[:300] + " …"


METADATA_DEPTH = 2  # nested records shown this deep; deeper ones as {… N keys} (--json prints everything)
METADATA_TEXT = 200  # characters of one value shown


def metadata_lines(metadata: dict, depth: int = 0) -> list[str]:
    """The metadata as `key: value` lines, nested records indented: every key whole, a long value cut at its own end
    (never mid-key), records deeper than METADATA_DEPTH folded."""
    lines = []
    for key, value in metadata.items():
        indent = "  " * depth
        if isinstance(value, dict) and value and depth < METADATA_DEPTH:
            lines += [f"{indent}{key}:"] + metadata_lines(value, depth + 1)
        elif isinstance(value, dict) and value:
            lines.append(f"{indent}{key}: {{… {len(value)} keys}}")
        else:
            text = _cell(value) if isinstance(value, list) else _value(value)
            cut = text if len(text) <= METADATA_TEXT else f"{text[:METADATA_TEXT]}… ({len(text)} characters)"
            lines.append(f"{indent}{key}: {cut}")
    return lines


def render(summary: dict, config: InspectConfig, console) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    table: pa.Table = summary["table"]
    if config.row is not None and not 0 <= config.row < table.num_rows:  # before anything is printed
        raise InputError(f"--row {config.row}: {summary['path']} has rows 0..{table.num_rows - 1}")
    console.print(f"[bold]{escape(summary['path'])}[/bold]: {summary['artifact']} file, {summary['rows']} rows")
    meta = {k: v for k, v in summary["metadata"].items() if k != "config"}
    console.print(Panel(escape("\n".join(metadata_lines(meta))), title="metadata (--json: all of it)"))
    overview = Table("column", "type", "summary", title="columns")
    for name, kind in summary["schema"].items():
        overview.add_row(name, escape(kind), escape(json.dumps(_rounded(summary["stats"].get(name, {})))[:160]))
    console.print(overview)
    rows = [config.row] if config.row is not None else list(range(min(config.samples, table.num_rows)))
    for index in rows:
        record = table.slice(index, 1).to_pylist()[0]
        full = config.row is not None
        body = "\n".join(
            f"[cyan]{k}[/cyan]: {escape(_value(v) if full else _cell(v))}" for k, v in record.items()
        )
        console.print(Panel(body, title=f"row {index}", expand=True))
        if full and {"prompt_token_ids", "response_token_ids"} <= set(record):
            render_views(record, _tokenizer(config, summary), console)
        elif full and summary["artifact"] == "advantages":
            render_advantages(record, _tokenizer(config, summary), console)


def is_run_dir(path: str | Path) -> bool:
    """A run folder of `antisd loop` (its manifest run.json), not a directory of part files."""
    return Path(path).is_dir() and (Path(path) / "run.json").is_file()


def run_summary(path: str | Path) -> dict:
    """A run folder as JSON: its manifest, every finished step's metrics row, the base model's evaluation."""
    from stages.runs.run_dir import Run

    run = Run(Path(path))
    return {"path": str(path), "manifest": run.read_manifest(), "steps": run.metrics_rows(),
            "base_evaluation": run.base_evaluation()}


def render_run(path: str | Path, console) -> None:
    """The run's state, its steps table with the notes (`stages.runs.view.print_run`), and each step's files."""
    from rich.markup import escape
    from rich.table import Table

    from stages.runs.run_dir import STEP_ARTIFACTS, Run
    from stages.runs.view import print_run

    run = Run(Path(path))
    manifest = run.read_manifest() or {}
    loop, update = run.configured("loop"), run.configured("update")
    finished = manifest.get("finished", [])
    console.print(f"[bold]{escape(str(path))}[/bold]: antisd loop run of {escape(str(loop.get('model')))}, method "
                  f"{update.get('method', 'antisd')} ({update.get('variant', '?')}), {len(finished)} of "
                  f"{loop.get('steps', '?')} steps done; config {manifest.get('config_digest')} (config.yaml)",
                  soft_wrap=True)
    print_run(console, Path(path), "steps (metrics.jsonl)")
    files = Table("step", "files", "checkpoint", title="step folders")
    for folder in sorted(Path(path).glob("step_[0-9][0-9][0-9][0-9]")):
        step = int(folder.name.removeprefix("step_"))
        present = [name for name in STEP_ARTIFACTS if (folder / f"{name}.parquet").exists()]
        present += [p.name for p in sorted(folder.glob("eval*")) if not p.name.endswith(".json")]
        checkpoint = run.checkpoint(step)
        state = ("–" if not checkpoint.is_dir() and step not in finished else "pruned" if not checkpoint.is_dir()
                 else "full (optimizer state)" if run.is_full(step) else "weights and run state")
        files.add_row(folder.name, " ".join(present), state)
    console.print(files)


def _tokenizer(config: InspectConfig, summary: dict):
    """The tokenizer of --model, else of the file's model (its metadata); None when neither loads."""
    from stages.lm.models import load_tokenizer, resolve_model

    meta = summary["metadata"]
    name = config.model or (meta.get("config") or {}).get("model") or meta.get("model")
    if name is None:
        return None
    try:
        return load_tokenizer(resolve_model(name))
    except (InputError, OSError, ValueError):
        if config.model is not None:
            raise InputError(f"--model {config.model}: could not load its tokenizer") from None
        return None


def token_rows(record: dict, tokenizer) -> list[tuple]:
    """(position, token text, s, t, u, H) of each response token of a scored row (text: the decoded id)."""
    ids = record["response_token_ids"]
    columns = [record.get(k) or [None] * len(ids) for k in ("student_logprobs", "teacher_logprobs", "pmi",
                                                                "teacher_entropy")]
    texts = [tokenizer.decode([i]) if tokenizer is not None else str(i) for i in ids]
    return [(k, texts[k], *(column[k] for column in columns)) for k in range(len(ids))]


def render_views(record: dict, tokenizer, console) -> None:
    """What each view saw: the decoded student prompt, teacher prompt and response, and a per-token table."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    if tokenizer is None:
        console.print("(no tokenizer for this file's model: pass --model to decode the prompts)")
        return
    views = [("student prompt", record["prompt_token_ids"])]
    if record.get("teacher_prompt_token_ids") is not None:
        views.append(("teacher prompt", record["teacher_prompt_token_ids"]))
    elif "teacher_logprobs" in record:
        views.append(("teacher prompt", None))
    for title, ids in views:
        text = ("(none: no teacher view for this row, or a file scored before teacher prompts were stored)"
                if ids is None else tokenizer.decode(ids))
        console.print(Panel(escape(text), title=f"{title} ({0 if ids is None else len(ids)} tokens)"))
    console.print(Panel(escape(tokenizer.decode(record["response_token_ids"])), title="response"))
    if "pmi" in record:
        table = Table("k", "token", "s", "t", "u = t − s", "H teacher", title="per response token")
        for k, text, *values in token_rows(record, tokenizer):
            table.add_row(str(k), escape(repr(text)[1:-1]), *("–" if v is None else f"{v:+.3f}" for v in values))
        console.print(table)


ADVANTAGE_COLUMNS = ("u", "term", "term_normalized", "advantage")


def render_advantages(record: dict, tokenizer, console) -> None:
    """An `update --advantages-out` row: λ_i, tppl_i and A_seq_i, then each response token beside its u, the term
    before and after normalisation and its final advantage (tokens decoded with the file's model, or ids)."""
    from rich.markup import escape
    from rich.table import Table

    ids = record["response_token_ids"]
    console.print(f"A_seq {record['seq_advantage']:+.4f}   λ_i {record['lam']:.4f}   tppl "
                  f"{'–' if record['teacher_ppl'] is None else format(record['teacher_ppl'], '.4f')}   source "
                  f"{record['privileged_source']}{'' if record['trained'] else '   (not trained: overlong filter)'}")
    table = Table("k", "token", "u (clipped)", "term r", "p (normalised)", "A = A_seq + λ·p", title="per response token")
    for k, token in enumerate(ids):
        text = tokenizer.decode([token]) if tokenizer is not None else str(token)
        table.add_row(str(k), escape(repr(text)[1:-1]), *(f"{record[c][k]:+.4f}" for c in ADVANTAGE_COLUMNS))
    console.print(table)
