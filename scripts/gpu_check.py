#!/usr/bin/env python
"""The flow of scripts/gpu_check.sh: a random model of Qwen3's shape, two 2-step `antisd loop` runs with evaluation at
every step, one killed during its second update and resumed, and a report of tokens/s and peak memory per stage.

    run A  resident trainer (HF rollouts, DeepSpeed ZeRO-2, bf16 on GPU), killed with SIGKILL as step 1's checkpoint is
           about to be published, then resumed: the trainer reopens from the run's start and replays step 0 from its
           scored file (bit for bit on CPU, within the stated tolerance on CUDA), then trains step 1
    run B  loop.resident_trainer: false (the trainer is freed after each update and reopened from the full checkpoint)
    run C  the resident loop as 1 rank under `torchrun --standalone --nproc-per-node 1` (one step): the launch path of
           N ranks on the one GPU we can get; N > 1 ranks are tested on CPU only (tests/test_loop_ranks.py, gloo)

Exit status: 0 when both runs finish with every step's files and metrics, the kill happened where it should, and the
resume replayed; 1 otherwise, naming what failed. Subcommands: `run` (the flow), `prepare-tokenizer` (scripts/
gpu_wheels.sh), `killed-loop` (internal: the loop with the kill armed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QWEN3_VOCAB = 151_936
# (layers, hidden, intermediate, heads, kv heads, head dim): Qwen3-4B's widths with 6 layers ≈ 1.0B parameters on GPU
SIZES = {"gpu": (6, 2560, 9728, 32, 8, 128), "cpu": (2, 64, 128, 4, 2, 16)}
SETTINGS = {  # prompts per step, samples, new tokens, eval problems, eval tokens, dtype, micro-batch tokens, timeout
    "gpu": dict(prompts=8, n=4, new_tokens=1024, eval_num=8, eval_tokens=256, dtype="bfloat16", micro=16384,
                limit=360),
    "cpu": dict(prompts=2, n=2, new_tokens=6, eval_num=2, eval_tokens=4, dtype="float32", micro=2048, limit=600),
}
STAGES = ("rollout", "verify", "score", "update", "eval")


def prepare_tokenizer(out: Path, source: str = "smollm2-135m", vocab: int = QWEN3_VOCAB) -> Path:
    """SmolLM2's tokenizer with decode-only filler entries up to `vocab` ids (see scripts/gpu_wheels.sh)."""
    from stages.lm.models import load_tokenizer, resolve_model

    folder = resolve_model(source)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    load_tokenizer(folder).save_pretrained(tmp)
    path = tmp / "tokenizer.json"
    data = json.loads(path.read_text())
    table = data["model"]["vocab"]
    taken = set(table.values()) | {token["id"] for token in data.get("added_tokens", [])}
    filler = range(max(taken) + 1, vocab)
    for token_id in filler:
        table[f"<pad{token_id}>"] = token_id
    path.write_text(json.dumps(data, ensure_ascii=False))
    from transformers import AutoTokenizer

    check = AutoTokenizer.from_pretrained(tmp)
    if len(check) != vocab or (filler and check.decode([vocab - 1]) != f"<pad{vocab - 1}>"):
        raise SystemExit(f"prepare-tokenizer: got {len(check)} entries, expected {vocab}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def make_model(out: Path, tokenizer: Path, mode: str) -> Path:
    """Random weights of Qwen3's shape (GQA, qk-norm, tied embeddings) with `tokenizer`, bf16 on disk on GPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from stages.lm.compat import make_portable

    layers, hidden, intermediate, heads, kv_heads, head_dim = SIZES[mode]
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                         intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, tie_word_embeddings=True, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if mode == "gpu" else torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    make_portable(out)
    print(f"model: Qwen3 shape, {layers} layers × {hidden} hidden, GQA {heads}/{kv_heads} × {head_dim}, vocab "
          f"{len(tok):,}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters (random init)")
    return out


def write_config(path: Path, model: Path, mode: str, resident: bool) -> Path:
    s = SETTINGS[mode]
    text = f"""# Written by scripts/gpu_check.py ({mode}): throughput and memory check, random weights.
loop:
  model: {model}
  steps: 2
  prompts_per_step: {s['prompts']}
  seed: 0
  eval_every: 1
  eval_n: 1
  eval_max_new_tokens: {s['eval_tokens']}
  tensorboard: false
  resident_trainer: {str(resident).lower()}
  train: {{name: arith, split: train, num: 64}}
  eval: {{name: arith, split: test, num: {s['eval_num']}}}
rollout: {{n: {s['n']}, temperature: 1.0, max_new_tokens: {s['new_tokens']}, engine: hf, dtype: {s['dtype']}}}
verify: {{workers: {8 if mode == 'gpu' else 1}}}
score: {{dtype: {s['dtype']}}}
update: {{method: antisd, lr: 1.0e-6, zero_stage: 2, dtype: {s['dtype']}, micro_batch_tokens: {s['micro']}}}
"""
    path.write_text(text)
    return path


def killed_loop(step: int, argv: list[str]) -> None:
    """`antisd loop ARGV` that SIGKILLs itself when step `step`'s checkpoint is about to be published."""
    import stages.training.checkpoint as checkpoint

    original = checkpoint._publish

    def publish(tmp, out):
        if Path(out).parent.name == f"step_{step:04d}":
            os.kill(os.getpid(), signal.SIGKILL)  # the temp checkpoint is written, not yet renamed
        return original(tmp, out)

    checkpoint._publish = publish
    from antisd_cli.main import cli

    cli(argv)


def loop(args: list[str], limit: int, killed_at: int | None = None, log: Path | None = None,
         nproc: int | None = None) -> tuple[int, float]:
    """Run the loop in a subprocess (killed at `killed_at`'s publish when given; as `nproc` ranks under torchrun when
    given); return (exit code, seconds)."""
    head = [sys.executable, str(Path(__file__).resolve()), "killed-loop", str(killed_at)] if killed_at is not None \
        else [sys.executable, "-m", "antisd_cli"]
    if nproc is not None:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
                "antisd_cli"]
    started = time.perf_counter()
    with open(log, "a") if log else open(os.devnull, "w") as sink:
        try:
            code = subprocess.run(head + ["loop", *args], cwd=REPO, stderr=sink, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - started


def report(run: Path, label: str, steps: int = 2) -> list[str]:
    """Per step and stage: seconds, tokens/s, peak GiB; returns the problems found."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    problems = [] if len(rows) == steps else [f"{label}: {len(rows)} metrics rows, expected {steps}"]
    print(f"== {label}: per stage (seconds, tokens/s, peak GiB: CUDA allocated, on CPU the peak RSS)")
    print(f"{'step':<5}{'stage':<9}{'seconds':>9}{'tok/s':>10}{'peak GiB':>10}")
    rates = {"rollout": "throughput/rollout_tok_s", "score": "throughput/score_tok_s",
             "update": "throughput/update_tok_s", "eval": "eval/tokens_per_s"}
    for row in rows:
        for stage in STAGES:
            seconds, peak = row.get(f"timing_s/{stage}"), row.get(f"memory/peak_gib/{stage}")
            if seconds is None:
                continue
            rate = row.get(rates.get(stage, ""))
            rate_text = "-" if rate is None else f"{rate:,.0f}"
            peak_text = "-" if peak is None else f"{peak:.2f}"
            print(f"{row['step']:<5}{stage:<9}{seconds:>9.1f}{rate_text:>10}{peak_text:>10}")
            if peak is None:
                problems.append(f"{label}: step {row['step']} has no memory/peak_gib/{stage}")
        print(f"{row['step']:<5}{'step':<9}{row.get('timing_s/step', 0.0):>9.1f}   weight sync / loads "
              f"{row.get('timing_s/model_load', 0.0):.1f} s")
        if "eval/accuracy" not in row:
            problems.append(f"{label}: step {row['step']} has no evaluation")
    return problems


def run_flow(mode: str, out: Path, tokenizer: Path | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    settings, logs = SETTINGS[mode], out / "loop.log"
    tokenizer = tokenizer or prepare_tokenizer(out / "tokenizer", vocab=QWEN3_VOCAB if mode == "gpu" else 49_152)
    model = out / "model"
    if not (model / "config.json").exists():
        make_model(model, tokenizer, mode)
    problems: list[str] = []
    # --- run A: resident trainer, killed in step 1's update, resumed
    run_a = out / "run_resident"
    shutil.rmtree(run_a, ignore_errors=True)
    args_a = ["--config", str(write_config(out / "resident.yaml", model, mode, True)), "--out", str(run_a)]
    code, seconds = loop(args_a, settings["limit"], killed_at=1, log=logs)
    print(f"run A (resident), killed at step 1's checkpoint: exit {code} after {seconds:.0f} s")
    if code != -signal.SIGKILL or (run_a / "step_0001" / "checkpoint").exists() or \
            not (run_a / "step_0000" / "checkpoint" / "config.json").exists():
        problems.append(f"run A: the kill did not happen where armed (exit {code}; see {logs})")
    code, seconds = loop(args_a, settings["limit"], log=logs)
    print(f"run A resumed: exit {code} after {seconds:.0f} s")
    if code != 0:
        problems.append(f"run A: the resume failed (exit {code}; see {logs})")
    elif "replayed update step 0" not in logs.read_text():
        problems.append("run A: the resume did not replay step 0")
    problems += report(run_a, "run A (resident, killed and resumed)")
    for step in (0, 1):  # the disk of the GPU machine is 64 GB: keep the report, drop the weights
        shutil.rmtree(run_a / f"step_{step:04d}" / "checkpoint", ignore_errors=True)
    # --- run B: the trainer freed after each update
    run_b = out / "run_not_resident"
    shutil.rmtree(run_b, ignore_errors=True)
    args_b = ["--config", str(write_config(out / "not_resident.yaml", model, mode, False)), "--out", str(run_b)]
    code, seconds = loop(args_b, settings["limit"], log=logs)
    print(f"run B (resident_trainer false): exit {code} after {seconds:.0f} s")
    if code != 0:
        problems.append(f"run B failed (exit {code}; see {logs})")
    problems += report(run_b, "run B (resident_trainer false)")
    for step in (0, 1):  # the disk again
        shutil.rmtree(run_b / f"step_{step:04d}" / "checkpoint", ignore_errors=True)
    # --- run C: the resident loop as rank 0 of 1 under torchrun (several ranks: CPU only, tests/test_loop_ranks.py)
    run_c = out / "run_torchrun"
    shutil.rmtree(run_c, ignore_errors=True)
    args_c = ["--config", str(out / "resident.yaml"), "--out", str(run_c), "--set", "loop.steps=1"]
    code, seconds = loop(args_c, settings["limit"], log=logs, nproc=1)
    print(f"run C (torchrun --nproc-per-node 1): exit {code} after {seconds:.0f} s")
    if code != 0:
        problems.append(f"run C failed under torchrun (exit {code}; see {logs})")
    problems += report(run_c, "run C (1 rank under torchrun)", steps=1)
    for problem in problems:
        print(f"FAILED: {problem}")
    if problems:
        print(f"--- last lines of {logs}")
        print("\n".join(logs.read_text().splitlines()[-40:]))
    return 1 if problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    flow = sub.add_parser("run", help="the whole check")
    flow.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    flow.add_argument("--out", type=Path, default=REPO / "gpu_check_out")
    flow.add_argument("--tokenizer", type=Path, default=None, help="a prepared tokenizer folder (prepare-tokenizer)")
    prepare = sub.add_parser("prepare-tokenizer", help="SmolLM2's tokenizer extended to Qwen3's 151,936 ids")
    prepare.add_argument("--out", type=Path, required=True)
    prepare.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    killed = sub.add_parser("killed-loop", help="internal: `antisd ARGS` with a SIGKILL armed at a checkpoint")
    killed.add_argument("step", type=int)
    killed.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "prepare-tokenizer":
        print(prepare_tokenizer(args.out, vocab=args.vocab))
    elif args.command == "killed-loop":
        killed_loop(args.step, args.argv)
    else:
        sys.exit(run_flow(args.mode, args.out.resolve(), args.tokenizer))


if __name__ == "__main__":
    main()
