"""Shared fixtures: the embedded model's folder, a tiny random-init model with the real tokenizer, small prompt files.

The suite never touches the user's cache (~/.cache/antisd or $ANTISD_CACHE): ANTISD_CACHE points at a temporary
folder made for the session (removed at its end), where the embedded model is converted once (~25 s) and shared by
every test and subprocess. To keep a conversion between runs, set ANTISD_TEST_CACHE to a folder of your choice.
The tiny model is made once per session.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not shutil.which("nvidia-smi"):  # a GPU host keeps DeepSpeed's CUDA accelerator (the Makefile's rule too)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a Hub id is only ever looked up in a cache the test builds
_SESSION_CACHE = os.environ.get("ANTISD_TEST_CACHE") or tempfile.mkdtemp(prefix="antisd-test-cache-")
os.environ["ANTISD_CACHE"] = _SESSION_CACHE  # set before any stage runs, so subprocesses inherit it


def pytest_sessionfinish(session, exitstatus):
    if not os.environ.get("ANTISD_TEST_CACHE"):
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_model_dir():
    from stages.lm.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir):
    """A 2-layer, hidden-64 Llama with SmolLM2's tokenizer and chat template (random weights, seed 0)."""
    from stages.lm.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", embedded_model_dir)


@pytest.fixture
def arith_prompts(tmp_path):
    """Four arith training prompts with the few-shot prefix."""
    from stages.data import run
    from stages.lm.datasets import PrepareConfig

    return run(PrepareConfig(name="arith", out=str(tmp_path / "prompts.parquet"), num=4, seed=1))


def load_script(name: str):
    """scripts/NAME.py as a module (the study scripts are not a package)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop_stages(rollout: dict, verify: dict) -> dict:
    """The rollout and verify Configs a loop would hand its evaluation, from run-config sections."""
    from stages.runs import config as run_config

    resolved = run_config.resolve({"rollout": rollout, "verify": verify})
    return {"rollout": resolved.rollout, "verify": resolved.verify}
