"""The bundled benchmarks and MATH train (row counts, known answers graded correct by the verifier), their quirks
(OlympiadBench's answer lists, MinervaMath's code-like answers), BeyondAIME from a user's file, and the verifier's
recorded and pinned versions."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import pytest

from stages.lm.bundled import BENCHMARKS, BUILTIN, DATA_DIR, builtin_rows, olympiad_gold
from stages.lm.datasets import PrepareConfig, build_rows
from stages.verifier import answers
from stages.verifier.answers import check_answers, latex_form

REPO = Path(__file__).resolve().parent.parent
ROWS = {("aime25", "test"): 30, ("aime26", "test"): 30, ("hmmt_feb25", "test"): 30, ("minervamath", "test"): 272,
        ("olympiadbench", "test"): 675, ("math", "train"): 7500}


def _grade(pairs: list[tuple[str, str]]) -> list[bool]:
    """Whether each (gold, final answer) pair grades correct, the answer given in a \\boxed{} as a model writes it."""
    checks = check_answers([f"So the answer is \\boxed{{{answer}}}." for _, answer in pairs],
                           [gold for gold, _ in pairs], workers=2, timeout=10)
    return [check.correct for check in checks]


@pytest.mark.parametrize("name, split", sorted(ROWS))
def test_each_new_set_has_its_rows_with_unique_ids_and_answers(name, split):
    rows = build_rows(PrepareConfig(name=name, out="", split=split))
    assert len(rows) == ROWS[(name, split)]
    assert len({row["prompt_id"] for row in rows}) == len(rows)
    assert all(row["problem"].strip() and row["answer"].strip() for row in rows)


def test_the_benchmarks_are_every_bundled_test_set_and_math_is_train_only():
    assert set(BENCHMARKS) == {"gsm8k", "math500", "aime24", "aime25", "aime26", "amc23", "hmmt_feb25", "minervamath",
                               "olympiadbench"}
    assert BUILTIN["math"] == {"train": "math/train.jsonl"}
    assert not (DATA_DIR / "beyond_aime").exists()  # no licence: never bundled


def test_every_bundled_file_is_attributed_in_the_readme_and_licences():
    readme = (DATA_DIR / "README.md").read_text()
    licences = (DATA_DIR / "LICENSES.md").read_text()
    for splits in BUILTIN.values():
        for file in splits.values():
            assert f"`{file}`" in readme or f"`{file.split('/')[0]}/" in readme, file
            assert f"({file.split('/')[0]}/" in licences or f"{file.split('/')[0]}/)" in licences, file


# gold answers taken from the files (first rows), each with a right answer written another way and a wrong one
KNOWN = [
    ("aime25", 0, "70", "69"),
    ("aime26", 0, "277", "276"),
    ("hmmt_feb25", 2, "\\dfrac{1}{576}", "\\frac{1}{575}"),
    ("hmmt_feb25", 6, "\\frac{9}{\\sqrt{23}}", "\\frac{9}{23}"),
    ("minervamath", 0, "1.60", "1.7"),
    ("olympiadbench", 0, "2", "3"),
]


def test_known_answers_of_each_new_benchmark_grade_right_and_wrong():
    pairs, expected = [], []
    for name, index, right, wrong in KNOWN:
        gold = builtin_rows(name, "test")[index]["answer"]
        pairs += [(gold, gold), (gold, right), (gold, wrong)]
        expected += [True, True, False]
    assert _grade(pairs) == expected


def test_math_train_is_a_training_set_of_a_run_config():
    from stages.lm.datasets import prompts_table
    from stages.runs import config as run_config
    from stages.runs.plan import data_config

    resolved = run_config.resolve({"loop": {"train": {"name": "math", "num": 16, "seed": 3}}})
    table = prompts_table(data_config(resolved.loop.train, Path("unused.parquet")))
    assert table.num_rows == 16 and set(table.column("dataset").to_pylist()) == {"math"}
    with pytest.raises(Exception, match="math has only train"):
        run_config.resolve({"loop": {"train": {"name": "math", "split": "test"}}})


def test_math_train_answers_are_the_last_boxed_of_their_solutions():
    rows = builtin_rows("math", "train")
    first = rows[0]
    assert first["prompt_id"] == "math-train/algebra/0.json" and first["answer"] == "0"
    assert answers.extract_boxed(first["solution"]) == first["answer"]
    assert _grade([(first["answer"], "0"), (first["answer"], "1")]) == [True, False]


# --- OlympiadBench: graded against the whole final_answer list --------------------------------------------------

def _olympiad(answer_field: str) -> dict:
    rows = [json.loads(line) for line in (DATA_DIR / "olympiadbench/test.jsonl").read_text().splitlines()]
    return next(row for row in rows if row["answer"] == answer_field)


def test_olympiad_multi_answer_gold_is_every_part_without_dollars():
    record = _olympiad("69$,$84")
    assert record["is_multiple_answer"] and record["final_answer"] == ["$69$,$84$"]
    assert olympiad_gold(record["final_answer"]) == "69,84"
    prompt = next(r for r in builtin_rows("olympiadbench", "test") if r["prompt_id"] == f"olympiadbench-{record['id']}")
    assert prompt["answer"] == "69,84"


def test_olympiad_multi_answer_needs_every_part_in_any_order():
    gold = olympiad_gold(_olympiad("69$,$84")["final_answer"])
    triple = olympiad_gold(_olympiad("(1,8,19), (2,7,13), (4,5,7)")["final_answer"])
    functions = olympiad_gold(_olympiad("f(x)=-1$,$f(x)=x+1")["final_answer"])
    cases = [(gold, "69, 84", True), (gold, "84, 69", True), (gold, "69", False), (gold, "84", False),
             (gold, "69, 84, 1", False),
             (triple, "(2,7,13), (1,8,19), (4,5,7)", True), (triple, "(1,8,19), (2,7,13)", False),
             (functions, "f(x)=x+1, f(x)=-1", True), (functions, "f(x)=-1", False)]
    assert _grade([(g, a) for g, a, _ in cases]) == [ok for _, _, ok in cases]


# --- MinervaMath: code-like answers, rewritten, never evaluated -------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("np.arcsin(10/13)", "\\arcsin(10/13)"),
    ("-1./3", "-1/3"),
    ("4.5e33", "4.5 \\times 10^{33}"),
    ("1e-5", "1 \\times 10^{-5}"),
    ("2.7778e+6", "2.7778 \\times 10^{6}"),
    ("math.sqrt((1+x)/2)", "\\sqrt{(1+x)/2}"),
    ("np.log(2)", "\\ln(2)"),
    ("x2e5 + np.foo(1)", "x2e5 + np.foo(1)"),  # glued to a letter; an unknown function: left alone
    ("\\frac{1}{2a}(\\exp{a*t} - \\exp{-a*t})", "\\frac{1}{2a}(\\exp{a*t} - \\exp{-a*t})"),
])
def test_latex_form_rewrites_code_like_forms_by_substitution(text, expected):
    assert latex_form(text) == expected


def test_minerva_code_like_golds_grade_a_right_normal_form_and_reject_a_wrong_one():
    golds = {row["answer"]: row["answer"] for row in builtin_rows("minervamath", "test")}
    cases = [("np.arcsin(10/13)", "\\arcsin\\left(\\frac{10}{13}\\right)", True),
             ("np.arcsin(10/13)", "\\arcsin\\left(\\frac{10}{12}\\right)", False),
             ("-1./3", "-\\frac{1}{3}", True), ("-1./3", "\\frac{1}{3}", False),
             ("\\frac{1}{2a}(\\exp{a*t} - \\exp{-a*t})", "\\frac{e^{at}-e^{-at}}{2a}", True),
             ("\\frac{1}{2a}(\\exp{a*t} - \\exp{-a*t})", "\\frac{e^{at}+e^{-at}}{2a}", False),
             ("4.5e33", "4.5 \\times 10^{33}", True), ("4.5e33", "4.5e33", True), ("4.5e33", "4.5 \\times 10^{32}", False),
             ("1e-5", "10^{-5}", True), ("1e-5", "10^{5}", False)]
    assert all(gold in golds for gold, _, _ in cases)  # verbatim in the bundled file
    assert _grade([(g, a) for g, a, _ in cases]) == [ok for _, _, ok in cases]


def test_a_code_like_answer_is_never_evaluated():
    # were the text eval-ed, the marker file would appear; the rewrite only substitutes text
    marker = Path("/tmp") / f"antisd-eval-marker-{id(object())}"
    hostile = f"np.sqrt(__import__('os').system('touch {marker}'))"
    assert _grade([("2", hostile)]) == [False]
    assert not marker.exists()


# --- BeyondAIME: not bundled, prepared from the user's file ---------------------------------------------------------

def test_beyond_aime_is_prepared_from_its_file(tmp_path):
    from stages.data import run

    source = tmp_path / "beyond_aime.jsonl"
    source.write_text("".join(json.dumps({"id": i, "problem": f"Problem {i}?", "answer": str(answer)}) + "\n"
                              for i, answer in enumerate((3, 4, 9))))
    out = run(PrepareConfig(name="jsonl", path=str(source), id_field="id", split="test",
                            out=str(tmp_path / "beyond_aime.parquet")))
    from stages.common.io import read_artifact

    table, _ = read_artifact(out, "prompts")
    assert table.column("prompt_id").to_pylist() == ["beyond_aime-0", "beyond_aime-1", "beyond_aime-2"]
    assert table.column("answer").to_pylist() == ["3", "4", "9"]
    assert _grade([("9", "9"), ("9", "8")]) == [True, False]


# --- the grader's versions ---------------------------------------------------------------------------------------------

def test_verifier_versions_are_the_installed_ones_and_math_verify_is_pinned_to_them():
    recorded = answers.verifier_versions()
    assert recorded == {name: version(name) for name in ("math-verify", "latex2sympy2_extended", "sympy")}
    pyproject = (REPO / "pyproject.toml").read_text()
    for package in ("math-verify", "latex2sympy2_extended"):
        pinned = re.search(rf'"{re.escape(package)}==([0-9.]+)"', pyproject)
        assert pinned, f"{package} is not pinned in pyproject.toml"
        assert pinned[1] == recorded[package], f"pyproject pins {package} {pinned[1]}, installed {recorded[package]}"


def test_verified_files_record_the_verifier_versions(tmp_path):
    import pyarrow as pa

    import schemas
    from stages.common.io import read_metadata, write_artifact
    from stages.verifier.rows import VerifyConfig
    from stages.verify import run

    rows = [{"prompt_id": "p", "dataset": "d", "problem": "1+1?", "answer": "2", "solution": None, "few_shot": [],
             "sample_idx": i, "prompt_token_ids": [1], "response_token_ids": [2], "response_text": f"\\boxed{{{i + 1}}}",
             "sampling_logprobs": [-0.1], "finish_reason": "stop", "response_length": 1} for i in range(2)]
    rollouts = write_artifact(pa.Table.from_pylist(rows, schema=schemas.ROLLOUTS), tmp_path / "r.parquet", "rollouts",
                              {"config": {}})
    out = run(VerifyConfig(rollouts=str(rollouts), out=str(tmp_path / "v.parquet"), workers=1))
    assert read_metadata(out)["verifier"] == answers.verifier_versions()


@pytest.mark.parametrize("name", ["aime25", "aime26", "hmmt_feb25", "minervamath", "olympiadbench"])
def test_each_new_benchmark_is_an_eval_benchmark(name):
    from stages.eval import BENCHMARKS as EVAL_BENCHMARKS
    from stages.eval import prompt_rows

    assert name in EVAL_BENCHMARKS
    rows, label = prompt_rows(name, "test", 3)
    assert label == f"{name}/test" and len(rows) == 3 and all(row["dataset"] == name for row in rows)
