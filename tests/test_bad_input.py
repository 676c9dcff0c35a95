"""Bad input and faults found by the audit: each gets exit 2 and a one-line error naming the file, row or option,
before any expensive work, and nothing written earlier is lost.

Covers non-finite option values, nulls and impossible values in input files, outputs that cannot be written, two
writers on one output, and files that are not Parquet. The loop-level cases are in tests/test_loop.py.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_update import make_scored

import schemas
from antisd_cli.main import cli
from stages.common import io

REPO = Path(__file__).resolve().parent.parent


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result, *fragments):
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def rewrite(path: Path, column: str, values, kind=None) -> Path:
    """`path` with `column` replaced by `values` (metadata kept), written as is: no checks on the way out."""
    table = pq.read_table(path)
    index = table.schema.get_field_index(column)
    field = table.schema.field(index).with_nullable(True)  # as another tool may declare it
    table = table.set_column(index, field, pa.array(values, kind or field.type))
    pq.write_table(table, path)
    return path


@pytest.fixture
def scored(tmp_path, tiny_model_dir):
    return make_scored(tmp_path / "scored.parquet", tiny_model_dir)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if update gets as far as building its trainer (the expensive part)."""
    from stages import update
    def refuse(*args, **kwargs):
        raise AssertionError("the trainer was built: the check came too late")

    monkeypatch.setattr(update, "Trainer", refuse)


# --- option values: finite and in range, before any work ---------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["rollout", "--temperature", "nan"], "--temperature: must be a finite number, got nan"),
    (["rollout", "--top-p", "nan"], "--top-p: must be a finite number"),
    (["rollout", "--n", "0", "--top-p", "2"], "--n: must be >= 1, got 0; --top-p: must be in (0, 1], got 2.0"),
    (["verify", "--timeout", "inf"], "--timeout: must be a finite number, got inf"),
    (["score", "--temperature", "nan"], "--temperature: must be a finite number"),
    (["eval", "--benchmark", "arith", "--temperature", "-inf"], "--temperature: must be a finite number"),
    (["eval", "--benchmark", "arith", "--timeout", "nan", "--n", "0"], "--n: must be >= 1, got 0; --timeout:"),
    (["analyze", "pmi", "--clip", "nan"], "--clip: must be a finite number"),
])
def test_non_finite_and_out_of_range_options_exit_2_naming_them(tmp_path, args, fragment):
    inputs = {"rollout": ["--prompts", tmp_path], "verify": ["--rollouts", tmp_path],
              "score": ["--verified", tmp_path], "eval": [], "analyze": []}[args[0]]
    result = invoke(*args, *inputs, "--out", tmp_path / "out")
    assert_refused(result, fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--lr", "--lam-max", "--weight-decay", "--grad-clip", "--is-cap", "--adv-eps"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_update_refuses_non_finite_floats_before_training(tmp_path, tiny_model_dir, scored, no_training, option,
                                                         value):
    result = invoke("update", "--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c", option, value)
    assert_refused(result, f"{option}: must be a finite number, got {value}")
    assert not (tmp_path / "c").exists()


# --- input files: nulls and impossible values -------------------------------------------------------------------

def test_null_problem_is_refused_before_sampling(tmp_path, arith_prompts, monkeypatch):
    from stages import rollout
    monkeypatch.setattr(rollout, "open_engine", lambda *a, **k: pytest.fail("sampling started"))
    path = rewrite(Path(arith_prompts), "problem", [None, "What is 1 + 1?", "x", "y"])
    result = invoke("rollout", "--prompts", path, "--out", tmp_path / "r.parquet")
    assert_refused(result, str(path), "column 'problem'", "row 0", "null")


def test_null_inside_token_ids_is_refused(tmp_path, scored, tiny_model_dir, no_training):
    values = pq.read_table(scored).column("response_token_ids").to_pylist()
    values[2][1] = None
    rewrite(scored, "response_token_ids", values)
    result = invoke("update", "--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c")
    assert_refused(result, "column 'response_token_ids'", "row 2", "null inside the list")


@pytest.fixture
def verified(tmp_path, scored):
    """The scored fixture read back as a verified file (score's columns dropped)."""
    table = pq.read_table(scored)
    table = table.drop_columns([c for c in table.column_names if c not in schemas.VERIFIED.names])
    return io.write_artifact(table, tmp_path / "verified.parquet", "verified", io.build_metadata("verified", {}))


def test_a_rollouts_file_concatenated_twice_is_refused(tmp_path, verified):
    table = pq.read_table(verified)
    doubled = pa.concat_tables([table, table])
    path = tmp_path / "doubled.parquet"
    pq.write_table(doubled.replace_schema_metadata(table.schema.metadata), path)
    result = invoke("verify", "--rollouts", path, "--out", tmp_path / "v.parquet")
    assert_refused(result, str(path), "row 8", "same (prompt_id, sample_idx) as row 0")


@pytest.mark.parametrize("column, values, fragment", [
    ("student_logprobs", lambda v: [[abs(x) + 0.5 for x in row] for row in v], "above 0.001"),
    ("teacher_entropy", lambda v: [[-1.0] + row[1:] for row in v], "below -0.001"),
    ("reward", lambda v: [float("nan")] + v[1:], "nan; a verified reward is a finite number"),
    ("privileged_source", lambda v: ["bogus"] + v[1:],
     "'bogus' is not one of peer, reference, other_peer, other_reference, none"),
    ("sample_idx", lambda v: [-1] + v[1:], "negative"),
    ("finish_reason", lambda v: ["eos"] + v[1:], "'eos' is not one of stop, length"),
    ("response_length", lambda v: [99] + v[1:], "99 for 6 response_token_ids"),
    ("correct", lambda v: [not v[0]] + v[1:], "with reward"),
])
def test_impossible_values_in_a_scored_file_are_refused(tmp_path, scored, tiny_model_dir, no_training, column,
                                                       values, fragment):
    rewrite(scored, column, values(pq.read_table(scored).column(column).to_pylist()))
    result = invoke("update", "--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c")
    assert_refused(result, str(scored), f"column '{column}'", "row 0", fragment)


def test_nan_in_a_scored_file_exits_2(tmp_path, scored, tiny_model_dir, no_training):
    values = pq.read_table(scored).column("pmi").to_pylist()
    values[4][3] = math.nan
    rewrite(scored, "pmi", values)
    result = invoke("update", "--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c")
    assert_refused(result, "column 'pmi'", "row 4", "non-finite value at response token 3")


def test_inspect_of_a_file_that_is_not_parquet_exits_2(tmp_path):
    path = tmp_path / "notes.parquet"
    path.write_text("hello")
    assert_refused(invoke("inspect", path), str(path), "not a readable Parquet file")


# --- outputs that cannot be written are found before the work ---------------------------------------------------

def test_output_under_a_file_is_refused_before_training(tmp_path, scored, tiny_model_dir, no_training):
    (tmp_path / "plain").write_text("x")
    result = invoke("update", "--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "plain" / "c")
    assert_refused(result, "is a file, not a directory")


def test_overwrite_does_not_replace_a_folder_with_a_file(tmp_path, verified):
    (tmp_path / "scored.out").mkdir()
    result = invoke("score", "--verified", verified, "--out", tmp_path / "scored.out", "--overwrite")
    assert_refused(result, "a folder is there")
    assert (tmp_path / "scored.out").is_dir()


def test_unwritable_output_folder_is_found_before_training(tmp_path, scored, tiny_model_dir, no_training,
                                                          monkeypatch):
    """As root chmod does not stop writes, so the refusal of the folder is simulated where the probe asks for it."""
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(io.os, "open", read_only)
    result = invoke("update", "--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c")
    assert_refused(result, f"cannot write in {tmp_path} (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; the case above covers it")
def test_read_only_output_folder_is_found_before_training(tmp_path, scored, tiny_model_dir, no_training):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = invoke("update", "--scored", scored, "--model", tiny_model_dir, "--out", folder / "c")
    finally:
        folder.chmod(0o755)
    assert_refused(result, "cannot write in")


# --- one writer per output ---------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from stages.common.io import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
    """
)


def hold(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_of_an_output_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path, verified):
    out = tmp_path / "rescored.parquet"
    holder = hold(out)
    try:
        result = invoke("score", "--verified", verified, "--out", out)
        assert_refused(result, str(out), f"another process (pid {holder.pid}) is writing it")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert io.lock_path(out).exists()  # a kill -9 leaves the file behind, but no lock on it
    with io.output_lock(out):
        assert io.lock_path(out).read_text().strip() == str(os.getpid())
    assert not io.lock_path(out).exists()  # released: removed


def test_the_lock_is_per_output(tmp_path):
    with io.output_lock(tmp_path / "a.parquet"), io.output_lock(tmp_path / "b.parquet"):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".a.parquet.lock", ".b.parquet.lock"]
