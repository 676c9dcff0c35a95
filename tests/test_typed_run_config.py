"""The run config as one typed object (issue 26): each stage section is that stage's Config, built once, every default
declared in one place; code outside the config module never reads a section's raw keys."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from antisd_cli.main import cli
from stages.runs import config as run_config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("section", list(run_config.STAGE_SECTIONS))
def test_an_unset_knob_reads_the_stage_configs_own_default(section):
    cls = run_config.stage_class(section)
    resolved = run_config.resolve({"loop": {"model": "m"}})
    typed = resolved.stage(section)
    owned = run_config.STAGE_SECTIONS[section][2]
    for field in dataclasses.fields(cls):
        if field.name in owned or field.default is dataclasses.MISSING:
            continue
        assert getattr(typed, field.name) == field.default, f"{section}.{field.name}"
    if "model" in owned:
        assert typed.model == "m"  # the loop's model, not the Config's embedded default


def test_a_set_knob_wins_and_the_typed_config_is_built_once():
    resolved = run_config.resolve({"rollout": {"max_new_tokens": 7}, "update": {"lr": 3e-6}})
    assert resolved.rollout.max_new_tokens == 7 and resolved.update.lr == 3e-6
    assert resolved.rollout is resolved.rollout  # cached: validated once
    assert resolved.sets("rollout", "max_new_tokens") and not resolved.sets("rollout", "n")
    assert resolved.to_dict()["rollout"] == {"max_new_tokens": 7}  # the digest keeps only what the config sets


def test_no_stage_section_is_read_raw_outside_the_config_module():
    """A default lives in its Config: `config.stages["rollout"].get("max_new_tokens", 256)` restates it (a default
    copied is a default that drifts). Sections are read through RunConfig.stage / .rollout / .verify / .score /
    .update only."""
    raw_reads = re.compile(r"\.stages\[|\.stages\.get\(|knobs\[\"(rollout|verify|score|update)\"\]")
    offenders = []
    for path in sorted((REPO / "stages").rglob("*.py")) + sorted((REPO / "antisd_cli").rglob("*.py")):
        if path == REPO / "stages" / "runs" / "config.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if raw_reads.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_embedded_model_is_named_as_a_default_once():
    """The issue counted the model name typed as a default 4 times; stages.lm.models.DEFAULT_MODEL is its one home
    (help texts and examples may still spell it out)."""
    literal = re.compile(r"""(=|\bor)\s*["']smollm2-135m["']""")  # `model: str = "…"`, `x or "…"`
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in sorted((REPO / "stages").rglob("*.py")) + sorted((REPO / "antisd_cli").rglob("*.py"))
                 if path != REPO / "stages" / "lm" / "models.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert not offenders, "\n".join(offenders)


def test_eval_takes_its_sampling_and_checking_defaults_from_rollout_and_verify():
    from stages.eval import EvalConfig
    from stages.lm.sampling import RolloutConfig
    from stages.verifier.rows import VerifyConfig

    shared = 0
    for source in (RolloutConfig, VerifyConfig):
        defaults = {f.name: f.default for f in dataclasses.fields(source)}
        for field in dataclasses.fields(EvalConfig):
            # n, temperature, top_p, max_new_tokens are eval's protocol (None: the protocol's), not rollout's
            if field.name in defaults and field.name not in ("n", "temperature", "top_p", "max_new_tokens", "out",
                                                             "seed", "shard", "progress", "overwrite", "model"):
                assert field.default == defaults[field.name], f"EvalConfig.{field.name}"
                shared += 1
    assert shared >= 12


def test_a_data_source_is_the_data_prepare_options_without_the_output():
    from stages.lm.datasets import DataSource, PrepareConfig

    source = {f.name: f.default for f in dataclasses.fields(DataSource)}
    prepare = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}
    assert {k: v for k, v in prepare.items() if k in source} == source
    assert set(prepare) - set(source) == {"out", "overwrite"}
    spec = run_config.resolve({"loop": {"train": {"name": "gsm8k", "num": 3}}}).loop.train
    assert PrepareConfig.of(spec, "p.parquet") == PrepareConfig(name="gsm8k", num=3, out="p.parquet")


def test_print_config_shows_every_stage_setting_at_its_resolved_value(tmp_path):
    result = CliRunner().invoke(cli, ["loop", "-o", str(tmp_path / "r"), "--set", "loop.model=smollm2-135m",
                                      "--set", "rollout.n=4", "--set",
                                      "update.variant=official", "--print-config"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    for section, (_, _, owned) in run_config.STAGE_SECTIONS.items():
        expected = {f.name for f in dataclasses.fields(run_config.stage_class(section))} - owned
        assert set(printed[section]) == expected, section
    assert printed["rollout"]["n"] == 4 and printed["rollout"]["max_new_tokens"] == 256
    assert printed["update"]["variant"] == "official"
    assert printed["update"]["clip_high"] == 0.28 and printed["update"]["term_norm"] == "response"  # §9's presets
    assert printed["score"]["teacher_layout"] == "official"  # the variant's teacher prompt
    again = run_config.resolve(printed)  # what it prints is a valid run config
    assert again.rollout.n == 4 and not (tmp_path / "r").exists()
