"""The learning-rate schedule of `antisd update`: a pure function of the run's update step (the step counter kept in
the run state, antisd_state.json), so a resumed run, a resident trainer and a chain of single `update` calls all set
the same rate at the same step.

    warm-up     steps 0 … W−1: lr · (k + 1) / W              (W = lr_warmup_steps; 0 = none)
    after it    p = min(1, (k − W) / D) over D = lr_decay_steps
                constant  lr
                linear    lr · (r + (1 − r) · (1 − p))
                cosine    lr · (r + (1 − r) · ½ (1 + cos π p))   (r = lr_min_ratio: the floor, as a share of lr)
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, lr: float, schedule: str = "constant", warmup_steps: int = 0, decay_steps: int = 0,
          min_ratio: float = 0.0) -> float:
    """The learning rate of update step `step` (0-based)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_ratio + (1.0 - min_ratio) * shape)
