"""Process-group and DeepSpeed setup for `update`: one plain process, or one rank of a deepspeed/torchrun/srun launch.

A launch is recognised from the environment the launchers set: RANK/WORLD_SIZE/LOCAL_RANK (deepspeed, torchrun) or
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun), with MASTER_ADDR/MASTER_PORT for the rendezvous. Without one, the
process forms a world of 1 on a free local port, passed to torch as arguments (os.environ is not written, except
RANK/WORLD_SIZE/LOCAL_RANK while the engine works, since DeepSpeed reads them there, and removed afterwards).
Backend: gloo on CPU, nccl on CUDA. On CPU the DeepSpeed JIT builds are avoided (docs/stack-notes.md, "DeepSpeed on CPU").

Also here: the split of a batch's sequences across ranks by token count (micro-batches within a rank:
`stages.lm.logprobs.pack_by_tokens`). This module trains nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from stages.common.errors import InputError
from stages.common.stack import import_deepspeed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"  # none | env (deepspeed/torchrun) | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise InputError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def env_from(environ: Mapping[str, str]) -> DistEnv:
    """Read the launch layout from `environ` (pass os.environ); a world of 1 when no launcher set it."""
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else None
    addr = environ.get("MASTER_ADDR") or None
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        launcher = "env"
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_NTASKS")
        local = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
        launcher = "slurm"
    else:
        return DistEnv(master_addr=addr, master_port=port)
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"launcher environment: need 0 <= rank < world size, got rank {rank} of {world}")
    if world > 1 and (addr is None or port is None):
        raise InputError(f"rank {rank} of {world}: set MASTER_ADDR and MASTER_PORT for the rendezvous "
                         "(deepspeed/torchrun set them; under srun export them in the batch script)")
    return DistEnv(rank, world, local, addr, port, launcher)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(env: DistEnv, device: str, timeout_minutes: float = 60.0) -> None:
    """Join (or create) the default process group; reuse it when this process already has one of the same shape.

    `timeout_minutes` bounds every collective (torch's default is 10 minutes for NCCL): the other ranks wait at the
    checkpoint's barrier while rank 0 writes and fsyncs the HF weights (a 4B model's full state is ~64 GB)."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(f"a process group of rank {dist.get_rank()}/{dist.get_world_size()} exists, "
                               f"but the environment says {env.rank}/{env.world_size}")
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if env.world_size == 1 and env.master_port is None:
        init_method = f"tcp://127.0.0.1:{free_port()}"
    else:
        init_method = f"tcp://{env.master_addr or '127.0.0.1'}:{env.master_port or free_port()}"
    log.debug("init_process_group %s rank %d/%d via %s", backend, env.rank, env.world_size, init_method)
    dist.init_process_group(backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(minutes=timeout_minutes))


def training_device(env: DistEnv) -> str:
    """cuda:LOCAL_RANK when CUDA is available, else cpu."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return f"cuda:{env.local_rank}"
    return "cpu"


def prepare_deepspeed(device: str):
    """Import deepspeed with the accelerator of `device`, whatever DS_ACCELERATOR says (a GPU host whose environment
    says cpu, e.g. from a Makefile, would otherwise train on cuda:0 through DeepSpeed's CPU accelerator); on CPU the
    shm JIT build is disabled."""
    deepspeed = import_deepspeed()  # its logger on stderr
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if device.startswith("cuda") and get_accelerator().device_name() != "cuda":
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

        set_accelerator(CUDA_Accelerator())
    if device == "cpu":
        if get_accelerator().device_name() != "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            set_accelerator(CPU_Accelerator())
        # `import deepspeed.comm.torch as m` yields torch itself; the shm op only serves inference all-reduce.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


@contextlib.contextmanager
def launcher_env(env: DistEnv) -> Iterator[None]:
    """Set RANK/WORLD_SIZE/LOCAL_RANK where missing (DeepSpeed reads them in initialize, and ZeRO-3 in every forward),
    and remove what was added afterwards. Hold it around every use of an engine."""
    wanted = {"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank)}
    added = [key for key in wanted if key not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


# Keys the trainer sets itself: it micro-batches by tokens and calls step() once per optimizer step, with a client
# torch AdamW (DeepSpeed's FusedAdam needs a JIT build on CPU) and a constant learning rate.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "managed_gradient_accumulation", "gradient_clipping")
FORBIDDEN_KEYS = ("optimizer", "scheduler")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolved_zero_stage(zero_stage: int | None, deepspeed_user: dict) -> int:
    """The ZeRO stage a run uses: --zero-stage, else the user's DeepSpeed JSON's, else 2."""
    return zero_stage if zero_stage is not None else deepspeed_user.get("zero_optimization", {}).get("stage", 2)


def deepspeed_config(user: dict, zero_stage: int | None, grad_clip: float, world_size: int, precision: str,
                     overlap_comm: bool = False) -> dict:
    """The DeepSpeed config of an update: built-in ZeRO-2 default < the user's JSON < `zero_stage` < owned keys.

    precision: fp32 (module weights stay fp32: at lr 1e-6 bf16 weights swallow the update, docs/stack-notes.md), bf16 or
    fp16 (DeepSpeed mixed precision with fp32 masters, for GPUs). `overlap_comm` (the trainer's default on CUDA: the
    gradient reduction runs beside backward on its own stream; off on CPU, where gloo gains nothing). A user file may
    set any other DeepSpeed knob (offload, buckets); `optimizer` and `scheduler` are refused (the trainer owns them).
    """
    bad = [key for key in FORBIDDEN_KEYS if key in user]
    if bad:
        raise InputError(f"--deepspeed-config: remove {', '.join(bad)}: update uses a client torch AdamW with a "
                         "constant --lr and --weight-decay")
    config = _merge({
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": overlap_comm,
                              "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }, user)
    if zero_stage is not None:
        config["zero_optimization"]["stage"] = zero_stage
    stage = config["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise InputError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 3:
        config["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if precision in ("bf16", "fp16"):
        config.setdefault(precision, {"enabled": True})
    owned = {"train_batch_size": world_size, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "managed_gradient_accumulation": False, "gradient_clipping": grad_clip}
    overridden = [key for key in OWNED_KEYS if key in user and user[key] != owned[key]]
    if overridden:
        log.warning("--deepspeed-config: %s replaced by update's own values", ", ".join(overridden))
    config.update(owned)
    return config


def offloads_optimizer(config: dict) -> bool:
    """Whether a DeepSpeed config puts the optimizer state in CPU memory (zero_optimization.offload_optimizer)."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() not in ("none", "")


def optimizer_class(config: dict, device: str) -> str:
    """The optimizer the trainer builds: torch's AdamW, or with optimizer offload (GPU) DeepSpeed's CPU Adam in AdamW
    mode, the only one DeepSpeed accepts there (a client torch optimizer is refused by zero_force_ds_cpu_optimizer;
    its C++ op builds on first use, which GPU hosts can do). InputError for offload on a CPU run."""
    if not offloads_optimizer(config):
        return "torch.optim.AdamW"
    if not device.startswith("cuda"):
        raise InputError("--deepspeed-config: zero_optimization.offload_optimizer moves the optimizer from the GPU to "
                         "CPU memory; this run trains on the CPU already, so remove it")
    return "deepspeed.ops.adam.DeepSpeedCPUAdam"


def client_optimizer(parameters: list, lr: float, weight_decay: float, config: dict, device: str):
    """The optimizer of `optimizer_class`, decoupled weight decay (AdamW) either way."""
    if optimizer_class(config, device) == "deepspeed.ops.adam.DeepSpeedCPUAdam":
        import_deepspeed()
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(parameters, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    import torch

    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def create_engine(module, optimizer, config: dict, env: DistEnv, device: str):
    """deepspeed.initialize on an initialized process group; returns the engine."""
    deepspeed = prepare_deepspeed(device)
    with launcher_env(env):
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                               dist_init_required=False)
    return engine


def split_by_tokens(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Deal sequence indices to ranks so their token totals are balanced (longest first, to the lightest rank).

    Deterministic (ties go to the lower rank, then the lower index); each rank's list is in ascending index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    loads = [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for index in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        parts[rank].append(index)
        loads[rank] += lengths[index]
    return [sorted(p) for p in parts]


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum a list of floats over all ranks (identity in a world of 1)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_max(value: int, device: str) -> int:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def same_on_every_rank(value: int, device: str) -> bool:
    """Whether every rank holds the same integer (max and min over the ranks agree; True in a world of 1)."""
    return all_reduce_max(value, device) == -all_reduce_max(-value, device)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
