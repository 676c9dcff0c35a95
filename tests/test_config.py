"""Run config: defaults < YAML < --set, unknown keys and bad types rejected up front, example configs load."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.common.errors import InputError
from stages.lm.datasets import DataSource
from stages.runs import config

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
    assert resolved.loop.train == DataSource(name="gsm8k", num=10)


def test_digest_changes_with_config():
    assert config.resolve({}).digest() != config.resolve({}, ["update.lr=3e-6"]).digest()
    assert config.resolve({}).digest() == config.resolve({}).digest()


def test_bad_override_syntax():
    with pytest.raises(InputError, match="expected section.key=value"):
        config.resolve({}, ["lr"])


def test_a_run_config_without_a_model_is_refused_with_its_other_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loop:\n  steps: 3\nupdate:\n  lrr: 1\n")
    with pytest.raises(InputError) as info:
        config.load(path)
    assert "loop.model: not set" in str(info.value) and "update.lrr: unknown key" in str(info.value)
    with pytest.raises(InputError, match="loop.model: not set"):
        config.load(None)  # `antisd loop` without --config
    assert config.load(None, ["loop.model=smollm2-135m"]).loop.model == "smollm2-135m"
    assert config.load(REPO / "stages" / "configs" / "demo.yaml").loop.model == "smollm2-135m"  # the demo names it


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        config.load(tmp_path / "missing.yaml")


def test_on_off_stay_strings_in_overrides_and_files(tmp_path):
    assert config.resolve({}, ["update.gate=off"]).stages["update"]["gate"] == "off"
    path = tmp_path / "c.yaml"
    path.write_text("loop:\n  model: smollm2-135m\nupdate:\n  gate: on\n  gradient_checkpointing: false\n")
    resolved = config.load(path)
    assert resolved.stages["update"]["gate"] == "on"
    assert resolved.stages["update"]["gradient_checkpointing"] is False


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("update:\n  lr: 1.0e-6\n  method: grpo\n  lr: 2.0e-6\n")
    with pytest.raises(InputError, match=r"c\.yaml: not valid YAML \(found duplicate key 'lr' \(first at line 2\), "
                                         r"line 4\)"):
        config.load(path)


@pytest.mark.parametrize("overrides, fragment", [
    (["loop.steps=-1"], "loop.steps: must be >= 0, got -1"),
    (["loop.prompts_per_step=0"], "loop.prompts_per_step: must be >= 1, got 0"),
    (["loop.train.name=mnist"], "loop.train.name: must be one of arith"),
    (["loop.eval.split=train", "loop.eval.name=math500"], "loop.eval.split: math500 has only test"),
    (["update.lr=.nan"], "update.lr: must be a finite number, got nan"),
    (["update.lr=inf"], "update.lr: must be a finite number, got inf"),
    (["score.temperature=-1"], "score.temperature: must be > 0, got -1.0"),
    (["verify.fallbacks=guess"], "verify.fallbacks: expected a comma list"),
])
def test_invalid_values_are_refused_when_the_config_is_resolved(overrides, fragment):
    with pytest.raises(InputError) as info:
        config.resolve({}, overrides)
    assert fragment in str(info.value)


def test_the_rules_live_in_the_config_classes():
    from stages.common.validation import ConfigError
    from stages.lm.sampling import RolloutConfig
    from stages.training.config import UpdateConfig

    with pytest.raises(ConfigError) as info:
        UpdateConfig(scored="s", out="o", lr=float("nan"), method="ppo", warmup_steps=0)
    assert [field for field, _ in info.value.problems] == ["method", "warmup_steps", "lr"]
    with pytest.raises(ConfigError, match="--top-p: must be in"):
        RolloutConfig(prompts="p", out="o", top_p=0.0)


def _cli_commands():
    """(command path, its Config class) for every command that builds one from its options."""
    from stages.analyze import PmiConfig
    from stages.eval import EvalConfig
    from stages.inspect import InspectConfig
    from stages.lm.datasets import PrepareConfig
    from stages.lm.sampling import RolloutConfig
    from stages.lm.scoring import ScoreConfig
    from stages.merge import MergeConfig
    from stages.plot import PlotConfig
    from stages.report import ReportConfig
    from stages.runs.config import LoopConfig
    from stages.training.config import UpdateConfig
    from stages.verifier.rows import VerifyConfig

    return [(["rollout"], RolloutConfig), (["verify"], VerifyConfig), (["score"], ScoreConfig),
            (["update"], UpdateConfig), (["eval"], EvalConfig), (["data", "prepare"], PrepareConfig),
            (["analyze", "pmi"], PmiConfig), (["plot"], PlotConfig), (["merge"], MergeConfig),
            (["inspect"], InspectConfig), (["loop"], LoopConfig), (["report"], ReportConfig)]


@pytest.mark.parametrize("path, cls", _cli_commands(), ids=lambda x: "-".join(x) if isinstance(x, list) else "")
def test_cli_defaults_are_the_config_defaults(path, cls):
    import dataclasses

    import click

    from antisd_cli.main import cli

    command, ctx = cli, click.Context(cli)
    for name in path:
        command = command.get_command(ctx, name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    compared = 0
    for param in command.params:
        field = fields.get(param.name)
        if field is None or field.default is dataclasses.MISSING or isinstance(param, click.Argument) \
                or param.required:
            continue
        if getattr(param, "multiple", False) and field.default == ():
            continue  # a repeatable option: none given is the empty tuple
        if param.name in ("metrics", "deliberation_words", "shortcut_words"):
            continue  # comma-joined text of the same constant on the command line, a tuple in the config
        assert param.default == field.default, f"antisd {' '.join(path)} --{param.name}: {param.default!r} != " \
                                               f"{cls.__name__}.{param.name} = {field.default!r}"
        compared += 1
    assert compared >= 1
