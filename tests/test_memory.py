"""The memory model (stages.runs.memory): parameter counts equal transformers' and PEFT's, docs/memory.md holds the
script's table, the GPU examples fit, and `antisd loop` refuses a run that cannot fit before any work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from antisd_cli.main import cli
from stages.common.card import GIB, Card
from stages.runs import memory

REPO = Path(__file__).resolve().parent.parent
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
            "num_hidden_layers": 36, "intermediate_size": 9728, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "tie_word_embeddings": True}


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_transformers_own(tied):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config)
    assert memory.ModelShape.from_config(config.to_dict()).params == model.num_parameters()
    assert memory.ModelShape.from_config(QWEN3_4B).params == 4_022_468_096  # Qwen3-4B's published 4.0B


def test_lora_parameter_count_is_peft_own(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert memory.ModelShape.from_folder(tiny_model_dir).lora_params(4) == trainable


def test_the_doc_table_is_the_scripts_output():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import memory_table
    finally:
        sys.path.pop(0)
    doc = (REPO / "docs" / "memory.md").read_text()
    block = doc.split("<!-- memory_table.py -->\n", 1)[1].split("<!-- /memory_table.py -->", 1)[0]
    assert block == memory_table.table()


def test_full_4b_does_not_fit_one_80gib_gpu_and_lora_does():
    shape = memory.ModelShape.from_config(QWEN3_4B)
    full = memory.plan(shape, memory.TrainSetup(longest_sequence=8448), 80 * GIB, vllm=True, resident_trainer=True)
    lora = memory.plan(shape, memory.TrainSetup(lora_rank=64, longest_sequence=8448), 80 * GIB, vllm=True,
                       resident_trainer=True)
    assert not full.fits and full.train.total > 80 * GIB  # 20 bytes/parameter in the update: ~80 GB before more
    assert lora.fits and 0.5 < lora.vllm_utilization <= 0.9


def test_the_gpu_examples_fit_one_80gib_gpu_as_their_headers_say(tmp_path, tiny_model_dir):
    from stages.runs import config as run_config
    from stages.runs.config import LoopConfig
    from stages.runs.resources import loop_plan

    folder = qwen3_folder(tmp_path, tiny_model_dir)
    for name in ("gsm8k_gpu.yaml", "qwen3_dapo_gpu.yaml"):
        # each file's one-GPU command line (its header) adds LoRA; as written, full training is for Slurm
        path = REPO / "examples" / "configs" / name
        resolved = run_config.load(path, [f"loop.model={folder}", "update.lora_rank=64"])
        full = run_config.load(path, [f"loop.model={folder}"])
        assert not loop_plan(LoopConfig(out=str(tmp_path / "run"), run=full), GPU80(), True, []).fits
        plan = loop_plan(LoopConfig(out=str(tmp_path / "run"), run=resolved), GPU80(), True, [])
        assert plan.fits, (name, plan.train.describe())


class GPU80(Card):
    """An 80 GiB CUDA card (its size only)."""

    def __init__(self):
        super().__init__("cuda")

    def total(self):
        return 80 * GIB


def qwen3_folder(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A folder with Qwen3-4B's config.json, a tokenizer and an empty weights file: enough to plan, nothing to load."""
    folder = tmp_path / "qwen3-4b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_4B))
    from safetensors.torch import save_file

    save_file({}, str(folder / "model.safetensors"))  # a valid file with no tensors: resolve_model checks the header
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, folder / name)
    return folder


def test_loop_refuses_full_4b_training_on_one_gpu_before_any_work(tmp_path, tiny_model_dir, monkeypatch):
    from stages import loop

    monkeypatch.setattr(loop.Card, "for_device", classmethod(lambda cls, device: GPU80()))
    folder = qwen3_folder(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(cli, ["loop", "-o", str(tmp_path / "run"), "--set", f"loop.model={folder}",
                                      "--set", "rollout.engine=hf", "--set", "loop.eval_every=0",
                                      "--set", "rollout.max_new_tokens=8192"])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "the update needs 84." in message and "GiB per GPU" in message and "of one 80.0 GiB GPU" in message
    assert "update.lora_rank=64 → 19." in message and "8 GPUs: torchrun --nproc-per-node 8" in message
    assert "\n" not in message and not (tmp_path / "run").exists()
