"""Run config: defaults < YAML < --set, unknown keys and bad types rejected up front, example configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages import config
from stages.io import InputError

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples" / "configs").glob("*.yaml")) + [REPO / "stages" / "configs" / "demo.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    resolved = config.load(path)
    assert resolved.loop.steps > 0
    for section in config.STAGE_SECTIONS:  # each section builds a real stage Config with placeholder paths
        assert isinstance(resolved.stages[section], dict)


def test_overrides_win_over_file_and_are_typed():
    resolved = config.resolve({"update": {"lr": 1e-6}}, ["update.lr=2e-6", "loop.steps=7", "rollout.n=3"])
    assert resolved.stages["update"]["lr"] == 2e-6
    assert resolved.loop.steps == 7 and resolved.stages["rollout"]["n"] == 3


def test_int_is_accepted_for_float():
    assert config.resolve({}, ["update.lr=1"]).stages["update"]["lr"] == 1.0


def test_all_errors_reported_at_once():
    with pytest.raises(InputError) as info:
        config.resolve({"update": {"lrr": 1}, "rollout": {"n": "many"}, "bogus": {}})
    message = str(info.value)
    assert "update.lrr: unknown key" in message and "rollout.n: expected int" in message
    assert "bogus: unknown section" in message


def test_loop_owned_paths_cannot_be_configured():
    with pytest.raises(InputError, match="rollout.out: set by the loop"):
        config.resolve({"rollout": {"out": "x.parquet"}})


def test_nested_data_spec():
    resolved = config.resolve({"loop": {"train": {"name": "gsm8k", "num": 10}}})
    assert resolved.loop.train == config.DataSpec(name="gsm8k", num=10)


def test_digest_changes_with_config():
    assert config.resolve({}).digest() != config.resolve({}, ["update.lr=3e-6"]).digest()
    assert config.resolve({}).digest() == config.resolve({}).digest()


def test_bad_override_syntax():
    with pytest.raises(InputError, match="expected section.key=value"):
        config.resolve({}, ["lr"])


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        config.load(tmp_path / "missing.yaml")


def test_on_off_stay_strings_in_overrides_and_files(tmp_path):
    assert config.resolve({}, ["update.gate=off"]).stages["update"]["gate"] == "off"
    path = tmp_path / "c.yaml"
    path.write_text("update:\n  gate: on\n  gradient_checkpointing: false\n")
    resolved = config.load(path)
    assert resolved.stages["update"]["gate"] == "on"
    assert resolved.stages["update"]["gradient_checkpointing"] is False
