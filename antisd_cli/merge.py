"""`antisd merge`: check a directory of part files and join it into one Parquet file."""

from __future__ import annotations

import click

from antisd_cli.options import overwrite_option, stage_errors
from stages.merge import MergeConfig

C = MergeConfig


@click.command("merge")
@click.argument("parts_dir", metavar="PARTS_DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Merged Parquet file to write.")
@overwrite_option(C)
@stage_errors
def merge_command(parts_dir, out, overwrite):
    """Join the part files of a sharded rollout/verify/score output into one file.

    Checks first that all N parts exist, that they are the same artifact made with the same config, and that no
    prompt id appears in two parts; each failure names the shard. Every stage also reads PARTS_DIR directly, so
    merging is only needed to hand one file to other tools.

    \b
    Example:
      antisd rollout --prompts p.parquet --out rollouts --shard 0/2   # and --shard 1/2
      antisd merge rollouts --out rollouts.parquet
    """
    from stages.merge import run

    click.echo(str(run(MergeConfig(parts=parts_dir, out=out, overwrite=overwrite))))
