"""Benchmark: tokens/s of `antisd rollout` (stages.rollout.run) vs the bare engine call, per installed engine.

Default size (issue 2): the embedded model, 32 arith prompts × 8 samples × 128 new tokens, temperature 1.0. For each
engine present (hf always; vllm when importable) it times
  bare     the engine alone on the same prompt ids and settings: `model.generate(do_sample=True, top_k=0, …)` on the
           same length-sorted, left-padded batches (hf), or `LLM.generate(…, SamplingParams(n, …))` (vllm);
  rollout  `stages.rollout.run` end to end on an already-loaded model/engine: read prompts, format, sample with
           per-sample seeds and log-probs, decode, write the Parquet file;
and prints response tokens/s of each and their ratio (target ≥ 0.9), plus HF vs vLLM when both ran. Model loading
and engine start-up are excluded from both sides. Sampled lengths differ between runs, and a batch runs until its
longest row stops, so single runs are noisy: use --repeats and read the medians.

    python bench/rollout.py                 # full size (several minutes on 1 CPU thread)
    python bench/rollout.py --quick         # 8 prompts × 4 samples × 32 tokens
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.data import run as prepare  # noqa: E402
from stages.lm.datasets import PrepareConfig  # noqa: E402
from stages.lm.engine import SamplingSettings, vllm_available
from stages.lm.sampling import RolloutConfig
from stages.rollout import run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32, help="arith prompts")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=0, help="rows per engine call (0 = engine default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each side (medians reported)")
    parser.add_argument("--engines", default="auto", help="comma list of hf,vllm; auto = every installed one")
    parser.add_argument("--quick", action="store_true", help="8 prompts × 4 samples × 32 tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.n, args.max_new_tokens = 8, 4, 32
    return args


def prompt_ids_of(tokenizer, prompts_path: Path) -> tuple[list[dict], list[list[int]]]:
    import pyarrow.parquet as pq

    from stages.lm.prompts import encode, student_messages

    rows = pq.read_table(prompts_path).to_pylist()
    return rows, [encode(tokenizer, student_messages(r["problem"], r["few_shot"])) for r in rows]


def bare_hf(engine, prompt_ids: list[list[int]], settings: SamplingSettings, batch_size: int) -> tuple[int, float]:
    """`model.generate` with transformers' own sampling on the engine's batches; (response tokens, seconds)."""
    import torch
    from transformers import GenerationConfig

    from stages.lm.engine_hf import cut_response, row_batches

    batch_size = batch_size or engine.default_batch_size
    sampling = settings.temperature > 0
    config = GenerationConfig(
        do_sample=sampling, temperature=settings.temperature if sampling else None, top_p=settings.top_p if sampling else None,
        top_k=0 if sampling else None, num_beams=1, max_new_tokens=settings.max_new_tokens, use_cache=True,
        eos_token_id=sorted(engine.eos_ids), pad_token_id=engine.pad_id,
    )
    torch.manual_seed(settings.seed)
    tokens, start = 0, time.perf_counter()
    for rows in row_batches(prompt_ids, settings.n, batch_size):
        input_ids, attention_mask = engine._left_pad([prompt_ids[p] for p, _ in rows])
        with torch.inference_mode():
            output = engine.loaded.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                  generation_config=config)
        for generated in output[:, input_ids.shape[1]:].tolist():
            tokens += len(cut_response(generated, engine.eos_ids, settings.max_new_tokens)[0])
    return tokens, time.perf_counter() - start


def bare_vllm(engine, prompt_ids: list[list[int]], settings: SamplingSettings) -> tuple[int, float]:
    """One `LLM.generate` over all prompts, no log-probs requested; (response tokens, seconds)."""
    from vllm import SamplingParams

    params = SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_new_tokens, seed=settings.seed)
    start = time.perf_counter()
    outputs = engine.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params,
                                  use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for o in outputs for c in o.outputs), seconds


def open_engine(name: str, args, max_model_len: int):
    if name == "hf":
        from stages.lm.engine_hf import HFEngine
        from stages.lm.models import load_model

        return HFEngine(load_model(args.model))
    from stages.common.process import pick_device
    from stages.lm.engine_vllm import VLLMEngine
    from stages.lm.models import resolve_model, torch_dtype

    dtype = str(torch_dtype("auto", pick_device())).replace("torch.", "")
    return VLLMEngine(resolve_model(args.model), dtype=dtype, seed=0, max_model_len=max_model_len)


def bench_engine(name: str, args, prompts_path: Path, workdir: Path) -> dict:
    from stages.common.io import read_metadata
    settings = SamplingSettings(args.n, args.temperature, args.top_p, args.max_new_tokens, seed=0)
    started = time.perf_counter()
    engine = open_engine(name, args, max_model_len=1024 + args.max_new_tokens)
    startup_s = time.perf_counter() - started
    _, prompt_ids = prompt_ids_of(engine.tokenizer, prompts_path)
    bare_rates, rollout_rates, generate_rates = [], [], []
    for repeat in range(args.repeats):
        tokens, seconds = (bare_hf(engine, prompt_ids, settings, args.batch_size) if name == "hf"
                           else bare_vllm(engine, prompt_ids, settings))
        bare_rates.append(tokens / seconds)
        out = workdir / f"{name}-{repeat}.parquet"
        start = time.perf_counter()
        run(RolloutConfig(prompts=str(prompts_path), out=str(out), n=args.n, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=repeat,
                          batch_size=args.batch_size, progress=False, overwrite=True),
            loaded=engine)
        seconds = time.perf_counter() - start
        meta = read_metadata(out)
        rollout_rates.append(meta["response_tokens"] / seconds)
        generate_rates.append(meta["tokens_per_s"])
        print(f"  {name} run {repeat}: bare {bare_rates[-1]:.1f} tok/s ({tokens} tokens), rollout "
              f"{rollout_rates[-1]:.1f} tok/s ({meta['response_tokens']} tokens)", file=sys.stderr, flush=True)
    engine.close()
    bare, rollout = statistics.median(bare_rates), statistics.median(rollout_rates)
    return {"engine": name, "startup_s": round(startup_s, 1), "bare_tok_s": round(bare, 1),
            "rollout_tok_s": round(rollout, 1), "rollout_generate_tok_s": round(statistics.median(generate_rates), 1),
            "ratio": round(rollout / bare, 3), "bare_runs": [round(r, 1) for r in bare_rates],
            "rollout_runs": [round(r, 1) for r in rollout_rates]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from stages.common.process import set_threads

    threads = set_threads(args.threads)
    engines = ["hf"] + (["vllm"] if vllm_available() else []) if args.engines == "auto" else args.engines.split(",")
    print(f"rollout bench: {args.model}, {args.prompts} prompts × {args.n} samples × {args.max_new_tokens} new "
          f"tokens, T={args.temperature}, top-p={args.top_p}, threads={threads}, engines={','.join(engines)}",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="antisd-bench-") as tmp:
        workdir = Path(tmp)
        prompts_path = prepare(PrepareConfig(name="arith", out=str(workdir / "prompts.parquet"), num=args.prompts,
                                             seed=0))
        for name in engines:
            results.append(bench_engine(name, args, prompts_path, workdir))
    print(f"{'engine':8} {'bare tok/s':>11} {'rollout tok/s':>14} {'ratio':>6} {'(generate only)':>16} {'start-up s':>10}")
    for r in results:
        print(f"{r['engine']:8} {r['bare_tok_s']:>11.1f} {r['rollout_tok_s']:>14.1f} {r['ratio']:>6.2f} "
              f"{r['rollout_generate_tok_s']:>16.1f} {r['startup_s']:>10.1f}")
    by_name = {r["engine"]: r for r in results}
    if "hf" in by_name and "vllm" in by_name:
        print(f"vllm / hf (rollout tok/s): {by_name['vllm']['rollout_tok_s'] / by_name['hf']['rollout_tok_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "threads": threads,
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
