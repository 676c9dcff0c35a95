"""docs/library.md: its example runs as written (with the tiny model), and every Config and run it names exists."""

from __future__ import annotations

import importlib
import importlib.util
import re
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIBRARY = REPO / "docs" / "library.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_stage_by_stage_example_runs(tmp_path, tiny_model_dir, monkeypatch, capsys):
    example = python_blocks(LIBRARY.read_text())[0]
    assert 'MODEL = "smollm2-135m"' in example  # the documented model; the test swaps in the tiny one
    script = tmp_path / "example.py"
    script.write_text(example.replace('MODEL = "smollm2-135m"', f'MODEL = "{tiny_model_dir}"'))
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(script))
    work = tmp_path / "antisd_library_example"
    assert (work / "checkpoint" / "model.safetensors").is_file()
    assert namespace["metadata"]["model"] == str(tiny_model_dir)  # score took the rollouts' model
    assert len(namespace["frame"]) == 16 and "reward" in capsys.readouterr().out


def test_every_config_and_run_the_page_names_exists():
    rows = re.findall(r"^\| `antisd [^|]+` \| (.+?) \| (.+?) \|$", LIBRARY.read_text(), flags=re.M)
    assert len(rows) == 12
    for configs, runs in rows:
        module = re.search(r"\(`([\w.]+)`\)", configs).group(1)
        names, functions = re.findall(r"`?(\w+)`?(?:,|\s\()", configs), re.findall(r"`([\w.]+)(?:\(|`)", runs)
        assert names and functions, (configs, runs)
        for name in names:
            assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
        for dotted in functions:
            owner, _, attribute = dotted.rpartition(".")
            assert callable(getattr(importlib.import_module(owner), attribute)), dotted


@pytest.mark.parametrize("name", ["antisd"])
def test_the_top_level_stays_stages_schemas_and_the_cli(name):
    assert importlib.util.find_spec(name) is None  # the design card's top level: antisd_cli, stages, schemas
