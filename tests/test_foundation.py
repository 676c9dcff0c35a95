"""Schemas, checked I/O, sharding, dataset preparation, model resolution and `inspect`."""

from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import schemas
from antisd_cli.main import cli
from stages.common import io
from stages.common.errors import InputError
from stages.common.parts import Shard, output_path
from stages.common.validation import ConfigError
from stages.lm import datasets as data


def _prompt_rows(n=3):
    return [
        {"prompt_id": f"p{i}", "dataset": "t", "problem": f"What is {i} + 1?", "answer": str(i + 1),
         "solution": None if i % 2 else f"{i} + 1 = {i + 1}", "few_shot": [{"user": "u", "assistant": "a"}]}
        for i in range(n)
    ]


@pytest.mark.parametrize("artifact", ["prompts", "rollouts", "verified", "scored"])
def test_schema_round_trip(tmp_path, artifact):
    schema = schemas.SCHEMAS[artifact]
    row = {}
    for field in schema:
        kind = field.type
        if pa.types.is_list(kind) and pa.types.is_struct(kind.value_type):
            row[field.name] = [{"user": "q", "assistant": "a"}]
        elif pa.types.is_list(kind):
            row[field.name] = [1, 2] if pa.types.is_integer(kind.value_type) else [-0.5, -1.5]
        elif pa.types.is_integer(kind):
            row[field.name] = 3
        elif pa.types.is_floating(kind):
            row[field.name] = 0.5
        elif pa.types.is_boolean(kind):
            row[field.name] = True
        else:
            row[field.name] = "x"
    # values the columns' rules require (schemas.check_values): a consistent, plausible row
    valid = {"response_length": 2, "reward": 1.0, "finish_reason": "stop", "verify_status": "ok",
             "privileged_source": "reference", "teacher_entropy": [0.5, 1.5], "student_entropy": [0.5, 1.5]}
    row.update({k: v for k, v in valid.items() if k in row})
    table = pa.Table.from_pylist([row], schema=schema)
    path = io.write_artifact(table, tmp_path / "f.parquet", artifact, io.build_metadata(artifact, {"k": 1}))
    back, meta = io.read_artifact(path, artifact)
    assert back.equals(table)
    assert meta["artifact"] == artifact and meta["config"] == {"k": 1}


def test_read_rejects_earlier_stage_file(tmp_path):
    path = tmp_path / "prompts.parquet"
    io.write_artifact(pa.Table.from_pylist(_prompt_rows(), schema=schemas.PROMPTS), path, "prompts", {})
    with pytest.raises(schemas.SchemaError, match=r"prompts\.parquet: this is a prompts file; a rollouts file"):
        io.read_artifact(path, "rollouts")


def test_read_names_missing_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt_id": ["a"], "problem": ["b"]}), path)
    with pytest.raises(schemas.SchemaError, match=r"bad\.parquet: missing column 'dataset'"):
        io.read_artifact(path, "prompts")


def test_read_names_mistyped_column(tmp_path):
    rows = _prompt_rows()
    table = pa.Table.from_pylist(rows, schema=schemas.PROMPTS).set_column(3, "answer", pa.array([1, 2, 3]))
    path = tmp_path / "typed.parquet"
    pq.write_table(table, path)
    with pytest.raises(schemas.SchemaError, match=r"column 'answer' has type int64, expected string"):
        io.read_artifact(path, "prompts")


def test_read_rejects_truncated_file(tmp_path):
    good = tmp_path / "good.parquet"
    io.write_artifact(pa.Table.from_pylist(_prompt_rows(), schema=schemas.PROMPTS), good, "prompts", {})
    bad = tmp_path / "truncated.parquet"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(schemas.SchemaError, match="truncated.parquet: not a readable Parquet file"):
        io.read_artifact(bad, "prompts")


def test_read_rejects_empty_file(tmp_path):
    path = tmp_path / "empty.parquet"
    io.write_artifact(pa.Table.from_pylist([], schema=schemas.PROMPTS), path, "prompts", {})
    with pytest.raises(InputError, match="empty.parquet: file has no rows"):
        io.read_artifact(path, "prompts")


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.parquet"
    io.write_artifact(pa.Table.from_pylist(_prompt_rows(), schema=schemas.PROMPTS), path, "prompts", {})
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError):
        io.write_artifact(pa.Table.from_pylist(_prompt_rows(1), schema=schemas.PROMPTS), path, "prompts", {})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("text,expected", [(None, Shard(0, 1)), ("0/4", Shard(0, 4)), (" 3 / 4 ", Shard(3, 4))])
def test_shard_parse(text, expected):
    assert Shard.parse(text) == expected


@pytest.mark.parametrize("text", ["4/4", "-1/2", "a/b", "1", "0/0"])
def test_shard_parse_rejects(text):
    with pytest.raises(InputError, match="--shard"):
        Shard.parse(text)


def test_shards_partition_keys():
    keys = ["a", "a", "b", "c", "c", "d", "e"]
    parts = [Shard(i, 3).select(keys) for i in range(3)]
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(keys)))
    for part in parts:  # a group never straddles two shards
        groups = {keys[i] for i in part}
        assert all(keys[j] not in groups for other in parts if other is not part for j in other)


def test_directory_of_parts_read_and_missing_part(tmp_path):
    out = tmp_path / "ds"
    rows = _prompt_rows(4)
    for index in (0, 1):
        shard = Shard(index, 2)
        chosen = [rows[i] for i in shard.select([r["prompt_id"] for r in rows])]
        io.write_artifact(pa.Table.from_pylist(chosen, schema=schemas.PROMPTS), output_path(out, shard), "prompts", {})
    table, _ = io.read_artifact(out, "prompts")
    assert sorted(table.column("prompt_id").to_pylist()) == ["p0", "p1", "p2", "p3"]
    (out / Shard(1, 2).part_name()).unlink()
    with pytest.raises(InputError, match=r"missing shard\(s\) 1/2"):
        io.read_artifact(out, "prompts")


def test_arith_train_and_test_are_disjoint():
    train = data.build_rows(data.PrepareConfig(name="arith", out="-", split="train"))
    test = data.build_rows(data.PrepareConfig(name="arith", out="-", split="test"))
    assert len(train) + len(test) == 90 * 90
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    a, b = map(int, train[0]["problem"][len("What is "):-1].split(" + "))
    assert train[0]["answer"] == str(a + b) and len(train[0]["few_shot"]) == 2


@pytest.mark.parametrize("name", ["arith", "arith_styles"])
def test_arith_operand_range_bounds_both_operands_and_holds_out_a_quarter(name):
    train = data.build_rows(data.PrepareConfig(name=name, out="-", split="train", operands="10-29"))
    test = data.build_rows(data.PrepareConfig(name=name, out="-", split="test", operands="10-29"))
    assert (len(train), len(test)) == (300, 100)  # 20 × 20 pairs, a quarter held out
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    for row in train + test:
        a, b = map(int, row["problem"][len("What is "):-1].split(" + "))
        assert 10 <= a <= 29 and 10 <= b <= 29 and row["answer"] == str(a + b)
    assert len(data.build_rows(data.PrepareConfig(name=name, out="-", split="test"))) == data.ARITH_TEST_SIZE


@pytest.mark.parametrize("operands", ["5", "0-9", "10-12", "10-1000", "29-10", "ten-20"])
def test_arith_operand_range_refuses_bad_ranges_by_name(operands):
    with pytest.raises(ConfigError, match=f"operands: a range LO-HI .* got '{operands}'"):
        data.PrepareConfig(name="arith", out="-", operands=operands)


def test_arith_seed_changes_order_not_content():
    first = data.build_rows(data.PrepareConfig(name="arith", out="-", seed=1))
    second = data.build_rows(data.PrepareConfig(name="arith", out="-", seed=2))
    assert [r["prompt_id"] for r in first] != [r["prompt_id"] for r in second]
    assert sorted(r["prompt_id"] for r in first) == sorted(r["prompt_id"] for r in second)


def test_gsm8k_answer_and_solution_split():
    rows = data.build_rows(data.PrepareConfig(name="gsm8k", out="-", split="train", num=1))
    assert rows[0]["answer"] == "72"
    assert "<<" not in rows[0]["solution"] and rows[0]["solution"].endswith("\\boxed{72}.")


@pytest.mark.parametrize("name,rows", [("math500", 500), ("aime24", 30), ("amc23", 40), ("gsm8k", 1319)])
def test_builtin_sets_load(name, rows):
    prepared = data.build_rows(data.PrepareConfig(name=name, out="-", split="test"))
    assert len(prepared) == rows
    assert all(r["answer"] for r in prepared)


def test_amc_float_answers_are_cleaned():
    rows = data.build_rows(data.PrepareConfig(name="amc23", out="-", split="test"))
    assert rows[0]["answer"] == "27"


def test_user_jsonl_with_field_mapping(tmp_path):
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(json.dumps({"q": f"Q{i}", "a": i, "key": f"k{i}"}) for i in range(3)))
    rows = data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=str(src), problem_field="q",
                                              answer_field="a", solution_field=None, id_field="key"))
    assert [r["prompt_id"] for r in rows] == ["mine-k0", "mine-k1", "mine-k2"]
    assert rows[1]["answer"] == "1" and rows[1]["solution"] is None


def test_user_jsonl_missing_field_names_row(tmp_path):
    src = tmp_path / "mine.jsonl"
    src.write_text(json.dumps({"problem": "x"}))
    with pytest.raises(InputError, match="mine.jsonl: row 0 has no field 'answer'"):
        data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=str(src)))


def test_user_rows_carry_their_own_few_shot_turns_into_the_prompt(tmp_path):
    from stages.lm.prompts import student_messages

    turns = [{"user": "What is 2 + 2?", "assistant": "4"}]
    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join([json.dumps({"problem": "P0", "answer": 1, "shots": turns}),
                              json.dumps({"problem": "P1", "answer": 2})]))
    config = data.PrepareConfig(name="jsonl", out=str(tmp_path / "p.parquet"), path=str(src), few_shot_field="shots")
    rows = data.build_rows(config)
    assert rows[0]["few_shot"] == turns and rows[1]["few_shot"] == []
    assert student_messages(rows[0]["problem"], rows[0]["few_shot"])[:2] == [
        {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    # through Parquet: the list column comes back as the same turns
    parquet = tmp_path / "mine.parquet"
    data.write_prompts(data.prompts_table(config), config, parquet)
    again = data.build_rows(data.PrepareConfig(name="parquet", out="-", path=str(parquet)))
    assert again[0]["few_shot"] == turns


@pytest.mark.parametrize("value, message", [
    ("not a list", "must be a list"), ([{"user": "q"}], "turn 0 must have exactly the keys user and assistant"),
    ([{"user": "q", "assistant": ""}], "turn 0: user and assistant must be non-empty strings"),
    ([{"user": "q", "assistant": 3}], "non-empty strings")])
def test_malformed_few_shot_turns_name_file_row_and_field(tmp_path, value, message):
    src = tmp_path / "mine.jsonl"
    src.write_text(json.dumps({"problem": "P", "answer": 1}) + "\n" + json.dumps({"problem": "P", "answer": 1,
                                                                                  "few_shot": value}))
    with pytest.raises(InputError, match=f"mine.jsonl: row 1 field 'few_shot': .*{message}"):
        data.build_rows(data.PrepareConfig(name="jsonl", out="-", path=str(src)))


@pytest.mark.parametrize("shots, styles", [("direct,deliberate", ["direct", "deliberate"]),
                                           ("deliberate,small,direct", ["deliberate", "direct", "direct"])])
def test_arith_styles_worked_examples_follow_shots_and_their_arithmetic_holds(shots, styles):
    import re

    rows = data.build_rows(data.PrepareConfig(name="arith_styles", out="-", num=5, shots=shots))
    assert [data.answer_style(turn["assistant"]) for turn in rows[0]["few_shot"]] == styles
    with pytest.raises(ConfigError, match="shots"):
        data.PrepareConfig(name="arith_styles", out="-", shots="direct,wordy")
    assert {r["problem"] for r in rows} == {r["problem"] for r in data.build_rows(
        data.PrepareConfig(name="arith", out="-", num=5))}  # the same pairs as arith
    assert rows[0]["prompt_id"].startswith("arith_styles-train-")
    for a in range(10, 100, 7):
        for b in range(10, 100, 11):
            text = data.deliberate_solution(a, b)
            for x, op, y, z in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", text):
                assert (int(x) + int(y) if op == "+" else int(x) - int(y)) == int(z), text
            assert text.endswith(f"\\boxed{{{a + b}}}.") and data.answer_style(text) == "deliberate"
    assert data.deliberate_solution(47, 36) == ("Split: 40 + 30 = 70 and 7 + 6 = 13, so 70 + 13 = 83. "
                                                "Check: 83 - 36 = 47. The final answer is \\boxed{83}.")


def test_cli_prepare_refuses_existing_output(tmp_path):
    out = tmp_path / "p.parquet"
    runner = CliRunner()
    first = runner.invoke(cli, ["data", "prepare", "arith", "--num", "5", "--out", str(out)])
    assert first.exit_code == 0, first.output
    before = out.read_bytes()
    again = runner.invoke(cli, ["data", "prepare", "arith", "--num", "3", "--out", str(out)])
    assert again.exit_code == 2
    assert "output exists" in again.stderr and str(out) in again.stderr
    assert out.read_bytes() == before


def test_cli_prepare_missing_output_dir(tmp_path):
    result = CliRunner().invoke(cli, ["data", "prepare", "arith", "--out", str(tmp_path / "nope" / "p.parquet")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_resolve_model_rejects_non_model(tmp_path):
    from stages.lm.models import resolve_model

    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not a Hugging Face model folder"):
        resolve_model(tmp_path / "folder")
    with pytest.raises(InputError, match="no such folder"):
        resolve_model(tmp_path / "missing")


def test_embedded_model_is_a_dense_llama(embedded_model_dir):
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config
    assert (embedded_model_dir / "model.safetensors").stat().st_size > 400e6


def test_prompt_encoding_uses_chat_template(tiny_model_dir):
    from stages.lm import prompts
    from stages.lm.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    ids = prompts.encode(tokenizer, prompts.student_messages("What is 1 + 2?", [{"user": "U", "assistant": "A"}]))
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "What is 1 + 2? Put the final answer in \\boxed{}." in text
    assert text.index("U") < text.index("What is 1 + 2?")


def test_teacher_text_holds_solution_and_assessment():
    from stages.lm import prompts
    text = prompts.teacher_user_text("P?", "sol", correct=False)
    assert text.startswith("P? Put the final answer")
    assert "Your previous attempt:\nsol\n\nPrevious assessment: Your answer is incorrect." in text


def test_strip_think():
    from stages.lm.prompts import strip_think

    assert strip_think("<think>hmm</think> 2 + 2 = 4") == "2 + 2 = 4"
    assert strip_think("partial</think>answer") == "answer"


def test_inspect_cli_json_and_row(arith_prompts):
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", str(arith_prompts), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["artifact"] == "prompts" and summary["rows"] == 4
    bad = runner.invoke(cli, ["inspect", str(arith_prompts), "--row", "99"])
    assert bad.exit_code == 2 and "--row 99" in bad.stderr


def test_the_suite_uses_a_temporary_cache_not_the_users():
    from pathlib import Path

    from stages.lm.models import cache_root

    root = cache_root().resolve()
    assert root != (Path.home() / ".cache" / "antisd").resolve()
    assert os.environ.get("ANTISD_TEST_CACHE") or Path(tempfile.gettempdir()).resolve() in root.parents


def test_the_gguf_conversion_bar_writes_no_carriage_return_into_a_log_file(capfd):
    """transformers' GGUF reader draws its tqdm bar only on a terminal while antisd converts (a Slurm log gets none);
    the real conversion's stderr to a file was checked to hold no carriage return (issue 26)."""
    import io as std_io

    from transformers import modeling_gguf_pytorch_utils as gguf

    from stages.lm.models import gguf_bar_on_terminals_only

    original = gguf.tqdm
    with gguf_bar_on_terminals_only(stream=std_io.StringIO()):
        assert list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
    assert gguf.tqdm is original
    assert "\r" not in capfd.readouterr().err
    list(gguf.tqdm(range(3), desc="outside", disable=False))  # the test can fail: outside, tqdm draws its bar
    assert "\r" in capfd.readouterr().err


def test_the_converted_embedded_model_is_readable_by_others(embedded_model_dir):
    mask = io.current_umask()
    assert embedded_model_dir.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (embedded_model_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_logs_written_to_a_file_hold_one_record_per_line(tmp_path):
    import re
    import subprocess
    import sys

    deep = tmp_path / ("a_rather_long_folder_name_" * 3) / "and_another_level_of_it"
    deep.mkdir(parents=True)
    out = deep / "prompts_with_a_long_name.parquet"
    with open(tmp_path / "stderr.log", "w") as stderr:
        subprocess.run([sys.executable, "-m", "antisd_cli", "-v", "data", "prepare", "arith", "--num", "3", "--out",
                        str(out)], stderr=stderr, stdout=subprocess.PIPE, check=True, cwd=tmp_path)
    lines = (tmp_path / "stderr.log").read_text().splitlines()
    record = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")
    assert lines and all(record.match(line) for line in lines), lines
    wrote = [line for line in lines if "wrote 3 prompts" in line]
    assert len(wrote) == 1 and wrote[0].endswith(str(out)) and len(wrote[0]) > 120  # the path, unbroken
    assert "\x1b[" not in "".join(lines)  # no colour codes in a file


def test_one_line_formatter_folds_newlines():
    import logging

    from antisd_cli.main import OneLineFormatter

    record = logging.LogRecord("stages.x", logging.INFO, __file__, 1, "a\nb\r\nc", None, None)
    assert OneLineFormatter().format(record).endswith("stages.x: a ⏎ b ⏎ c")


def test_hf_datasets_folder_with_field_mapping(tmp_path):
    import datasets as hf_datasets
    from click.testing import CliRunner

    from antisd_cli.main import cli

    records = {"question": [f"What is {i} + {i}?" for i in range(4)], "final": [str(2 * i) for i in range(4)],
               "key": [f"q{i}" for i in range(4)]}
    hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_dict(records),
                             "validation": hf_datasets.Dataset.from_dict(records).select(range(2))}
                            ).save_to_disk(str(tmp_path / "mydata"))
    out = tmp_path / "val.parquet"
    result = CliRunner().invoke(cli, ["data", "prepare", "hf", "--path", str(tmp_path / "mydata"), "--split",
                                      "validation", "--problem-field", "question", "--answer-field", "final",
                                      "--id-field", "key", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [(r["prompt_id"], r["problem"], r["answer"]) for r in rows] == [
        ("mydata-q0", "What is 0 + 0?", "0"), ("mydata-q1", "What is 1 + 1?", "2")]
    for args, message in ((["--split", "test"], "no split 'test' (has train, validation)"),
                          (["--path", "no-org/not-cached", "--split", "train"], "--path no-org/not-cached --split "
                                                                                 "train: cannot load it"),
                          (["--path", str(tmp_path / "not_there"), "--split", "train"], f"--path {tmp_path / 'not_there'}: "
                                                                                         "no such folder")):
        base = ["-q", "data", "prepare", "hf", "--path", str(tmp_path / "mydata"), "--out", str(tmp_path / "x.parquet")]
        bad = CliRunner().invoke(cli, base + args)
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (tmp_path / "x.parquet").exists()


def test_a_run_configs_train_section_maps_fields(tmp_path):
    from stages.runs import config as run_config
    from stages.runs.plan import run_prompts

    src = tmp_path / "mine.jsonl"
    src.write_text("\n".join(json.dumps({"q": f"Q{i}", "a": i, "key": f"k{i}"}) for i in range(3)))
    resolved = run_config.resolve({"loop": {"train": {"name": "jsonl", "path": str(src), "problem_field": "q",
                                                      "answer_field": "a", "id_field": "key"}}})
    table = run_prompts(resolved.loop.train, tmp_path / "train_prompts.parquet")
    assert table.column("prompt_id").to_pylist() == ["mine-k0", "mine-k1", "mine-k2"]
    assert table.column("answer").to_pylist() == ["0", "1", "2"]
    with pytest.raises(InputError, match="problem_field"):
        run_config.resolve({"loop": {"train": {"name": "jsonl", "path": str(src), "problem_field": 3}}})
