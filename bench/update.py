"""Benchmark of `antisd update`: one DeepSpeed step on 64 scored sequences of the real SmolLM2-135M.

Workload (issue 3): 16 arith prompts × 4 samples = 64 sequences; each prompt is the real student prompt (chat
template, SmolLM2's default system prompt, two few-shot turns: ~130 tokens) and each response 64 random token ids
(seed 0), so a sequence is ~194 tokens. The old-policy log-probs s_t are computed first with the same model (no grad, not timed), so
the step is on-policy as after `score`. Rewards are mixed in every group; u ~ N(0, 1); teacher entropy ~2 nats.

The update runs as `python -m antisd_cli update` in a child process (defaults: fp32 weights, ZeRO-2, shared
prefixes, no gradient checkpointing, --micro-batch-tokens 2048); its peak RSS comes from wait4's rusage, so the preparation in this process
does not count. Printed: the training step's tokens/s (prompt + response tokens through forward + backward, from
metrics.json), the stage's own time (timing_s/update: load, DeepSpeed init, step; not the checkpoint write), the
child's wall time (with imports and the checkpoint write), peak RSS and the checkpoint's size.

Usage: python bench/update.py [--threads 1] [--sequences 64] [--response-tokens 64] [--json out.json] [-- EXTRA ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prepare(folder: Path, sequences: int, response_tokens: int, threads: int) -> Path:
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM

    import schemas
    from stages.common import io
    from stages.lm.datasets import ARITH_FEW_SHOT
    from stages.lm.logprobs import response_token_stats
    from stages.lm.models import load_tokenizer, model_revision, resolve_model
    from stages.lm.prompts import encode, student_messages

    torch.set_num_threads(threads)
    model_dir = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(model_dir)
    few_shot = [{"user": u, "assistant": a} for u, a in ARITH_FEW_SHOT]
    rng = random.Random(0)
    group_size = 4
    prompts, responses = [], []
    for i in range(sequences):
        a, b = 10 + (i // group_size) * 3 % 90, 20 + (i // group_size) * 7 % 80
        prompts.append(encode(tokenizer, student_messages(f"What is {a} + {b}?", few_shot)))
        responses.append([rng.randrange(200, 20000) for _ in range(response_tokens - 1)] + [tokenizer.eos_token_id])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    student = []
    with torch.no_grad():
        for begin in range(0, sequences, 8):
            lps, _ = response_token_stats(model, [p + r for p, r in zip(prompts[begin:begin + 8],
                                                                         responses[begin:begin + 8])],
                                          [len(p) for p in prompts[begin:begin + 8]], pad_id=tokenizer.pad_token_id,
                                          with_entropy=False)
            student += [lp.tolist() for lp in lps]
    rows = []
    for i in range(sequences):
        n = len(responses[i])
        reward = float(i % 2 == 0)
        pmi = [rng.gauss(0, 1) for _ in range(n)]
        rows.append({
            "prompt_id": f"p{i // group_size}", "dataset": "arith/bench", "problem": "x", "answer": "0",
            "solution": None, "few_shot": few_shot, "sample_idx": i % group_size, "prompt_token_ids": prompts[i],
            "response_token_ids": responses[i], "response_text": "", "sampling_logprobs": student[i],
            "finish_reason": "stop", "response_length": n, "extracted_answer": None, "reward": reward,
            "correct": reward == 1.0, "verify_status": "ok", "group_size": group_size, "group_mean_reward": 0.5,
            "privileged_text": "x", "privileged_source": "peer", "peer_sample_idx": (i + 1) % group_size,
            "student_logprobs": student[i], "teacher_logprobs": [s + u for s, u in zip(student[i], pmi)],
            "teacher_entropy": [2.0 + 0.1 * rng.random() for _ in range(n)], "student_entropy": [1.5] * n,
            "pmi": pmi, "teacher_prompt_length": len(prompts[i]) + 40,
        })
    path = folder / "scored.parquet"
    io.write_artifact(pa.Table.from_pylist(rows, schema=schemas.SCORED), path, "scored",
                      io.build_metadata("scored", {}, model=str(model_dir), model_revision=model_revision(model_dir)))
    return path


def run_update(scored: Path, out: Path, threads: int, extra: list[str]) -> tuple[float, float, int]:
    """Run the update in a child; return (wall seconds, peak RSS GiB, exit code)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    command = [sys.executable, "-m", "antisd_cli", "-q", "update", "--scored", str(scored), "--model",
               "smollm2-135m", "--out", str(out), "--threads", str(threads), *extra]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    return wall, usage.ru_maxrss / 2**20, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("extra", nargs="*", help="Extra `antisd update` options (after --).")
    args = parser.parse_args()
    from stages.common import metrics as keys
    folder = Path(tempfile.mkdtemp(prefix="bench_update."))
    try:
        scored = prepare(folder, args.sequences, args.response_tokens, args.threads)
        wall, peak_gib, code = run_update(scored, folder / "ckpt", args.threads, args.extra)
        if code != 0:
            sys.exit(f"update failed with exit code {code}")
        metrics = json.loads((folder / "ckpt" / "metrics.json").read_text())
        size = sum(p.stat().st_size for p in (folder / "ckpt").rglob("*") if p.is_file())
        import pyarrow.parquet as pq

        table = pq.read_table(scored, columns=["prompt_token_ids", "response_token_ids"])
        tokens = sum(len(p) + len(r) for p, r in zip(table["prompt_token_ids"].to_pylist(),
                                                    table["response_token_ids"].to_pylist()))
        figures = {
            "sequences": args.sequences, "tokens": tokens, "mean_sequence_tokens": tokens / args.sequences,
            "threads": args.threads, "extra_args": args.extra,
            "train_tok_s": metrics[keys.UPDATE_TOK_S], "stage_s": metrics[keys.timing("update")],
            "child_wall_s": wall, "peak_rss_gib": peak_gib, "checkpoint_gib": size / 2**30,
            "grad_norm": metrics[keys.GRAD_NORM], "pg_loss": metrics[keys.PG_LOSS],
        }
        print(f"update: {args.sequences} sequences, {tokens} tokens (mean {tokens / args.sequences:.0f}), "
              f"{args.threads} thread(s) {' '.join(args.extra)}")
        print(f"  training step   {figures['train_tok_s']:.1f} tok/s")
        print(f"  stage time      {figures['stage_s']:.1f} s (load + DeepSpeed init + step)")
        print(f"  child wall      {wall:.1f} s (with imports and the checkpoint write)")
        print(f"  peak RSS        {peak_gib:.2f} GiB")
        print(f"  checkpoint      {figures['checkpoint_gib']:.2f} GiB (HF fp32 + DeepSpeed module/optimizer state)")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
