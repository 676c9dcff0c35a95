"""Run `antisd update` with a probe that records the step's reduced gradients and Adam moments (tests only).

Usage: python tests/grad_probe.py DUMP_DIR update ARGS...   (every rank of a launch runs the same command)

Just before each optimizer step (the ZeRO optimizer's `step`, which `engine.step()` calls once the gradients are
reduced: in unmanaged accumulation ZeRO-2 finalizes its gradient partitions only inside `engine.step()`) every rank gathers the full all-reduced gradient of every parameter with
DeepSpeed's `safe_get_full_grad` (a collective: all ranks call it in the same order), and just after it the full
`exp_avg` / `exp_avg_sq` of the optimizer; rank 0 saves them to DUMP_DIR/probe.pt as
{"grads": [{name: tensor}], "exp_avg": [...], "exp_avg_sq": [...]}, one entry per optimizer step.
"""

from __future__ import annotations

import sys
from pathlib import Path


def install(dump_dir: Path) -> None:
    import torch
    from deepspeed.utils import safe_get_full_grad, safe_get_full_optimizer_state

    from stages.training import trainer as update
    record: dict[str, list] = {"grads": [], "exp_avg": [], "exp_avg_sq": []}
    original_init = update.Trainer.__init__

    def full(engine, getter) -> dict:
        return {name: getter(param).detach().float().cpu().clone()
                for name, param in engine.module.named_parameters()}

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        engine = self.engine
        real_step = engine.optimizer.step

        def step(*step_args, **step_kwargs):
            record["grads"].append(full(engine, safe_get_full_grad))
            result = real_step(*step_args, **step_kwargs)
            for key in ("exp_avg", "exp_avg_sq"):
                record[key].append(full(engine, lambda p, key=key: safe_get_full_optimizer_state(p, key)))
            if self.env.is_main:
                torch.save(record, dump_dir / "probe.pt")
            return result

        engine.optimizer.step = step

    update.Trainer.__init__ = init


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    install(target)
    from antisd_cli.main import cli

    cli.main(args=sys.argv[2:], prog_name="antisd")
