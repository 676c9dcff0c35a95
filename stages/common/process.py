"""Process-level knobs every engine-using stage sets the same way: CPU threads and seeds.

Nothing here runs at import; stages call these with values from their config.
"""

from __future__ import annotations

import logging
import os
import random

log = logging.getLogger(__name__)


def default_threads() -> int:
    """The cores this process may use (its CPU affinity), shared between the ranks of a launch on this node."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
    return max(1, len(os.sched_getaffinity(0)) // max(ranks_here, 1))


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads; 0 = OMP_NUM_THREADS when it is set, else `default_threads()`. Returns the count
    in effect, for the run record.

    Oversubscribing 2 cores is 3-10x slower (docs/stack-notes.md), so stages expose this as `--threads`.
    """
    import torch

    if threads == 0 and not os.environ.get("OMP_NUM_THREADS"):
        threads = default_threads()
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
