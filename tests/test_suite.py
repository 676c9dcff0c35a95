"""`antisd eval --suite` (stages.runs.suites): the paper's five benchmarks with their protocol, exact accuracies with a
gold-answering fake engine, resume after a kill, shards, the loop's suite evaluation and its run config."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import loop_stages
from fake_engine import GoldEngine, gold_answers, install

from antisd_cli.main import cli
from stages import eval as eval_stage
from stages.common.errors import InputError
from stages.common.io import read_artifact, read_metadata
from stages.lm.models import load_tokenizer
from stages.method.estimators import pass_at_k
from stages.runs import suites
from stages.verifier.answers import verifier_versions

PAPER = suites.SUITES["paper"]
NUM = 3  # problems per benchmark
TIMINGS = ("wall_s", "tokens_per_s", "shards")  # what differs between two runs of the same evaluation


def correct_counts(golds: dict) -> dict:
    """c of each problem: 0, 1, 2, 0, 1, 2, … in file order, so accuracies differ between benchmarks' n."""
    return {prompt_id: index % 3 for index, prompt_id in enumerate(golds)}


@pytest.fixture(scope="module")
def golds():
    return gold_answers(PAPER.names, num=NUM)


@pytest.fixture
def engine(monkeypatch, tiny_model_dir, golds):
    return install(monkeypatch, GoldEngine(load_tokenizer(tiny_model_dir), tiny_model_dir, golds, correct_counts(golds)))


def suite_config(model, out, **changes) -> eval_stage.EvalConfig:
    return eval_stage.EvalConfig(**{"benchmark": None, "suite": "paper", "out": str(out), "model": str(model),
                                    "num": NUM, "engine": "hf", "workers": 1, "bootstrap_resamples": 200,
                                    "progress": False, **changes})


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, tiny_model_dir, golds):
    """One uninterrupted paper suite (3 problems per benchmark) with the gold engine: (folder, summary, engine)."""
    with pytest.MonkeyPatch.context() as patch:
        engine = install(patch, GoldEngine(load_tokenizer(tiny_model_dir), tiny_model_dir, golds,
                                           correct_counts(golds)))
        folder = eval_stage.run(suite_config(tiny_model_dir, tmp_path_factory.mktemp("suite") / "paper"))
    return folder, json.loads((folder / suites.SUMMARY_NAME).read_text()), engine


def metrics_of(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMINGS}


def test_paper_suite_lists_the_five_benchmarks_with_the_papers_protocol(paper_run):
    _, summary, _ = paper_run
    assert summary["benchmarks"] == ["aime24", "aime25", "aime26", "hmmt_feb25", "minervamath"]
    assert {name: entry["n"] for name, entry in summary["per_benchmark"].items()} == dict(PAPER.benchmarks)
    for sampling in summary["sampling"].values():
        assert (sampling["temperature"], sampling["top_p"], sampling["max_new_tokens"]) == (0.7, 0.95, 32768)
    assert summary["verifier"] == verifier_versions()


def test_paper_suite_accuracies_are_the_gold_engines_exactly(paper_run, golds):
    folder, summary, _ = paper_run
    counts = correct_counts(golds)
    expected = {}
    for name, n in PAPER.benchmarks:
        ids = [p for p in golds if p.startswith(f"{name}-")]
        expected[name] = sum(counts[p] / n for p in ids) / len(ids)  # avg@n: mean over problems of c/n
        entry = summary["per_benchmark"][name]
        assert entry["accuracy"] == pytest.approx(expected[name], abs=1e-12)
        assert entry["accuracy_ci_low"] <= entry["accuracy"] <= entry["accuracy_ci_high"]
        stored = json.loads((folder / f"{name}.summary.json").read_text())
        assert stored["correct_per_problem"] == {p: counts[p] for p in ids}
        assert stored["pass@2"] == pytest.approx(sum(pass_at_k(n, counts[p], 2) for p in ids) / len(ids))
    assert summary["average"] == pytest.approx(sum(expected.values()) / 5, abs=1e-12)
    assert summary["average_ci_low"] <= summary["average"] <= summary["average_ci_high"]


def test_suite_rows_and_metadata_record_the_verifier(paper_run):
    folder, _, _ = paper_run
    table, metadata = read_artifact(folder / "aime24.parquet", "verified")
    assert table.num_rows == NUM * 32
    assert metadata["verifier"] == metadata["eval"]["verifier"] == verifier_versions()


def test_a_killed_suite_continues_where_it_stopped(tmp_path, tiny_model_dir, golds, engine, paper_run):
    config = suite_config(tiny_model_dir, tmp_path / "paper")
    engine.fail_on = "aime26-"
    with pytest.raises(KeyboardInterrupt):
        eval_stage.run(config)
    assert (tmp_path / "paper" / "aime25.summary.json").exists()
    assert not (tmp_path / "paper" / suites.SUMMARY_NAME).exists()
    engine.fail_on, engine.calls = None, []
    eval_stage.run(config)
    assert {call.split("-")[0] for call in engine.calls} == {"aime26", "hmmt_feb25", "minervamath"}
    resumed = json.loads((tmp_path / "paper" / suites.SUMMARY_NAME).read_text())
    assert metrics_of(resumed) == metrics_of({**paper_run[1], "model": resumed["model"]})
    engine.calls = []
    eval_stage.run(config)  # a finished suite: nothing sampled again
    assert engine.calls == []


def test_a_sharded_suite_merges_into_the_unsharded_result(tmp_path, tiny_model_dir, engine, paper_run):
    folder = tmp_path / "paper"
    eval_stage.run(suite_config(tiny_model_dir, folder, shard="0/2"))
    assert (folder / "aime24" / "part-00000-of-00002.parquet").exists()
    assert not (folder / suites.SUMMARY_NAME).exists()
    first = set(engine.calls)
    engine.calls = []
    eval_stage.run(suite_config(tiny_model_dir, folder))  # samples only the missing shard 1, then merges
    assert engine.calls and not first & set(engine.calls)
    merged = json.loads((folder / suites.SUMMARY_NAME).read_text())
    assert metrics_of(merged) == metrics_of({**paper_run[1], "model": merged["model"]})
    for name in PAPER.names:
        ours, _ = read_artifact(folder / f"{name}.parquet", "verified")
        whole, _ = read_artifact(paper_run[0] / f"{name}.parquet", "verified")
        columns = ["prompt_id", "sample_idx", "response_text", "correct", "privileged_source"]
        assert ours.select(columns).to_pylist() == whole.select(columns).to_pylist()
        assert read_metadata(folder / f"{name}.parquet")["merged_from"]["count"] == 2


def test_shards_of_one_folder_run_side_by_side_but_a_shard_only_once(tmp_path, tiny_model_dir, engine):
    from stages.common.io import output_lock

    folder = tmp_path / "paper"
    folder.mkdir()
    with output_lock(folder / "part-00000-of-00002.parquet"):  # shard 0 is being written by another process
        eval_stage.run(suite_config(tiny_model_dir, folder, shard="1/2", suite_n="aime24=1,aime25=1,aime26=1,"
                                                                                  "hmmt_feb25=1"))
        with pytest.raises(InputError, match="another process"):
            eval_stage.run(suite_config(tiny_model_dir, folder, shard="0/2"))
    assert (folder / "minervamath" / "part-00001-of-00002.parquet").exists()


def test_an_empty_parts_folder_left_by_a_kill_is_sampled_whole(tmp_path, tiny_model_dir, engine):
    folder = tmp_path / "paper"
    (folder / "aime24").mkdir(parents=True)  # a shard run killed before its first part was written
    eval_stage.run(suite_config(tiny_model_dir, folder, n=1))
    assert (folder / suites.SUMMARY_NAME).exists() and (folder / "aime24.summary.json").exists()


def test_a_suite_folder_made_with_another_protocol_is_refused_before_sampling(tmp_path, tiny_model_dir, engine,
                                                                             paper_run):
    with pytest.raises(InputError, match=r"aime24.summary.json: made with another sampling"):
        eval_stage.run(suite_config(tiny_model_dir, paper_run[0], suite_n="aime24=2"))
    assert engine.calls == []


@pytest.mark.parametrize("changes, expected", [
    ({}, {"aime24": 32, "minervamath": 4}),
    ({"n": 2}, {"aime24": 2, "minervamath": 2}),
    ({"n": 2, "suite_n": "minervamath=3"}, {"aime24": 2, "minervamath": 3}),
])
def test_suite_options_override_its_protocol(tmp_path, changes, expected):
    config = suite_config(tmp_path, tmp_path / "x", **changes)
    assert {name: config.protocol(name).n for name in expected} == expected
    assert config.protocol("aime24").max_new_tokens == suites.PAPER_LENGTH
    assert suite_config(tmp_path, tmp_path / "x", max_new_tokens=64).protocol("aime24").max_new_tokens == 64


def test_cli_suite_prints_the_table_and_the_folder(tmp_path, tiny_model_dir, engine):
    out = tmp_path / "check"
    result = CliRunner().invoke(cli, ["-q", "eval", "--model", str(tiny_model_dir), "--suite", "aime25-check",
                                      "--num", str(NUM), "--engine", "hf", "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "aime25" in result.stdout and "average" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == str(out)
    summary = json.loads((out / suites.SUMMARY_NAME).read_text())
    assert summary["per_benchmark"]["aime25"]["n"] == 4  # the authors' mean@4


@pytest.mark.parametrize("args, message", [
    (["--suite", "paper", "--benchmark", "aime25"], "not both"),
    (["--suite", "paper", "--suite-n", "gsm8k=3"], "--suite-n"),
    (["--suite", "paper", "--suite-n", "aime24=0"], "--suite-n"),
    (["--benchmark", "aime25", "--shard", "1/2"], "--shard"),
    (["--suite", "paper", "--shard", "2/2"], "--shard"),
    ([], "--benchmark: required"),
    (["--suite", "paper", "--split", "train"], "--split"),
])
def test_cli_suite_bad_input_exits_2(tmp_path, tiny_model_dir, args, message):
    result = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "o").exists()


# --- the loop's held-out evaluation as a suite ---------------------------------------------------------------------

def test_evaluate_for_loop_runs_a_suite_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    from stages.lm.datasets import write_prompts

    prompts = write_prompts(suites.prompts_table("aime25-check"), {"suite": "aime25-check"}, tmp_path / "p.parquet")
    golds = gold_answers(["aime25"])
    engine = install(monkeypatch, GoldEngine(load_tokenizer(tiny_model_dir), tiny_model_dir, golds,
                                             {p: 4 for p in list(golds)[:6]}))  # 6 of 30 always right
    kwargs = dict(model=str(tiny_model_dir), prompts=str(prompts), out_prefix=str(tmp_path / "step_0004" / "eval"),
                  n=1, temperature=0.0, max_new_tokens=64, seed=0, suite="aime25-check",
                  **loop_stages({"engine": "hf", "progress": False}, {"workers": 1}))
    (tmp_path / "step_0004").mkdir()
    metrics = eval_stage.evaluate_for_loop(**kwargs)
    assert metrics["accuracy"] == metrics["aime25/avg@4"] == pytest.approx(6 / 30)
    assert (tmp_path / "step_0004" / "eval-aime25-check" / suites.SUMMARY_NAME).exists()
    assert len(engine.calls) == 30
    engine.calls = []
    assert eval_stage.evaluate_for_loop(**kwargs) == metrics and engine.calls == []


def test_run_config_eval_suite_is_checked():
    from stages.runs import config as run_config

    assert run_config.resolve({"loop": {"eval_suite": "aime25-check"}}).loop.eval_suite == "aime25-check"
    with pytest.raises(InputError, match="loop.eval_suite: must be one of paper, aime25-check"):
        run_config.resolve({"loop": {"eval_suite": "nope"}})
    with pytest.raises(InputError, match="loop.eval_n: loop.eval_suite aime25-check sets the held-out evaluation"):
        run_config.resolve({"loop": {"eval_suite": "aime25-check", "eval_n": 4}})


def test_a_loop_with_eval_suite_evaluates_its_base_model_on_the_suite(tmp_path, tiny_model_dir, monkeypatch):
    from stages.loop import run
    from stages.runs import config as run_config
    from stages.runs.config import LoopConfig

    golds = gold_answers(["aime25"])
    install(monkeypatch, GoldEngine(load_tokenizer(tiny_model_dir), tiny_model_dir, golds,
                                    {p: 2 for p in list(golds)[:3]}))
    resolved = run_config.resolve({"loop": {"model": str(tiny_model_dir), "steps": 0, "eval_suite": "aime25-check",
                                            "tensorboard": False, "prompts_per_step": 4,
                                            "train": {"num": 8}},
                                   "rollout": {"engine": "hf", "progress": False}, "verify": {"workers": 1}})
    root = run(LoopConfig(out=str(tmp_path / "run"), run=resolved))
    base = json.loads((root / "eval_base.json").read_text())
    assert base["eval/accuracy"] == pytest.approx(3 * 2 / 4 / 30)
    assert (root / "eval_base-aime25-check" / "aime25.parquet").exists()
    assert read_artifact(root / "eval_prompts.parquet", "prompts")[0].num_rows == 30
