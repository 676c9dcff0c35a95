"""No write follows a link antisd did not make (issue 21, bugs 2 and 7): locks, temp files, outputs, checkpoints.

Each case plants a link (or a hard link) where antisd writes and checks that the file or folder it points to keeps
its content, and that the command either does its work (replacing the link) or refuses in one line (a lock).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from test_loop import tiny_config
from test_update import config, make_scored, run

from antisd_cli.main import cli

PREPARE = ("data", "prepare", "arith", "--num", "3")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def test_a_linked_output_lock_is_refused_and_its_target_kept(tmp_path, victim):
    (tmp_path / ".out.parquet.lock").symlink_to(victim)
    result = invoke(*PREPARE, "--out", tmp_path / "out.parquet")
    assert result.exit_code == 2, result.output
    assert "symbolic link" in result.stderr and ".out.parquet.lock" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert victim.read_text() == "precious\n" and not (tmp_path / "out.parquet").exists()


def test_a_hard_linked_output_lock_is_refused_and_its_target_kept(tmp_path, victim):
    os.link(victim, tmp_path / ".out.parquet.lock")
    result = invoke(*PREPARE, "--out", tmp_path / "out.parquet")
    assert result.exit_code == 2, result.output
    assert "hard link" in result.stderr and victim.read_text() == "precious\n"


def test_a_linked_run_directory_lock_is_refused(tmp_path, victim, tiny_model_dir):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, steps=1)))
    (tmp_path / ".run.lock").symlink_to(victim)
    result = invoke("loop", "--config", path, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "symbolic link" in result.stderr and victim.read_text() == "precious\n"
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_link_planted_at_the_temp_name_is_replaced_not_written_through(tmp_path, victim):
    (tmp_path / "out.parquet.tmp").symlink_to(victim)
    result = invoke(*PREPARE, "--out", tmp_path / "out.parquet")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious\n"
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 3
    assert not os.path.lexists(tmp_path / "out.parquet.tmp")


def test_overwrite_replaces_a_linked_output_file_not_its_target(tmp_path, victim):
    (tmp_path / "out.parquet").symlink_to(victim)
    result = invoke(*PREPARE, "--out", tmp_path / "out.parquet", "--overwrite")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "out.parquet").is_symlink() and pq.read_table(tmp_path / "out.parquet").num_rows == 3


def test_overwrite_onto_a_linked_checkpoint_folder_replaces_the_link_twice(tmp_path, tiny_model_dir):
    """Bug 7: the old folder was moved aside as a link, then rmtree'd: exit 1 after publishing, `.c.old` left, and
    every later --overwrite trained, then failed."""
    scored = make_scored(tmp_path / "scored.parquet", tiny_model_dir)
    elsewhere = tmp_path / "elsewhere"
    run(config(scored, tiny_model_dir, elsewhere))
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()}
    (tmp_path / "c").symlink_to(elsewhere, target_is_directory=True)
    for lr in (1e-3, 2e-3):
        out = run(config(scored, tiny_model_dir, tmp_path / "c", overwrite=True, lr=lr))
        assert out == tmp_path / "c" and not out.is_symlink() and (out / "model.safetensors").is_file()
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".c.")]
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()} == before


def test_a_link_planted_at_the_checkpoint_temp_folder_is_not_followed(tmp_path, tiny_model_dir):
    scored = make_scored(tmp_path / "scored.parquet", tiny_model_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (tmp_path / ".c.tmp").symlink_to(elsewhere, target_is_directory=True)
    run(config(scored, tiny_model_dir, tmp_path / "c"))
    assert (tmp_path / "c" / "model.safetensors").is_file()
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "mine"
