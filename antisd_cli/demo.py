"""`antisd demo`: the main job on the embedded default, for `make demo`."""

from __future__ import annotations

from pathlib import Path

import click

from antisd_cli.options import stage_errors

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "stages" / "configs" / "demo.yaml"


@click.command("demo")
@click.option("--out", "-o", default="demo_out", type=click.Path(file_okay=False), help="Folder for the demo run.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a demo config value.")
@stage_errors
def demo_command(out, overrides):
    """Train SmolLM2-135M with AntiSD on two-digit addition for a few steps, on the CPU.

    Runs `antisd loop --config stages/configs/demo.yaml` (the default variant, official: METHOD §9): per step it
    prints reward, held-out accuracy with its 95 % interval, the teacher's perplexity (its entropy under --set
    update.variant=paper), the gate (warm-up: λ = 0, plain GRPO; then on/off) and λ, then says which part of the
    held-out change came during the warm-up, and the commands to look further (`antisd inspect OUT/run`, a step's
    scored file with --row, `antisd plot`). Every stage's Parquet file stays under OUT/run/.

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
    _print_summary(run_dir, Path(out))
    click.echo(str(run_dir))


def _print_summary(run_dir: Path, out: Path) -> None:
    from rich.console import Console

    from stages.runs.run_dir import Run
    from stages.runs.view import print_run

    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # logs and CI: do not squeeze the columns into 80
    update = Run(run_dir).configured("update")
    method = update.get("method", "antisd")
    arm = out.with_name(out.name + "_grpo")
    paired = [] if method == "grpo" else [
        f"antisd demo --out {arm} --set update.method=grpo   # the paired GRPO arm: same prompts and seeds, no term",
        f"antisd plot {run_dir} {arm / 'run'} --out {out / 'antisd_vs_grpo.png'}"]
    print_run(console, run_dir, f"antisd demo: {method} on arith, SmolLM2-135M (variant "
                                f"{update.get('variant', 'official')})", paired)
