"""Sharded outputs: directories of part files read by every stage, `antisd merge` and its checks."""

from __future__ import annotations

import pyarrow as pa
import pytest
from click.testing import CliRunner

import schemas
from antisd_cli.main import cli
from stages import merge
from stages.common import io, parts
from stages.common.errors import InputError
from stages.common.parts import Shard, output_path

ARTIFACTS = ["prompts", "rollouts", "verified", "scored"]


def rows_for(artifact: str, prompt_ids: list[str], samples: int = 2) -> pa.Table:
    """A valid table of `artifact` with `samples` rows per prompt id (values depend on the id, for equality checks)."""
    schema = schemas.SCHEMAS[artifact]
    per_prompt = 1 if artifact == "prompts" else samples
    rows = []
    for number, prompt_id in enumerate(prompt_ids):
        for sample in range(per_prompt):
            row = {}
            for field in schema:
                kind = field.type
                if field.name == "prompt_id":
                    row[field.name] = prompt_id
                elif field.name == "sample_idx":
                    row[field.name] = sample
                elif pa.types.is_list(kind) and pa.types.is_struct(kind.value_type):
                    row[field.name] = [{"user": "What is 3 + 4?", "assistant": "7"}]
                elif pa.types.is_list(kind):
                    row[field.name] = ([number, sample, 7] if pa.types.is_integer(kind.value_type)
                                       else [-0.5, -1.5 - sample, -number / 10])
                elif pa.types.is_integer(kind):
                    row[field.name] = 3
                elif pa.types.is_floating(kind):
                    row[field.name] = 0.5
                elif pa.types.is_boolean(kind):
                    row[field.name] = sample % 2 == 0
                else:
                    row[field.name] = f"{field.name} of {prompt_id}"
            # values the columns' rules require (schemas.check_values)
            valid = {"response_length": 3, "reward": float(sample % 2 == 0), "finish_reason": "stop",
                     "verify_status": "ok", "privileged_source": "reference",
                     "teacher_entropy": [0.5, 1.5 + sample, number / 10], "student_entropy": [0.5, 1.5, 2.5]}
            row.update({k: v for k, v in valid.items() if k in row})
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


def write_parts(directory, artifact: str, prompt_ids: list[str], count: int, config: dict | None = None) -> list:
    """Deal `prompt_ids` to `count` shards the way the stages do (Shard.select) and write one part each."""
    directory.mkdir(exist_ok=True)
    table = rows_for(artifact, prompt_ids)
    keys = table.column("prompt_id").to_pylist()
    paths = []
    for index in range(count):
        shard = Shard(index, count)
        metadata = io.build_metadata(artifact, {**(config or {"seed": 1}), "shard": f"{index}/{count}"},
                                     tokens_per_s=100.0 + index)
        paths.append(io.write_artifact(table.take(shard.select(keys)), output_path(directory, shard),
                                       artifact, metadata))
    return paths


IDS = [f"p{i}" for i in range(7)]


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_directory_of_parts_reads_as_the_whole(tmp_path, artifact):
    write_parts(tmp_path / "parts", artifact, IDS, 3)
    table, _ = io.read_artifact(tmp_path / "parts", artifact)
    whole = rows_for(artifact, IDS)
    key = [("prompt_id", "ascending")] + ([("sample_idx", "ascending")] if artifact != "prompts" else [])
    assert table.sort_by(key).equals(whole.sort_by(key))


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_merge_writes_one_file_equal_to_the_parts(tmp_path, artifact):
    write_parts(tmp_path / "parts", artifact, IDS, 3)
    out = merge.run(merge.MergeConfig(parts=str(tmp_path / "parts"), out=str(tmp_path / "merged.parquet")))
    merged, metadata = io.read_artifact(out, artifact)
    whole, _ = io.read_artifact(tmp_path / "parts", artifact)
    assert merged.equals(whole)
    assert metadata["artifact"] == artifact
    assert metadata["config"] == {"seed": 1}  # the shard is per part, not of the merged file
    assert metadata["merged_from"]["count"] == 3
    assert [m["config"]["shard"] for m in metadata["parts_metadata"]] == ["0/3", "1/3", "2/3"]
    assert "tokens_per_s" not in metadata  # differs between parts: kept only per part
    assert [m["tokens_per_s"] for m in metadata["parts_metadata"]] == [100.0, 101.0, 102.0]


def test_merge_names_the_missing_shard(tmp_path):
    paths = write_parts(tmp_path / "parts", "rollouts", IDS, 4)
    paths[2].unlink()
    with pytest.raises(InputError, match=r"missing shard\(s\) 2/4"):
        merge.run(merge.MergeConfig(parts=str(tmp_path / "parts"), out=str(tmp_path / "m.parquet")))
    assert not (tmp_path / "m.parquet").exists()


def test_merge_names_the_shards_sharing_a_prompt_id(tmp_path):
    write_parts(tmp_path / "parts", "verified", IDS, 2)
    # shard 1 rewritten from a different sharding: it now also holds p0, which shard 0 has
    table = rows_for("verified", ["p0", "p1", "p3"])
    io.write_artifact(table, tmp_path / "parts" / "part-00001-of-00002.parquet", "verified",
                      io.build_metadata("verified", {"seed": 1, "shard": "1/2"}))
    with pytest.raises(InputError, match=r"prompt id 'p0' appears in shard 0/2 \(part-00000-of-00002.parquet\) "
                                         r"and in shard 1/2"):
        parts.check_parts(tmp_path / "parts")


def test_merge_rejects_parts_of_different_configs(tmp_path):
    write_parts(tmp_path / "parts", "rollouts", IDS, 2)
    write_parts(tmp_path / "other", "rollouts", IDS, 2, config={"seed": 2})
    (tmp_path / "other" / "part-00001-of-00002.parquet").replace(tmp_path / "parts" / "part-00001-of-00002.parquet")
    with pytest.raises(InputError, match=r"shard 1/2 \(part-00001-of-00002.parquet\) was made with a different "
                                         r"config .*\(seed\)"):
        parts.check_parts(tmp_path / "parts")


def test_merge_rejects_parts_of_different_artifacts(tmp_path):
    write_parts(tmp_path / "parts", "rollouts", IDS, 2)
    verified = rows_for("verified", IDS)
    table = verified.take(Shard(1, 2).select(verified.column("prompt_id").to_pylist()))
    io.write_artifact(table, tmp_path / "parts" / "part-00001-of-00002.parquet", "verified",
                      io.build_metadata("verified", {"seed": 1, "shard": "1/2"}))
    with pytest.raises(InputError, match=r"shard 1/2 .* is a verified file, shard 0/2 .* a rollouts file"):
        parts.check_parts(tmp_path / "parts")


def test_disjoint_allows_a_prompt_spread_over_rows_of_one_part():
    assert parts.find_overlap([("a", ["p0", "p0", "p1"]), ("b", ["p2", "p2"])]) is None
    assert parts.find_overlap([("a", ["p0", "p1"]), ("b", ["p2", "p1"])]) == ("p1", "a", "b")


def test_missing_shards_lists_absent_indices(tmp_path):
    paths = write_parts(tmp_path / "parts", "prompts", IDS, 3)
    assert parts.missing_shards(tmp_path / "parts", 3) == []
    paths[0].unlink()
    assert parts.missing_shards(tmp_path / "parts", 3) == [0]
    assert parts.missing_shards(tmp_path / "absent", 2) == [0, 1]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["PARTS", "--out", "OUT"], 0, ""),
        (["PARTS", "--out", "EXISTING"], 2, "output exists (pass --overwrite to replace it)"),
        (["PARTS", "--out", "EXISTING", "--overwrite"], 0, ""),
        (["FILE", "--out", "OUT"], 2, "is a file"),
        (["PARTS", "--out", "NODIR/m.parquet"], 2, "output directory"),
    ],
)
def test_merge_cli(tmp_path, args, code, message):
    write_parts(tmp_path / "parts", "scored", IDS, 2)
    (tmp_path / "existing.parquet").write_text("old")
    names = {"PARTS": tmp_path / "parts", "OUT": tmp_path / "m.parquet", "EXISTING": tmp_path / "existing.parquet",
             "FILE": tmp_path / "existing.parquet", "NODIR/m.parquet": tmp_path / "nodir" / "m.parquet"}
    result = CliRunner().invoke(cli, ["merge"] + [str(names.get(a, a)) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.stderr
    if code == 0:
        out = names[args[2]]
        assert result.stdout.strip() == str(out)
        assert io.read_artifact(out, "scored")[0].num_rows == 2 * len(IDS)
    elif args[2] == "EXISTING":
        assert (tmp_path / "existing.parquet").read_text() == "old"


def test_merge_cli_missing_part_exits_2_naming_the_shard(tmp_path):
    paths = write_parts(tmp_path / "parts", "rollouts", IDS, 3)
    paths[1].unlink()
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "parts"), "--out", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2
    assert "missing shard(s) 1/3" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_merged_scored_file_recomputes_the_median_teacher_entropy_over_all_parts(tmp_path):
    import numpy as np

    paths = write_parts(tmp_path / "parts", "scored", IDS, 3)
    for index, path in enumerate(paths):  # per-part figures as `score --shard` records them
        table, metadata = io.read_artifact(path, "scored")
        io.write_artifact(table, path, "scored", {**metadata, "rows": table.num_rows, "median_teacher_entropy": index})
    out = merge.run(merge.MergeConfig(parts=str(tmp_path / "parts"), out=str(tmp_path / "merged.parquet")))
    _, metadata = io.read_artifact(out, "scored")
    whole = rows_for("scored", IDS).to_pylist()
    expected = np.median([v for row in whole if row["privileged_source"] != "none" for v in row["teacher_entropy"]])
    assert metadata["median_teacher_entropy"] == pytest.approx(expected)
    assert metadata["teacher_entropy_tokens"] == 3 * len(whole)
    assert metadata["rows"] == len(whole)


def test_median_teacher_entropy_leaves_out_rows_without_a_teacher():
    table = pa.table({"privileged_source": ["peer", "none", "reference"],
                      "teacher_entropy": [[1.0, 2.0], [100.0, 100.0, 100.0], [3.0]]})
    from stages.method.gate import median_teacher_entropy

    has_teacher = [source != "none" for source in table.column("privileged_source").to_pylist()]
    assert median_teacher_entropy(table.column("teacher_entropy").to_pylist(), has_teacher) == (2.0, 3)
    assert median_teacher_entropy([[100.0]], [False]) == (None, 0)


# --- every stage takes a directory of parts as its input (hand-built parts, tiny model) ----------------------------

STAGE_INPUTS = {  # stage → (input option, artifact of the input parts, extra options, output artifact)
    "rollout": ("--prompts", "prompts", ["--n", "1", "--max-new-tokens", "2", "--engine", "hf", "--threads", "1"],
                "rollouts"),
    "verify": ("--rollouts", "rollouts", ["--workers", "1"], "verified"),
    "score": ("--verified", "verified", ["--threads", "1"], "scored"),
    "update": ("--scored", "scored", ["--threads", "1", "--zero-stage", "2"], None),
}


@pytest.mark.parametrize("stage", list(STAGE_INPUTS))
def test_each_stage_reads_a_directory_of_parts(tmp_path, tiny_model_dir, stage):
    option, artifact, extra, out_artifact = STAGE_INPUTS[stage]
    ids = ["p0", "p1", "p2"]
    write_parts(tmp_path / "parts", artifact, ids, 3)
    args = [stage, option, str(tmp_path / "parts"), "--out", str(tmp_path / "out")] + extra
    if stage != "verify":
        args += ["--model", str(tiny_model_dir)]
    result = CliRunner().invoke(cli, ["-q"] + args)
    assert result.exit_code == 0, result.output
    if out_artifact is None:  # update: a checkpoint trained on all parts' rows
        assert (tmp_path / "out" / "config.json").exists()
        return
    table, _ = io.read_artifact(tmp_path / "out", out_artifact)
    assert sorted(set(table.column("prompt_id").to_pylist())) == ids
    assert table.num_rows == (3 if stage == "rollout" else 2 * 3)


def test_parts_may_differ_in_how_they_were_computed(tmp_path):
    write_parts(tmp_path / "parts", "scored", IDS, 2, config={"seed": 1, "threads": 4, "micro_batch_tokens": 8192})
    table, metadata = io.read_artifact(tmp_path / "parts" / "part-00001-of-00002.parquet", "scored")
    metadata["config"].update(threads=1, micro_batch_tokens=1024)  # shard 1 rerun on a smaller machine
    io.write_artifact(table, tmp_path / "parts" / "part-00001-of-00002.parquet", "scored", metadata)
    assert len(parts.check_parts(tmp_path / "parts")) == 2


def test_per_part_knobs_inside_a_stage_section_may_differ_too(tmp_path):
    # eval's suite parts record {"rollout": {...}, "verify": {...}}: a shard rerun with other threads is the same output
    config = {"rollout": {"n": 4, "threads": 4, "progress": True}, "verify": {"workers": 2}}
    write_parts(tmp_path / "parts", "verified", IDS, 2, config=config)
    part = tmp_path / "parts" / "part-00001-of-00002.parquet"
    table, metadata = io.read_artifact(part, "verified")
    metadata["config"]["rollout"].update(threads=1, progress=False)
    io.write_artifact(table, part, "verified", metadata)
    assert len(parts.check_parts(tmp_path / "parts")) == 2
    metadata["config"]["rollout"]["n"] = 8  # what a part computes may not differ
    io.write_artifact(table, part, "verified", metadata)
    with pytest.raises(InputError, match="different config than"):
        parts.check_parts(tmp_path / "parts")
