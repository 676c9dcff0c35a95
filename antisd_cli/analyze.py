"""`antisd analyze pmi`: which tokens the privileged context inflates and deflates (METHOD §7)."""

from __future__ import annotations

import json

import click

from antisd_cli.options import config_option, overwrite_option, seed_option, stage_errors
from stages.analyze import DELIBERATION_WORDS, SHORTCUT_WORDS, PmiConfig

C = PmiConfig


def _word_list(ctx, param, value: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in value.split(",") if w.strip())
    if not words:
        raise click.BadParameter("give at least one word (comma-separated)")
    return words


@click.group("analyze")
def analyze_command() -> None:
    """Diagnostics of scored rollouts."""


@analyze_command.command("pmi")
@click.argument("scored", nargs=-1, type=click.Path(exists=True, dir_okay=True))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder (created).")
@click.option("--model", "-m", default=None,
              help="Tokenizer source: model folder or embedded name "
                   "[default: the scored file's model, else smollm2-135m].")
@click.option("--prompts", default=None, type=click.Path(exists=True, dir_okay=True),
              help="A prompts Parquet: sample (--n, --temperature, --max-new-tokens), verify and score it with "
                   "--model first, into OUT, instead of reading scored files.")
@config_option(C, "n", "--prompts mode: samples per prompt.")
@config_option(C, "temperature", "--prompts mode: sampling temperature.")
@config_option(C, "max_new_tokens", "--prompts mode: response length cap.")
@click.option("--deliberation-words", default=",".join(DELIBERATION_WORDS), callback=_word_list,
              help="Comma-separated deliberation words (matched case-insensitively on the stripped word).")
@click.option("--shortcut-words", default=",".join(SHORTCUT_WORDS), callback=_word_list,
              help="Comma-separated shortcut words (matched case-insensitively on the stripped word).")
@config_option(C, "min_count", "Printed table and heatmap labels: only words seen at least this often.")
@config_option(C, "top", "Printed table: how many most inflated / deflated words to show.")
@config_option(C, "rollouts", "Rollouts rendered in rollouts.html.")
@seed_option(C, "Picks the rendered rollouts.")
@config_option(C, "clip", "Colour scales of u are clipped to ±CLIP.")
@config_option(C, "bins", "Heatmap bins per axis (>= 2).")
@click.option("--probe", "probes", multiple=True, help="A word whose u probes.csv reports, split by style, context "
              "style and note (repeatable; the first response token is always probed).")
@config_option(C, "style_marker", "A response (or context) beginning with this text is 'deliberate', else 'direct' "
                                  "(e.g. 'Split:' for arith_styles); unset = no style split.")
@config_option(C, "resamples", "Bootstrap resamples (over problems) of the probe intervals.")
@config_option(C, "gate_subset", "Problems per draw of the gate-noise estimate (a step's prompts); 0 = skip it.")
@config_option(C, "gate_draws", "Draws of the gate-noise estimate.")
@overwrite_option(C)
@stage_errors
def pmi(scored, out, model, prompts, n, temperature, max_new_tokens, deliberation_words, shortcut_words, min_count,
        top, rollouts, seed, clip, bins, probes, style_marker, resamples, gate_subset, gate_draws, overwrite):
    """Per-word PMI u = t − s of SCORED files: tokens.csv, probes.csv, heatmap.png, rollouts.html, summary.json.

    Rows without a privileged context (u = 0) are left out. A word's u is the sum of its pieces' u (its PMI with the
    context); pieces.csv has the per-token table. Prints the deliberation-vs-shortcut table, then the folder.

    \b
    Example:
      antisd analyze pmi scored.parquet --out pmi_base
      antisd analyze pmi run/step-*/scored.parquet --out pmi_run --min-count 20 --rollouts 4
      antisd analyze pmi --prompts prompts.parquet --model smollm2-135m --n 4 --out pmi_base
      antisd analyze pmi scored.parquet --probe Check --style-marker Split: --gate-subset 8 --out pmi_probes
    """
    from rich.console import Console

    from stages.analyze import run

    config = PmiConfig(scored=tuple(scored), out=out, model=model, prompts=prompts, n=n, temperature=temperature,
                       max_new_tokens=max_new_tokens,
                       deliberation_words=deliberation_words, shortcut_words=shortcut_words, min_count=min_count,
                       top=top, rollouts=rollouts, seed=seed, clip=clip, bins=bins, probes=tuple(probes),
                       style_marker=style_marker, resamples=resamples, gate_subset=gate_subset,
                       gate_draws=gate_draws, overwrite=overwrite)
    path = run(config)
    console = Console(width=110)
    for table in summary_tables(json.loads((path / "summary.json").read_text())):
        console.print(table)
    click.echo(str(path))


def summary_tables(summary: dict) -> list:
    """Rich tables of a summary: deliberation vs shortcut words, then the most inflated / deflated word types."""
    from rich.table import Table
    from rich.text import Text

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    def add(table, label, name, st, style=None):
        table.add_row(label, Text(name), str(st["count"]), fmt(st["mean_u"], "+.3f"), fmt(st["median_u"], "+.3f"),
                      fmt(st.get("mean_p_student"), ".3f"), fmt(st.get("mean_p_teacher"), ".3f"), style=style)

    headers = ("group", "word", "count", "mean u", "median u", "mean p_s", "mean p_t")
    contrast = Table(*headers, title="Deliberation vs shortcut words (u = t − s; < 0: deflated by the context)")
    for group in ("deliberation", "shortcut"):
        for name, st in summary[group]["words"].items():
            add(contrast, group, name, st)
        add(contrast, group, "(all)", summary[group], style="bold")
    extreme = Table(*headers, title=f"Most inflated and deflated words (count ≥ {summary['min_count']})")
    for group in ("top_inflated", "top_deflated"):
        for row in summary[group]:
            add(extreme, group.removeprefix("top_"), row["word"], row)
    probes = Table("probe", "style", "context style", "note", "occurrences", "problems", "mean u", "95 % interval",
                   title="u at the probes (interval: bootstrap over problems)")
    for row in summary["probes"]:
        interval = "-" if row["ci_low"] is None else f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"
        probes.add_row(Text(row["probe"]), row["style"], row["peer_style"], row["note"], str(row["occurrences"]),
                       str(row["problems"]), f"{row['mean_u']:+.3f}", interval)
    return [contrast, extreme, probes]
