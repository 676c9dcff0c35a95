"""`antisd score` on the tiny random model: values vs a naive full-logits reference, order, shards, bad input."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

import schemas
from stages.common.io import build_metadata, read_artifact, read_metadata, write_artifact
from stages.lm.prompts import CORRECT_NOTE, INCORRECT_NOTE, encode, student_messages

# Two scoring paths reduce over the same V = 49152 logits (the real tokenizer's vocabulary) in different orders: other
# matmul and softmax shapes. An fp32 reduction's rounding error grows like a random walk, √V · ε relative, on values
# of size ln V ≈ 10.8 nats (a random-init model's log-probs and entropies); four times that bounds the tail:
# 4 · √49152 · 1.19e-7 · 10.8 ≈ 1.1e-3 nats. A wrong position, view or temperature moves them by more than 1e-2.
VOCAB = 49152
VOCAB_REDUCTION_ATOL = 4 * math.sqrt(VOCAB) * float(torch.finfo(torch.float32).eps) * math.log(VOCAB)
PMI_ATOL = 2 * VOCAB_REDUCTION_ATOL  # u is a difference of two such log-probs


FEW_SHOT = [{"user": "What is 3 + 4? Put the final answer in \\boxed{}.",
             "assistant": "3 + 4 = 7. The final answer is \\boxed{7}."}]

# (prompt_id, sample_idx, problem, response text, correct, privileged_source, privileged_text)
ROWS = [
    ("p-b", 0, "What is 21 + 34?", "21 + 34 = 55. The final answer is \\boxed{55}.", True, "peer",
     "21 + 34 = 55. So \\boxed{55}."),
    ("p-a", 0, "What is 10 + 15?", "10 + 15 = 26.", False, "reference", "10 + 15 = 25. The answer is \\boxed{25}."),
    ("p-b", 1, "What is 21 + 34?", "The sum is 54, \\boxed{54}", False, "peer", "21 + 34 = 55. So \\boxed{55}."),
    ("p-c", 0, "What is 40 + 41?", "Let me think. 40 + 41 = 81, so the answer is \\boxed{81}.", True, "none", None),
    ("p-a", 1, "What is 10 + 15?", "Hmm.", False, "reference", "10 + 15 = 25. The answer is \\boxed{25}."),
    ("p-c", 1, "What is 40 + 41?", "", False, "none", None),  # an empty response is scored as zero tokens
]


def verified_table(tokenizer, rows=ROWS, response_ids=None) -> pa.Table:
    """A schemas.VERIFIED table; response ids come from tokenizing the response text with the model's tokenizer."""
    records = []
    for index, (prompt_id, sample_idx, problem, text, correct, source, privileged) in enumerate(rows):
        ids = response_ids[index] if response_ids else tokenizer(text, add_special_tokens=False)["input_ids"]
        records.append({
            "prompt_id": prompt_id, "dataset": "arith", "problem": problem, "answer": "0", "solution": None,
            "few_shot": FEW_SHOT, "sample_idx": sample_idx,
            "prompt_token_ids": encode(tokenizer, student_messages(problem, FEW_SHOT)),
            "response_token_ids": ids, "response_text": text, "sampling_logprobs": [0.0] * len(ids),
            "finish_reason": "stop", "response_length": len(ids), "extracted_answer": None,
            "reward": float(correct), "correct": correct, "verify_status": "ok", "group_size": 2,
            "group_mean_reward": 0.5, "privileged_text": privileged, "privileged_source": source,
            "peer_sample_idx": 1 - sample_idx if source == "peer" else None,
        })
    return pa.Table.from_pylist(records, schema=schemas.VERIFIED)


def write_verified(path, table, temperature=1.0):
    meta = build_metadata("verified", {"test": True}, rollout={"config": {"temperature": temperature}})
    return write_artifact(table, path, "verified", meta)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from stages.lm.models import load_model

    return load_model(tiny_model_dir)


@pytest.fixture
def verified(tmp_path, tiny):
    return write_verified(tmp_path / "verified.parquet", verified_table(tiny.tokenizer))


@pytest.fixture
def scored(tmp_path, tiny, verified):
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    out = run(ScoreConfig(verified=str(verified), out=str(tmp_path / "scored.parquet"), model=str(tiny.path)),
              loaded=tiny)
    table, meta = read_artifact(out, "scored")
    return table.to_pylist(), meta


def _naive(model, prompt_ids, response_ids, temperature=1.0):
    from stages.lm.logprobs import naive_response_token_stats

    with torch.inference_mode():
        lp, ent = naive_response_token_stats(model, [prompt_ids + response_ids], [len(prompt_ids)],
                                             temperature=temperature)
    return lp[0].tolist(), ent[0].tolist()


def _teacher_ids(tokenizer, row):
    from stages.lm.prompts import teacher_messages

    return encode(tokenizer, teacher_messages(row["problem"], row["few_shot"], row["privileged_text"], row["correct"]))


def test_logprobs_match_naive_full_logits(scored, tiny):
    rows, _ = scored
    for row in rows:
        lp, ent = _naive(tiny.model, row["prompt_token_ids"], row["response_token_ids"])
        np.testing.assert_allclose(row["student_logprobs"], lp, rtol=0, atol=VOCAB_REDUCTION_ATOL)
        np.testing.assert_allclose(row["student_entropy"], ent, rtol=0, atol=VOCAB_REDUCTION_ATOL)
        if row["privileged_source"] != "none":
            lp, ent = _naive(tiny.model, _teacher_ids(tiny.tokenizer, row), row["response_token_ids"])
            np.testing.assert_allclose(row["teacher_logprobs"], lp, rtol=0, atol=VOCAB_REDUCTION_ATOL)
            np.testing.assert_allclose(row["teacher_entropy"], ent, rtol=0, atol=VOCAB_REDUCTION_ATOL)
        assert len(row["student_logprobs"]) == row["response_length"]


def test_entropy_is_full_vocabulary_nats(scored, tiny):
    rows, _ = scored
    values = np.concatenate([r["teacher_entropy"] for r in rows])
    assert (values > 0).all() and (values <= math.log(len(tiny.tokenizer)) + 1e-4).all()


def test_teacher_prompt_holds_privileged_text_and_assessment(tiny):
    from stages.lm.scoring import build_views

    rows = verified_table(tiny.tokenizer).to_pylist()
    views = {(v.row, v.teacher): v for v in build_views(rows, tiny.tokenizer)}
    for index, row in enumerate(rows):
        if row["privileged_source"] == "none":
            assert (index, True) not in views
            continue
        text = tiny.tokenizer.decode(views[(index, True)].prompt_ids)
        assert row["privileged_text"] in text and row["problem"] in text
        assert (CORRECT_NOTE if row["correct"] else INCORRECT_NOTE) in text
        assert views[(index, True)].response_ids == row["response_token_ids"]


def test_teacher_prompt_length_is_recorded(scored, tiny):
    rows, _ = scored
    for row in rows:
        want = len(row["prompt_token_ids"]) if row["privileged_source"] == "none" else len(_teacher_ids(tiny.tokenizer, row))
        assert row["teacher_prompt_length"] == want


def test_pmi_is_teacher_minus_student(scored):
    rows, _ = scored
    for row in rows:
        want = np.float32(row["teacher_logprobs"]) - np.float32(row["student_logprobs"])
        assert np.array_equal(np.float32(row["pmi"]), want)
    assert any(abs(u) > 1e-3 for row in rows for u in row["pmi"])  # the teacher view really differs


def test_source_none_gets_zero_pmi_and_student_values(scored):
    rows, _ = scored
    none_rows = [r for r in rows if r["privileged_source"] == "none"]
    assert len(none_rows) == 2
    for row in none_rows:
        assert row["pmi"] == [0.0] * row["response_length"]
        assert row["teacher_logprobs"] == row["student_logprobs"]
        assert row["teacher_entropy"] == row["student_entropy"]


def test_median_in_metadata_equals_recomputation(scored):
    rows, meta = scored
    pool = np.concatenate([r["teacher_entropy"] for r in rows if r["privileged_source"] != "none"])
    assert meta["median_teacher_entropy"] == pytest.approx(float(np.median(pool.astype(np.float64))), abs=1e-6)
    assert meta["teacher_entropy_tokens"] == len(pool)
    assert meta["privileged_sources"] == {"peer": 2, "reference": 2, "none": 2}
    assert meta["response_tokens"] == sum(r["response_length"] for r in rows)
    assert meta["tokens_per_s"] > 0 and meta["model_revision"] and meta["temperature"] == 1.0


def test_output_order_is_input_order(scored, verified):
    rows, _ = scored
    table, _ = read_artifact(verified, "verified")
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == list(
        zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))


def test_micro_batch_budget_does_not_change_values(tmp_path, tiny, verified, scored):
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    rows, _ = scored
    out = run(ScoreConfig(verified=str(verified), out=str(tmp_path / "one.parquet"), micro_batch_tokens=1,
                          chunk_size=3, share_prefix=False), loaded=tiny)
    other, meta = read_artifact(out, "scored")
    assert meta["micro_batches"] == 10  # 6 student + 4 teacher views, one per batch
    for a, b in zip(rows, other.to_pylist()):
        for column in ("student_logprobs", "teacher_logprobs", "teacher_entropy", "student_entropy", "pmi"):
            atol = PMI_ATOL if column == "pmi" else VOCAB_REDUCTION_ATOL
            np.testing.assert_allclose(a[column], b[column], rtol=0, atol=atol)


SCORED_COLUMNS = ("student_logprobs", "teacher_logprobs", "teacher_entropy", "student_entropy", "pmi",
                  "teacher_prompt_length")


@pytest.mark.parametrize("budget", [100_000, 200, 1])  # one unit per group; split units; one view per pass
def test_the_shared_prefix_path_equals_full_sequences_on_every_column(tmp_path, tiny, verified, budget):
    """Uneven groups (2 views, teacher prompts of different lengths, an empty response), padding, splits."""
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    outputs = {}
    for share in (True, False):
        out = run(ScoreConfig(verified=str(verified), out=str(tmp_path / f"{share}-{budget}.parquet"),
                              micro_batch_tokens=budget, chunk_size=5, share_prefix=share), loaded=tiny)
        outputs[share] = read_artifact(out, "scored")
    (shared, shared_meta), (full, full_meta) = outputs[True], outputs[False]
    for a, b in zip(shared.to_pylist(), full.to_pylist()):
        for column in SCORED_COLUMNS:
            atol = PMI_ATOL if column == "pmi" else VOCAB_REDUCTION_ATOL
            np.testing.assert_allclose(a[column], b[column], rtol=0, atol=atol)
    assert shared_meta["sequence_tokens"] == full_meta["sequence_tokens"]
    if budget > 1:
        assert shared_meta["forward_tokens"] < full_meta["forward_tokens"]  # the prompts ran once per group


def test_without_the_teacher_pass_the_teacher_columns_repeat_the_students(tmp_path, tiny, verified):
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    out = run(ScoreConfig(verified=str(verified), out=str(tmp_path / "s.parquet"), teacher=False), loaded=tiny)
    table, meta = read_artifact(out, "scored")
    assert meta["teacher"] is False and meta["median_teacher_entropy"] is None
    for row in table.to_pylist():
        assert row["teacher_logprobs"] == row["student_logprobs"] and set(row["pmi"]) <= {0.0}
        assert row["teacher_prompt_length"] == len(row["prompt_token_ids"])


def test_micro_batches_respect_budget_and_sort():
    from stages.lm.scoring import View, micro_batches

    views = [View(i, False, [1] * n, [2]) for i, n in enumerate([5, 2, 9, 3, 3, 1])]
    batches = micro_batches(views, budget=12)
    assert [[v.row for v in b] for b in batches] == [[2], [0, 3], [4, 1, 5]]
    assert all(len(b) * b[0].length <= 12 for b in batches)
    assert sorted(v.row for b in batches for v in b) == list(range(6))


def test_shard_parts_cover_all_rows(tmp_path, tiny, verified, scored):
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    rows, _ = scored
    parts = tmp_path / "parts"
    for index in range(2):
        run(ScoreConfig(verified=str(verified), out=str(parts), shard=f"{index}/2"), loaded=tiny)
    merged, _ = read_artifact(parts, "scored")
    by_key = {(r["prompt_id"], r["sample_idx"]): r for r in merged.to_pylist()}
    assert sorted(by_key) == sorted((r["prompt_id"], r["sample_idx"]) for r in rows)
    for row in rows:
        np.testing.assert_allclose(by_key[(row["prompt_id"], row["sample_idx"])]["pmi"], row["pmi"], atol=PMI_ATOL)


def test_temperature_from_input_metadata(tmp_path, tiny):
    from stages.lm.scoring import ScoreConfig, metadata_temperature
    from stages.score import run

    assert metadata_temperature({"config": {"x": 1}, "rollout": {"config": {"temperature": 0.7}}}) == 0.7
    assert metadata_temperature({"config": {"temperature": 0.0}}) is None  # greedy: no softmax temperature
    path = write_verified(tmp_path / "v.parquet", verified_table(tiny.tokenizer, ROWS[:1]), temperature=2.0)
    out = run(ScoreConfig(verified=str(path), out=str(tmp_path / "s.parquet")), loaded=tiny)
    row = read_artifact(out, "scored")[0].to_pylist()[0]
    assert read_metadata(out)["temperature"] == 2.0
    lp, _ = _naive(tiny.model, row["prompt_token_ids"], row["response_token_ids"], temperature=2.0)
    np.testing.assert_allclose(row["student_logprobs"], lp, rtol=0, atol=VOCAB_REDUCTION_ATOL)


def test_cli_scores_and_prints_path(tmp_path, tiny, verified):
    from antisd_cli.main import cli

    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(cli, ["score", "--verified", str(verified), "--model", str(tiny.path), "--out",
                                      str(out), "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert read_artifact(out, "scored")[0].num_rows == len(ROWS)


def test_score_in_a_log_file_writes_progress_records_and_no_blank_lines(tmp_path, tiny, verified, caplog, capfd):
    """Off a terminal (a Slurm log): a progress record in tokens, no bar's blank line or carriage return on stderr,
    and the median entropy with 4 significant digits."""
    import logging

    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    with caplog.at_level(logging.INFO):
        run(ScoreConfig(verified=str(verified), out=str(tmp_path / "s.parquet"), model=str(tiny.path)), loaded=tiny)
    stderr = capfd.readouterr().err
    assert "\n\n" not in stderr and "\r" not in stderr and not stderr.startswith("\n")
    progress = [r.getMessage() for r in caplog.records if r.name == "stages.common.progress"]
    assert len(progress) == 1 and progress[0].startswith("score: ") and "tokens (100 %)" in progress[0]
    (wrote,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    median = read_metadata(tmp_path / "s.parquet")["median_teacher_entropy"]
    assert f"median teacher entropy {median:.4g} nats" in wrote and str(median) not in wrote


# --- which model scores ------------------------------------------------------------------------------------------

def _sampled_by(path, tiny, model: str):
    """A verified file whose rows are as `model`'s rollouts would be: sampling log-probs = the tiny model's own
    (temperature 1, no top-p), and the rollouts' metadata naming `model`."""
    table = verified_table(tiny.tokenizer, ROWS[:3])
    sampling = [_naive(tiny.model, p, r)[0] for p, r in zip(table.column("prompt_token_ids").to_pylist(),
                                                               table.column("response_token_ids").to_pylist())]
    table = table.set_column(table.schema.get_field_index("sampling_logprobs"), "sampling_logprobs",
                             pa.array(sampling, pa.list_(pa.float32())))
    rollouts = build_metadata("rollouts", {"temperature": 1.0}, model=model, sampling={"top_p": 1.0})
    return write_artifact(table, path, "verified", build_metadata("verified", {}, rollouts_metadata=rollouts))


def test_score_without_model_scores_with_the_model_the_rollouts_record(tmp_path, tiny):
    from antisd_cli.main import cli

    path = _sampled_by(tmp_path / "v.parquet", tiny, str(tiny.path))
    result = CliRunner().invoke(cli, ["score", "--verified", str(path), "--out", str(tmp_path / "s.parquet"),
                                      "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    meta = read_metadata(tmp_path / "s.parquet")
    assert meta["model"] == str(tiny.path) and meta["config"]["model"] == str(tiny.path)
    assert meta["logprob_mismatch_mean"] < 1e-4 and "differ from the rollouts' sampling" not in result.stderr


def test_scoring_with_another_model_warns_above_the_mismatch_limit(tmp_path, tiny, embedded_model_dir):
    from antisd_cli.main import cli
    from stages.method.losses import logprob_mismatch_limit

    assert logprob_mismatch_limit() == pytest.approx(math.log(2))  # a factor 2: update.is_cap's
    assert logprob_mismatch_limit(0.95) == pytest.approx(math.log(2) - math.log(0.95))  # + top-p's largest shift
    path = _sampled_by(tmp_path / "v.parquet", tiny, str(tiny.path))
    result = CliRunner().invoke(cli, ["score", "--verified", str(path), "--out", str(tmp_path / "s.parquet"),
                                      "--model", str(embedded_model_dir), "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    mismatch = read_metadata(tmp_path / "s.parquet")["logprob_mismatch_mean"]
    assert mismatch > math.log(2)
    assert "differ from the rollouts' sampling log-probs" in result.stderr and str(tiny.path) in result.stderr


def test_score_without_model_on_rollouts_that_record_none_is_refused(tmp_path, tiny, verified):
    from antisd_cli.main import cli

    result = CliRunner().invoke(cli, ["score", "--verified", str(verified), "--out", str(tmp_path / "s.parquet")])
    assert result.exit_code == 2 and "records no model" in result.stderr and "--model" in result.stderr


# --- bad input ----------------------------------------------------------------------------------------------------

def test_token_id_outside_vocabulary_exits_2_naming_the_row(tmp_path, tiny):
    from antisd_cli.main import cli

    ids = [tiny.tokenizer("ok", add_special_tokens=False)["input_ids"] for _ in ROWS]
    ids[2] = ids[2] + [len(tiny.tokenizer) + 5]
    path = write_verified(tmp_path / "v.parquet", verified_table(tiny.tokenizer, response_ids=ids))
    out = tmp_path / "s.parquet"
    result = CliRunner().invoke(cli, ["score", "--verified", str(path), "--model", str(tiny.path), "--out", str(out)])
    assert result.exit_code == 2
    assert "row 2" in result.stderr and "'p-b'" in result.stderr and "vocabulary" in result.stderr
    assert not out.exists()


def test_verified_file_without_privileged_columns_exits_2(tmp_path, tiny):
    from antisd_cli.main import cli

    table = verified_table(tiny.tokenizer).drop_columns(["privileged_text", "privileged_source", "peer_sample_idx"])
    path = tmp_path / "v.parquet"
    write_artifact(table, path, "verified-without-privileged", build_metadata("verified", {}))
    result = CliRunner().invoke(cli, ["score", "--verified", str(path), "--model", str(tiny.path), "--out",
                                      str(tmp_path / "s.parquet")])
    assert result.exit_code == 2
    assert "privileged_text" in result.stderr and str(path) in result.stderr


def test_rollouts_file_is_refused(tmp_path, tiny):
    from antisd_cli.main import cli

    table = verified_table(tiny.tokenizer).select([f.name for f in schemas.ROLLOUTS])
    path = write_artifact(table, tmp_path / "r.parquet", "rollouts", build_metadata("rollouts", {}))
    result = CliRunner().invoke(cli, ["score", "--verified", str(path), "--model", str(tiny.path), "--out",
                                      str(tmp_path / "s.parquet")])
    assert result.exit_code == 2 and "rollouts file" in result.stderr


def test_nan_logprobs_stop_with_row_and_write_nothing(tmp_path, tiny, verified):
    from antisd_cli.main import cli

    poisoned = copy.deepcopy(tiny.model)
    with torch.no_grad():
        poisoned.model.norm.weight[0] = float("nan")
    folder = tmp_path / "poisoned"
    poisoned.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    out = tmp_path / "s.parquet"
    result = CliRunner().invoke(cli, ["score", "--verified", str(verified), "--model", str(folder), "--out", str(out)])
    assert result.exit_code == 1
    assert "non-finite" in result.stderr and "prompt_id" in result.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["--chunk-size", "0"], "--chunk-size"),
    (["--micro-batch-tokens", "0"], "--micro-batch-tokens"),
    (["--temperature", "0"], "--temperature"),
    (["--shard", "3/2"], "--shard"),
])
def test_bad_options_exit_2(tmp_path, verified, args, message):
    from antisd_cli.main import cli

    result = CliRunner().invoke(cli, ["score", "--verified", str(verified), "--out", str(tmp_path / "s.parquet"),
                                      *args])
    assert result.exit_code == 2 and message in result.stderr


def test_existing_output_needs_overwrite(tmp_path, tiny, verified, scored):
    from stages.common.errors import InputError
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    config = ScoreConfig(verified=str(verified), out=str(tmp_path / "scored.parquet"))
    with pytest.raises(InputError, match="overwrite"):
        run(config, loaded=tiny)
    assert run(replace(config, overwrite=True), loaded=tiny).exists()


# --- the frozen reference (update --kl-coef) ----------------------------------------------------------------------

def test_reference_of_the_same_weights_equals_student_logprobs(tmp_path, tiny, verified, scored):
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    rows, meta = scored
    assert "ref_logprobs" not in rows[0] and meta["reference_model"] is None  # no --reference: no column
    out = run(ScoreConfig(verified=str(verified), out=str(tmp_path / "ref.parquet"), reference=str(tiny.path)),
              loaded=tiny)  # the reference is loaded from disk: a second copy of the same weights
    table, meta = read_artifact(out, "scored")
    assert table.schema.field("ref_logprobs").type == pa.list_(pa.float32())
    assert meta["reference_model"] == str(tiny.path) and meta["reference_revision"] == tiny.revision
    for row, before in zip(table.to_pylist(), rows):
        assert len(row["ref_logprobs"]) == row["response_length"]
        np.testing.assert_allclose(row["ref_logprobs"], row["student_logprobs"], rtol=0, atol=1e-6)
        assert row["student_logprobs"] == before["student_logprobs"]  # the policy's columns do not change


def test_reference_of_other_weights_differs_and_rescoring_drops_it(tmp_path, tiny, verified, embedded_model_dir):
    from stages.lm.models import load_model, make_tiny_model
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    other = load_model(make_tiny_model(tmp_path / "other", embedded_model_dir, seed=1))
    temperature_two = write_verified(tmp_path / "v2.parquet", verified_table(tiny.tokenizer), temperature=2.0)
    out = run(ScoreConfig(verified=str(temperature_two), out=str(tmp_path / "ref.parquet"), reference=str(other.path)),
              loaded=tiny, reference_loaded=other)
    rows = read_artifact(out, "scored")[0].to_pylist()
    for row in rows:  # log π_ref of the student view, at the policy's temperature
        lp, _ = _naive(other.model, row["prompt_token_ids"], row["response_token_ids"], temperature=2.0)
        np.testing.assert_allclose(row["ref_logprobs"], lp, rtol=0, atol=VOCAB_REDUCTION_ATOL)
    assert max(abs(a - b) for r in rows for a, b in zip(r["ref_logprobs"], r["student_logprobs"])) > 1e-2
    again = run(ScoreConfig(verified=str(out), out=str(tmp_path / "again.parquet")), loaded=tiny)
    assert "ref_logprobs" not in read_artifact(again, "scored")[0].column_names  # a stale column is not carried


def test_cli_reference_option_and_bad_reference(tmp_path, tiny, verified):
    from antisd_cli.main import cli

    out = tmp_path / "cli.parquet"
    args = ["score", "--verified", str(verified), "--model", str(tiny.path), "--out", str(out), "--threads", "1"]
    result = CliRunner().invoke(cli, [*args, "--reference", str(tiny.path)])
    assert result.exit_code == 0, result.stderr
    assert "ref_logprobs" in read_artifact(out, "scored")[0].column_names
    missing = CliRunner().invoke(cli, [*args, "--overwrite", "--reference", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "--reference" in missing.stderr and len(missing.stderr.splitlines()) == 1


# --- the model's own logits processing (soft-capping families) and the refusal of unknown ones ---------------------

def _tiny_gemma2(softcap: float | None):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                          final_logit_softcapping=softcap)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # logits of a few units, so that a soft-cap of 0.5 matters
        model.lm_head.weight.mul_(50.0)
    return model


def test_a_soft_capping_family_is_scored_through_its_own_logits():
    from stages.lm.logprobs import check_logits_path, naive_response_token_stats, response_token_stats

    model = _tiny_gemma2(softcap=0.5)
    sequences = [[2, 651, 1030, 4400, 17, 9], [2, 88, 1500, 3]]
    with torch.no_grad():
        ours, ours_h = response_token_stats(model, sequences, [2, 1])
        reference, reference_h = naive_response_token_stats(model, sequences, [2, 1])  # through model(...).logits
        uncapped = torch.log_softmax(model.lm_head(model.model(torch.tensor([sequences[0]])).last_hidden_state), -1)
    for mine, theirs in zip(ours + ours_h, reference + reference_h):  # capped logits: near-uniform over VOCAB
        torch.testing.assert_close(mine, theirs, rtol=0, atol=VOCAB_REDUCTION_ATOL)
    raw = uncapped[0, 1:-1].gather(-1, torch.tensor(sequences[0][2:])[:, None]).squeeze(-1)
    assert float((raw - ours[0]).abs().max()) > 0.05  # the cap changes the numbers: the test is not vacuous
    check_logits_path(model, "--model gemma2")


def test_a_model_that_post_processes_its_logits_unseen_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.common.errors import InputError
    from stages.lm.models import checked_logits_path

    class Tempered(LlamaForCausalLM):  # any family whose forward changes the logits after the LM head
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    plain = LlamaForCausalLM(config).eval()
    checked_logits_path(plain, "--model plain")  # the same body without the change passes
    tempered = Tempered(config).eval()
    tempered.load_state_dict(plain.state_dict())
    with torch.no_grad():
        tempered.lm_head.weight.mul_(50.0)
    with pytest.raises(InputError, match=r"--model tempered: its forward post-processes the logits .*Tempered"):
        checked_logits_path(tempered, "--model tempered")


def test_the_teacher_instruction_is_an_option_and_empty_leaves_it_out():
    from stages.lm import prompts

    default = prompts.teacher_user_text("P?", "sol", correct=True)
    assert default.endswith("Previous assessment: Your answer is correct.\nNow solve this problem step by step.")
    assert prompts.teacher_user_text("P?", "sol", True, "Think.").endswith("Your answer is correct.\nThink.")
    assert prompts.teacher_user_text("P?", "sol", True, "").endswith("Previous assessment: Your answer is correct.")


def test_score_teacher_instruction_changes_only_the_teacher_view(tiny):
    from stages.lm.scoring import build_views

    rows = [{"problem": "What is 1 + 1?", "few_shot": [], "privileged_text": "1 + 1 = 2", "correct": True,
             "privileged_source": "peer", "prompt_token_ids": [1, 2, 3], "response_token_ids": [4, 5]}]
    plain = build_views(rows, tiny.tokenizer, instruction="")
    default = build_views(rows, tiny.tokenizer)
    assert plain[0] == default[0]  # the student view
    text = tiny.tokenizer.decode(default[1].prompt_ids)
    assert "Now solve this problem step by step." in text
    assert "Now solve" not in tiny.tokenizer.decode(plain[1].prompt_ids)


def test_suffixes_of_very_different_lengths_run_in_passes_with_the_full_sequence_numbers(tiny):
    from stages.lm.logprobs import response_token_stats
    from stages.lm.shared_prefix import length_buckets, share, shared_prefix_token_stats

    prompt, responses = list(range(5, 25)), [list(range(30, 70)), [7, 8, 9], [11, 12, 13, 14], [15]]
    unit = share([prompt] * 4, responses)
    assert length_buckets([len(s) for s in unit.suffixes]) == [[0], [2, 1], [3]]  # three passes, longest first
    assert unit.tokens == 20 + 40 + 2 * 4 + 1  # not 20 + 4 × 40
    model = tiny.model
    results = {}
    for shared in (True, False):
        model.zero_grad()
        if shared:
            logprobs, entropies = shared_prefix_token_stats(model, unit)
        else:
            logprobs, entropies = response_token_stats(model, [prompt + r for r in responses], [len(prompt)] * 4,
                                                       pad_id=0, temperature=1.0, with_entropy=True)
        sum(lp.sum() for lp in logprobs).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[shared] = ([lp.detach() for lp in logprobs], [h.detach() for h in entropies], grads)
    model.zero_grad()
    for a, b in zip(results[True][0] + results[True][1], results[False][0] + results[False][1]):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5  # float32 sums in other orders: ~1e-6
    for name, full in results[False][2].items():
        scale = float(full.abs().max())
        assert float((results[True][2][name] - full).abs().max()) <= 1e-5 * max(scale, 1e-12), name


def test_the_scored_file_keeps_what_the_teacher_saw_and_inspect_shows_both_views(tmp_path, tiny, verified,
                                                                                   tiny_model_dir):
    from click.testing import CliRunner

    from antisd_cli.main import cli
    from stages.lm.scoring import ScoreConfig
    from stages.score import run

    scored = run(ScoreConfig(verified=str(verified), out=str(tmp_path / "s.parquet"), model=str(tiny.path)),
                 loaded=tiny)
    rows = read_artifact(scored, "scored")[0].to_pylist()
    with_teacher = [i for i, r in enumerate(rows) if r["privileged_source"] != "none"]
    assert with_teacher and all(rows[i]["teacher_prompt_token_ids"] for i in with_teacher)
    for row in rows:
        ids = row["teacher_prompt_token_ids"]
        assert (ids is None) == (row["privileged_source"] == "none")
        assert ids is None or len(ids) == row["teacher_prompt_length"]
    index = with_teacher[0]
    result = CliRunner().invoke(cli, ["inspect", str(scored), "--row", str(index), "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    for fragment in ("student prompt", "teacher prompt", "Now solve this problem step by step.", "u = t − s",
                     rows[index]["problem"]):
        assert fragment in result.stdout, fragment


def test_a_system_prompt_and_thinking_reach_both_views(tmp_path, tiny_model_dir, arith_prompts):
    """rollout renders the student view with the chat options; score reads them back from the metadata chain and
    renders the teacher view the same way; enable_thinking goes to the template as a keyword."""
    from stages import rollout, verify
    from stages.lm.models import load_tokenizer
    from stages.lm.prompts import ChatOptions
    from stages.lm.sampling import RolloutConfig
    from stages.lm.scoring import ScoreConfig, metadata_chat
    from stages.score import run as score_run
    from stages.verifier.rows import VerifyConfig

    system = "You are a careful arithmetic tutor."
    rolled = rollout.run(RolloutConfig(prompts=str(arith_prompts), out=str(tmp_path / "r.parquet"),
                                       model=str(tiny_model_dir), n=2, max_new_tokens=3, engine="hf", threads=1,
                                       system_prompt=system, thinking="off", progress=False))
    verified = verify.run(VerifyConfig(rollouts=str(rolled), out=str(tmp_path / "v.parquet"), workers=1))
    scored = score_run(ScoreConfig(model=str(tiny_model_dir), verified=str(verified), out=str(tmp_path / "s.parquet"),
                                   threads=1))
    table, metadata = read_artifact(scored, "scored")
    assert metadata_chat(metadata) == ChatOptions(system, "off")
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = table.to_pylist()
    assert all(tokenizer.decode(r["prompt_token_ids"]).count(system) == 1 for r in rows)
    teacher = [r for r in rows if r["privileged_source"] != "none"]
    assert teacher and all(system in tokenizer.decode(r["teacher_prompt_token_ids"]) for r in teacher)

    seen = []

    class Recording:  # a tokenizer that records what the template was asked
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, **kwargs):
            seen.append((messages[0], kwargs.get("enable_thinking")))
            return [1, 2]

    for thinking, expected in (("on", True), ("off", False), ("default", None)):
        encode(Recording(), student_messages("2 + 2?"), ChatOptions("S", thinking))
        assert seen[-1] == ({"role": "system", "content": "S"}, expected)


def test_chat_options_round_trip_through_a_scored_files_metadata():
    from stages.lm.prompts import PLAIN_TEMPLATE, ChatOptions
    from stages.lm.scoring import metadata_chat

    options = ChatOptions.from_knobs({"system_prompt": "S", "thinking": "on", "chat_template": "plain"})
    assert options == ChatOptions("S", "on", PLAIN_TEMPLATE)
    # a rescoring reads the scored file's own record first, which keeps the template's text (no file needed)
    assert metadata_chat({"chat": options.record(), "verified": {"config": {"chat_template": "/gone.jinja"}}}) == options
    assert metadata_chat({"config": {"teacher": True}}) == ChatOptions()  # files from before these options


def test_an_answer_instruction_reaches_both_views(tmp_path, tiny_model_dir, arith_prompts):
    from stages import rollout, verify
    from stages.lm.models import load_tokenizer
    from stages.lm.prompts import INSTRUCTION
    from stages.lm.sampling import RolloutConfig
    from stages.lm.scoring import ScoreConfig
    from stages.score import run as score_run
    from stages.verifier.rows import VerifyConfig

    mine = "Give the result on the last line as 'Answer: N'."
    rolled = rollout.run(RolloutConfig(prompts=str(arith_prompts), out=str(tmp_path / "r.parquet"),
                                       model=str(tiny_model_dir), n=2, max_new_tokens=3, engine="hf", threads=1,
                                       answer_instruction=mine, progress=False))
    verified = verify.run(VerifyConfig(rollouts=str(rolled), out=str(tmp_path / "v.parquet"), workers=1))
    scored = score_run(ScoreConfig(model=str(tiny_model_dir), verified=str(verified), out=str(tmp_path / "s.parquet"),
                                   threads=1))
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = read_artifact(scored, "scored")[0].to_pylist()
    for row in rows:
        student = tokenizer.decode(row["prompt_token_ids"])
        last_user = student.rsplit(row["problem"], 1)[1]  # the problem's own turn (few-shot turns keep theirs)
        assert mine in last_user and INSTRUCTION not in last_user
        if row["privileged_source"] != "none":
            assert f"{row['problem']} {mine}" in tokenizer.decode(row["teacher_prompt_token_ids"])
