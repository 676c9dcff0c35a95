"""The stack's version floors match the APIs the code calls (stages/common/stack.py), and the installed versions have
them: a CI run on a transformers or DeepSpeed without one of them fails here, naming it, instead of mid-run."""

from __future__ import annotations

import re
from pathlib import Path

from stages.common import stack

REPO = Path(__file__).resolve().parent.parent


def test_the_installed_stack_has_every_api_antisd_calls():
    assert stack.missing_apis() == []


def test_a_missing_api_is_named_with_its_caller(monkeypatch):
    import transformers

    class OldCache:  # a transformers whose cache cannot drop rows
        def __init__(self, ddp_cache_data=None, config=None):
            pass

        def batch_repeat_interleave(self, repeats):
            pass

    monkeypatch.setattr(transformers, "DynamicCache", OldCache)
    missing = stack.missing_apis(("transformers",))
    assert missing == ["transformers: transformers.DynamicCache.batch_select_indices (AttributeError), needed by "
                       "stages.lm.engine_hf"]


def test_a_missing_keyword_is_named(monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "initialize", lambda model=None, optimizer=None, config=None: None)
    missing = stack.missing_apis(("deepspeed",))
    assert any("deepspeed.initialize takes no dist_init_required" in line for line in missing)


def test_pyproject_floors_are_the_stacks():
    text = (REPO / "pyproject.toml").read_text()
    for package, floor in stack.FLOORS.items():
        assert re.search(rf'"{package}>={re.escape(floor)}[,"]', text), package
