"""The device between a loop's phases, on CPU: a fake card that counts what each owner holds and what the allocator
caches, and a fake vLLM with vLLM's start-up rule (it refuses to start or wake when less than utilization × the card
is free) driving 2-step loops through `reload`, `inplace` (in-memory weights from the trainer) and evaluation.

The fake card is what `torch.cuda.mem_get_info` would say if the trainer, the policy copies and the vLLM pool held
what the memory plan (stages.runs.memory) says they hold: freed memory stays cached until `Card.release` (the
caching allocator until `empty_cache`), a vLLM engine's pool goes to that cache when it closes (an in-process engine)
and back to the device when it sleeps (vLLM's own allocator). The sampled tokens are a function of the weights the
engine holds, so a rollout shows which weights (and which sync path) it sampled from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from stages.common.card import Card

EOS = 2
GIB = 2**30


def state_tokens(state: dict) -> list[int]:
    """Two response tokens, a function of the weights (the tied head excluded: checkpoints do not store it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if name != "lm_head.weight":
            digest.update(name.encode())
            digest.update(state[name].detach().cpu().float().numpy().tobytes())
    raw = digest.digest()
    return [100 + int.from_bytes(raw[:4], "little") % 4000, 100 + int.from_bytes(raw[4:8], "little") % 4000]


def folder_tokens(folder) -> list[int]:
    from safetensors.torch import load_file

    return state_tokens(load_file(str(Path(folder) / "model.safetensors")))


class FakeCard(Card):
    """A CUDA card of `total` bytes whose free memory is total − held − cached (module docstring)."""

    reserved = 0
    vllm_overhead = 0

    def __init__(self, total: int):
        super().__init__("cuda")
        self.total_bytes, self.cached, self.releases, self._peak = total, 0, 0, 0

    def total(self):
        return self.total_bytes

    def free(self):
        return self.total_bytes - sum(self.held.values()) - self.cached

    def hold(self, owner, nbytes):
        self.held[owner] = int(nbytes)
        self._peak = max(self._peak, self.total_bytes - self.free())

    def drop(self, owner, to_cache: bool = True):
        freed = self.held.pop(owner, 0)
        self.cached += freed if to_cache else 0

    def release(self):
        self.cached, self.releases = 0, self.releases + 1

    def start_phase(self):
        self._peak = self.total_bytes - self.free()

    def peak(self):
        return self._peak


class MemoryLLM:
    """vLLM's LLM as far as memory goes: start-up and wake-up need utilization × the card free."""

    card: FakeCard = None
    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        self.utilization = kwargs.get("gpu_memory_utilization", 0.9)  # vLLM's default when none is passed
        self.tokens = folder_tokens(kwargs["model"])
        self._claim("start-up")
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self._shutdown))
        MemoryLLM.instances.append(self)

    def _claim(self, when: str):
        need = self.utilization * self.card.total()
        if self.card.free() < need:
            raise ValueError(f"Free memory on device ({self.card.free() / GIB:.2f}/{self.card.total() / GIB:.2f} "
                             f"GiB) on {when} is less than desired GPU memory utilization ({self.utilization}, "
                             f"{need / GIB:.2f} GiB)")
        self.card.hold(f"vllm {id(self)}", need)

    def _shutdown(self):
        self.calls.append(("shutdown",))
        self.card.drop(f"vllm {id(self)}")  # an in-process engine's pool returns to the caching allocator

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate",))
        ids = self.tokens + [EOS]
        completion = lambda index: SimpleNamespace(  # noqa: E731
            index=index, token_ids=tuple(ids), finish_reason="stop",
            logprobs=[{token: SimpleNamespace(logprob=-0.5)} for token in ids])
        return [SimpleNamespace(outputs=[completion(i) for i in range(p.kwargs["n"])]) for p in sampling_params]

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(("reload_weights",))
        self.tokens = folder_tokens(kwargs["weights_path"])

    def apply_model(self, func):
        model = SimpleNamespace(load_weights=lambda weights: dict(weights))
        loaded = {}
        model.load_weights = lambda weights: loaded.update(dict(weights))
        func(model)
        self.calls.append(("load_in_memory",))
        self.tokens = state_tokens(loaded)

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        self.card.drop(f"vllm {id(self)}", to_cache=False)  # vLLM's own allocator unmaps: back to the device

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))
        if tags is None or "kv_cache" in tags:
            self._claim("wake-up")


@pytest.fixture(autouse=True)
def no_logits_budget(monkeypatch):
    """The 4 GiB fp32-logits budget of a CUDA forward would dwarf the tiny model: plan without it."""
    from stages.runs import memory

    monkeypatch.setattr(memory, "LOGITS_BYTES", 0)


@pytest.fixture
def memory_vllm(monkeypatch):
    module = types.ModuleType("vllm")

    @dataclasses.dataclass
    class EngineArgs:
        model: str = ""
        logprobs_mode: str = "raw_logprobs"

    module.LLM, module.EngineArgs = MemoryLLM, EngineArgs
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    MemoryLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return module


def card_for(model_dir: Path) -> FakeCard:
    """A card on which the tiny model's trainer leaves half for vLLM: what a tight 80 GB card is for a 4B model."""
    from stages.runs import memory

    shape = memory.ModelShape.from_folder(model_dir)
    setup = memory.TrainSetup(longest_sequence=512)
    resident = memory.trainer_bytes(shape, setup, training=False).total
    train = memory.trainer_bytes(shape, setup, training=True).total
    return FakeCard(max(2 * resident, train) * 2)


def run_loop(tmp_path, model_dir, card, weight_sync: str, *, eval_every: int = 0, resident: bool = True,
             opener_patch=None):
    from stages import loop
    from stages.lm.engine_vllm import VLLMEngine
    from stages.runs import config as run_config
    from stages.runs.config import LoopConfig
    from stages.runs.view import LoopView

    raw = {
        "loop": {"model": str(model_dir), "steps": 2, "prompts_per_step": 2, "seed": 3, "eval_every": eval_every,
                 "eval_max_new_tokens": 4, "train": {"name": "arith", "split": "train", "num": 8},
                 "eval": {"name": "arith", "split": "test", "num": 2}, "tensorboard": False,
                 "weight_sync": weight_sync, "resident_trainer": resident},
        "rollout": {"engine": "vllm", "n": 2, "max_new_tokens": 4, "progress": False},
        "verify": {"workers": 1},
        "update": {"method": "sd", "lr": 1.0e-3, "dtype": "float32"},
    }
    config = LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve(raw))

    def opener(folder, utilization, in_process):
        return VLLMEngine(folder, device="cuda", sleep_mode=True, max_model_len=512,
                          gpu_memory_utilization=utilization, in_process=in_process)

    with open(os.devnull, "w") as devnull:
        return loop.run(config, view=LoopView(2, stream=devnull), card=card, vllm_opener=opener_patch or opener)


def rollout_tokens(run_dir: Path, step: int) -> list[list[int]]:
    from stages.common.io import read_artifact

    return read_artifact(run_dir / f"step_{step:04d}" / "rollouts.parquet", "rollouts")[0] \
        .column("response_token_ids").to_pylist()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reload_opens_each_engine_with_the_planned_share_after_the_cache_is_given_back(memory_vllm, tmp_path,
                                                                                      tiny_model_dir):
    card = card_for(tiny_model_dir)
    MemoryLLM.card = card
    run_dir = run_loop(tmp_path, tiny_model_dir, card, "reload")
    first, second = MemoryLLM.instances
    utilization = first.kwargs["gpu_memory_utilization"]
    assert 0 < utilization < 0.9  # the plan's share beside the resident trainer, not vLLM's default
    assert second.kwargs["gpu_memory_utilization"] == utilization
    assert rollout_tokens(run_dir, 1)[0][:2] == folder_tokens(run_dir / "step_0000" / "checkpoint")
    for row in metrics(run_dir):
        for phase in ("rollout", "verify", "score", "update"):
            assert row[f"memory/peak_gib/{phase}"] >= 0
    assert max(row["memory/peak_gib/rollout"] for row in metrics(run_dir)) >= utilization * card.total() / GIB * 0.99


def test_without_giving_the_cache_back_the_second_engine_cannot_start(memory_vllm, tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    """The control: the same run with Card.release doing nothing fails at step 1's start-up, as on a real card."""
    card = card_for(tiny_model_dir)
    MemoryLLM.card = card
    monkeypatch.setattr(FakeCard, "release", lambda self: None)
    with pytest.raises(ValueError, match="less than desired GPU memory utilization"):
        run_loop(tmp_path, tiny_model_dir, card, "reload")
    assert len(MemoryLLM.instances) == 1  # step 0 sampled; the engine of step 1 could not start


def test_vllm_default_share_does_not_fit_beside_the_resident_trainer(memory_vllm, tmp_path, tiny_model_dir):
    """What main did: no gpu_memory_utilization (vLLM's 0.9) beside a resident trainer."""
    from stages.lm.engine_vllm import VLLMEngine

    card = card_for(tiny_model_dir)
    MemoryLLM.card = card

    def default_share(folder, utilization, in_process):
        return VLLMEngine(folder, device="cuda", sleep_mode=True, max_model_len=512)

    with pytest.raises(ValueError, match="less than desired GPU memory utilization"):
        run_loop(tmp_path, tiny_model_dir, card, "reload", opener_patch=default_share)


def test_inplace_sleeps_wakes_and_syncs_in_memory_with_evaluation_on_the_same_engine(memory_vllm, tmp_path,
                                                                                    tiny_model_dir, monkeypatch):
    from stages.lm import models

    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda model, **kw: loads.append(str(model)) or real_load(model, **kw))
    card = card_for(tiny_model_dir)
    MemoryLLM.card = card
    run_dir = run_loop(tmp_path, tiny_model_dir, card, "inplace", eval_every=1)
    (llm,) = MemoryLLM.instances  # rollouts and the base, step-0 and step-1 evaluations: one engine
    names = [call[0] for call in llm.calls]
    assert names.count("sleep") == 2 and all(call == ("sleep", 2) for call in llm.calls if call[0] == "sleep")
    assert names.count("load_in_memory") == 2 and "reload_weights" not in names  # steps 0 and 1: no disk
    wakes = [call for call in llm.calls if call[0] == "wake_up"]
    assert wakes == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))] * 2
    assert names.count("generate") == 5  # base eval, rollout 0, eval 0, rollout 1, eval 1
    for step in (0, 1):
        expected = tiny_model_dir if step == 0 else run_dir / "step_0000" / "checkpoint"
        assert rollout_tokens(run_dir, step)[0][:2] == folder_tokens(expected)  # in memory = the checkpoint's bits
    rows = metrics(run_dir)
    assert "eval/accuracy" in rows[0] and "memory/peak_gib/eval" in rows[1]
    assert loads == [str(tiny_model_dir)]  # score of step 0 only; step 1 scores with the lent trainer; eval: none


def test_a_trainer_that_is_not_resident_gives_its_memory_back_before_vllm_starts(memory_vllm, tmp_path,
                                                                                 tiny_model_dir):
    card = card_for(tiny_model_dir)
    MemoryLLM.card = card
    run_dir = run_loop(tmp_path, tiny_model_dir, card, "reload", resident=False)
    assert "trainer" not in card.held and len(MemoryLLM.instances) == 2
    assert all(llm.kwargs["gpu_memory_utilization"] == 0.9 for llm in MemoryLLM.instances)  # the card is its own
    assert rollout_tokens(run_dir, 1)[0][:2] == folder_tokens(run_dir / "step_0000" / "checkpoint")


def test_a_run_that_cannot_fit_is_refused_before_any_work(tmp_path, tiny_model_dir):
    from stages import loop
    from stages.common.errors import InputError
    from stages.runs import config as run_config
    from stages.runs.config import LoopConfig

    raw = {"loop": {"model": str(tiny_model_dir), "steps": 1, "prompts_per_step": 2, "eval_every": 0,
                    "train": {"name": "arith", "split": "train", "num": 8}, "tensorboard": False},
           "rollout": {"engine": "hf", "max_new_tokens": 4}}
    config = LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve(raw))
    with pytest.raises(InputError, match=r"the update needs .* GiB per GPU .*ways out: update.lora_rank=64"):
        loop.run(config, card=FakeCard(64 * 2**20))
    assert not (tmp_path / "run").exists()


def test_each_rank_opens_its_engine_through_vllms_external_launcher_in_tensor_parallel_groups(memory_vllm, tmp_path,
                                                                                               tiny_model_dir):
    """A loop of N ranks: every rank opens its engine in process with `distributed_executor_backend=external_launcher`
    (the engines join the ranks' process group, as TRL colocates them), rollout.tensor_parallel_size GPUs each, the
    same seed on every rank (a tensor-parallel group must sample alike; the samples' seeds are per prompt); ranks
    2k and 2k+1 share engine k, whose first rank writes its part. One process: vLLM's own executor."""
    from stages.runs import config as run_config
    from stages.runs import memory
    from stages.runs.config import LoopConfig
    from stages.runs.ranks import Ranks
    from stages.runs.resources import _default_opener, loop_plan
    from stages.training.distributed import DistEnv

    MemoryLLM.card = card_for(tiny_model_dir)
    raw = {"loop": {"model": str(tiny_model_dir), "seed": 5, "eval_every": 0},
           "rollout": {"engine": "vllm", "tensor_parallel_size": 2, "max_new_tokens": 4}}
    config = LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve(raw))
    ranks = [Ranks(DistEnv(rank, 4, rank), tensor_parallel=2) for rank in range(4)]
    assert [(r.sampler, r.samplers, r.writes_samples) for r in ranks] == [(0, 2, True), (0, 2, False), (1, 2, True),
                                                                          (1, 2, False)]
    _default_opener(config, [], ranks[3])(tiny_model_dir, 0.4, False)
    MemoryLLM.card = card_for(tiny_model_dir)  # a card of its own for the one-process engine
    _default_opener(config, [], Ranks())(tiny_model_dir, 0.4, False)
    launched, alone = (llm.kwargs for llm in MemoryLLM.instances)
    assert launched["distributed_executor_backend"] == "external_launcher" and launched["tensor_parallel_size"] == 2
    assert launched["seed"] == alone["seed"] == 5 and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "distributed_executor_backend" not in alone
    # the memory plan of one rank: the trainer's ZeRO-2 shard of 4 ranks, vLLM's weights and KV cache over 2 GPUs
    card = FakeCard(80 * GIB)
    plans = {count: loop_plan(config, card, True, [], Ranks(DistEnv(0, count, 0), tensor_parallel=parallel))
             for count, parallel in ((1, 1), (4, 2))}
    assert plans[4].train.parts["Adam m, v"] * 4 == plans[1].train.parts["Adam m, v"]
    shape = memory.ModelShape.from_folder(tiny_model_dir)
    assert plans[4].vllm_min == memory.vllm_min_bytes(shape, 4, 0, tensor_parallel=2) < plans[1].vllm_min
