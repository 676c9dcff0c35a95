"""Benchmark: a whole training step of antisd next to TRL's GRPOTrainer step on the same batch, side by side.

Batch (issue 11): the first 8 arith training prompts (two few-shot turns, the student prompt antisd builds) × 8
samples, at most 48 new tokens (`--max-new-tokens`), temperature 1, SmolLM2-135M in fp32, lr 1e-5, `--threads`
torch threads (default: the cores this process may use).

- antisd: `antisd loop` for `--steps` steps (default 3: the first opens the trainer, the last writes the full
  checkpoint, the middle one is a typical step) of `--method`s (default antisd and grpo) in a child process each; a
  step's figure is `timing_s/step` from metrics.jsonl (rollout, verify, score, update and the checkpoint write; the
  model loads included), split by stage; the median over the steps is printed. Peak RSS of the child (and of the
  processes it waited for) from wait4.
- TRL: `GRPOTrainer` (num_generations 8, per-device batch 16 × 4 accumulation steps = 64 completions, loss `dapo`,
  beta 0, no gradient checkpointing, CPU), run by `--trl-python` (a Python with `trl` installed; TRL is never a
  dependency of antisd: `pip install -e .[bench]`, or any venv with trl) in a child; step seconds from a callback
  (generation + loss forward + backward), median over `--steps`. Skipped, and said so, without trl.

Printed: per-stage seconds, peak RSS, and each antisd method's step as a ratio of TRL's. Other load on the machine
changes every figure: run it alone (`--json` writes the figures to a file).

`--nproc N`: each method also as N resident ranks (`antisd loop --nproc N`: torchrun, gloo on CPU) on the same batch
and the same cores (--threads split over the ranks), both runs with rollout.batch_size 64/N so that the N ranks share
the 1-rank run's engine batches (stages.runs.shared_sampling); then the computed cost of a step of Qwen3-4B on 8 GPUs
as resident ranks and as the Slurm chain (stages.runs.costs). `--costs` prints only that.

Usage: python bench/step.py [--trl-python .venv-trl/bin/python] [--steps 2] [--max-new-tokens 48] [--json out.json]
       python bench/step.py --nproc 2 [--methods antisd] [--steps 3]      python bench/step.py --costs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("rollout", "verify", "score", "update")

TRL_SCRIPT = textwrap.dedent(
    """
    import json, re, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir, prompts_file, out_dir, steps, max_new, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    rows = json.loads(open(prompts_file).read())
    data = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])

    def reward(completions, answer, **kwargs):
        out = []
        for completion, gold in zip(completions, answer):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            found = re.findall(r"\\\\boxed\\{([^}]*)\\}", text)
            out.append(float(bool(found) and found[-1].strip() == gold))
        return out

    class Clock(TrainerCallback):
        def __init__(self):
            self.starts, self.seconds = [], []
        def on_step_begin(self, args, state, control, **kw):
            self.starts.append(time.perf_counter())
        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.starts[-1])

    config = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=16, gradient_accumulation_steps=4,
                        num_generations=8, max_completion_length=int(max_new), learning_rate=1e-5, beta=0.0,
                        loss_type="dapo", temperature=1.0, max_steps=int(steps), logging_steps=1, save_strategy="no",
                        report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0,
                        dataloader_num_workers=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    print("TRL_STEPS " + json.dumps(clock.seconds))
    """
)


def child(command: list[str], env: dict, log_path: Path) -> tuple[float, float, int]:
    """Run `command`; return (wall seconds, peak RSS GiB of it and what it waited for, exit code)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - started, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def antisd_steps(method: str, args, folder: Path, env: dict, nproc: int = 1) -> dict:
    """`antisd loop` of `method` for args.steps steps as `nproc` ranks, the cores (args.threads) split over them."""
    name, threads = f"{method}-{nproc}", max(1, args.threads // nproc)
    rollout = {"batch_size": 64 // args.nproc} if args.nproc > 1 else {}  # the same engine batches for 1 and N
    config = folder / f"{name}.yaml"
    config.write_text(json.dumps({
        "loop": {"model": args.model, "steps": args.steps, "prompts_per_step": 8, "seed": 0, "eval_every": 0,
                 "tensorboard": False, "train": {"name": "arith", "split": "train", "num": 8 * args.steps}},
        "rollout": {"n": 8, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "progress": False,
                    "threads": threads, **rollout},
        "score": {"threads": threads},
        "update": {"method": method, "lr": 1.0e-5, "threads": threads},
    }))
    out = folder / f"run-{name}"
    command = [sys.executable, "-m", "antisd_cli", "-q", "loop", "-c", str(config), "-o", str(out),
               *(["--nproc", str(nproc)] if nproc > 1 else [])]
    wall, rss, code = child(command, {**env, "OMP_NUM_THREADS": str(threads)}, folder / f"{name}.log")
    if code != 0:
        raise SystemExit(f"antisd {name} failed ({code}); see {folder / f'{name}.log'}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {stage: statistics.median(r[f"timing_s/{stage}"] for r in rows) for stage in STAGES}
    return {"step_s": statistics.median(r["timing_s/step"] for r in rows), "stages_s": stages, "rss_gib": rss,
            "wall_s": wall, "steps": [r["timing_s/step"] for r in rows]}


def trl_steps(args, folder: Path, env: dict) -> dict | None:
    if not args.trl_python:
        return None
    from stages.lm.datasets import PrepareConfig, build_rows
    from stages.lm.models import resolve_model
    from stages.lm.prompts import student_messages

    rows = build_rows(PrepareConfig(name="arith", out="", split="train", num=8 * args.steps))
    prompts = folder / "trl_prompts.json"
    prompts.write_text(json.dumps([{"messages": student_messages(r["problem"], r["few_shot"]), "answer": r["answer"]}
                                   for r in rows]))
    command = [args.trl_python, "-c", TRL_SCRIPT, str(resolve_model("smollm2-135m")), str(prompts),
               str(folder / "trl"), str(args.steps), str(args.max_new_tokens), str(args.threads)]
    wall, rss, code = child(command, env, folder / "trl.log")
    text = (folder / "trl.log").read_text()
    marker = [line for line in text.splitlines() if line.startswith("TRL_STEPS ")]
    if code != 0 or not marker:
        print(f"TRL did not run ({code}); see {folder / 'trl.log'}", file=sys.stderr)
        return None
    steps = json.loads(marker[-1].removeprefix("TRL_STEPS "))
    return {"step_s": statistics.median(steps), "rss_gib": rss, "wall_s": wall, "steps": steps}


RUN_STEPS, RUN_EVERY = 20, 5  # the run the amortized figure is for: 20 steps, full checkpoints every 5


def amortized(steps: list[float]) -> float:
    """Mean step of a RUN_STEPS-step run from a 3-step measurement: the first step once (it opens the trainer), the
    last (a full checkpoint) RUN_STEPS / RUN_EVERY − 1 times more, the middle (a typical step) for the rest."""
    first, typical, full = steps
    fulls = RUN_STEPS // RUN_EVERY
    return (first + fulls * full + (RUN_STEPS - fulls - 1) * typical) / RUN_STEPS


def costs_text() -> str:
    """The computed step of Qwen3-4B on 8 GPUs, resident ranks beside the Slurm chain (stages.runs.costs)."""
    from stages.runs import costs
    from stages.runs.memory import PUBLISHED_SHAPES

    return costs.table(PUBLISHED_SHAPES["Qwen3-4B"], "Qwen3-4B (computed, stages/runs/costs.py)")


def report(figures: dict) -> None:
    batch, trl = figures["batch"], figures["trl"]
    print(f"one training step, {batch['prompts']} prompts × {batch['samples']} samples, ≤ {batch['max_new_tokens']} new "
          f"tokens, {batch['threads']} threads")
    if trl is not None:
        print(f"  TRL GRPOTrainer: median {trl['step_s']:.1f} s (steps {', '.join(f'{s:.1f}' for s in trl['steps'])}), "
              f"peak RSS {trl['rss_gib']:.2f} GiB")
    else:
        print("  TRL GRPOTrainer: not run (no trl: pip install -e .[bench], or --trl-python)")
    for method, result in figures.items():
        if method in ("batch", "trl", "costs"):
            continue
        steps = result["steps"]
        split = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in result["stages_s"].items())
        print(f"  antisd --method {method}: steps {', '.join(f'{s:.1f}' for s in steps)} s, peak RSS "
              f"{result['rss_gib']:.2f} GiB (median split: {split})")
        if len(steps) == 3:
            kinds = {"first (opens the trainer)": steps[0], "typical (resident, weights-only checkpoint)": steps[1],
                     "with a full checkpoint": steps[2],
                     f"amortized, {RUN_STEPS} steps, full every {RUN_EVERY}": amortized(steps)}
            for kind, seconds in kinds.items():
                ratio = f" = {seconds / trl['step_s']:.2f}× TRL" if trl else ""
                print(f"      {kind:<46} {seconds:6.1f} s{ratio}")
    if figures.get("costs"):
        print("\n" + figures["costs"], end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-python", default=sys.executable if importlib.util.find_spec("trl") else None,
                        help="A Python with trl installed (default: this one when it has trl: pip install -e .[bench]).")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--methods", default="antisd,grpo")
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--report", default=None, metavar="JSON", help="Only print the figures of an earlier --json.")
    parser.add_argument("--nproc", type=int, default=1,
                        help="Also run each method as this many resident ranks (torchrun, gloo) on the same batch.")
    parser.add_argument("--costs", action="store_true", help="Only print the computed step of Qwen3-4B on 8 GPUs.")
    parser.add_argument("--model", default="smollm2-135m", help="antisd's policy (TRL always runs SmolLM2-135M).")
    args = parser.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    if args.costs:
        print(costs_text(), end="")
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "DS_ACCELERATOR": "cpu"}
    folder = Path(tempfile.mkdtemp(prefix="bench_step."))
    figures = {"batch": {"prompts": 8, "samples": 8, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                         "model": args.model,
                         "rollout_batch_size": 64 // args.nproc if args.nproc > 1 else 0}}
    figures["trl"] = trl_steps(args, folder, env) if args.nproc == 1 else None
    for method in args.methods.split(","):
        figures[method] = antisd_steps(method, args, folder, env)
        if args.nproc > 1:
            figures[f"{method}, {args.nproc} ranks"] = antisd_steps(method, args, folder, env, args.nproc)
    figures["costs"] = costs_text() if args.nproc > 1 else None
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
