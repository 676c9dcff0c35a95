"""`antisd demo`: the main job on the embedded default, for `make demo`."""

from __future__ import annotations

from pathlib import Path

import click

from antisd_cli.options import stage_errors
from stages.common import metrics as keys

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "stages" / "configs" / "demo.yaml"


@click.command("demo")
@click.option("--out", "-o", default="demo_out", type=click.Path(file_okay=False), help="Folder for the demo run.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a demo config value.")
@stage_errors
def demo_command(out, overrides):
    """Train SmolLM2-135M with AntiSD on two-digit addition for a few steps, on the CPU.

    Runs `antisd loop --config stages/configs/demo.yaml` (the default variant, official: METHOD §9): per step it
    prints reward, held-out accuracy, the teacher's perplexity (its entropy under --set update.variant=paper), the
    gate state and λ, and leaves every stage's Parquet file under OUT/run/ for `antisd inspect`.

    \b
    Example:
      antisd demo --out demo_out
    """
    from stages.loop import run
    from stages.runs import config as run_config
    from stages.runs.config import LoopConfig

    Path(out).mkdir(parents=True, exist_ok=True)
    resolved = run_config.load(DEMO_CONFIG, list(overrides))
    run_dir = run(LoopConfig(out=str(Path(out) / "run"), run=resolved))
    _print_summary(run_dir)
    click.echo(str(run_dir))


def _print_summary(run_dir: Path) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    from stages.runs.view import COLUMNS, format_cell

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    base = json.loads((run_dir / "eval_base.json").read_text()) if (run_dir / "eval_base.json").exists() else {}
    title = "antisd demo: AntiSD on arith, SmolLM2-135M"
    if keys.EVAL_ACCURACY in base:
        title += f" (base model held-out accuracy {base[keys.EVAL_ACCURACY]:.3f})"
    table = Table(*[name for name, _, _ in COLUMNS], title=title)
    for row in rows:
        table.add_row(*[format_cell(row, key, fmt) for _, key, fmt in COLUMNS])
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and CI: do not squeeze the columns into 80
    console.print(table)
