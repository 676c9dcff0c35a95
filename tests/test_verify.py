"""The verify stage: rewards, group statistics, privileged context (METHOD §4), output schema, CLI and bad input."""

from __future__ import annotations

import time
from collections import Counter

import pyarrow as pa
import pytest
from click.testing import CliRunner

import schemas
from antisd_cli.main import cli
from stages import verify
from stages.common import io
from stages.verifier.rows import VerifyConfig, group_stats, pick_peer, privileged_contexts

TIMEOUT = 1.0


def write_rollouts(path, groups: dict, solutions: dict | None = None, artifact: str = "rollouts", metadata=None):
    """A rollouts file without a model: `groups` maps prompt_id → (gold answer, [response texts])."""
    rows = []
    for prompt_id, (gold, responses) in groups.items():
        for sample_idx, text in enumerate(responses):
            rows.append({
                "prompt_id": prompt_id, "dataset": "test", "problem": f"Problem {prompt_id}?", "answer": gold,
                "solution": (solutions or {}).get(prompt_id), "few_shot": [],
                "sample_idx": sample_idx, "prompt_token_ids": [1, 2, 3], "response_token_ids": [4, 5],
                "response_text": text, "sampling_logprobs": [-0.5, -1.0], "finish_reason": "stop",
                "response_length": 2,
            })
    schema = schemas.SCHEMAS[artifact]
    table = pa.Table.from_pylist([{f.name: row.get(f.name) for f in schema} for row in rows], schema=schema)
    metadata = metadata or io.build_metadata(artifact, {"test": True}, model="fake")
    return io.write_artifact(table, path, artifact, metadata)


GROUPS = {
    "mixed": ("4", ["\\boxed{4}", "<think>hmm 2+2</think>So \\boxed{4}", "\\boxed{5}", "no idea"]),
    "one-right": ("7", ["\\boxed{7}", "\\boxed{8}", "\\boxed{9}"]),
    "none-right": ("1", ["\\boxed{2}", "\\boxed{3}"]),
    "no-ref": ("1", ["\\boxed{2}", "\\boxed{3}"]),
}
SOLUTIONS = {"mixed": "2 + 2 = 4", "one-right": "3 + 4 = 7", "none-right": "<think>x</think>0 + 1 = 1", "no-ref": None}


def run_verify(tmp_path, groups=GROUPS, solutions=SOLUTIONS, name="verified.parquet", **knobs):
    rollouts = tmp_path / "rollouts.parquet"
    if not rollouts.exists():
        write_rollouts(rollouts, groups, solutions)
    knobs.setdefault("timeout", TIMEOUT)
    knobs.setdefault("workers", 1)  # each worker start costs ~1 s of CPU on a shared 2-core machine
    out = verify.run(VerifyConfig(rollouts=str(rollouts), out=str(tmp_path / name), **knobs))
    table, metadata = io.read_artifact(out, "verified")
    return table.to_pylist(), metadata


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    return run_verify(tmp_path_factory.mktemp("verify"))


def _by_key(rows):
    return {(r["prompt_id"], r["sample_idx"]): r for r in rows}


# --- stage output ----------------------------------------------------------------------------------------------

def test_output_keeps_every_row_in_order_with_the_verified_schema(verified, tmp_path):
    rows, metadata = verified
    assert [(r["prompt_id"], r["sample_idx"]) for r in rows] == [
        (p, i) for p, (_, responses) in GROUPS.items() for i in range(len(responses))]
    assert set(rows[0]) == set(schemas.VERIFIED.names)
    assert metadata["artifact"] == "verified"


def test_rewards_and_statuses(verified):
    rows = _by_key(verified[0])
    assert [rows[("mixed", i)]["reward"] for i in range(4)] == [1.0, 1.0, 0.0, 0.0]
    assert [rows[("mixed", i)]["verify_status"] for i in range(4)] == ["ok", "ok", "ok", "no_answer"]
    assert rows[("mixed", 3)]["extracted_answer"] is None
    assert rows[("mixed", 1)]["extracted_answer"] == "4"
    assert all(r["correct"] == (r["reward"] == 1.0) for r in verified[0])


def test_group_stats(verified):
    rows = _by_key(verified[0])
    assert rows[("mixed", 0)]["group_size"] == 4 and rows[("mixed", 0)]["group_mean_reward"] == pytest.approx(0.5)
    assert rows[("one-right", 2)]["group_size"] == 3
    assert rows[("one-right", 2)]["group_mean_reward"] == pytest.approx(1 / 3)
    assert rows[("none-right", 0)]["group_mean_reward"] == 0.0


def test_privileged_sources(verified):
    rows = _by_key(verified[0])
    # the only correct rollout of its group cannot be its own peer: it falls back to the reference
    assert rows[("one-right", 0)]["privileged_source"] == "reference"
    assert rows[("one-right", 0)]["privileged_text"] == "3 + 4 = 7"
    assert rows[("one-right", 0)]["peer_sample_idx"] is None
    for i in (1, 2):
        assert rows[("one-right", i)]["privileged_source"] == "peer"
        assert rows[("one-right", i)]["peer_sample_idx"] == 0
        assert rows[("one-right", i)]["privileged_text"] == "\\boxed{7}"
    assert rows[("none-right", 0)]["privileged_text"] == "0 + 1 = 1"  # <think> stripped from the reference too
    assert rows[("no-ref", 0)]["privileged_source"] == "none" and rows[("no-ref", 0)]["privileged_text"] is None


def test_peer_text_has_think_stripped(verified):
    rows = _by_key(verified[0])
    assert rows[("mixed", 0)]["peer_sample_idx"] == 1  # the only other correct one
    assert rows[("mixed", 0)]["privileged_text"] == "So \\boxed{4}"


def test_metadata_records_config_and_counts(verified):
    _, metadata = verified
    assert metadata["config"]["timeout"] == TIMEOUT and metadata["config"]["fallbacks"] == "hash,answer-is"
    assert metadata["status_counts"] == {"ok": 10, "no_answer": 1, "timeout": 0, "error": 0}
    assert metadata["reward_mean"] == pytest.approx(3 / 11)
    assert metadata["privileged_source_counts"] == {"peer": 6, "reference": 3, "none": 2}
    assert metadata["rollouts_metadata"]["model"] == "fake" and metadata["reward_function"] == "math-verify"


def test_rollouts_sampling_temperature_is_what_score_finds_in_the_verified_metadata(tmp_path):
    from dataclasses import asdict

    from stages.lm.engine import SamplingSettings
    from stages.lm.sampling import RolloutConfig
    from stages.lm.scoring import metadata_temperature

    rollout_config = RolloutConfig(prompts="p.parquet", out="r.parquet", temperature=0.7)
    metadata = io.build_metadata("rollouts", rollout_config, model_path="fake",
                                 sampling=asdict(SamplingSettings.from_config(rollout_config)))
    write_rollouts(tmp_path / "rollouts.parquet", {"g": ("1", ["\\boxed{1}"])}, metadata=metadata)
    _, verified_metadata = run_verify(tmp_path)
    assert verified_metadata["rollouts_metadata"]["sampling"]["temperature"] == 0.7
    assert metadata_temperature(verified_metadata) == 0.7  # not score's 1.0 fallback


def test_privileged_budget_in_chars(tmp_path):
    rows, _ = run_verify(tmp_path, privileged_max_chars=5)
    assert _by_key(rows)[("one-right", 1)]["privileged_text"] == "\\boxe"


class _CharTokenizer:
    """A stand-in tokenizer: each word is a token (offsets into the original text)."""

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        import re

        return {"offset_mapping": [m.span() for m in re.finditer(r"\S+", text)]}


class _Loaded:
    tokenizer = _CharTokenizer()


def test_privileged_budget_in_tokens(tmp_path):
    groups = {"g": ("3", ["one two three \\boxed{3}", "\\boxed{3}"])}
    write_rollouts(tmp_path / "rollouts.parquet", groups)
    out = verify.run(VerifyConfig(rollouts=str(tmp_path / "rollouts.parquet"), out=str(tmp_path / "v.parquet"),
                                  timeout=TIMEOUT, workers=1, privileged_max_tokens=2), loaded=_Loaded())
    rows = _by_key(io.read_artifact(out, "verified")[0].to_pylist())
    assert rows[("g", 1)]["privileged_text"] == "one two"
    assert rows[("g", 0)]["privileged_text"] == "\\boxed{3}"


def test_fallbacks_option_changes_extraction(tmp_path):
    groups = {"g": ("5", ["The answer is 5.", "#### 5", "it is 5"])}
    write_rollouts(tmp_path / "rollouts.parquet", groups)
    boxed_only, _ = run_verify(tmp_path, name="a.parquet", fallbacks="none")
    every, _ = run_verify(tmp_path, name="b.parquet", fallbacks="answer-is,hash,last-number")
    assert [r["verify_status"] for r in boxed_only] == ["no_answer"] * 3
    assert [r["correct"] for r in every] == [True, True, True]


def test_same_seed_same_output_and_scored_input_accepted(tmp_path):
    first, _ = run_verify(tmp_path, name="a.parquet", seed=3)
    again, _ = run_verify(tmp_path, name="b.parquet", seed=3)
    assert first == again
    # a later stage's file is accepted as input; its extra columns are recomputed, not copied
    third = verify.run(VerifyConfig(rollouts=str(tmp_path / "a.parquet"), out=str(tmp_path / "c.parquet"),
                                    seed=3, timeout=TIMEOUT, workers=1))
    assert io.read_artifact(third, "verified")[0].to_pylist() == first


# --- pure decisions --------------------------------------------------------------------------------------------

def test_pick_peer_never_picks_itself_and_is_deterministic():
    for sample_idx in range(8):
        picks = {pick_peer(0, "p", sample_idx, list(range(8))) for _ in range(3)}
        assert len(picks) == 1 and sample_idx not in picks
    assert pick_peer(0, "p", 2, [2]) is None
    assert pick_peer(0, "p", 2, []) is None
    assert pick_peer(0, "p", 2, [2, 5]) == 5


def test_pick_peer_depends_on_seed_and_covers_candidates():
    by_seed = [[pick_peer(seed, f"p{k}", 0, range(1, 8)) for k in range(50)] for seed in (0, 1)]
    assert by_seed[0] != by_seed[1]
    assert set(by_seed[0]) == set(range(1, 8))
    assert max(Counter(by_seed[0]).values()) < 20


def test_privileged_contexts_reference_and_none():
    contexts = privileged_contexts(["a", "a", "b"], [0, 1, 0], [False, False, True], ["x", "y", "\\boxed{1}"],
                                   ["ref a", "ref a", "  "], seed=0, budget=lambda t: t)
    assert contexts == [("ref a", "reference", None), ("ref a", "reference", None), (None, "none", None)]


def test_group_stats_pure():
    sizes, means = group_stats(["a", "b", "a"], [1.0, 0.0, 0.0])
    assert sizes == [2, 1, 2] and means == [0.5, 0.0, 0.5]


# --- injection corpus through the stage ------------------------------------------------------------------------

def test_stage_completes_on_the_injection_corpus(tmp_path, monkeypatch):
    from test_answers import injection_corpus

    sentinel_dir = tmp_path / "sentinel"
    sentinel_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    corpus = injection_corpus(sentinel_dir) + ["\\boxed{1}"]
    write_rollouts(tmp_path / "rollouts.parquet", {"evil": ("1", corpus)}, {"evil": None})
    started = time.perf_counter()
    rows, metadata = run_verify(tmp_path, groups=None, fallbacks="hash,answer-is,last-number", workers=2)
    assert time.perf_counter() - started < len(corpus) * (TIMEOUT + 2.5) / 2 + 10
    assert list(sentinel_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.parquet", "sentinel", "verified.parquet"]
    assert len(rows) == len(corpus)
    assert [r["correct"] for r in rows] == [False] * (len(corpus) - 1) + [True]
    assert sum(metadata["status_counts"].values()) == len(corpus)
    assert metadata["status_counts"]["timeout"] >= 1 and metadata["status_counts"]["error"] >= 1
    assert all(r["privileged_source"] == "peer" for r in rows[:-1])  # the one correct row is everyone's peer


# --- CLI -------------------------------------------------------------------------------------------------------

def test_cli_writes_and_prints_the_output_path(tmp_path):
    write_rollouts(tmp_path / "r.parquet", GROUPS, SOLUTIONS)
    out = tmp_path / "v.parquet"
    result = CliRunner().invoke(cli, ["verify", "--rollouts", str(tmp_path / "r.parquet"), "--out", str(out),
                                      "--timeout", "2", "--workers", "1", "--fallbacks", "none", "--seed", "1"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert io.read_metadata(out)["config"]["fallbacks"] == "none"


def test_cli_missing_file(tmp_path):
    result = CliRunner().invoke(cli, ["verify", "--rollouts", str(tmp_path / "nope.parquet"), "--out",
                                      str(tmp_path / "v.parquet")])
    assert result.exit_code == 2
    assert "nope.parquet" in result.stderr


def test_cli_prompts_file_instead_of_rollouts(tmp_path, arith_prompts):
    result = CliRunner().invoke(cli, ["verify", "--rollouts", str(arith_prompts), "--out", str(tmp_path / "v.parquet")])
    assert result.exit_code == 2
    assert str(arith_prompts) in result.stderr and "prompts file" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "v.parquet").exists()


def test_cli_refuses_existing_output_and_leaves_it_untouched(tmp_path):
    write_rollouts(tmp_path / "r.parquet", GROUPS, SOLUTIONS)
    out = tmp_path / "v.parquet"
    out.write_bytes(b"precious")
    args = ["verify", "--rollouts", str(tmp_path / "r.parquet"), "--out", str(out), "--timeout", "2", "--workers", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert str(out) in result.stderr and "--overwrite" in result.stderr
    assert out.read_bytes() == b"precious"
    assert CliRunner().invoke(cli, args + ["--overwrite"]).exit_code == 0
    assert io.read_metadata(out)["artifact"] == "verified"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fallbacks", "hash,bogus"], "--fallbacks"),
        (["--workers", "0"], "--workers"),
        (["--timeout", "0"], "--timeout"),
        (["--out", "/no/such/dir/v.parquet"], "/no/such/dir"),
    ],
)
def test_cli_bad_options(tmp_path, extra, message):
    write_rollouts(tmp_path / "r.parquet", GROUPS, SOLUTIONS)
    args = ["verify", "--rollouts", str(tmp_path / "r.parquet"), "--out", str(tmp_path / "v.parquet")] + extra
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert not (tmp_path / "v.parquet").exists()


def test_cli_rollouts_missing_a_column(tmp_path):
    table = pa.table({"prompt_id": ["a"], "answer": ["1"]})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "bad.parquet")
    result = CliRunner().invoke(cli, ["verify", "--rollouts", str(tmp_path / "bad.parquet"), "--out",
                                      str(tmp_path / "v.parquet")])
    assert result.exit_code == 2
    assert "bad.parquet" in result.stderr and "missing column" in result.stderr


# --- privileged context from another problem (a control) -------------------------------------------------------

def test_donors_form_one_cycle_without_fixed_points():
    from stages.verifier.rows import donor_prompts

    prompts = [f"p{i}" for i in range(7)]
    donors = donor_prompts(prompts * 2, seed=3)
    assert set(donors) == set(prompts) and all(donors[p] != p for p in prompts)
    assert sorted(donors.values()) == sorted(prompts)  # every prompt donates exactly once
    seen, p = [], "p0"
    while p not in seen:
        seen.append(p)
        p = donors[p]
    assert len(seen) == 7  # a single cycle
    assert donors == donor_prompts(prompts, seed=3) and donors != donor_prompts(prompts, seed=4)
    assert donor_prompts(["only"], seed=0) == {}


def test_other_problem_contexts_come_from_the_donor():
    from stages.verifier.rows import donor_prompts

    ids, idxs = ["a", "a", "b", "b", "c"], [0, 1, 0, 1, 0]
    correct = [True, False, False, False, True]
    texts = ["sol a", "wrong", "x", "y", "sol c"]
    refs = ["ref a", "ref a", "ref b", "ref b", None]
    donors = donor_prompts(ids, seed=0)
    contexts = privileged_contexts(ids, idxs, correct, texts, refs, seed=0, budget=lambda t: t, other=True)
    expected_text = {"a": ("sol a", "other_peer"), "b": ("ref b", "other_reference"), "c": ("sol c", "other_peer")}
    for prompt_id, (text, source, peer) in zip(ids, contexts):
        assert (text, source) == expected_text[donors[prompt_id]]
        assert peer is None
    # the donor's only correct rollout is a valid context for another problem's rollout of the same index
    assert all(source != "none" for _, source, _ in contexts)


def test_verify_privileged_from_other_through_the_stage(tmp_path):
    rows, metadata = run_verify(tmp_path, privileged_from="other")
    sources = Counter(r["privileged_source"] for r in rows)
    assert set(sources) <= {"other_peer", "other_reference", "none"} and sources["other_peer"] > 0
    assert metadata["config"]["privileged_from"] == "other"
    same = {(r["prompt_id"], r["sample_idx"]): r["privileged_text"] for r in run_verify(tmp_path, name="v2.parquet")[0]}
    mixed_texts = {r["privileged_text"] for r in rows if r["prompt_id"] == "mixed"}
    assert not mixed_texts & {"\\boxed{4}", "So \\boxed{4}", "2 + 2 = 4"}  # never this problem's own solution
    assert same[("mixed", 2)] in {"\\boxed{4}", "So \\boxed{4}"}


# --- a user's reward function ----------------------------------------------------------------------------------

REWARD_FILE = '''
import time


def ends_with_answer(problem, answer, response, row):
    """Correct when the response ends with the reference answer (no \\\\boxed{} needed)."""
    if "slow" in response:
        time.sleep(30)
    if "crash" in response:
        raise ValueError("boom")
    if "half" in response:
        return 0.5
    assert problem == f"Problem {row['prompt_id']}?" and row["dataset"] == "test"
    return response.strip().endswith(answer)
'''

REWARD_GROUPS = {"g": ("4", ["it is 4", "\\\\boxed{4} is wrong here", "slow", "crash", "half"]),
                 "h": ("9", ["nine", "so 9"])}


@pytest.mark.parametrize("form", ["file", "module"])
def test_a_reward_function_decides_correctness_in_the_killable_workers(tmp_path, monkeypatch, form):
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)
    spec = "my_reward.py:ends_with_answer" if form == "file" else "my_reward:ends_with_answer"
    rows, metadata = run_verify(tmp_path, groups=REWARD_GROUPS, solutions={}, reward=spec)
    assert [r["reward"] for r in rows] == [1.0, 0.0, 0.0, 0.0, 0.5, 0.0, 1.0]  # "half": a float reward, kept
    assert [r["verify_status"] for r in rows] == ["ok", "ok", "timeout", "error", "ok", "ok", "ok"]
    assert [r["correct"] for r in rows] == [True, False, False, False, False, False, True]
    assert rows[1]["extracted_answer"] == "4"  # math-verify would have said correct: the function decided
    assert [r["privileged_source"] for r in rows[1:5]] == ["peer"] * 4 and rows[1]["peer_sample_idx"] == 0
    assert metadata["reward_function"] == spec and metadata["config"]["reward"] == spec


FLOAT_REWARDS = '''
import math

import numpy as np


def graded(problem, answer, response, row):
    return {"a": 0.25, "b": 1.5, "c": -1, "d": np.float32(1.0), "e": True, "f": math.nan}[response]
'''


def test_a_reward_function_may_return_floats_and_correct_is_full_credit(tmp_path, monkeypatch):
    """TRL/verl-style float rewards are kept as they are; `correct` (a peer the teacher may see) is reward ≥ 1; a
    NaN is an error of its row (reward 0); the file passes every reader's checks."""
    (tmp_path / "graded.py").write_text(FLOAT_REWARDS)
    monkeypatch.chdir(tmp_path)
    groups = {"g": ("4", ["a", "b", "c", "d"]), "h": ("1", ["e", "f", "a"])}
    rows, metadata = run_verify(tmp_path, groups=groups, solutions={}, reward="graded.py:graded")
    assert [r["reward"] for r in rows] == [0.25, 1.5, -1.0, 1.0, 1.0, 0.0, 0.25]
    assert [r["correct"] for r in rows] == [False, True, False, True, True, False, False]
    assert [r["verify_status"] for r in rows] == ["ok"] * 5 + ["error", "ok"]
    assert rows[0]["group_mean_reward"] == pytest.approx((0.25 + 1.5 - 1 + 1) / 4)
    assert {r["peer_sample_idx"] for r in rows[:4] if r["privileged_source"] == "peer"} <= {1, 3}
    assert rows[5]["privileged_source"] == "peer" and rows[5]["peer_sample_idx"] == 0
    assert metadata["reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / 7)
    table, _ = io.read_artifact(tmp_path / "verified.parquet", "verified")  # the checked read every stage runs
    assert table.column("reward").to_pylist() == [r["reward"] for r in rows]


@pytest.mark.parametrize("spec, message", [
    ("nosuch_module_xyz:f", "--reward nosuch_module_xyz:f: cannot load it (ModuleNotFoundError"),
    ("my_reward.py:absent", "--reward my_reward.py:absent: cannot load it (AttributeError"),
    ("just_a_name", "--reward: 'just_a_name': expected module:function or path/to/file.py:function")])
def test_a_reward_function_that_cannot_load_is_refused_before_work(tmp_path, monkeypatch, spec, message):
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)
    write_rollouts(tmp_path / "r.parquet", REWARD_GROUPS)
    result = CliRunner().invoke(cli, ["-q", "verify", "--rollouts", "r.parquet", "--out", "v.parquet", "--reward",
                                      spec])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "v.parquet").exists()


def test_the_example_reward_runs_as_documented(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "rewards" / "exact_final_line.py"
    groups = {"g": ("B", ["I pick\nB.", "B is it", "\\boxed{B}"])}
    rows, _ = run_verify(tmp_path, groups=groups, solutions={}, reward=f"{example}:exact_final_line")
    assert [r["reward"] for r in rows] == [1.0, 0.0, 0.0]
