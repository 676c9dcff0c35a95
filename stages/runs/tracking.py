"""Live tracking of a loop run: TensorBoard events (on by default) and Weights & Biases (when `loop.wandb` names a
project), each step's metrics under the names of `stages.common.metrics`, the same keys as metrics.jsonl.

TensorBoard writes `RUN/tensorboard/`, the base model's evaluation at step −1 (`log_base`). W&B runs in the run directory (`RUN/wandb/`) with a run id derived from the
run directory and config digest, so a resumed loop continues the same W&B run; `WANDB_MODE=offline` (or
`loop.wandb_mode: offline`) keeps it on disk for `wandb sync`. Both are imported only when used.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from stages.common import metrics as keys
from stages.common.errors import InputError

log = logging.getLogger(__name__)

def check_wandb(project: str | None) -> None:
    """Refuse `loop.wandb` before any work when wandb is not installed."""
    if project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise InputError(f"loop.wandb {project!r}: wandb is not installed (pip install wandb), or unset loop.wandb"
                         ) from None


def scalars(row: dict) -> dict[str, float]:
    """The numeric metrics of a metrics.json row, step excluded (booleans as 0/1)."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and value == value}


class Trackers:
    """The trackers a run logs to; `log(row)` after each finished step, `close()` at the end."""

    def __init__(self, root: Path, config: dict, digest: str, *, tensorboard: bool, wandb_project: str | None,
                 wandb_mode: str = "online"):
        self.tensorboard = None
        self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency: only a broken install lands here
                log.warning("loop.tensorboard: the tensorboard package is not importable; no events are written")
            else:
                self.tensorboard = SummaryWriter(str(root / "tensorboard"))
        if wandb_project is not None:
            import wandb

            run_id = hashlib.sha256(f"{root.resolve()}:{digest}".encode()).hexdigest()[:16]
            self.wandb = wandb.init(project=wandb_project, name=root.name, id=run_id, resume="allow",
                                    dir=str(root), config=config, mode=wandb_mode)

    def log(self, row: dict) -> None:
        step, values = int(row["step"]), scalars(row)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_base(self, base: dict) -> None:
        """The base model's held-out evaluation (eval/* values): in TensorBoard at step BASE_STEP (−1), so the eval
        curves start at the model the run started from, as `antisd plot` draws them; W&B's steps start at 0, so
        there it goes to the run summary as eval_base/<name>."""
        values = scalars(base)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, keys.BASE_STEP)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.summary.update({key.replace(keys.EVAL_PREFIX, "eval_base/", 1): value
                                       for key, value in values.items()})

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
