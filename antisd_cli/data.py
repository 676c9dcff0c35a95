"""`antisd data prepare`: datasets → prompts Parquet."""

from __future__ import annotations

import click

from antisd_cli.options import out_option, overwrite_option, stage_errors
from stages.data import DATASETS


@click.group("data")
def data_command() -> None:
    """Prepare prompt files from built-in or user datasets."""


@data_command.command("prepare")
@click.argument("name", type=click.Choice(DATASETS))
@out_option
@click.option("--split", default="train", type=click.Choice(["train", "test"]),
              help="Dataset split (math500, aime24 and amc23 have only test).")
@click.option("--num", default=0, type=click.IntRange(min=0), help="Keep the first N prompts (0 = all).")
@click.option("--seed", default=0, type=int, help="Shuffle seed (0 keeps file order for built-in sets; arith train is always shuffled by it).")
@click.option("--few-shot/--no-few-shot", default=True, help="arith: prepend two worked examples as chat turns.")
@click.option("--path", type=click.Path(exists=True, dir_okay=False), help="jsonl/parquet: the input file.")
@click.option("--problem-field", default="problem", help="jsonl/parquet: column holding the problem text.")
@click.option("--answer-field", default="answer", help="jsonl/parquet: column holding the gold answer.")
@click.option("--solution-field", default="solution", help="jsonl/parquet: column holding a reference solution (optional).")
@click.option("--id-field", default=None, help="jsonl/parquet: column holding a unique id (default: row number).")
@overwrite_option
@stage_errors
def prepare(name, out, split, num, seed, few_shot, path, problem_field, answer_field, solution_field, id_field, overwrite):
    """Write a prompts Parquet for NAME.

    \b
    Example:
      antisd data prepare arith --split train --num 256 --out train.parquet
      antisd data prepare gsm8k --split test --out gsm8k_test.parquet
      antisd data prepare jsonl --path mine.jsonl --problem-field question --out mine.parquet
    """
    from stages.data import PrepareConfig, run

    config = PrepareConfig(name=name, out=out, split=split, num=num, seed=seed, few_shot=few_shot, path=path,
                           problem_field=problem_field, answer_field=answer_field,
                           solution_field=solution_field, id_field=id_field, overwrite=overwrite)
    click.echo(str(run(config)))
