"""`antisd inspect`: describe any stage's Parquet file (rows, schema, metadata, column stats, sample rows).

Works on every artifact (prompts, rollouts, verified, scored, eval, `update --advantages-out`) and on directories of
part files; a scored row with --row shows the decoded views, an advantages row its tokens beside u, the term before
and after normalisation and the final advantage. It renders with
rich and computes only summaries; it never modifies the file.
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


def _cell(value) -> str:
    if isinstance(value, list):
        head = ", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value[:LIST_PREVIEW])
        return f"[{head}{', …' if len(value) > LIST_PREVIEW else ''}] ({len(value)})"
    text = str(value)
    return text if len(text) <= 300 else text[:300] + " …"


def render(summary: dict, config: InspectConfig, console) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    table: pa.Table = summary["table"]
    console.print(f"[bold]{summary['path']}[/bold]: {summary['artifact']} file, {summary['rows']} rows")
    meta = {k: v for k, v in summary["metadata"].items() if k != "config"}
    console.print(Panel(escape(json.dumps(meta, indent=1, default=str)[:2000]), title="metadata"))
    overview = Table("column", "type", "summary", title="columns")
    for name, kind in summary["schema"].items():
        overview.add_row(name, escape(kind), escape(json.dumps(summary["stats"].get(name, {}), default=str)[:160]))
    console.print(overview)
    rows = [config.row] if config.row is not None else list(range(min(config.samples, table.num_rows)))
    for index in rows:
        if not 0 <= index < table.num_rows:
            raise InputError(f"--row {index}: file has rows 0..{table.num_rows - 1}")
        record = table.slice(index, 1).to_pylist()[0]
        full = config.row is not None
        body = "\n".join(
            f"[cyan]{k}[/cyan]: {escape(str(v) if full else _cell(v))}" for k, v in record.items()
        )
        console.print(Panel(body, title=f"row {index}", expand=True))
        if full and {"prompt_token_ids", "response_token_ids"} <= set(record):
            render_views(record, _tokenizer(config, summary), console)
        elif full and summary["artifact"] == "advantages":
            render_advantages(record, _tokenizer(config, summary), console)


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
