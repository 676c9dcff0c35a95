"""Field options name nested fields by dotted path (`reward_model.ground_truth`, `prompt.-1.content`), in every user
reader (jsonl, parquet, hf) and in a run config's train:/eval: mapping; a missing path is a one-line error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from stages.common.errors import InputError
from stages.lm import datasets as data
from stages.lm.records import field_value


def dapo_rows(count: int = 3) -> list[dict]:
    """Rows shaped like DAPO-Math-17k's: the problem inside a list of chat turns, the answer and id nested."""
    return [{"data_source": "math_dapo",
             "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "ability": "MATH",
             "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
             "extra_info": {"index": f"id-{i}", "split": "train"}} for i in range(count)]


DAPO_FIELDS = ["--problem-field", "prompt.0.content", "--answer-field", "reward_model.ground_truth",
               "--id-field", "extra_info.index"]


def test_field_value_reads_keys_and_list_indices_and_a_dotted_column_wins():
    record = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
              "reward_model": {"ground_truth": "7"}, "a.b": "flat", "a": {"b": "nested"}, "n": {"0": "key zero"}}
    assert field_value(record, "reward_model.ground_truth") == "7"
    assert field_value(record, "prompt.0.content") == "S"
    assert field_value(record, "prompt.-1.content") == "U"  # the last turn
    assert field_value(record, "prompt.1") == {"role": "user", "content": "U"}
    assert field_value(record, "a.b") == "flat"  # a top-level column of that very name wins over the path
    assert field_value(record, "n.0") == "key zero"  # a dict key that looks like an index is still a key
    for missing in ("reward_model.style", "prompt.2.content", "prompt.-3.content", "prompt.first",
                    "reward_model.ground_truth.x", "nothing"):
        assert field_value(record, missing) is None, missing
    assert field_value(record, None) is None and field_value(record, "") is None


def _write(fmt: str, rows: list[dict], folder) -> str:
    """`rows` as a user dataset of format `fmt` (nested struct and list columns in Parquet and HF)."""
    if fmt == "jsonl":
        path = folder / "dapo.jsonl"
        path.write_text("\n".join(json.dumps(row) for row in rows))
    elif fmt == "parquet":
        path = folder / "dapo.parquet"
        table = pa.Table.from_pylist(rows)
        assert pa.types.is_list(table.schema.field("prompt").type)  # really nested columns
        assert pa.types.is_struct(table.schema.field("reward_model").type)
        pq.write_table(table, path)
    else:
        import datasets as hf_datasets

        path = folder / "dapo"
        hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_data_prepare_reads_dapo_shaped_rows_by_path(tmp_path, fmt):
    from antisd_cli.main import cli

    source = _write(fmt, dapo_rows(), tmp_path)
    out = tmp_path / "prompts.parquet"
    result = CliRunner().invoke(cli, ["data", "prepare", fmt, "--path", source, "--split", "train", *DAPO_FIELDS,
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [(r["prompt_id"], r["problem"], r["answer"]) for r in rows] == [
        ("dapo-id-0", "What is 0 + 0?", "0"), ("dapo-id-1", "What is 1 + 1?", "2"), ("dapo-id-2", "What is 2 + 2?", "4")]
    assert all(r["solution"] is None and r["few_shot"] == [] for r in rows)
    # the last turn by a negative index, the same rows
    again = data.build_rows(data.PrepareConfig(name=fmt, out="-", path=source, problem_field="prompt.-1.content",
                                               answer_field="reward_model.ground_truth", id_field="extra_info.index"))
    assert [r["problem"] for r in again] == [r["problem"] for r in rows]


def test_a_missing_path_is_a_one_line_error_naming_file_row_and_path(tmp_path):
    from antisd_cli.main import cli

    rows = dapo_rows()
    del rows[1]["reward_model"]["ground_truth"]
    source = _write("jsonl", rows, tmp_path)
    with pytest.raises(InputError, match=r"dapo.jsonl: row 1 has no field 'reward_model.ground_truth' \(row has: "
                                         r"data_source, prompt, ability, reward_model, extra_info"):
        data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=source, problem_field="prompt.0.content",
                                           answer_field="reward_model.ground_truth"))
    result = CliRunner().invoke(cli, ["-q", "data", "prepare", "jsonl", "--path", source, *DAPO_FIELDS,
                                      "--out", str(tmp_path / "x.parquet")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "row 1 has no field 'reward_model.ground_truth'" in result.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_a_problem_field_naming_the_turns_themselves_is_refused(tmp_path):
    source = _write("jsonl", dapo_rows(1), tmp_path)
    with pytest.raises(InputError, match=r"dapo.jsonl: row 0 field 'prompt' holds a list, not text .*'prompt.0.content'"):
        data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=source, problem_field="prompt",
                                           answer_field="reward_model.ground_truth"))


def test_a_run_configs_train_and_eval_sections_take_paths(tmp_path):
    from stages.runs import config as run_config
    from stages.runs.plan import run_prompts

    source = _write("parquet", dapo_rows(), tmp_path)
    spec = {"name": "parquet", "path": source, "problem_field": "prompt.-1.content",
            "answer_field": "reward_model.ground_truth", "id_field": "extra_info.index"}
    resolved = run_config.resolve({"loop": {"train": spec, "eval": {**spec, "num": 2}}})
    train = run_prompts(resolved.loop.train, tmp_path / "train_prompts.parquet")
    assert train.column("prompt_id").to_pylist() == ["dapo-id-0", "dapo-id-1", "dapo-id-2"]
    assert train.column("answer").to_pylist() == ["0", "2", "4"]
    held_out = run_prompts(resolved.loop.eval, tmp_path / "eval_prompts.parquet")
    assert held_out.column("problem").to_pylist() == ["What is 0 + 0?", "What is 1 + 1?"]


def test_dedupe_keeps_the_first_row_of_each_problem(tmp_path):
    """DAPO-Math-17k's Hub copy repeats every problem (with the same id): --dedupe keeps the first of each."""
    from antisd_cli.main import cli

    rows = dapo_rows(3)
    source = _write("jsonl", [*rows, rows[1], rows[0]], tmp_path)
    fields = ["--problem-field", "prompt.0.content", "--answer-field", "reward_model.ground_truth"]
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(cli, ["-q", "data", "prepare", "jsonl", "--path", source, *fields, "--dedupe",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    kept = pq.read_table(out).to_pylist()
    assert [r["problem"] for r in kept] == [f"What is {i} + {i}?" for i in range(3)]
    assert [r["prompt_id"] for r in kept] == ["dapo-0", "dapo-1", "dapo-2"]  # row numbers of the kept rows
    repeated = data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=source, problem_field="prompt.0.content",
                                                  answer_field="reward_model.ground_truth"))
    assert len(repeated) == 5  # without --dedupe every row stays
    with pytest.raises(InputError, match="is not unique .*--dedupe"):  # the repeated ids need --dedupe
        data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=source, problem_field="prompt.0.content",
                                           answer_field="reward_model.ground_truth", id_field="extra_info.index"))
    assert len(data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=source, dedupe=True,
                                                  problem_field="prompt.0.content", id_field="extra_info.index",
                                                  answer_field="reward_model.ground_truth"))) == 3


def test_answer_boxed_reads_maths_answers_out_of_the_solution(tmp_path):
    """MATH train rows carry the answer only inside the worked solution's last \\boxed{}."""
    rows = [{"problem": "Half of 1?", "level": "Level 1", "type": "Algebra",
             "solution": "It is $\\boxed{2}$ no, $\\boxed{\\frac{1}{2}}$."},
            {"problem": "Nested?", "level": "Level 2", "type": "Algebra", "solution": "So $\\boxed{\\{1, 2\\}}$."}]
    source = _write("jsonl", rows, tmp_path)
    built = data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=source, answer_field="solution",
                                               answer_boxed=True))
    assert [r["answer"] for r in built] == ["\\frac{1}{2}", "\\{1, 2\\}"]
    assert [r["solution"] for r in built] == [r["solution"] for r in rows]  # the solution stays the reference
    bad = _write("jsonl", [*rows, {"problem": "P", "solution": "no box here"}], tmp_path)
    with pytest.raises(InputError, match=r"dapo.jsonl: row 2 field 'solution': no \\boxed\{…\} answer in it"):
        data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=bad, answer_field="solution",
                                           answer_boxed=True))
