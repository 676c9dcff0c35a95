"""The ranks of one `antisd loop` launched as N processes (`torchrun --nproc-per-node N -m antisd_cli loop …` on one
node; `srun` starting one `torchrun` per node across nodes): what they tell each other and how they share a step.

Files stay the contract. Rank 0 owns the run directory (its lock, run.json, metrics.jsonl, trackers, checkpoint
pruning), runs verify and every merge, and decides what is done (a stage is done iff its merged output exists); it
broadcasts each decision (`from_main`), so every rank takes the same path through a step, and a resume after a kill
of any rank follows the one-process rule. A shared stage (`sharded`) writes one part per sharer into
`<output>.parts/part-RRRRR-of-NNNNN.parquet` (what `antisd merge` reads), skipping the parts a killed launch left
complete; rank 0 merges them, in the row order of the unsharded stage, into the stage's ordinary output and removes
the parts. Work that every rank does ends in `together`: when one rank fails, every rank raises (none is left
waiting at the next collective).

Shares of a step:
- sampling (rollout, the held-out evaluation): the engine batches of the unsharded run, dealt to the engines
  (`stages.runs.shared_sampling`), so on CPU in fp32 1 and N ranks sample the same bits; the evaluation samples
  collectively there and rank 0 alone verifies it and writes its files.
- score: the prompts round-robin (`score --shard r/N`): with shared prefixes a prompt's views are their own forward
  pieces (`stages.lm.scoring.plan_batches`), so a share computes for its rows what the unsharded run computes.
- update: the trainer's token-balanced split (`stages.training.micro`), one DeepSpeed engine over all ranks.
- verify: rank 0 (its answer checks run in CPU worker processes); the others wait.

The collectives here go through a gloo group beside the trainer's (CPU objects and barriers whatever the trainer's
backend), with the update's timeout: rank 0 verifies and merges while the others wait. No stage runs here: the loop
passes the stage functions in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Callable

from stages.common.errors import InputError
from stages.common.parts import PART_RE, Shard, missing_shards
from stages.training import distributed

log = logging.getLogger(__name__)


class Ranks:
    """This process's place among the loop's ranks, and the collectives between them (module docstring)."""

    def __init__(self, env: distributed.DistEnv = distributed.DistEnv(), group=None, tensor_parallel: int = 1):
        self.env, self.group, self.tensor_parallel = env, group, tensor_parallel

    @classmethod
    def open(cls, env: distributed.DistEnv, device: str, timeout_minutes: float, tensor_parallel: int = 1) -> "Ranks":
        """Join the launch's process group (the trainer's: gloo on CPU, NCCL on CUDA) and make the control group."""
        if env.world_size == 1:
            return cls(env, None, tensor_parallel)
        import torch.distributed as dist

        distributed.init_process_group(env, device, timeout_minutes)
        group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))
        return cls(env, group, tensor_parallel)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def count(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def samplers(self) -> int:
        """Sampling engines among the ranks: one per group of `tensor_parallel` ranks."""
        return self.count // self.tensor_parallel

    @property
    def sampler(self) -> int:
        return self.rank // self.tensor_parallel

    @property
    def writes_samples(self) -> bool:
        """Whether this rank writes its engine group's samples (the group's first rank)."""
        return self.rank % self.tensor_parallel == 0

    def close(self) -> None:
        """Leave the process group (the trainer, which used it too, is closed by then): a process that exits with
        it open, e.g. on a refusal, can abort in its destructor instead of exiting with its status."""
        if self.group is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.group = None

    # --- collectives -------------------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.count > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def broadcast(self, value=None):
        """Rank 0's `value` on every rank."""
        if self.count == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, value) -> list:
        if self.count == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.count
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def gather(self, value) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere)."""
        if self.count == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.count if self.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self.group)
        return gathered

    def from_main(self, func: Callable):
        """`func()` run by rank 0 and its result broadcast; its failure raised on every rank (an InputError as the
        same one-line error, anything else as a RuntimeError naming rank 0)."""
        if self.count == 1:
            return func()
        if not self.is_main:
            kind, value = self.broadcast()
            if kind == "input":
                raise InputError(value)
            if kind == "error":
                raise RuntimeError(f"rank 0 failed: {value}")
            return value
        try:
            value = func()
        except InputError as exc:
            self.broadcast(("input", str(exc)))
            raise
        except Exception as exc:
            self.broadcast(("error", f"{type(exc).__name__}: {exc}"))
            raise
        self.broadcast(("ok", value))
        return value

    @contextlib.contextmanager
    def main_holds(self, factory: Callable):
        """Rank 0 inside the context manager `factory()` for the block (e.g. the run directory under its lock),
        yielding what it yields; the other ranks yield None once rank 0 is inside (its refusal raised everywhere)."""
        if not self.is_main:
            self.from_main(lambda: None)
            yield None
            return
        with contextlib.ExitStack() as stack:
            yield self.from_main(lambda: stack.enter_context(factory()))

    def together(self, func: Callable):
        """`func()` on every rank, then a check that all of them succeeded: a rank's failure raises on every rank
        (its own error there, a RuntimeError naming it on the others)."""
        error, value = None, None
        try:
            value = func()
        except Exception as exc:  # noqa: BLE001  (re-raised below, once every rank knows)
            error = exc
        if self.count > 1:
            failed = [(rank, text) for rank, text in enumerate(self.all_gather(
                None if error is None else f"{type(error).__name__}: {error}")) if text is not None]
            if failed and error is None:
                rank, text = failed[0]
                raise RuntimeError(f"rank {rank} failed: {text}")
        if error is not None:
            raise error
        return value

    # --- shared stages -----------------------------------------------------------------------------------------

    def sharded(self, out: Path, work: Callable[[Shard, Path, bool], None], merge: Callable[[Path, Path], None],
                by_sampler: bool = False, count: Callable[[], int] | None = None,
                expected: Callable[[Shard], set[str]] | None = None) -> None:
        """Stage output `out` written as parts by the ranks (`by_sampler`: one part per engine group, its first rank
        writing; `count()`, rank 0's: only the first that many ranks), then merged into `out` by rank 0.
        `work(shard, parts folder, write)` computes this rank's part (`write` False: a tensor-parallel rank that
        samples beside its group's writer); `merge(parts, out)` joins them. Parts found complete (a killed launch's)
        are kept unless they are of another count or, with `expected(shard)` (rank 0's), hold other prompts than
        the shard has now (a resumable setting such as rollout.batch_size changed how prompts are dealt)."""
        index, write = (self.sampler, self.writes_samples) if by_sampler else (self.rank, True)
        parts = parts_dir(out)

        def pending() -> tuple[int, list[int]]:
            shares = count() if count is not None else (self.samplers if by_sampler else self.count)
            return shares, pending_parts(parts, shares, expected)

        shares, missing = self.from_main(pending)
        self.together(lambda: work(Shard(index, shares), parts, write) if index in missing else None)

        def merged() -> None:
            merge(parts, out)
            shutil.rmtree(parts)

        self.from_main(merged)


def parts_dir(out: Path) -> Path:
    """Where the ranks' parts of stage output `out` (…/rollouts.parquet) go: …/rollouts.parts/."""
    return out.with_name(out.name.removesuffix(".parquet") + ".parts")


def pending_parts(parts: Path, count: int, expected: Callable[[Shard], set[str]] | None = None) -> list[int]:
    """The shards of `count` whose part is not in `parts` yet (creating it), after removing the parts of another
    count (a launch with another number of ranks: their rows are dealt otherwise) and, with `expected`, the parts
    whose prompt ids are not their shard's."""
    import pyarrow.parquet as pq

    parts.mkdir(exist_ok=True)
    for path in parts.iterdir():
        match = PART_RE.match(path.name)
        if not match:
            continue
        shard = Shard(int(match.group(1)), int(match.group(2)))
        if shard.count != count or (expected is not None and set(
                pq.read_table(path, columns=["prompt_id"]).column("prompt_id").to_pylist()) != expected(shard)):
            path.unlink()
    return missing_shards(parts, count)


# --- files of shared stages ------------------------------------------------------------------------------------

def prompt_order(config) -> list[tuple[str, int]]:
    """The (prompt_id, sample_idx) row order of the rollouts of RolloutConfig `config` unsharded: its prompts in file
    order (after max_prompts), n samples each."""
    from stages.common.io import read_artifact
    from stages.lm.sampling import select_prompts

    rows = select_prompts(read_artifact(config.prompts, "prompts")[0], config.prompts, config.max_prompts, Shard())
    return [(row["prompt_id"], sample) for row in rows for sample in range(config.n)]


def row_order(path: str | Path) -> list[tuple[str, int]]:
    """The (prompt_id, sample_idx) of a stage file's rows, in file order (what a stage reading it keeps)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["prompt_id", "sample_idx"])
    return list(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))


def prompt_count(path: str | Path) -> int:
    """The distinct prompts of a stage file (a round-robin shard holds at least one when there are as many)."""
    return len({prompt_id for prompt_id, _ in row_order(path)})


def throughput(metadata: dict) -> float | None:
    """A stage file's tokens/s: its own, or for parts the ranks wrote side by side (a merge: `parts_metadata`) their
    tokens over the slowest part's seconds."""
    parts = metadata.get("parts_metadata")
    if metadata.get("tokens_per_s") is not None or not parts:
        return metadata.get("tokens_per_s")
    seconds = [part.get("generate_s", part.get("seconds")) or 0.0 for part in parts]
    tokens = sum((part.get("tokens_per_s") or 0.0) * part_seconds for part, part_seconds in zip(parts, seconds))
    return round(tokens / max(seconds), 2) if max(seconds) > 0 else None


# --- the launch --------------------------------------------------------------------------------------------------

def check_launch(config, env: distributed.DistEnv, engine: str, record_only: bool = False, out: str | None = None,
                 node_ranks: int | None = None) -> None:
    """What a launch of `env.world_size` ranks cannot run, refused before any work (InputError, one line): ZeRO-3
    over several ranks (`stages.training.batch.check_zero3_ranks`), `--record-only` (one process: the Slurm record
    job), a tensor-parallel size that is not vLLM's or does not divide the ranks (of a node), and resuming run
    directory `out` from optimizer state saved by another number of ranks. `node_ranks`: the ranks of one node
    (default LOCAL_WORLD_SIZE, which torchrun sets)."""
    from stages.training.batch import check_zero3_ranks, zero_stage

    ranks, parallel = env.world_size, config.rollout.tensor_parallel_size
    check_zero3_ranks(zero_stage(config.update), ranks)
    if ranks > 1 and record_only:
        raise InputError(f"--record-only: one process (what each Slurm record job runs), not {ranks} ranks")
    if parallel > 1 and engine == "hf":
        raise InputError(f"rollout.tensor_parallel_size {parallel}: vLLM's, but the rollouts use the hf engine")
    node = node_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    if ranks % parallel or node % parallel:
        raise InputError(f"rollout.tensor_parallel_size {parallel}: must divide the {ranks} ranks and the {node} "
                         "ranks of a node (one vLLM engine spans that many GPUs of one node)")
    if out is not None:
        check_resumed_ranks(Path(out), config.loop.steps, ranks)


def check_resumed_ranks(root: Path, steps: int, ranks: int) -> None:
    """A resumed run's trainer opens from its newest full checkpoint, whose ZeRO shards are of the ranks that wrote
    it (DeepSpeed reads them back only on as many)."""
    from stages.runs.run_dir import Run
    from stages.training.checkpoint import STATE_FILE

    run = Run(root.absolute())
    newest = run.full_checkpoint_before(steps) if root.is_dir() and steps > 0 else None
    if newest is None or run.done(steps - 1, "update"):
        return
    state_file = run.checkpoint(newest) / STATE_FILE
    saved = json.loads(state_file.read_text()).get("world_size") if state_file.is_file() else None
    if saved not in (None, ranks):
        raise InputError(f"--out {root}: its newest full checkpoint ({run.checkpoint(newest)}) holds the optimizer "
                         f"state of {saved} rank(s), this launch has {ranks}; resume it with {saved} "
                         f"(torchrun --nproc-per-node {saved}, or without torchrun for 1)")


def open_ranks(config, env: distributed.DistEnv, engine: str) -> Ranks:
    """This process's Ranks: the process group joined on the device the trainer will use, with the update's
    timeout, and the vLLM engine groups of rollout.tensor_parallel_size ranks."""
    parallel = config.rollout.tensor_parallel_size if engine == "vllm" else 1
    if env.world_size == 1:
        return Ranks(env, None, parallel)
    timeout = config.update.comm_timeout_minutes
    ranks = Ranks.open(env, distributed.training_device(env), timeout, parallel)
    if not ranks.is_main:
        logging.getLogger("stages").setLevel(max(logging.WARNING, logging.getLogger("stages").getEffectiveLevel()))
    return ranks


def reopened_run(config):
    """What a rank other than 0 needs of the run directory rank 0 opened: (run, None for the manifest, the training
    prompts, the held-out prompts' path or None)."""
    from stages.common.io import read_artifact
    from stages.runs.run_dir import Run

    root = Path(config.out).absolute()
    eval_path = root / "eval_prompts.parquet" if config.run.loop.eval_every > 0 else None
    return Run(root), None, read_artifact(root / "train_prompts.parquet", "prompts")[0], eval_path
