"""Sampling shared by the ranks of a loop (stages.runs.ranks): which prompts each engine samples, and the collective
engine of the held-out evaluation.

A share is made of the engine batches of the unsharded run (`sampling_share`): for the HF engine whole groups of
rollout.batch_size rows (64 by default), longest prompts first, as `stages.lm.engine.prompt_batches` cuts them; for
vLLM, which schedules its own batches, single prompts. The batches are dealt to the engines by their prompt tokens
(`stages.training.distributed.split_by_tokens`). A rank thus samples exactly some batches of the 1-rank run, row for
row with the same per-sample seeds: on CPU in fp32 (the HF engine), 1 and N ranks sample the same bits. The price: a
step of fewer batches than engines leaves engines idle while sampling (a smaller rollout.batch_size spreads it). With
vLLM tensor parallel T, the T ranks of an engine group sample the same share (vLLM's external launcher wants the same
calls on each) and the group's first rank keeps the result.

The evaluation samples collectively: rank 0 runs `stages.eval`'s evaluation with a `SharedEngine`, whose every
`generate` call is broadcast, sampled share by share and gathered back on rank 0, while the other ranks `serve`;
rank 0 alone verifies and writes the evaluation's files. No file is written here.
"""

from __future__ import annotations

from typing import Callable, Sequence

from stages.common.parts import Shard
from stages.lm.engine import Engine, SamplingSettings, prompt_batches
from stages.runs.ranks import Ranks
from stages.training import distributed


def batch_rows(engine_name: str, batch_size: int, n: int) -> int:
    """Rows of the unit the samplers share: the HF engine's batch (its own cut: bit-equal batches), else one prompt
    (vLLM schedules its own batches)."""
    if engine_name == "hf":
        from stages.lm.engine_hf import HFEngine

        return batch_size or HFEngine.default_batch_size
    return n


def sampling_share(lengths: Sequence[int], n: int, rows_per_batch: int, count: int, index: int) -> list[int]:
    """Positions of the prompts sampler `index` of `count` samples: the unsharded engine's batches
    (`prompt_batches`), dealt by their prompt tokens (`distributed.split_by_tokens`), ascending."""
    batches = prompt_batches(lengths, n, rows_per_batch)
    owners = distributed.split_by_tokens([n * sum(lengths[p] + 1 for p in batch) for batch in batches], count)
    return sorted(p for batch in owners[index] for p in batches[batch])


def rollout_share(config, tokenizer, engine_name: str, count: int, index: int) -> set[str]:
    """The prompt ids of `config.prompts` (a RolloutConfig's, after max_prompts) sampler `index` of `count` samples."""
    from stages.common.io import read_artifact
    from stages.lm.prompts import ChatOptions
    from stages.lm.sampling import select_prompts, student_prompt_ids

    rows = select_prompts(read_artifact(config.prompts, "prompts")[0], config.prompts, config.max_prompts, Shard())
    lengths = [len(ids) for ids in student_prompt_ids(tokenizer, rows, ChatOptions.from_knobs(config))]
    positions = sampling_share(lengths, config.n, batch_rows(engine_name, config.batch_size, config.n), count, index)
    return {rows[p]["prompt_id"] for p in positions}


class SharedEngine(Engine):
    """Rank 0's engine for a collective evaluation: each `generate` is sampled by every rank's engine, each its
    `sampling_share`, and gathered here, while the other ranks `serve`; `stop` ends their serving."""

    def __init__(self, local: Engine, ranks: Ranks):
        self.local, self.ranks = local, ranks
        self.name, self.tokenizer, self.model_path = local.name, local.tokenizer, local.model_path
        self.revision, self.dtype_name, self.default_batch_size = local.revision, local.dtype_name, \
            local.default_batch_size

    def generate(self, prompt_ids, prompt_keys, settings: SamplingSettings, batch_size: int = 0, on_progress=None):
        request = (list(map(list, prompt_ids)), list(prompt_keys), settings, batch_size)
        self.ranks.broadcast(("sample", request))
        return sample_together(self.ranks, self.local, request, on_progress)

    def stop(self, failed: bool = False) -> None:
        self.ranks.broadcast(("stop", failed))


def serve(ranks: Ranks, local: Engine) -> None:
    """The other ranks' side of a `SharedEngine`: sample each request's share until rank 0 stops (RuntimeError when
    it stopped because it failed)."""
    while True:
        kind, request = ranks.broadcast()
        if kind == "stop":
            if request:
                raise RuntimeError("rank 0 failed during the evaluation")
            return
        sample_together(ranks, local, request)


def sample_together(ranks: Ranks, local: Engine, request: tuple, on_progress=None):
    """This rank's share of `request` sampled by `local`; on rank 0 the groups of every share, in prompt order."""
    prompt_ids, keys, settings, batch_size = request
    share = sampling_share([len(ids) for ids in prompt_ids], settings.n,
                           batch_rows(local.name, batch_size, settings.n), ranks.samplers, ranks.sampler)
    progress = None if on_progress is None else (lambda done, tokens: on_progress([share[i] for i in done], tokens))
    try:
        groups = local.generate([prompt_ids[p] for p in share], [keys[p] for p in share], settings, batch_size,
                                progress) if share else []
        result = ("ok", dict(zip(share, groups)) if ranks.writes_samples else {})
    except Exception as exc:  # noqa: BLE001  (sent to rank 0, which raises it: a rank must not leave the gather)
        result = ("error", f"rank {ranks.rank}: {type(exc).__name__}: {exc}")
    gathered = ranks.gather(result)
    if gathered is None:
        return None
    errors = [text for kind, text in gathered if kind == "error"]
    if errors:
        raise RuntimeError(errors[0])
    merged = {position: group for _, groups in gathered for position, group in groups.items()}
    return [merged[position] for position in range(len(prompt_ids))]


def sample_shared(ranks: Ranks, loaded, evaluate: Callable, share_prefix: bool = True):
    """`evaluate(engine)` (the loop's evaluation) sampled by every rank: rank 0 runs it with a `SharedEngine` and
    returns its result, the other ranks serve their shares and return {}; one rank: `evaluate(loaded)`."""
    if ranks.count == 1:
        return evaluate(loaded)
    local = local_engine(loaded, share_prefix)
    if not ranks.is_main:
        serve(ranks, local)
        return {}
    engine = SharedEngine(local, ranks)
    try:
        result = evaluate(engine)
    except BaseException:
        engine.stop(failed=True)
        raise
    engine.stop()
    return result


def local_engine(loaded, share_prefix: bool = True) -> Engine:
    """The engine a rank samples its share with: the loop's vLLM engine, or an HF engine on its policy."""
    from stages.lm.engine import is_engine
    from stages.lm.engine_hf import HFEngine

    return loaded if is_engine(loaded) else HFEngine(loaded, share_prefill=share_prefix)
