"""`antisd rollout`: sample n responses per prompt and write one row per sample (schemas.ROLLOUTS).

Reads a prompts Parquet, formats each problem with `stages.lm.prompts` (the exact prompt ids are stored), samples with
an engine (`stages.lm.engine_hf.HFEngine`, or `stages.lm.engine_vllm.VLLMEngine` imported only when chosen) through
`stages.lm.sampling.sample` (which `eval` and `loop` reuse with an engine they keep open) and writes the rows
atomically with the run's model, revision, sampling settings, chat options (`chat`: the resolved
`stages.lm.prompts.ChatOptions`, which score reads back), engine, dtype, threads and speed in the metadata.

Row conventions: `response_token_ids` are the engine's ids (never re-tokenized) and end with the EOS id when
finish_reason is "stop" (the trainer must learn to stop); `response_text` is their decoding without special
tokens; `sampling_logprobs[k]` is the log-prob of response token k under the distribution it was drawn from (after
temperature and top-p; at temperature 0, greedy, the unscaled model's log-prob).

Determinism: each sample has its own seed derived from (seed, prompt_id, sample_idx) (`sample_seed`), so with the HF
engine the same seed gives the same table, and a sample does not depend on `--batch-size`, `--shard` or the other
prompts (up to float differences between padded batches). The metadata (wall time, tokens/s) differs between runs.
This module does not judge answers (that is `verify`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Collection

from stages.common.io import build_metadata, carried_step, check_output, output_lock, read_artifact, write_artifact
from stages.common.parts import Shard, output_path
from stages.lm.engine import SamplingSettings, is_engine, resolve_engine
from stages.lm.prompts import ChatOptions
from stages.lm.sampling import RolloutConfig, open_engine, sample, select_prompts

log = logging.getLogger(__name__)


def run(config: RolloutConfig, loaded=None, share: Collection[str] | None = None) -> Path:
    """Validate, read prompts, sample, write the rollouts Parquet; return its path (a part file with --shard).

    `loaded` (optional) is a LoadedModel for the HF engine, or an open engine (e.g. the loop's VLLMEngine), which
    is then used as is (config.model, engine, dtype and device are ignored) and left open. `share` (a loop rank's,
    stages.runs.ranks): the prompt ids this process samples, in place of the shard's round-robin choice (the shard
    still names the part file).
    """
    from stages.common.process import set_threads
    from stages.lm.models import resolve_model

    # --- validate everything before any work (the options were checked when `config` was made)
    shard = Shard.parse(config.shard)
    if shard.is_whole:
        check_output(config.out, config.overwrite)
    table, prompts_metadata = read_artifact(config.prompts, "prompts")
    rows = select_prompts(table, config.prompts, config.max_prompts, shard if share is None else Shard())
    if share is not None:
        rows = [row for row in rows if row["prompt_id"] in share]
    engine_given = loaded is not None and is_engine(loaded)
    if engine_given:
        engine_name, model_path = loaded.name, loaded.model_path
    else:
        engine_name = resolve_engine(config.engine)
        model_path = loaded.path if loaded is not None else resolve_model(config.model)
    out = check_output(output_path(config.out, shard), config.overwrite)
    with output_lock(out):
        threads = set_threads(config.threads)
        log.info("rollout: %d prompts × %d samples, engine %s, model %s, threads %d", len(rows), config.n,
                 engine_name, model_path, threads)
        log.debug("config: %s", asdict(config))

        # --- sample
        started = time.perf_counter()
        chat = ChatOptions.from_knobs(config)
        engine = loaded if engine_given else open_engine(engine_name, config, Path(model_path), rows, loaded)
        try:
            result, stats = sample(engine, rows, SamplingSettings.from_config(config),
                                   batch_size=config.batch_size, progress=config.progress, chat=chat)
        finally:
            if not engine_given:
                engine.close()
        wall_s = time.perf_counter() - started

        # --- write
        metadata = build_metadata(
            "rollouts", config, **carried_step(prompts_metadata), inputs={"prompts": str(config.prompts)},
            model=str(engine.model_path),
            model_revision=engine.revision,
            sampling=asdict(SamplingSettings.from_config(config)), chat=chat.record(), seed=config.seed,
            engine=engine.name, dtype=engine.dtype_name, threads=threads, prompts=len(rows), shard=asdict(shard),
            batch_size=config.batch_size or engine.default_batch_size, wall_s=round(wall_s, 3), **stats,
        )
        write_artifact(result, out, "rollouts", metadata)
        log.info("wrote %d rollouts (%d response tokens, %.1f tok/s; stop %d, length %d) to %s", stats["samples"],
                 stats["response_tokens"], stats["tokens_per_s"], stats["finish_stop"], stats["finish_length"], out)
        return out
