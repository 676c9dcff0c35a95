"""The GPU path, read on CPU (issue 22): each finding of the first reading of the GPU code against vLLM, DeepSpeed,
TRL and verl, fixed or refused, with its CPU twin. The loops through a fake card and a fake vLLM are in
tests/test_resources.py; the memory model in tests/test_memory.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from antisd_cli.main import cli
from stages.common.errors import InputError

REPO = Path(__file__).resolve().parent.parent


# --- 4. ZeRO-3 on several ranks, 8. loop under a launcher ---------------------------------------------------------

def test_zero3_on_several_ranks_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    from stages import update
    from stages.training.config import UpdateConfig
    from stages.training.distributed import DistEnv

    config = UpdateConfig(scored="s.parquet", out=str(tmp_path / "out"), model=str(tiny_model_dir), zero_stage=3)
    with pytest.raises(InputError, match="ZeRO-3 on 2 ranks: .* use --zero-stage 2"):
        update.read_start(config, DistEnv(0, 2, 0, "127.0.0.1", 29500, "env"), tiny_model_dir)
    update.read_start(config, DistEnv(), tiny_model_dir)  # one rank: ZeRO-3 works (tested in test_update.py)


def test_zero3_slurm_updates_on_several_gpus_are_refused_at_render_time(tmp_path, tiny_model_dir):
    result = CliRunner().invoke(cli, ["loop", "-o", str(tmp_path / "run"), "--set", f"loop.model={tiny_model_dir}",
                                      "--set", "update.zero_stage=3", "--launcher", "slurm", "--dry-run",
                                      "--nodes", "1", "--gpus-per-node", "8"])
    assert result.exit_code == 2 and "ZeRO-3 on 8 ranks" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, refusal", [
    (["--set", "update.zero_stage=3"], "ZeRO-3 on 2 ranks: the ranks' forwards make different numbers of module calls"),
    (["--record-only"], "--record-only: one process"),
    (["--set", "rollout.engine=hf", "--set", "rollout.tensor_parallel_size=2"],
     "rollout.tensor_parallel_size 2: vLLM's, but the rollouts use the hf engine"),
])
def test_what_several_ranks_cannot_run_is_refused_before_any_work(tmp_path, monkeypatch, setting, refusal):
    """Issue 25 lifts the one-process refusal; what stays refused is said in one line before the process group or
    the run directory exists (ZeRO-3: every rank would have to make the same module calls, issue 22's item 4)."""
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)  # port 1: a rendezvous attempted by mistake fails at once
    result = CliRunner().invoke(cli, ["loop", "-o", str(tmp_path / "run"), "--set", "loop.model=smollm2-135m", *setting])
    assert result.exit_code == 2, result.output
    assert refusal in result.stderr and "\n" not in result.stderr.strip()
    assert not (tmp_path / "run").exists()


# --- 7. DeepSpeed's accelerator on a GPU host ----------------------------------------------------------------------

def _make_database(path_prefix: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PATH"] = path_prefix + os.pathsep + env["PATH"]
    return subprocess.run(["make", "-np", "-f", "Makefile", "install"], cwd=REPO, env=env, capture_output=True,
                          text=True).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_makefile_says_cpu_only_where_no_gpu_answers(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    (fake / "nvidia-smi").chmod(0o755)
    assert "DS_ACCELERATOR = cpu" not in _make_database(str(fake))
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")  # installed, but no GPU answers
    assert "DS_ACCELERATOR = cpu" in _make_database(str(fake))


def test_deepspeed_gets_the_accelerator_of_the_training_device(monkeypatch):
    """DS_ACCELERATOR=cpu on a GPU host: the trainer's device wins (the CUDA accelerator object is only recorded)."""
    import deepspeed.accelerator as accelerator_module

    from stages.training import distributed

    chosen = []
    monkeypatch.setattr(accelerator_module, "set_accelerator", lambda acc: chosen.append(type(acc).__name__))
    monkeypatch.setattr(accelerator_module, "get_accelerator", lambda: SimpleNamespace(device_name=lambda: "cpu"))
    distributed.prepare_deepspeed("cuda:0")
    assert chosen == ["CUDA_Accelerator"]


# --- 9. score's dtype and device in the loop ------------------------------------------------------------------------

def test_the_loop_scores_in_scores_dtype_not_the_rollouts(tmp_path, tiny_model_dir):
    from stages import loop
    from stages.common.io import read_metadata
    from stages.runs import config as run_config
    from stages.runs.config import LoopConfig
    from stages.runs.view import LoopView

    raw = {"loop": {"model": str(tiny_model_dir), "steps": 1, "prompts_per_step": 2, "eval_every": 0,
                    "train": {"name": "arith", "split": "train", "num": 8}, "tensorboard": False},
           "rollout": {"n": 2, "max_new_tokens": 3, "progress": False, "dtype": "float32"},
           "score": {"dtype": "bfloat16"}, "verify": {"workers": 1}, "update": {"method": "sd"}}
    with open(os.devnull, "w") as devnull:
        run_dir = loop.run(LoopConfig(out=str(tmp_path / "run"), run=run_config.resolve(raw)),
                           view=LoopView(1, stream=devnull))
    assert read_metadata(run_dir / "step_0000" / "rollouts.parquet")["dtype"] == "float32"
    assert read_metadata(run_dir / "step_0000" / "scored.parquet")["dtype"] == "bfloat16"


# --- 10. IS correction by sampler -------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine, dtype, expected", [("vllm", "float32", "token"), ("vllm", "bfloat16", "token"),
                                                     ("hf", "bfloat16", "token"), ("hf", "float32", "off")])
def test_is_correction_auto_follows_the_sampler(engine, dtype, expected):
    """update.is_correction auto: on where the sampler is another forward than the trainer's (vLLM, 16-bit)."""
    from stages.training.batch import resolved_is_correction
    from stages.training.config import UpdateConfig, resolve_variant

    # the default is the variant's (official: token, as TRL for vLLM; paper: off); auto decides by the sampler
    assert resolve_variant(UpdateConfig(scored="s", out="o")).is_correction == "token"
    assert resolve_variant(UpdateConfig(scored="s", out="o", is_correction="auto")).is_correction == "auto"
    metadata = {"config": {"dtype": "auto"}, "rollouts_metadata": {"engine": engine, "dtype": dtype,
                                                                   "config": {"engine": "auto", "dtype": "auto"}}}
    assert resolved_is_correction("auto", {"input": {"verified": metadata}}) == expected
    assert resolved_is_correction("off", metadata) == "off"
    assert resolved_is_correction("auto", {}) == "off"  # no record of the sampler


# --- 11. the LM head in fp32 ----------------------------------------------------------------------------------------

class _Head(torch.nn.Module):
    """Just an LM head, as stats_of_positions sees a model."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        self.head.weight.data.copy_(weight)
        self.config = SimpleNamespace()

    def get_output_embeddings(self):
        return self.head


def _head_stats(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, fp32_head: bool):
    from stages.lm.logprobs import stats_of_positions

    model = _Head(weight)
    logprobs, _ = stats_of_positions(model, hidden, targets, [len(targets)], temperature=1.0, chunk_size=8,
                                     with_entropy=False, lm_head_fp32=fp32_head)
    logprobs[0].sum().backward()
    return logprobs[0].detach().double(), model.head.weight.grad.double()


def test_an_fp32_head_brings_bf16_log_probs_and_the_head_gradient_to_the_exact_ones():
    """The same bf16 weights and hidden states, 2,048 positions in 256 chunks of 8: a bf16 head rounds the logits
    (2^-8 relative) and autograd sums the head's 256 chunk gradients in bf16; the fp32 head does neither. The exact
    values: the same inputs through a float64 head (its logits then rounded to fp32)."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(1000, 64, generator=generator) * 0.5).to(torch.bfloat16)
    hidden = torch.randn(2048, 64, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, 1000, (2048,), generator=generator)
    exact_lp, exact_grad = _head_stats(weight.double(), hidden.double(), targets, False)  # a float64 head
    lp16, grad16 = _head_stats(weight, hidden, targets, False)
    lp32, grad32 = _head_stats(weight, hidden, targets, True)
    assert (lp32 - exact_lp).abs().max() * 10 < (lp16 - exact_lp).abs().max()  # rounding of fp32 vs bf16 logits
    # the fp32 sum, cast to bf16 once, is within bf16's rounding of the exact gradient (≤ 2^-8 relative, here in
    # norm: 0.77 of 463); the bf16 sum of 256 chunk gradients is not (5.8: 7× more)
    assert (grad32 - exact_grad).norm() <= 2**-8 * exact_grad.norm() < (grad16 - exact_grad).norm()


def test_the_fp32_head_is_the_module_itself_for_an_fp32_model(tiny_model_dir):
    """CPU runs (fp32) keep their bits: no copy, the module's own matmul."""
    from transformers import AutoModelForCausalLM

    from stages.lm.logprobs import fp32_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert fp32_head(model) is None
    assert fp32_head(model.to(torch.bfloat16))[0].dtype == torch.float32


# --- 14. chunk size by device -----------------------------------------------------------------------------------------

def test_chunk_positions_by_device_and_budget():
    from stages.lm.forward import CPU_CHUNK, chunk_positions

    assert chunk_positions(None, "cpu", 151_936) == CPU_CHUNK == 64  # what every CPU result used
    assert chunk_positions(None, "cuda:0", 151_936) == 2048  # 4 GiB / (3 × 4 B × 151,936) = 2,355 → 2,048
    assert chunk_positions(None, "cuda", 49_152) == 4096  # capped
    assert chunk_positions(17, "cuda", 151_936) == 17  # an option set wins


# --- 15. gradient checkpointing by device, 16. attention, 18. collectives ---------------------------------------------

def test_gradient_checkpointing_is_on_for_cuda_and_off_on_cpu_unless_set():
    from stages.training.config import UpdateConfig, resolved_gradient_checkpointing

    assert UpdateConfig(scored="s", out="o").gradient_checkpointing is None
    assert resolved_gradient_checkpointing(None, "cuda:0") and not resolved_gradient_checkpointing(None, "cpu")
    assert resolved_gradient_checkpointing(True, "cpu") and not resolved_gradient_checkpointing(False, "cuda:0")


def test_attention_implementation_choices(monkeypatch):
    import importlib.util

    from stages.lm.models import attention_kwargs

    assert attention_kwargs("auto") == {} and attention_kwargs("sdpa") == {"attn_implementation": "sdpa"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="flash-attn package is not installed"):
        attention_kwargs("flash_attention_2")


def test_overlap_comm_on_gpu_and_a_configurable_collective_timeout(monkeypatch):
    import torch.distributed as dist

    from stages.training import distributed

    assert distributed.deepspeed_config({}, None, 1.0, 2, "bf16", overlap_comm=True)["zero_optimization"][
        "overlap_comm"] is True
    assert distributed.deepspeed_config({}, None, 1.0, 1, "fp32")["zero_optimization"]["overlap_comm"] is False
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: seen.update(kw))
    distributed.init_process_group(distributed.DistEnv(), "cpu", timeout_minutes=90)
    assert seen["timeout"].total_seconds() == 90 * 60


def test_optimizer_offload_takes_deepspeeds_cpu_adam_or_is_refused_on_cpu():
    from stages.training import distributed

    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert distributed.optimizer_class({}, "cuda:0") == "torch.optim.AdamW"
    assert distributed.optimizer_class(offload, "cuda:0") == "deepspeed.ops.adam.DeepSpeedCPUAdam"
    with pytest.raises(InputError, match="offload_optimizer .* trains on the CPU already"):
        distributed.optimizer_class(offload, "cpu")


# --- 19. srun passes --cpus-per-task ---------------------------------------------------------------------------------

def test_srun_of_the_update_job_passes_cpus_per_task():
    from stages.runs.slurm import SlurmConfig, render_update

    text = render_update(SlurmConfig(cpus_per_task=12), "job", Path("log"), "title", "antisd update --x 1",
                         Path("/work"))
    assert "export SRUN_CPUS_PER_TASK=12" in text and "srun --kill-on-bad-exit=1 --cpus-per-task=12" in text
    example = (REPO / "examples" / "slurm" / "multi_node.sbatch").read_text()
    assert "export SRUN_CPUS_PER_TASK=$CPUS" in example


# --- 20. the resident trainer lends its bf16 policy on GPU ------------------------------------------------------------

def test_a_bf16_trainer_on_cuda_lends_its_policy_to_score(tmp_path):
    from stages.runs import config as run_config
    from stages.runs.config import LoopConfig
    from stages.runs.resources import Resources
    from stages.runs.run_dir import Run

    policy = torch.nn.Linear(2, 2).to(torch.bfloat16)
    trainer = SimpleNamespace(serves_inference=lambda: True, policy=policy, device="cuda:0", model_revision="r",
                              tokenizer=None)
    config = LoopConfig(out=str(tmp_path), run=run_config.resolve({}, ["score.device=cuda", "rollout.device=cuda"]))
    resources = Resources(config, Run(tmp_path), "hf", card=SimpleNamespace(kind="cpu", total=lambda: None))
    resources.trainer = trainer
    resources._lend(0)
    ((key, loaded),) = resources._policies.items()
    assert key == (str(Run(tmp_path).checkpoint(0)), "torch.bfloat16", "cuda") and loaded.model is policy
    trainer.policy = torch.nn.Linear(2, 2)  # an fp32 trainer on cuda does not match score's bf16: no lending
    resources._policies.clear()
    resources._lend(0)
    assert resources._policies == {}


# --- 5. replay on CUDA, sharded saves ---------------------------------------------------------------------------------

def test_replay_is_exact_on_cpu_and_within_the_stated_tolerance_on_cuda():
    from stages.training.checkpoint import replay_differences, replay_tolerance

    stored = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=torch.bfloat16)}
    one_ulp = {"w": torch.tensor([0.5, -1.0078125, 2.0], dtype=torch.bfloat16)}  # −1 moved by one bf16 ulp
    lr = 1e-6
    assert replay_tolerance("cpu", lr, 1) == (0.0, 0.0)
    assert replay_differences(stored, one_ulp, replay_tolerance("cpu", lr, 1))[0] == ["w"]
    assert replay_differences(stored, one_ulp, replay_tolerance("cuda:0", lr, 1))[0] == []
    wrong = {"w": torch.tensor([0.5, -1.0, 2.5], dtype=torch.bfloat16)}  # not noise: another weight
    assert replay_differences(stored, wrong, replay_tolerance("cuda:0", lr, 1))[0] == ["w"]
    nan = {"w": torch.tensor([0.5, float("nan"), 2.0], dtype=torch.bfloat16)}
    assert replay_differences(stored, nan, replay_tolerance("cuda:0", lr, 1))[0] == ["w"]


def test_stored_weights_reads_a_sharded_save(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stages.training.checkpoint import stored_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    whole = load_file(str(tiny_model_dir / "model.safetensors"))
    sharded = stored_weights(tmp_path / "sharded")
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)
    assert stored_weights(tmp_path) is None
    assert json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
