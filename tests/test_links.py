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


# --- code in a model folder or a checkpoint (issue 21, bugs 4 and 5) -------------------------------------------------

class _Planted:
    """Pickles as a call that writes `sentinel` when unpickled in full."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (exec, (f"open({str(self.sentinel)!r}, 'w').write('ran')",))


def test_a_checkpoint_whose_deepspeed_state_holds_code_is_refused_unless_trusted(tmp_path, tiny_model_dir):
    import torch

    scored = make_scored(tmp_path / "scored.parquet", tiny_model_dir)
    start = run(config(scored, tiny_model_dir, tmp_path / "start"))
    states = start / "deepspeed" / "engine" / "mp_rank_00_model_states.pt"
    content = torch.load(states, weights_only=False)
    sentinel = tmp_path / "RAN"
    torch.save({**content, "planted": _Planted(sentinel)}, states)
    scored = make_scored(tmp_path / "scored_next.parquet", start)
    refused = invoke("update", "--scored", scored, "--model", start, "--out", tmp_path / "next", "--threads", 1)
    assert refused.exit_code == 2, refused.output
    assert "mp_rank_00_model_states.pt" in refused.stderr and "--trust-checkpoint" in refused.stderr
    assert "Traceback" not in refused.stderr and not sentinel.exists() and not (tmp_path / "next").exists()
    trusted = invoke("update", "--scored", scored, "--model", start, "--out", tmp_path / "next", "--threads", 1,
                     "--trust-checkpoint")
    assert trusted.exit_code == 0, trusted.output
    assert sentinel.read_text() == "ran"  # the user's explicit choice: full unpickling, as DeepSpeed does


def test_a_clean_checkpoint_continues_without_trusting_it(tmp_path, tiny_model_dir):
    from stages.training import checkpoint

    scored = make_scored(tmp_path / "scored.parquet", tiny_model_dir)
    start = run(config(scored, tiny_model_dir, tmp_path / "start"))
    for file in sorted((start / "deepspeed" / "engine").glob("*.pt")):
        assert isinstance(checkpoint.safe_deepspeed_load(str(file), map_location="cpu"), dict)
    assert run(config(make_scored(tmp_path / "next.parquet", start), start, tmp_path / "next")).exists()


def _folder_with_code(tmp_path: Path, model_dir: Path, model_type: str) -> tuple[Path, Path]:
    import json
    import shutil

    folder = tmp_path / f"remote_{model_type}"
    shutil.copytree(model_dir, folder)
    sentinel = tmp_path / f"RAN_{model_type}"
    config_json = json.loads((folder / "config.json").read_text())
    config_json.update(model_type=model_type, auto_map={"AutoConfig": "planted.PlantedConfig",
                                                        "AutoModelForCausalLM": "planted.PlantedModel"})
    (folder / "config.json").write_text(json.dumps(config_json))
    tokenizer_json = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_json["auto_map"] = {"AutoTokenizer": ["planted.PlantedTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_json))
    (folder / "planted.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        f"class PlantedConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class PlantedModel(LlamaForCausalLM):\n    config_class = PlantedConfig\n"
        "class PlantedTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder, sentinel


@pytest.mark.parametrize("model_type, exit_code", [("planted", 2), ("llama", 0)])
def test_a_model_folders_code_never_runs_even_when_stdin_says_yes(tmp_path, tiny_model_dir, arith_prompts,
                                                                    model_type, exit_code):
    """`yes | antisd rollout --model FOLDER`: transformers used to ask on stdout whether to run the folder's auto_map
    module. An unknown model type is now refused in one line; a known one loads with transformers' own classes."""
    import subprocess
    import sys

    folder, sentinel = _folder_with_code(tmp_path, tiny_model_dir, model_type)
    result = subprocess.run([sys.executable, "-m", "antisd_cli", "rollout", "--model", str(folder), "--prompts",
                             str(arith_prompts), "--n", "1", "--max-new-tokens", "2", "--engine", "hf", "--out",
                             str(tmp_path / "r.parquet")], input="y\n" * 20, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == exit_code, result.stderr[-2000:]
    assert not sentinel.exists() and "Traceback" not in result.stderr
    if exit_code:
        assert "trust_remote_code=False" in result.stderr.strip().splitlines()[-1]
