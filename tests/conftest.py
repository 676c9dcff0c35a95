"""Shared fixtures: the embedded model's folder, a tiny random-init model with the real tokenizer, small prompt files.

The embedded model is converted once into the user cache (~/.cache/antisd, or $ANTISD_CACHE) and reused by every
later run; the tiny model is made once per session.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def embedded_model_dir():
    from stages.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir):
    """A 2-layer, hidden-64 Llama with SmolLM2's tokenizer and chat template (random weights, seed 0)."""
    from stages.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", embedded_model_dir)


@pytest.fixture
def arith_prompts(tmp_path):
    """Four arith training prompts with the few-shot prefix."""
    from stages.data import PrepareConfig, run

    return run(PrepareConfig(name="arith", out=str(tmp_path / "prompts.parquet"), num=4, seed=1))
