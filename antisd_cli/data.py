"""`antisd data prepare`: datasets → prompts Parquet."""

from __future__ import annotations

import click

from antisd_cli.options import config_option, out_option, overwrite_option, seed_option, stage_errors
from stages.lm.datasets import DATASETS, SPLITS, PrepareConfig

C = PrepareConfig
FIELD = (" A column, or a dotted path into nested ones with list indices: reward_model.ground_truth, "
         "prompt.-1.content (a column of that very name wins).")


@click.group("data")
def data_command() -> None:
    """Prepare prompt files from built-in or user datasets."""


@data_command.command("prepare")
@click.argument("name", type=click.Choice(DATASETS))
@out_option
@config_option(C, "split", f"Dataset split: {' or '.join(SPLITS)} (math500, aime24 and amc23 have only test); hf: any "
                           "split the dataset has.")
@config_option(C, "num", "Keep the first N prompts (0 = all).")
@seed_option(C, "Shuffle seed (0 keeps file order for built-in sets; arith train is always shuffled by it).")
@config_option(C, "few_shot", "arith, arith_styles: prepend two worked examples as chat turns.")
@config_option(C, "shots", "arith_styles: its worked examples in order, a comma list of small (3 + 4, direct), "
                           "direct (12 + 25) and deliberate (47 + 36).")
@config_option(C, "operands", "arith, arith_styles: LO-HI, the range both operands are drawn from (a quarter of the "
                              "pairs, at most 1000, is held out as test).")
@config_option(C, "path", "jsonl/parquet: the input file; hf: a datasets folder (save_to_disk or data files) or a "
                          "Hub dataset name in the datasets cache.")
@config_option(C, "problem_field", "jsonl/parquet/hf: the field holding the problem text." + FIELD)
@config_option(C, "answer_field", "jsonl/parquet/hf: the field holding the gold answer." + FIELD)
@config_option(C, "solution_field", "jsonl/parquet/hf: the field holding a reference solution (optional)." + FIELD)
@config_option(C, "id_field", "jsonl/parquet/hf: the field holding a unique id (default: row number)." + FIELD)
@config_option(C, "few_shot_field", "jsonl/parquet/hf: the field holding the row's few-shot turns, a list of {user, "
                                    "assistant} (optional; absent = none)." + FIELD)
@config_option(C, "dedupe", "jsonl/parquet/hf: keep only the first row of each problem text (DAPO-Math-17k's Hub "
                            "copy repeats every problem).")
@config_option(C, "answer_boxed", "jsonl/parquet/hf: the answer is the last \\boxed{} of the answer field's text "
                                  "(MATH train: --answer-field solution --answer-boxed).")
@overwrite_option(C)
@stage_errors
def prepare(**options):
    """Write a prompts Parquet for NAME.

    \b
    Example:
      antisd data prepare arith --split train --num 256 --out train.parquet
      antisd data prepare gsm8k --split test --out gsm8k_test.parquet
      antisd data prepare arith_styles --shots deliberate,small,direct --num 64 --out styles.parquet
      antisd data prepare arith_styles --operands 10-49 --split test --num 150 --out styles_test.parquet
      antisd data prepare jsonl --path mine.jsonl --problem-field question --out mine.parquet
      antisd data prepare parquet --path dapo.parquet --problem-field prompt.0.content \\
        --answer-field reward_model.ground_truth --id-field extra_info.index --out dapo_prompts.parquet
      antisd data prepare hf --path ./my_dataset --split validation --problem-field question --out mine.parquet
    """
    from stages.data import run

    click.echo(str(run(PrepareConfig(**options))))
