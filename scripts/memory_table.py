#!/usr/bin/env python
"""Print docs/memory.md's table: per-GPU memory of an antisd loop for Qwen3-4B and Qwen3-8B, full training and LoRA
(rank 64), with and without a colocated vLLM engine, on 1 and 8 GPUs of 80 GiB, computed by stages.runs.memory (the
model `antisd loop` refuses runs with). tests/test_memory.py checks that the doc holds this script's output.

Usage: python scripts/memory_table.py [--gib 80] [--longest 8448]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.runs import memory  # noqa: E402

SHAPES = memory.PUBLISHED_SHAPES
LORA_RANK = 64


def rows(gib: float, longest: int) -> list[str]:
    total = int(gib * memory.GIB)
    lines = []
    for name, shape in SHAPES.items():
        for lora in (0, LORA_RANK):
            for gpus in (1, 8):
                setup = memory.TrainSetup(world_size=gpus, lora_rank=lora, longest_sequence=longest)
                for vllm in (False, True):  # on 8 GPUs: 8 resident ranks, each with its vLLM engine colocated
                    plan = memory.plan(shape, setup, total, vllm=vllm, resident_trainer=True)
                    sample = f"{plan.sample_bytes / memory.GIB:.1f} (vLLM {plan.vllm_utilization:.2f})" if vllm \
                        else "–"
                    lines.append(f"| {name} ({shape.params / 1e9:.2f}B) | {'LoRA r' + str(lora) if lora else 'full'} "
                                 f"| {gpus} × {gib:g} GiB | {'colocated' if vllm else 'no'} "
                                 f"| {plan.train.total / memory.GIB:.1f} | {plan.resident.total / memory.GIB:.1f} "
                                 f"| {sample} | {'yes' if plan.fits else '**no**'} |")
    return lines


def table(gib: float = 80, longest: int = 8448) -> str:
    header = ["| model | training | GPUs | vLLM | update GiB/GPU | resident GiB | sampling GiB | fits |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    return "\n".join(header + rows(gib, longest)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=80, help="GPU memory in GiB")
    parser.add_argument("--longest", type=int, default=8448, help="longest prompt + response (tokens)")
    args = parser.parse_args()
    sys.stdout.write(table(args.gib, args.longest))


if __name__ == "__main__":
    main()
