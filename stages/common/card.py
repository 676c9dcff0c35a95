"""The memory of the device a loop runs on, as the loop hands it between phases: its size and free bytes, the peak of
each phase, and giving cached blocks back.

`Card.for_device("cuda:0")` reads CUDA's allocator (`mem_get_info`, `max_memory_allocated` reset per phase,
`empty_cache`); on CPU the "card" is the process: its peak resident set per phase (VmHWM, reset through
/proc/self/clear_refs where the kernel allows it, else the peak since the start) and no total. `hold`/`drop` tell the
card what an owner keeps resident (the trainer's state, a policy copy, vLLM's pool): the real card only logs them;
the CPU tests' fake card (tests/test_resources.py) counts them to model free memory as vLLM sees it at start-up.
No torch import at module level; nothing is probed until asked.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

log = logging.getLogger(__name__)

GIB = 2**30
RESERVED_BYTES = 4 * GIB  # CUDA context, NCCL buffers, allocator fragmentation: never planned for


class Card:
    """One device's memory (see the module docstring); `kind` is "cuda" or "cpu"."""

    reserved = RESERVED_BYTES  # bytes of the card no plan may use
    vllm_overhead: int | None = None  # vLLM's bytes beside weights and KV cache (None: the memory model's estimate)

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda" if str(device).startswith("cuda") else "cpu"
        self.held: dict[str, int] = {}

    @classmethod
    def for_device(cls, device: str) -> "Card":
        return cls(device)

    # --- what is there ---------------------------------------------------------------------------------------------
    def total(self) -> int | None:
        """Bytes of the device (None on CPU: the loop plans no memory there)."""
        if self.kind != "cuda":
            return None
        import torch

        return int(torch.cuda.mem_get_info(self.device)[1])

    def free(self) -> int | None:
        if self.kind != "cuda":
            return None
        import torch

        return int(torch.cuda.mem_get_info(self.device)[0])

    # --- owners ----------------------------------------------------------------------------------------------------
    def hold(self, owner: str, nbytes: int) -> None:
        self.held[owner] = int(nbytes)
        log.debug("card %s: %s holds %.2f GiB", self.device, owner, nbytes / GIB)

    def drop(self, owner: str) -> None:
        self.held.pop(owner, None)

    def release(self) -> None:
        """Give freed memory back to the device: collect garbage (objects in reference cycles still hold tensors),
        then return the allocator's cached blocks (vLLM reads *free* device memory when it starts or wakes)."""
        gc.collect()
        if self.kind == "cuda":
            import torch

            torch.cuda.empty_cache()

    # --- peaks -----------------------------------------------------------------------------------------------------
    def start_phase(self) -> None:
        """Reset the peak counter at the start of a phase."""
        if self.kind == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()

    def peak(self) -> int:
        """The phase's peak: CUDA bytes allocated, else the process's peak resident set."""
        if self.kind == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        return _peak_rss()


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    except OSError:
        pass  # not permitted here: the peak then counts from the process's start


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
