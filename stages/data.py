"""`antisd data prepare`: turn a dataset into a prompts Parquet (schemas.PROMPTS) with `stages.lm.datasets`."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.common.io import check_output, output_lock
from stages.lm.datasets import PrepareConfig, prompts_table, write_prompts

log = logging.getLogger(__name__)


def run(config: PrepareConfig) -> Path:
    out = check_output(config.out, config.overwrite)
    with output_lock(out):
        table = prompts_table(config)
        write_prompts(table, config, out)
        log.info("wrote %d prompts to %s", table.num_rows, out)
        return out
