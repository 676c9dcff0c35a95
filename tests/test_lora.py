"""LoRA updates (update.lora_rank > 0): only the adapter trains, checkpoints hold merged weights plus the PEFT
adapter, a continued run equals an uninterrupted one, and the loop trains through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from test_loop import tiny_config
from test_update import config, make_scored, weights, weights_hash

from antisd_cli.main import cli
from stages.common import io
from stages.common.errors import InputError
from stages.training import checkpoint
from stages.update import run

LORA = {"lora_rank": 4, "warmup_steps": 1}


@pytest.fixture(scope="module")
def lora_steps(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lora")
    first = make_scored(tmp / "a.parquet", tiny_model_dir, seed=1)
    second = make_scored(tmp / "b.parquet", tiny_model_dir, seed=2, revision=None)
    ckpt1 = run(config(first, tiny_model_dir, tmp / "c1", **LORA))
    ckpt2 = run(config(second, ckpt1, tmp / "c2", **LORA))
    return tmp, first, second, ckpt1, ckpt2


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_only_the_adapted_layers_change_and_the_merge_equals_base_plus_adapter(lora_steps, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, _, ckpt1, _ = lora_steps
    before, after = weights(tiny_model_dir), weights(ckpt1)
    assert sorted(before) == sorted(after)  # a plain HF folder: no lora_ or base_layer keys
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(any(f".{name}." in k for name in linear) for k in changed)  # all-linear, no head
    assert all(f"layers.{i}.mlp.down_proj.weight" in " ".join(changed) for i in (0, 1))
    state = json.loads((ckpt1 / checkpoint.STATE_FILE).read_text())
    assert state["lora"]["rank"] == 4 and Path(state["lora_base"]) == Path(tiny_model_dir).resolve()
    adapter_config = json.loads((ckpt1 / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == Path(tiny_model_dir).resolve()
    merged = AutoModelForCausalLM.from_pretrained(ckpt1, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(ckpt1 / "adapter")).eval()
    ids = [1, 504, 2843, 28, 17, 901, 2]
    # W + ΔW in fp32 against the unmerged x·W + x·ΔW: rounding of a few ulps per layer of O(1) logits
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), rtol=0, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()  # (from_pretrained
    moved = (_logits(merged, ids) - _logits(plain, ids)).abs().max()  # above wrapped `base` in place)
    assert moved > 1e-3, moved
    module_state = torch.load(ckpt1 / "deepspeed" / "engine" / "mp_rank_00_model_states.pt", weights_only=False)
    kept = list(module_state["module"])  # the adapter, plus the tied embedding DeepSpeed keeps as a shared param
    assert kept and all("lora_" in k or k == "model.lm_head.weight" for k in kept), kept


def test_a_continued_adapter_equals_two_steps_in_one_process(lora_steps, tiny_model_dir):
    from stages.training import distributed
    from stages.training.batch import batch_from_table
    from stages.training.trainer import Trainer

    tmp, first, second, _, ckpt2 = lora_steps
    trainer = Trainer(config(first, tiny_model_dir, tmp / "direct", **LORA), Path(tiny_model_dir), None,
                      distributed.DistEnv(), "cpu")
    for path in (first, second):
        trainer.train_step(batch_from_table(io.read_artifact(path, "scored")[0], str(path), 49152))
    trainer.save(tmp / "direct", {})
    trainer.close()
    assert weights_hash(tmp / "direct") == weights_hash(ckpt2)
    from safetensors.torch import load_file

    direct, continued = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (tmp / "direct", ckpt2))
    assert sorted(direct) == sorted(continued) and all(torch.equal(direct[k], continued[k]) for k in direct)


def test_lora_state_mismatches_are_refused_before_training(lora_steps, tmp_path):
    _, _, second, ckpt1, _ = lora_steps
    with pytest.raises(InputError, match="its LoRA adapter is"):
        run(config(second, ckpt1, tmp_path / "r8", lora_rank=8, warmup_steps=1))
    with pytest.raises(InputError, match="its optimizer state is a LoRA adapter's"):
        run(config(second, ckpt1, tmp_path / "full", warmup_steps=1))
    with pytest.raises(ValueError, match="--lora-rank: LoRA is not available with ZeRO-3"):
        config(second, ckpt1, tmp_path / "z3", lora_rank=4, zero_stage=3)


def test_bad_target_modules_name_the_option(tmp_path, tiny_model_dir):
    scored = make_scored(tmp_path / "s.parquet", tiny_model_dir)
    with pytest.raises(InputError, match="--lora-target-modules no_such_proj"):
        run(config(scored, tiny_model_dir, tmp_path / "c", lora_rank=2, lora_target_modules="no_such_proj"))


def _policy_hash(checkpoint_dir: Path) -> str:
    """The merged weights' hash, or the adapter's for a checkpoint without merged weights."""
    import hashlib

    if (checkpoint_dir / "model.safetensors").is_file():
        return weights_hash(checkpoint_dir)
    return hashlib.sha256((checkpoint_dir / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("merge", [True, False])
def test_the_loop_trains_an_adapter_and_resumes_it(tmp_path, tiny_model_dir, merge):
    """Two LoRA steps through `antisd loop` (merged checkpoints, or adapter-only ones the stages merge at load);
    step 1 rerun from step 0's checkpoint files samples, scores and trains to the same bits."""
    import shutil

    cfg = tiny_config(tiny_model_dir, steps=2)
    cfg["loop"]["eval_every"] = 0
    cfg["update"].update({"lora_rank": 4, "lr": 1.0e-2, "lora_merge": merge})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["loop", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    last = tmp_path / "run" / "step_0001" / "checkpoint"
    assert (last / "adapter" / "adapter_model.safetensors").is_file()
    assert (last / "model.safetensors").is_file() == merge
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    shutil.rmtree(copy / "step_0001")  # killed before step 1's rollout: it samples from step 0's checkpoint files
    result = CliRunner().invoke(cli, ["loop", "--config", str(path), "--out", str(copy)])
    assert result.exit_code == 0, result.output
    for name in ("rollouts", "scored"):
        again, first = (io.read_artifact(run / "step_0001" / f"{name}.parquet", name)[0] for run in (copy, tmp_path / "run"))
        for column in ("response_token_ids", "sampling_logprobs") + (("student_logprobs",) if name == "scored" else ()):
            assert again.column(column).to_pylist() == first.column(column).to_pylist(), (name, column)
    assert _policy_hash(copy / "step_0001" / "checkpoint") == _policy_hash(last)


@pytest.mark.parametrize("knob, message", [
    ("update.lora_target_modules=no_such_proj", "--lora-target-modules no_such_proj: no linear layer named"),
    ("update.overlong_buffer=6", "update.overlong_buffer 6: must be below the response limit 6")])
def test_update_settings_the_first_update_would_refuse_stop_the_loop_before_any_work(tmp_path, tiny_model_dir, knob,
                                                                                     message):
    cfg = tiny_config(tiny_model_dir, steps=1)
    cfg["update"]["lora_rank"] = 4
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(cli, ["-q", "loop", "--config", str(path), "--out", str(tmp_path / "run"), "--set",
                                      knob])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_lora_with_a_zero3_deepspeed_file_is_refused(tmp_path, tiny_model_dir):
    scored = make_scored(tmp_path / "s.parquet", tiny_model_dir)
    (tmp_path / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(InputError, match="LoRA is not available with ZeRO-3"):
        run(config(scored, tiny_model_dir, tmp_path / "c", lora_rank=4, deepspeed_config=str(tmp_path / "z3.json")))
    assert not (tmp_path / "c").exists()


def test_full_training_after_lora_drops_the_adapter_state(lora_steps, tmp_path):
    """A LoRA checkpoint without its optimizer state continues as full training; its state no longer says LoRA, so
    the next full update is not refused as 'a LoRA adapter's'."""
    import shutil

    _, first, second, ckpt1, _ = lora_steps
    bare = tmp_path / "bare"
    shutil.copytree(ckpt1, bare, ignore=shutil.ignore_patterns(checkpoint.DEEPSPEED_DIR))
    full = run(config(second, bare, tmp_path / "full", warmup_steps=1))
    state = json.loads((full / checkpoint.STATE_FILE).read_text())
    assert "lora" not in state and "lora_base" not in state
    run(config(first, full, tmp_path / "again", warmup_steps=1, force=True))


def test_an_adapter_only_checkpoint_loads_as_the_merged_one(lora_steps, tmp_path, tiny_model_dir):
    """update --no-lora-merge writes no weights of its own; loading it merges the adapter into its base, to the same
    bits (fp32) as the merged checkpoint of the same step; the next update continues it; vLLM refuses it."""
    from stages.lm.engine_vllm import check_merged
    from stages.lm.models import load_model, model_revision

    _, first, second, ckpt1, _ = lora_steps
    bare = run(config(first, tiny_model_dir, tmp_path / "bare", lora_merge=False, **LORA))
    assert not list(bare.glob("*.safetensors")) and (bare / "adapter" / "adapter_model.safetensors").is_file()
    merged, loaded = weights(ckpt1), load_model(bare).model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in merged.items())
    assert model_revision(bare) != model_revision(tiny_model_dir)
    with pytest.raises(InputError, match="a LoRA adapter without merged weights"):
        check_merged(bare)
    again = run(config(second, bare, tmp_path / "again", lora_merge=False, **LORA))
    from safetensors.torch import load_file

    reference = load_file(str(lora_steps[4] / "adapter" / "adapter_model.safetensors"))
    continued = load_file(str(again / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(continued[k], reference[k]) for k in reference)  # the same second step as merged c2
