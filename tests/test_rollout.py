"""`antisd rollout`: rows, ids, log-probs, determinism, sharding, bad input, the vLLM path (through a fake `vllm`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import schemas
from stages.common.io import read_artifact, read_metadata
from stages.lm.engine import SamplingSettings
from stages.lm.sampling import RolloutConfig, sample, select_prompts
from stages.rollout import run

N = 3
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    from stages.common.process import set_threads
    from stages.lm.models import load_model

    set_threads(1)
    return load_model(tiny_model_dir)


@pytest.fixture
def rollout(tmp_path, arith_prompts, tiny_loaded):
    """Run the stage on the tiny model; returns (table, path)."""
    counter = iter(range(1000))

    def _run(loaded=tiny_loaded, **overrides):
        options = dict(prompts=str(arith_prompts), out=str(tmp_path / f"r{next(counter)}.parquet"), n=N,
                       max_new_tokens=NEW_TOKENS, progress=False)
        options.update(overrides)
        path = run(RolloutConfig(**options), loaded=loaded)
        return read_artifact(path, "rollouts")[0], path

    return _run


def _key(table):
    return [(r["prompt_id"], r["sample_idx"]) for r in table.select(["prompt_id", "sample_idx"]).to_pylist()]


# --- rows and columns -------------------------------------------------------------------------------------------


def test_one_row_per_prompt_and_sample_with_rollouts_schema(rollout, arith_prompts):
    table, path = rollout()
    prompts = pq.read_table(arith_prompts)
    assert table.num_rows == prompts.num_rows * N
    schemas.check_schema(table.schema, schemas.ROLLOUTS, str(path), "rollouts")
    expected = [(pid, j) for pid in prompts.column("prompt_id").to_pylist() for j in range(N)]
    assert _key(table) == expected
    first = table.to_pylist()[0]
    source = prompts.to_pylist()[0]
    assert {k: first[k] for k in ("problem", "answer", "solution", "few_shot")} == {
        k: source[k] for k in ("problem", "answer", "solution", "few_shot")}


def test_prompt_token_ids_are_the_encoded_student_prompt(rollout, tiny_loaded):
    from stages.lm.prompts import encode, student_messages

    table, _ = rollout()
    for row in table.to_pylist():
        assert row["prompt_token_ids"] == encode(tiny_loaded.tokenizer, student_messages(row["problem"], row["few_shot"]))


def test_logprobs_are_nonpositive_one_per_response_token(rollout):
    table, _ = rollout()
    for row in table.to_pylist():
        assert row["response_length"] == len(row["response_token_ids"]) == len(row["sampling_logprobs"]) > 0
        assert all(lp <= 0 for lp in row["sampling_logprobs"])


def test_response_text_is_the_decoded_response_ids(rollout, tiny_loaded):
    table, _ = rollout()
    for row in table.to_pylist():
        assert row["response_text"] == tiny_loaded.tokenizer.decode(row["response_token_ids"], skip_special_tokens=True)


def test_metadata_records_model_sampling_engine_and_speed(rollout, tiny_loaded):
    _, path = rollout(seed=5, threads=1)
    meta = read_metadata(path)
    assert meta["artifact"] == "rollouts" and meta["schema_version"] == schemas.SCHEMA_VERSION
    assert meta["model"] == str(tiny_loaded.path) and meta["model_revision"] == tiny_loaded.revision
    assert meta["sampling"] == {"n": N, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": NEW_TOKENS, "seed": 5}
    assert (meta["engine"], meta["dtype"], meta["threads"]) == ("hf", "float32", 1)
    assert meta["tokens_per_s"] > 0 and meta["wall_s"] > 0 and meta["antisd_version"]


# --- log-probs against the trainer's recomputation (issue 5's mismatch metric) ----------------------------------


def _recomputed(loaded, table, temperature):
    from stages.lm.logprobs import response_token_stats

    rows = table.to_pylist()
    sequences = [r["prompt_token_ids"] + r["response_token_ids"] for r in rows]
    starts = [len(r["prompt_token_ids"]) for r in rows]
    with torch.no_grad():
        logprobs, _ = response_token_stats(loaded.model, sequences, starts, pad_id=0, temperature=temperature,
                                           with_entropy=False)
    return [lp.tolist() for lp in logprobs], rows


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_trainer_recomputation(rollout, tiny_loaded, temperature):
    table, _ = rollout(temperature=temperature, max_new_tokens=12)
    recomputed, rows = _recomputed(tiny_loaded, table, temperature)
    for row, expected in zip(rows, recomputed):
        assert row["sampling_logprobs"] == pytest.approx(expected, abs=1e-4)


def test_top_p_logprobs_are_renormalized_over_the_nucleus(rollout, tiny_loaded):
    table, _ = rollout(top_p=0.3, max_new_tokens=12)
    raw, rows = _recomputed(tiny_loaded, table, 1.0)
    gaps = [s - r for row, full in zip(rows, raw) for s, r in zip(row["sampling_logprobs"], full)]
    assert all(gap >= -1e-5 for gap in gaps)  # renormalizing over a subset can only raise a token's probability
    assert max(gaps) > 1e-3


# --- determinism --------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_table(rollout):
    assert rollout(seed=7)[0].equals(rollout(seed=7)[0])


def test_different_seed_gives_different_samples(rollout):
    first, second = rollout(seed=7)[0], rollout(seed=8)[0]
    assert first.column("response_token_ids").to_pylist() != second.column("response_token_ids").to_pylist()


def test_samples_do_not_depend_on_batch_size(rollout):
    one, many = rollout(seed=3, batch_size=1)[0], rollout(seed=3, batch_size=7)[0]
    assert one.column("response_token_ids").equals(many.column("response_token_ids"))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_shared_prefill_samples_the_same_tokens(rollout, temperature):
    """A group's prompt prefilled once per batch (its cache repeated) gives the rows of full prefills."""
    shared, _ = rollout(seed=5, temperature=temperature, share_prefix=True, batch_size=7)  # groups cut by batches
    full, _ = rollout(seed=5, temperature=temperature, share_prefix=False, batch_size=7)
    assert shared.column("response_token_ids").equals(full.column("response_token_ids"))
    for a, b in zip(shared.column("sampling_logprobs").to_pylist(), full.column("sampling_logprobs").to_pylist()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_greedy_is_reproducible_and_ignores_seed(rollout):
    first, second = rollout(temperature=0.0, seed=1)[0], rollout(temperature=0.0, seed=2)[0]
    assert first.equals(second)
    responses = first.column("response_token_ids").to_pylist()
    assert all(responses[i] == responses[i - i % N] for i in range(len(responses)))


def test_length_finish_reason_when_cap_is_hit(rollout):
    table, _ = rollout(max_new_tokens=4)
    rows = table.to_pylist()
    assert any(r["finish_reason"] == "length" for r in rows)
    for r in rows:
        assert r["finish_reason"] in ("stop", "length")
        assert r["response_length"] == 4 if r["finish_reason"] == "length" else r["response_token_ids"][-1] == 2


# --- prompt selection: --max-prompts and --shard ------------------------------------------------------------------


def test_max_prompts_keeps_the_first_prompts(rollout, arith_prompts):
    table, _ = rollout(max_prompts=2)
    first_two = pq.read_table(arith_prompts).column("prompt_id").to_pylist()[:2]
    assert sorted(set(table.column("prompt_id").to_pylist())) == sorted(first_two)
    assert table.num_rows == 2 * N


def test_shards_cover_all_prompts_disjointly_and_match_the_whole_run(rollout, tmp_path, arith_prompts):
    out = tmp_path / "sharded"
    parts = [rollout(out=str(out), shard=f"{i}/2", seed=4)[0] for i in range(2)]
    ids = [set(p.column("prompt_id").to_pylist()) for p in parts]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(pq.read_table(arith_prompts).column("prompt_id").to_pylist())
    assert sorted(p.name for p in out.iterdir()) == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    whole = {(r["prompt_id"], r["sample_idx"]): r["response_token_ids"] for r in rollout(seed=4)[0].to_pylist()}
    merged = read_artifact(out, "rollouts")[0]
    assert {(r["prompt_id"], r["sample_idx"]): r["response_token_ids"] for r in merged.to_pylist()} == whole


def test_select_prompts_rejects_duplicate_prompt_ids(arith_prompts):
    from stages.common.errors import InputError
    from stages.common.parts import Shard
    table = pq.read_table(arith_prompts)
    with pytest.raises(InputError, match="occurs more than once"):
        select_prompts(pa.concat_tables([table, table]), "x.parquet", 0, Shard())


# --- pure pieces of the HF engine -----------------------------------------------------------------------------------


def test_cut_response_keeps_eos_on_stop_and_caps_length():
    from stages.lm.engine_hf import cut_response

    assert cut_response([5, 6, 2, 2, 2], {2}, 5) == ([5, 6, 2], "stop")
    assert cut_response([5, 6, 7, 8, 2], {2}, 5) == ([5, 6, 7, 8, 2], "stop")
    assert cut_response([5, 6, 7, 8, 9], {2}, 5) == ([5, 6, 7, 8, 9], "length")
    assert cut_response([5, 0, 7], {0, 2}, 3) == ([5, 0], "stop")


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
def test_top_p_mask_equals_transformers_warper(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    from stages.lm.engine_hf import processed_scores

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ours = processed_scores(logits, 1.0, top_p)
    theirs = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_sample_tokens_draws_from_the_processed_distribution():
    from stages.lm.engine_hf import sample_tokens

    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]])).expand(4000, 4)
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens, logprobs = sample_tokens(scores, generators)
    frequencies = torch.bincount(tokens, minlength=4).float() / 4000
    assert frequencies.tolist() == pytest.approx([0.5, 0.3, 0.2, 0.0], abs=0.03)
    assert torch.allclose(logprobs, scores[0].log_softmax(-1)[tokens])
    greedy, _ = sample_tokens(scores[:2], None)
    assert greedy.tolist() == [0, 0]


def _sampled_alone(model, prompt, generator, settings, eos_ids):
    """Reference: one row, no KV cache, no padding; the whole sequence re-run for every new token."""
    from stages.lm.engine_hf import processed_scores, sample_tokens

    sequence, tokens, logprobs = list(prompt), [], []
    for _ in range(settings.max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sequence])).logits[:, -1]  # [1, V]
        token, logprob = sample_tokens(processed_scores(logits, settings.temperature, settings.top_p), [generator])
        tokens.append(int(token))
        logprobs.append(float(logprob))
        sequence.append(int(token))
        if int(token) in eos_ids:
            break
    return tokens, logprobs


@pytest.mark.parametrize("share_prefill", [True, False])
def test_rows_that_stop_leave_the_batch_and_sample_as_if_alone(tiny_loaded, arith_prompts, share_prefill):
    from stages.lm.engine import sample_seed
    from stages.lm.engine_hf import HFEngine
    from stages.lm.prompts import encode, student_messages

    rows = pq.read_table(arith_prompts).to_pylist()[:3]
    for row in rows:
        row["prompt_token_ids"] = encode(tiny_loaded.tokenizer, student_messages(row["problem"], row["few_shot"]))
    engine = HFEngine(tiny_loaded, share_prefill=share_prefill)
    engine.eos_ids = set(range(0, tiny_loaded.model.config.vocab_size, 9))  # ~1 id in 9 stops: rows end apart
    settings = SamplingSettings(n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=11)
    keys = [r["prompt_id"] for r in rows]
    completions = engine.generate([r["prompt_token_ids"] for r in rows], keys, settings, batch_size=9)
    lengths = [len(c.response_token_ids) for group in completions for c in group]
    assert len(set(lengths)) > 2 and min(lengths) < 12  # rows left the batch at different steps
    for row, group in zip(rows, completions):
        for j, completion in enumerate(group):
            generator = torch.Generator().manual_seed(sample_seed(settings.seed, row["prompt_id"], j))
            tokens, logprobs = _sampled_alone(tiny_loaded.model, row["prompt_token_ids"], generator, settings,
                                              engine.eos_ids)
            assert completion.response_token_ids == tokens
            assert completion.finish_reason == ("stop" if tokens[-1] in engine.eos_ids else "length")
            # float32 sums over other batch shapes and a cache: ~1e-6 here; 1e-4 as the trainer-recompute test
            assert completion.sampling_logprobs == pytest.approx(logprobs, abs=1e-4)


# --- library entry -------------------------------------------------------------------------------------------------


def test_sample_accepts_a_loaded_model_and_returns_stats(tiny_loaded, arith_prompts):
    rows = pq.read_table(arith_prompts).to_pylist()[:2]
    table, stats = sample(tiny_loaded, rows, SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=3, seed=0))
    assert table.num_rows == 4 and stats["samples"] == 4
    assert stats["response_tokens"] == sum(table.column("response_length").to_pylist())
    assert stats["finish_stop"] + stats["finish_length"] == 4


def test_run_reuses_an_open_engine(rollout, tiny_loaded):
    from stages.lm.engine_hf import HFEngine

    engine = HFEngine(tiny_loaded)
    table, path = rollout(loaded=engine, engine="vllm", batch_size=5)  # an open engine wins over config.engine
    assert table.num_rows == 4 * N and read_metadata(path)["engine"] == "hf"


def test_the_hf_engine_reports_tokens_as_it_samples_them(tiny_loaded):
    """A batch of long responses decodes for minutes: its tokens reach the progress at every decode step, and its
    samples when the batch ends (so a Slurm log moves during a batch)."""
    from stages.lm.engine import SamplingSettings
    from stages.lm.engine_hf import HFEngine

    calls = []
    settings = SamplingSettings(n=2, max_new_tokens=5, temperature=1.0, top_p=1.0, seed=0)
    completions = HFEngine(tiny_loaded).generate([[1, 2, 3], [1, 4]], ["a", "b"], settings,
                                                 on_progress=lambda indices, tokens: calls.append((indices, tokens)))
    during, end = calls[:-1], calls[-1]
    assert len(during) >= 2 and all(indices == [] and tokens > 0 for indices, tokens in during)
    assert sorted(end[0]) == [0, 0, 1, 1] and end[1] == 0
    assert sum(tokens for _, tokens in during) >= sum(len(c.response_token_ids) for group in completions for c in group)


def test_a_rollout_in_a_log_file_reports_samples_and_tokens_per_second(rollout, caplog):
    """Off a terminal (a Slurm log) the rollout writes progress records, not a bar, and no carriage return."""
    import logging

    with caplog.at_level(logging.INFO, logger="stages.common.progress"):
        rollout(progress=True)
    records = [r.getMessage() for r in caplog.records if r.name == "stages.common.progress"]
    assert len(records) == 1 and records[0].startswith(f"rollout: {4 * N} / {4 * N} samples (100 %), ")
    assert "tok/s" in records[0] and "\r" not in caplog.text


# --- CLI and bad input ----------------------------------------------------------------------------------------------


def _invoke(*args):
    from antisd_cli.main import cli

    return CliRunner().invoke(cli, ["rollout", *map(str, args)])


def test_cli_writes_rollouts_and_prints_the_path(tmp_path, arith_prompts, tiny_model_dir):
    out = tmp_path / "r.parquet"
    result = _invoke("--model", tiny_model_dir, "--prompts", arith_prompts, "--out", out, "--n", 2,
                     "--max-new-tokens", 3, "--engine", "hf", "--threads", 1, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert read_artifact(out, "rollouts")[0].num_rows == 8


def _write_empty_prompts(path):
    pq.write_table(pa.Table.from_pylist([], schema=schemas.PROMPTS), path)
    return path


def _write_rollouts_like(path, arith_prompts):
    table = pq.read_table(arith_prompts)
    pq.write_table(pa.concat_tables([table, table]), path)  # prompts columns, but each prompt twice
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_prompts", "does not exist"),
        ("wrong_columns", "missing column 'prompt_id'"),
        ("rollouts_as_prompts", "occurs more than once"),
        ("empty_prompts", "has no rows"),
        ("not_a_model", "not a Hugging Face model folder"),
        ("n_zero", "--n"),
        ("out_dir_missing", "does not exist"),
        ("shard_bad", "--shard"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_it(case, message, tmp_path, arith_prompts, tiny_model_dir):
    prompts, model, out, extra = arith_prompts, tiny_model_dir, tmp_path / "r.parquet", []
    if case == "missing_prompts":
        prompts = tmp_path / "nope.parquet"
    elif case == "wrong_columns":
        prompts = tmp_path / "other.parquet"
        pq.write_table(pa.table({"x": [1, 2]}), prompts)
    elif case == "rollouts_as_prompts":
        prompts = _write_rollouts_like(tmp_path / "doubled.parquet", arith_prompts)
    elif case == "empty_prompts":
        prompts = _write_empty_prompts(tmp_path / "empty.parquet")
    elif case == "not_a_model":
        model = tmp_path / "empty_dir"
        model.mkdir()
    elif case == "n_zero":
        extra = ["--n", 0]
    elif case == "out_dir_missing":
        out = tmp_path / "no" / "such" / "r.parquet"
    elif case == "shard_bad":
        extra = ["--shard", "2/2"]
    result = _invoke("--model", model, "--prompts", prompts, "--out", out, "--engine", "hf", *extra)
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not out.exists()


def test_existing_output_is_refused_and_left_untouched(tmp_path, arith_prompts, tiny_model_dir):
    out = tmp_path / "r.parquet"
    out.write_bytes(b"precious")
    result = _invoke("--model", tiny_model_dir, "--prompts", arith_prompts, "--out", out, "--engine", "hf")
    assert result.exit_code == 2
    assert "--overwrite" in result.stderr and str(out) in result.stderr
    assert out.read_bytes() == b"precious"


def test_engine_vllm_without_vllm_installed_is_bad_input(tmp_path, arith_prompts, tiny_model_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    result = _invoke("--model", tiny_model_dir, "--prompts", arith_prompts, "--out", tmp_path / "r.parquet",
                     "--engine", "vllm")
    assert result.exit_code == 2 and "vllm is not installed" in result.stderr


# --- vLLM engine through a fake `vllm` module ---------------------------------------------------------------------


class FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.function_rpc = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")  # what the workers would inherit
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params))
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            completions = []
            for index in range(params.kwargs["n"]):
                stop = index % 2 == 0
                ids = [100 + index, 200, 2] if stop else [300 + index] * params.kwargs["max_tokens"]
                logprobs = [{token: SimpleNamespace(logprob=-0.25 * (k + 1)), 999: SimpleNamespace(logprob=-0.01)}
                            for k, token in enumerate(ids)]
                completions.append(SimpleNamespace(index=index, token_ids=tuple(ids), logprobs=logprobs,
                                                   finish_reason="stop" if stop else "length", text="(vllm text)"))
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=completions[::-1]))
        return outputs

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(("collective_rpc", method, kwargs))

    def apply_model(self, func):
        self.calls.append(("apply_model", func))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    @dataclasses.dataclass
    class EngineArgs:
        model: str = ""
        logprobs_mode: str = "raw_logprobs"

    module.LLM, module.SamplingParams, module.EngineArgs = FakeLLM, SamplingParams, EngineArgs
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    return module


def test_vllm_engine_calls_and_rows(fake_vllm, tmp_path, arith_prompts, tiny_model_dir):
    from stages.lm.engine import prompt_seed
    from stages.lm.models import load_tokenizer
    from stages.lm.prompts import encode, student_messages

    config = RolloutConfig(prompts=str(arith_prompts), out=str(tmp_path / "r.parquet"), model=str(tiny_model_dir),
                           n=2, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=11, engine="auto",
                           batch_size=4, progress=False)
    table, _ = read_artifact(run(config), "rollouts")
    (llm,) = FakeLLM.instances
    assert llm.kwargs["model"] == str(tiny_model_dir) and llm.kwargs["seed"] == 11
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = pq.read_table(arith_prompts).to_pylist()
    encoded = [encode(tokenizer, student_messages(p["problem"], p["few_shot"])) for p in prompts]
    assert llm.kwargs["max_model_len"] == max(map(len, encoded)) + 5
    generate_calls = [c for c in llm.calls if c[0] == "generate"]
    assert len(generate_calls) == 2  # batch 4 rows = 2 prompts × n 2 per call
    sent = [p["prompt_token_ids"] for c in generate_calls for p in c[1]]
    params = [p.kwargs for c in generate_calls for p in c[2]]
    assert sent == encoded
    assert params[0] == {"n": 2, "temperature": 0.8, "top_p": 0.9, "max_tokens": 5, "logprobs": 1,
                         "seed": prompt_seed(11, prompts[0]["prompt_id"])}
    rows = table.to_pylist()
    assert [r["sample_idx"] for r in rows] == [0, 1] * len(prompts)
    assert rows[0]["response_token_ids"] == [100, 200, 2] and rows[0]["finish_reason"] == "stop"
    assert rows[1]["response_token_ids"] == [301] * 5 and rows[1]["finish_reason"] == "length"
    assert rows[0]["sampling_logprobs"] == [-0.25, -0.5, -0.75]
    assert rows[0]["response_text"] == tokenizer.decode([100, 200, 2], skip_special_tokens=True)
    assert rows[0]["prompt_token_ids"] == encoded[0]
    assert read_metadata(tmp_path / "r.parquet")["engine"] == "vllm"


def test_vllm_load_weights_reloads_repacks_and_resets_cache(fake_vllm, tiny_model_dir):
    from stages.lm.engine_vllm import VLLMEngine, _repack_tied_lm_head

    engine = VLLMEngine(tiny_model_dir, dtype="float32", seed=0, max_model_len=64, device="cpu", inplace_sync=True)
    assert engine.llm.function_rpc == "1" and "VLLM_ALLOW_INSECURE_SERIALIZATION" not in os.environ
    assert engine.llm.kwargs["trust_remote_code"] is False
    engine.load_weights(tiny_model_dir)
    assert engine.llm.calls == [
        ("collective_rpc", "reload_weights", {"weights_path": str(tiny_model_dir)}),
        ("apply_model", _repack_tied_lm_head),
        ("reset_prefix_cache",),
    ]
    engine.close()
    assert engine.llm is None


def test_function_rpc_is_not_allowed_unless_the_engine_syncs_in_place(fake_vllm, tiny_model_dir):
    """VLLM_ALLOW_INSECURE_SERIALIZATION (pickled functions over vLLM's RPC) only for the in-place tied-head re-pack
    (issue 21): a plain engine's workers never see it, and such an engine refuses the in-place sync in one line."""
    from stages.lm.engine_vllm import VLLMEngine

    engine = VLLMEngine(tiny_model_dir, dtype="float32", seed=0, max_model_len=64, device="cpu")
    assert engine.llm.function_rpc is None
    with pytest.raises(RuntimeError, match="inplace_sync"):
        engine.load_weights(tiny_model_dir)


def test_cpu_environment_keeps_user_values(monkeypatch):
    from stages.lm import engine_vllm
    monkeypatch.setattr(engine_vllm.os, "environ", {"VLLM_CPU_KVCACHE_SPACE": "8"})
    assert engine_vllm.cpu_environment() == {"VLLM_CPU_KVCACHE_SPACE": "8"}


def test_vllm_without_logprobs_mode_still_runs(fake_vllm, tiny_model_dir):
    from stages.lm.engine_vllm import VLLMEngine

    fake_vllm.EngineArgs = dataclasses.make_dataclass("EngineArgs", [("model", str, "")])
    engine = VLLMEngine(tiny_model_dir, device="cpu")
    assert "logprobs_mode" not in engine.llm.kwargs and not engine.processed_logprobs


def test_auto_engine_is_hf_without_vllm(monkeypatch):
    from stages.lm.engine import resolve_engine

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert resolve_engine("auto") == "hf"


# --- the real embedded model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_writes_nonempty_answers(tmp_path, embedded_model_dir):
    from stages.data import run as prepare
    from stages.lm.datasets import PrepareConfig

    prompts = prepare(PrepareConfig(name="arith", out=str(tmp_path / "p.parquet"), num=2, seed=3))
    path = run(RolloutConfig(prompts=str(prompts), out=str(tmp_path / "r.parquet"), model=str(embedded_model_dir),
                             n=2, max_new_tokens=24, seed=0, threads=1, engine="hf", progress=False))
    table, _ = read_artifact(path, "rollouts")
    assert table.num_rows == 4
    assert all(text.strip() for text in table.column("response_text").to_pylist())


# --- a Hugging Face Hub id as --model ---------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(tmp_path, model_dir, repo_id="tiny-org/tiny-model"):
    """The Hub cache layout (models--ORG--NAME/refs/main, snapshots/COMMIT/…) holding `model_dir`'s files."""
    hub = tmp_path / "hub"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return hub


def test_a_hub_id_resolves_through_the_local_cache(tmp_path, arith_prompts, tiny_model_dir, monkeypatch):
    from stages.common.errors import InputError
    from stages.lm.models import model_revision, resolve_model

    hub = hub_cache_with(tmp_path, tiny_model_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hub / "models--tiny-org--tiny-model" / "snapshots" / COMMIT
    assert resolve_model("tiny-org/tiny-model") == snapshot
    assert resolve_model(f"tiny-org/tiny-model@{COMMIT}") == snapshot
    assert model_revision(snapshot) == model_revision(tiny_model_dir)
    out = tmp_path / "r.parquet"
    result = _invoke("--model", "tiny-org/tiny-model", "--prompts", arith_prompts, "--out", out, "--n", 2,
                     "--max-new-tokens", 3, "--engine", "hf", "--threads", 1)
    assert result.exit_code == 0, result.output
    with pytest.raises(InputError, match=r"--model other-org/absent: neither a folder nor in the Hugging Face cache "
                                         + re.escape(str(hub))):
        resolve_model("other-org/absent")
    missing = _invoke("--model", "other-org/absent", "--prompts", arith_prompts, "--out", tmp_path / "x.parquet")
    assert missing.exit_code == 2 and "other-org/absent" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.parquet").exists()


def base_model_copy(tmp_path, model_dir):
    """`model_dir` without its chat template (as a base model ships)."""
    bare = tmp_path / "base-model"
    shutil.copytree(model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = bare / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({k: v for k, v in json.loads(tokenizer_config.read_text()).items()
                                            if k != "chat_template"}))
    return bare


def test_a_model_without_a_chat_template_is_a_one_line_error(tmp_path, arith_prompts, tiny_model_dir):
    bare = base_model_copy(tmp_path, tiny_model_dir)
    result = _invoke("--model", bare, "--prompts", arith_prompts, "--out", tmp_path / "r.parquet", "--engine", "hf",
                     "--threads", 1)
    assert result.exit_code == 2, result.output
    assert "its tokenizer has no chat template" in result.stderr and str(bare) in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r.parquet").exists()


def test_num_is_the_same_option_as_max_prompts(tmp_path, arith_prompts, tiny_model_dir):
    out = tmp_path / "r.parquet"
    result = _invoke("--model", tiny_model_dir, "--prompts", arith_prompts, "--out", out, "--n", 2, "--num", 1,
                     "--max-new-tokens", 2, "--engine", "hf", "--threads", 1)
    assert result.exit_code == 0, result.output
    assert read_artifact(out, "rollouts")[0].num_rows == 2  # 1 prompt × 2 samples


def test_a_base_model_samples_with_the_plain_template_or_a_jinja_file(tmp_path, arith_prompts, tiny_model_dir):
    from stages.lm.models import load_tokenizer

    bare = base_model_copy(tmp_path, tiny_model_dir)
    mine = tmp_path / "mine.jinja"
    mine.write_text("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<<assistant>>{% endif %}")
    tokenizer = load_tokenizer(bare)
    for choice, marks in (("plain", ("Question: ", "Answer:")), (str(mine), ("<<user>> ", "<<assistant>>"))):
        out = tmp_path / f"{Path(choice).stem}.parquet"
        result = _invoke("--model", bare, "--prompts", arith_prompts, "--out", out, "--n", 1, "--num", 1,
                         "--max-new-tokens", 2, "--engine", "hf", "--threads", 1, "--chat-template", choice)
        assert result.exit_code == 0, result.output
        prompt = tokenizer.decode(read_artifact(out, "rollouts")[0].column("prompt_token_ids")[0].as_py())
        assert all(mark in prompt for mark in marks) and prompt.rstrip().endswith(marks[1])
    missing = _invoke("--model", bare, "--prompts", arith_prompts, "--out", tmp_path / "x.parquet",
                      "--chat-template", str(tmp_path / "absent.jinja"))
    assert missing.exit_code == 2 and "absent.jinja: no such file" in missing.stderr
