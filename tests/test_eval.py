"""`antisd eval` and the loop's evaluate_for_loop, end to end on the tiny random model (structure, not accuracy)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import loop_stages

from antisd_cli.main import cli
from stages import eval as eval_stage
from stages.common.io import read_artifact, read_metadata

TINY = dict(n=2, max_new_tokens=8, num=3, engine="hf", threads=1, workers=1, bootstrap_resamples=200,
            progress=False)


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory, tiny_model_dir):
    """One eval of 3 arith problems × 2 samples × 8 tokens; (rows path, config)."""
    out = tmp_path_factory.mktemp("eval") / "eval.parquet"
    config = eval_stage.EvalConfig(benchmark="arith", out=str(out), model=str(tiny_model_dir), seed=3, **TINY)
    return eval_stage.run(config), config


def test_eval_writes_one_verified_row_per_sample(tiny_eval):
    path, _ = tiny_eval
    table, metadata = read_artifact(path, "verified")
    assert table.num_rows == 3 * 2
    assert metadata["artifact"] == "verified"
    assert all(length <= 8 for length in table.column("response_length").to_pylist())
    assert set(table.column("group_size").to_pylist()) == {2}


def test_eval_metadata_temperature_is_the_sampling_temperature(tiny_eval):
    from stages.lm.scoring import metadata_temperature

    path, config = tiny_eval
    assert metadata_temperature(read_metadata(path)) == config.protocol("arith").temperature == 0.7


def test_eval_rows_carry_verify_privileged_contexts(tiny_eval):
    path, _ = tiny_eval
    rows = read_artifact(path, "verified")[0].to_pylist()
    for row in rows:  # arith problems all have a reference solution, so no row is left without a context
        peer_correct = any(other["correct"] for other in rows
                           if other["prompt_id"] == row["prompt_id"] and other["sample_idx"] != row["sample_idx"])
        assert row["privileged_source"] == ("peer" if peer_correct else "reference")
        assert row["privileged_text"]


def test_eval_problems_are_the_first_of_the_test_split(tiny_eval):
    from stages.lm.datasets import PrepareConfig, build_rows

    path, _ = tiny_eval
    expected = [row["prompt_id"] for row in build_rows(PrepareConfig(name="arith", out="", split="test", num=3))]
    table, _ = read_artifact(path, "verified")
    assert table.column("prompt_id").to_pylist() == [p for p in expected for _ in range(2)]
    assert table.column("sample_idx").to_pylist() == [0, 1] * 3


def test_eval_summary_keys_and_counts_match_rows(tiny_eval):
    path, _ = tiny_eval
    summary = json.loads(eval_stage.summary_path(path).read_text())
    assert eval_stage.summary_path(path).name == "eval.summary.json"
    for key in ("accuracy", "avg@2", "pass@1", "pass@2", "maj@2", "accuracy_ci_low", "accuracy_ci_high",
                "length_mean", "truncated_frac", "no_answer_frac", "problems", "samples", "n", "correct",
                "benchmark", "model", "sampling", "verify_status_counts", "verifier", "correct_per_problem"):
        assert key in summary, key
    table, _ = read_artifact(path, "verified")
    assert summary["problems"] == 3 and summary["samples"] == 6 and summary["n"] == 2
    assert summary["correct"] == sum(table.column("correct").to_pylist())
    assert summary["accuracy"] == pytest.approx(summary["correct"] / 6)
    assert summary["accuracy_ci_low"] <= summary["accuracy"] <= summary["accuracy_ci_high"]
    assert summary["length_mean"] == pytest.approx(sum(table.column("response_length").to_pylist()) / 6)
    truncated = sum(r == "length" for r in table.column("finish_reason").to_pylist())
    assert summary["truncated_frac"] == pytest.approx(truncated / 6)
    assert sum(summary["verify_status_counts"].values()) == 6
    assert summary["sampling"]["top_p"] == 0.95 and summary["sampling"]["temperature"] == 0.7
    assert read_metadata(path)["eval"]["accuracy"] == summary["accuracy"]
    assert sum(summary["correct_per_problem"].values()) == summary["correct"]
    assert len(summary["correct_per_problem"]) == summary["problems"]
    from stages.verifier.answers import verifier_versions

    assert read_metadata(path)["verifier"] == summary["verifier"] == verifier_versions()


def test_eval_is_deterministic_for_a_seed(tiny_eval, tmp_path):
    path, config = tiny_eval
    again = eval_stage.run(eval_stage.EvalConfig(**{**config.__dict__, "out": str(tmp_path / "again.parquet")}))
    first, _ = read_artifact(path, "verified")
    second, _ = read_artifact(again, "verified")
    assert first.column("response_token_ids").to_pylist() == second.column("response_token_ids").to_pylist()


# --- summarize on a hand-made table ------------------------------------------------------------------------------

def _verified(rows):
    columns = ("prompt_id", "sample_idx", "correct", "extracted_answer", "response_length", "finish_reason",
               "verify_status")
    return pa.Table.from_pylist([dict(zip(columns, row)) for row in rows])


def test_summarize_hand_computed():
    table = _verified([
        # problem a: answers 5, 5, 7, none; gold 5 -> c=2, majority 5 correct
        ("a", 0, True, "5", 10, "stop", "ok"),
        ("a", 1, True, " 5 ", 20, "stop", "ok"),
        ("a", 2, False, "7", 30, "length", "ok"),
        ("a", 3, False, None, 40, "length", "no_answer"),
        # problem b: answers 1, 2, 2, 3 (gold 1) -> c=1, majority 2 wrong
        ("b", 0, True, "1", 10, "stop", "ok"),
        ("b", 1, False, "2", 10, "stop", "ok"),
        ("b", 2, False, "2", 10, "stop", "ok"),
        ("b", 3, False, "3", 10, "stop", "ok"),
    ])
    summary = eval_stage.summarize(table, seed=0, resamples=500)
    assert summary["n"] == 4 and summary["problems"] == 2 and summary["correct"] == 3
    assert summary["accuracy"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # pass@2: a: 1 - C(2,2)/C(4,2) = 5/6; b: 1 - C(3,2)/C(4,2) = 1/2
    assert summary["pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert summary["pass@4"] == pytest.approx(1.0)
    assert summary["maj@4"] == pytest.approx(0.5)
    assert summary["length_mean"] == pytest.approx(140 / 8)
    assert summary["truncated_frac"] == pytest.approx(2 / 8)
    assert summary["no_answer_frac"] == pytest.approx(1 / 8)


def test_summarize_orders_votes_by_sample_idx_not_row_order():
    # tie between 4 and 9: sample 0 said 9, so 9 wins even though its row comes last
    table = _verified([
        ("a", 1, True, "4", 5, "stop", "ok"),
        ("a", 0, False, "9", 5, "stop", "ok"),
    ])
    assert eval_stage.summarize(table)["maj@2"] == 0.0


@pytest.mark.parametrize("answer, key", [("\\dfrac{1}{2}", "\\frac{1}{2}"), ("$ 12 $", "12"), ("x = 3.", "x=3"),
                                         ("\\left( 1, 2 \\right)", "(1,2)"), (None, None), ("  ", None)])
def test_vote_key_normalizes_spacing_only(answer, key):
    assert eval_stage.vote_key(answer) == key


# --- the loop hook -----------------------------------------------------------------------------------------------

def test_evaluate_for_loop_writes_files_and_resumes(tmp_path, tiny_model_dir, arith_prompts, monkeypatch):
    kwargs = dict(model=str(tiny_model_dir), prompts=str(arith_prompts), out_prefix=str(tmp_path / "eval"), n=1,
                  temperature=0.0, max_new_tokens=4, seed=0,
                  **loop_stages({"engine": "hf", "threads": 1, "top_p": 0.5, "n": 8, "progress": False}, {"workers": 1}))
    result = eval_stage.evaluate_for_loop(**kwargs)
    for key in ("accuracy", "pass@1", "length_mean", "truncated_frac"):
        assert isinstance(result[key], float), key
    assert all(isinstance(v, (int, float)) for v in result.values())
    stored = json.loads((tmp_path / "eval.summary.json").read_text())
    assert stored["sampling"]["top_p"] == 1.0 and stored["sampling"]["n"] == 1  # greedy overrides the knobs
    table, _ = read_artifact(tmp_path / "eval.parquet", "verified")
    assert table.num_rows == 4

    def no_sampling(*args, **kwargs):
        raise AssertionError("resume must not sample again")

    monkeypatch.setattr("stages.lm.sampling.sample", no_sampling)
    assert eval_stage.evaluate_for_loop(**kwargs) == result


def test_evaluate_for_loop_recomputes_when_summary_is_missing(tmp_path, tiny_model_dir, arith_prompts):
    kwargs = dict(model=str(tiny_model_dir), prompts=str(arith_prompts), out_prefix=str(tmp_path / "eval"), n=1,
                  temperature=0.0, max_new_tokens=2, seed=0,
                  **loop_stages({"engine": "hf", "progress": False}, {"workers": 1}))
    (tmp_path / "eval.parquet").write_text("a killed run left rows but no summary")
    result = eval_stage.evaluate_for_loop(**kwargs)
    assert result["samples"] == 4
    assert read_artifact(tmp_path / "eval.parquet", "verified")[0].num_rows == 4


# --- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_prints_table_and_path(tmp_path, tiny_model_dir):
    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(cli, ["-q", "eval", "--model", str(tiny_model_dir), "--benchmark", "arith",
                                      "--num", "2", "--n", "2", "--max-new-tokens", "4", "--engine", "hf",
                                      "--threads", "1", "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "avg@2" in result.stdout and "pass@2" in result.stdout and "maj@2" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert out.exists() and (tmp_path / "cli.summary.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "nope.parquet"], "nope.parquet"),
    (["--benchmark", "arith", "--n", "0"], "--n"),
    (["--benchmark", "math500", "--split", "train"], "--split: math500 has only test"),
])
def test_cli_bad_input_exits_2(tmp_path, tiny_model_dir, args, message):
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not out.exists()


def test_cli_refuses_existing_output(tmp_path, tiny_model_dir):
    out = tmp_path / "out.parquet"
    out.write_text("earlier result")
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--benchmark", "arith",
                                      "--out", str(out)])
    assert result.exit_code == 2
    assert "output exists" in result.stderr and str(out) in result.stderr
    assert out.read_text() == "earlier result"


def test_cli_rejects_a_file_of_the_wrong_stage(tmp_path, tiny_model_dir):
    table = pa.table({"x": [1]})
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(table, bad)
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--benchmark", str(bad),
                                      "--out", str(tmp_path / "out.parquet")])
    assert result.exit_code == 2
    assert "bad.parquet" in result.stderr and "prompt_id" in result.stderr


def test_cli_json_prints_only_json_on_stdout(tmp_path, tiny_model_dir):
    out = tmp_path / "cli.parquet"
    result = CliRunner().invoke(cli, ["-q", "eval", "--model", str(tiny_model_dir), "--benchmark", "arith",
                                      "--num", "2", "--n", "1", "--max-new-tokens", "4", "--engine", "hf",
                                      "--threads", "1", "--workers", "1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the whole of stdout parses: nothing printed after the JSON
    assert summary["rows_file"] == str(out) and "accuracy" in summary
