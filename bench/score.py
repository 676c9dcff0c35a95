"""Benchmark of the score stage's numerics: the chunked scorer vs a naive full-logits scorer vs bare forwards.

Workload (issue 3): 8 sequences of 1,024 tokens (a 64-token prompt + 960 response tokens, random ids, seed 0) on the
real SmolLM2-135M (vocab 49,152), no grad. Variants, each in a fresh subprocess so that memory figures do not mix:
  chunked       stages.lm.logprobs.response_token_stats (body once, then LM head + log-softmax + entropy over chunks
                of --chunk-size response positions): what `antisd score` runs per micro-batch;
  chunked-noentropy  the same without the full-vocabulary entropy (softmax and Σ p·logit over the vocabulary):
                what `antisd score --no-entropy` runs (METHOD §9 needs no entropy); the saving is printed;
  entropy-ab    (not in the default list) chunked and chunked-noentropy alternated --repeats times in one process,
                the minimum of each: the entropy's share of score's time on a busy machine;
  naive         stages.lm.logprobs.naive_response_token_stats: full [B, L, V] fp32 logits, log_softmax, entropy;
  forward-body  the model body only (`model.model(...)`, last hidden states, no LM head): the floor;
  forward-full  `model(...)`: body + LM head producing full [B, L, V] logits, nothing else.
Peak extra memory = peak RSS during the variant − RSS just before it (model and inputs loaded, weights faulted in
by an 8-token forward: safetensors are mmap-loaded and would otherwise count as the first variant's). The kernel's peak
RSS (VmHWM) is reset first through /proc/self/clear_refs, so the load-time peak cannot hide the variant's; where
that file is not writable, ru_maxrss is used and the figure is a lower bound (said in the output).
Targets: chunked peak extra ≤ 10% of naive's (printed as a whole, and above the body forward's own activation
memory, which all variants share and which `--micro-batch-tokens` bounds in the stage); chunked tokens/s ≥ 0.8 × forward-full's (the bare no-grad
`model(...)` forward); the ratio to forward-body is printed too.

Usage: python bench/score.py [--threads 1] [--device auto] [--repeats 1] [--json out.json]
       python bench/score.py --variants entropy-ab --repeats 5      # what score --no-entropy saves
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("forward-body", "forward-full", "chunked", "chunked-noentropy", "naive")


def _rss_kib(field: str) -> int | None:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    import torch

    from stages.common.process import pick_device, set_threads
    from stages.lm.logprobs import naive_response_token_stats, pad_batch, response_token_stats
    from stages.lm.models import load_model

    threads = set_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device=pick_device(args.device))
    model, device = loaded.model, loaded.device
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, vocab, (args.length,), generator=gen).tolist() for _ in range(args.seqs)]
    starts = [args.prompt_length] * args.seqs
    input_ids, attention_mask = pad_batch(sequences, 0, device)

    def once():
        with torch.inference_mode():
            if args.worker == "forward-body":
                out = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask)
                return out.last_hidden_state
            if args.worker == "forward-full":
                return model(input_ids=input_ids, attention_mask=attention_mask).logits
            if args.worker in ("chunked", "chunked-noentropy"):
                return response_token_stats(model, sequences, starts, chunk_size=args.chunk_size,
                                            with_entropy=args.worker == "chunked")
            return naive_response_token_stats(model, sequences, starts)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if args.worker == "entropy-ab":
        return entropy_ab(args, model, sequences, starts, device)
    cuda = device.startswith("cuda")
    with torch.inference_mode():  # fault in the (mmap-loaded) weights, so that they do not count as the variant's
        model(input_ids=input_ids[:1, :8], attention_mask=attention_mask[:1, :8])
    if cuda:
        once()  # warm-up: kernels and allocator; CUDA memory is measured by torch's peak counter instead
        sync()
        torch.cuda.reset_peak_memory_stats()
    reset_ok = _reset_peak()
    rss_before = _rss_kib("VmRSS")
    cuda_before = torch.cuda.memory_allocated() if cuda else 0
    times = []
    start = time.perf_counter()
    result = once()
    sync()
    times.append(time.perf_counter() - start)
    peak_kib = _rss_kib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda_peak = (torch.cuda.max_memory_allocated() - cuda_before) if cuda else None
    del result
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    seconds = times[len(times) // 2]
    return {"variant": args.worker, "device": device, "dtype": str(loaded.dtype), "threads": threads,
            "tokens": args.seqs * args.length, "seconds": seconds, "tokens_per_s": args.seqs * args.length / seconds,
            "peak_extra_mib": (peak_kib - rss_before) / 1024, "peak_exact": reset_ok,
            "cuda_peak_extra_mib": None if cuda_peak is None else cuda_peak / 2**20}


def entropy_ab(args, model, sequences, starts, device) -> dict:
    """The scorer with and without the entropy, alternated `--repeats` times in one process; CPU seconds of this
    process (time.process_time: on a shared machine the wall clock mostly measures the other load), the minimum of
    each being the figure least disturbed (on CUDA: wall seconds after a synchronize)."""
    import torch

    from stages.lm.logprobs import response_token_stats

    clock = time.perf_counter if device.startswith("cuda") else time.process_time

    def timed(with_entropy: bool) -> float:
        start = clock()
        with torch.inference_mode():
            response_token_stats(model, sequences, starts, chunk_size=args.chunk_size, with_entropy=with_entropy)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return clock() - start

    timed(True)  # warm-up (weights faulted in, kernels and allocator)
    runs = {True: [], False: []}
    for _ in range(args.repeats):
        for with_entropy in (True, False):
            runs[with_entropy].append(timed(with_entropy))
    full, lean = min(runs[True]), min(runs[False])
    return {"variant": "entropy-ab", "device": device, "tokens": args.seqs * args.length, "repeats": args.repeats,
            "with_entropy_s": sorted(runs[True]), "without_entropy_s": sorted(runs[False]),
            "saved_fraction": 1 - lean / full}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (median); 1 on a busy CPU")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(max(args.threads, 1)), "TOKENIZERS_PARALLELISM": "false"}
    figures = {}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--worker", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "variants", "json")
            and v is not None]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"{variant}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            return 1
        figures[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        f = figures[variant]
        if variant == "entropy-ab":
            print(f"entropy-ab ({'wall' if f['device'].startswith('cuda') else 'CPU'} seconds): min "
                  f"{f['with_entropy_s'][0]:.2f} s with the entropy, {f['without_entropy_s'][0]:.2f} s "
                  f"without ({100 * f['saved_fraction']:.1f} % saved; {f['repeats']} alternated runs each: "
                  f"{f['with_entropy_s']} / {f['without_entropy_s']})", flush=True)
            continue
        cuda = f"  cuda peak extra {f['cuda_peak_extra_mib']:8.1f} MiB" if f["cuda_peak_extra_mib"] is not None else ""
        print(f"{variant:17s} {f['seconds']:8.2f} s  {f['tokens_per_s']:9.1f} tok/s  "
              f"peak RSS extra {f['peak_extra_mib']:8.1f} MiB{cuda}", flush=True)
    if {"chunked", "chunked-noentropy"} <= figures.keys():
        full, lean = figures["chunked"]["seconds"], figures["chunked-noentropy"]["seconds"]
        print(f"entropy: --no-entropy takes {lean / full:.3f} of the time ({100 * (1 - lean / full):.1f} % saved, "
              f"{full - lean:.2f} s of {full:.2f} s)")
    if {"chunked", "naive"} <= figures.keys():
        key = "cuda_peak_extra_mib" if figures["chunked"]["cuda_peak_extra_mib"] is not None else "peak_extra_mib"
        ratio = figures["chunked"][key] / max(figures["naive"][key], 1e-9)
        print(f"memory: chunked/naive peak extra ({key}) = {ratio:.3f}  (target <= 0.10: {'ok' if ratio <= 0.10 else 'MISSED'})")
        figures["memory_ratio"] = ratio
        if "forward-body" in figures:  # what the log-prob/entropy computation adds on top of the body's activations
            body = figures["forward-body"][key]
            head = (figures["chunked"][key] - body) / max(figures["naive"][key] - body, 1e-9)
            print(f"memory above the body forward: chunked {figures['chunked'][key] - body:.1f} MiB, naive "
                  f"{figures['naive'][key] - body:.1f} MiB, ratio {head:.3f}  (target <= 0.10: {'ok' if head <= 0.10 else 'MISSED'})")
            figures["memory_ratio_above_body"] = head
    for base in ("forward-full", "forward-body"):
        if {"chunked", base} <= figures.keys():
            ratio = figures["chunked"]["tokens_per_s"] / figures[base]["tokens_per_s"]
            target = f"  (target >= 0.8: {'ok' if ratio >= 0.8 else 'MISSED'})" if base == "forward-full" else ""
            print(f"speed: chunked / {base} tokens/s = {ratio:.3f}{target}")
            figures[f"speed_ratio_vs_{base}"] = ratio
    if not all(f.get("peak_exact", True) for f in figures.values() if isinstance(f, dict)):
        print("note: /proc/self/clear_refs not writable; peak extras are lower bounds (ru_maxrss)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
