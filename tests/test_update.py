"""`antisd update`: one DeepSpeed step on scored rows, the checkpoint it writes, resume, gate state and bad input.

Scored fixtures are built here directly as Arrow tables (`make_scored`), with the old-policy log-probs s_t computed
by the tiny model itself, so the first optimizer step is on-policy (ρ = 1) exactly as after `score`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

import schemas
from antisd_cli.main import cli
from stages import update as update_stage
from stages.common import io
from stages.common.errors import InputError
from stages.lm.models import model_revision
from stages.training import checkpoint
from stages.training.config import UpdateConfig
from stages.update import run

METRIC_KEYS = [
    "step", "reward/mean", "reward/accuracy", "reward/zero_variance_frac", "response/length_mean",
    "response/length_max", "response/truncated_frac", "teacher/entropy_median", "student/entropy_mean", "gate/open",
    "gate/lambda", "gate/h_warm", "pmi/u_mean", "pmi/antisd_term_mean", "pmi/neg_frac", "actor/pg_loss",
    "actor/clip_frac", "actor/approx_kl", "actor/kl_ref", "actor/grad_norm", "actor/lr", "privileged/peer",
    "actor/no_signal", "gate/warmup",
    "privileged/reference", "privileged/other_peer", "privileged/other_reference", "privileged/none",
    "throughput/update_tok_s", "timing_s/update", "rollout/logprob_mismatch_mean",
    "rollout/logprob_mismatch_max", "reward/overlong_penalty_mean", "response/overlong_filtered",
    # METHOD §9 (None or 0/1 under the paper variant): λ_i, the perplexity gate, the u-clip, the dual clip
    "privileged/assessment", "teacher/ppl_mean", "gate/lambda_max", "gate/lambda_active_frac", "gate/statistic",
    "gate/target", "gate/reactivate", "gate/ppl_m", "gate/sigma_ref", "gate/ppl_spike_frac", "pmi/clipped_frac",
    "actor/clip_frac_dual",
]


# --- fixtures ---------------------------------------------------------------------------------------------------

def _old_logprobs(model_dir: Path, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    from stages.lm.logprobs import response_token_stats

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs, _ = response_token_stats(model, [p + r for p, r in zip(prompts, responses)],
                                           [len(p) for p in prompts], pad_id=2, with_entropy=False)
    return [lp.tolist() for lp in logprobs]


def make_scored(path: Path, model_dir: Path, *, groups: int = 2, group_size: int = 4, response_len: int = 6,
                rewards: list[float] | None = None, pmi: float | list[list[float]] | None = None,
                entropy: float = 2.0, source: str = "peer", seed: int = 0, revision: str | None = "auto",
                responses: list[list[int]] | None = None, ref_shift: float | None = None) -> Path:
    """Write a SCORED Parquet: `groups` prompts × `group_size` samples with random token ids and real s_t.

    rewards default to alternating 1, 0 (every group mixed); pmi a float (constant u) or per-row lists, default
    random N(0, 1); teacher entropy `entropy` + small noise. revision "auto" records --model's revision.
    ref_shift: add the optional ref_logprobs column = s_t + ref_shift (None: no column, as without score --reference).
    """
    rng = random.Random(seed)
    n = groups * group_size
    prompts = [[1] + [rng.randrange(100, 5000) for _ in range(5)] for _ in range(groups) for _ in range(group_size)]
    responses = responses or [[rng.randrange(100, 5000) for _ in range(response_len)] for _ in range(n)]
    student = _old_logprobs(model_dir, prompts, [[min(t, 49151) for t in r] for r in responses])
    rewards = rewards if rewards is not None else [float(i % 2 == 0) for i in range(n)]
    if pmi is None:
        pmi_rows = [[rng.gauss(0, 1) for _ in r] for r in responses]
    elif isinstance(pmi, (int, float)):
        pmi_rows = [[float(pmi)] * len(r) for r in responses]
    else:
        pmi_rows = pmi
    rows = []
    for i in range(n):
        length = len(responses[i])
        rows.append({
            "prompt_id": f"p{i // group_size}", "dataset": "t", "problem": "What is 1 + 1?", "answer": "2",
            "solution": None, "few_shot": [], "sample_idx": i % group_size,
            "prompt_token_ids": prompts[i], "response_token_ids": responses[i], "response_text": "x",
            "sampling_logprobs": [x - 0.01 for x in student[i]], "finish_reason": "length" if i == 0 else "stop",
            "response_length": length, "extracted_answer": "2", "reward": rewards[i], "correct": rewards[i] == 1.0,
            "verify_status": "ok", "group_size": group_size, "group_mean_reward": 0.5, "privileged_text": "sol",
            "privileged_source": source, "peer_sample_idx": (i + 1) % group_size if source == "peer" else None,
            "student_logprobs": student[i], "teacher_logprobs": [s + u for s, u in zip(student[i], pmi_rows[i])],
            "teacher_entropy": [entropy + 0.01 * rng.random() for _ in range(length)],
            "student_entropy": [1.5] * length, "pmi": pmi_rows[i], "teacher_prompt_length": 20,
        })
    table = pa.Table.from_pylist(rows, schema=schemas.SCORED)
    if ref_shift is not None:
        table = table.append_column("ref_logprobs", pa.array([[s + ref_shift for s in lp] for lp in student],
                                                             pa.list_(pa.float32())))
    extra = {}
    if revision is not None:
        extra = {"model": str(model_dir),
                 "model_revision": model_revision(model_dir) if revision == "auto" else revision}
    io.write_artifact(table, path, "scored", io.build_metadata("scored", {}, **extra))
    return path


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(weights(folder).items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def config(scored, model, out, **kw) -> UpdateConfig:
    kw.setdefault("lr", 1e-3)
    kw.setdefault("threads", 1)
    kw.setdefault("variant", "paper")  # these tests pin the paper's text (METHOD §2–§5); §9's are test_variants.py
    return UpdateConfig(scored=str(scored), model=str(model), out=str(out), **kw)


@pytest.fixture
def scored(tmp_path, tiny_model_dir):
    return make_scored(tmp_path / "scored.parquet", tiny_model_dir)


# --- training -------------------------------------------------------------------------------------------------

def test_update_changes_weights(tmp_path, tiny_model_dir, scored):
    out = run(config(scored, tiny_model_dir, tmp_path / "ckpt1"))
    before, after = weights(tiny_model_dir), weights(out)
    changed = sum(int(not torch.equal(before[k], after[k])) for k in before)
    assert changed == len(before)
    assert all(torch.isfinite(t).all() for t in after.values())


def test_a_step_without_learning_signal_takes_no_optimizer_step_and_says_so(tmp_path, tiny_model_dir, caplog):
    """Uniform groups and λ = 0 (grpo): every advantage is 0, so the gradient is 0 and the step is skipped: the
    weights stay bit for bit (weight decay included, which an AdamW step on zero gradients would apply), the run
    state advances, actor/no_signal says it and a warning names it."""
    flat = make_scored(tmp_path / "flat.parquet", tiny_model_dir, rewards=[1.0] * 8)
    with caplog.at_level(logging.WARNING, logger="stages.training.trainer"):
        skipped = run(config(flat, tiny_model_dir, tmp_path / "skipped", method="grpo", weight_decay=0.1))
    before = weights(tiny_model_dir)
    for name, tensor in weights(skipped).items():
        assert torch.equal(tensor, before[name]), name
    metrics = json.loads((skipped / "metrics.json").read_text())
    assert metrics["actor/no_signal"] == 1 and metrics["reward/zero_variance_frac"] == 1.0
    assert metrics["actor/grad_norm"] is None and metrics["throughput/update_tok_s"] is None
    assert json.loads((skipped / checkpoint.STATE_FILE).read_text())["step"] == 1
    assert "update step 0: no learning signal" in caplog.text
    # the same file with a reference KL term has a gradient (toward the reference): it trains
    shifted = make_scored(tmp_path / "shifted.parquet", tiny_model_dir, rewards=[1.0] * 8, ref_shift=-0.5)
    pulled = run(config(shifted, tiny_model_dir, tmp_path / "pulled", method="grpo", kl_coef=0.1))
    assert json.loads((pulled / "metrics.json").read_text())["actor/no_signal"] == 0
    assert weights_hash(pulled) != weights_hash(tiny_model_dir)


def test_a_skipped_step_resumes_exactly(tmp_path, tiny_model_dir):
    """A no-signal step then a step with signal: through checkpoints (the skipped step's optimizer state stored
    untouched) the same weights, optimizer moments and gate as one trainer running both."""
    from stages.training import distributed
    from stages.training.batch import batch_from_table
    from stages.training.trainer import Trainer

    flat = make_scored(tmp_path / "flat.parquet", tiny_model_dir, rewards=[0.0] * 8, seed=1)
    mixed = make_scored(tmp_path / "mixed.parquet", tiny_model_dir, seed=2, revision=None)
    first = run(config(mixed, tiny_model_dir, tmp_path / "c0", method="grpo", force=True))
    skipped = run(config(flat, first, tmp_path / "c1", method="grpo", force=True))
    last = run(config(mixed, skipped, tmp_path / "c2", method="grpo", force=True))
    assert json.loads((skipped / "metrics.json").read_text())["actor/no_signal"] == 1

    trainer = Trainer(config(mixed, tiny_model_dir, tmp_path / "direct", method="grpo"), Path(tiny_model_dir), None,
                      distributed.DistEnv(), "cpu")
    for path in (mixed, flat, mixed):
        trainer.train_step(batch_from_table(io.read_artifact(path, "scored")[0], str(path), 49152))
    trainer.save(tmp_path / "direct", {})
    trainer.close()
    assert weights_hash(tmp_path / "direct") == weights_hash(last)
    assert weights_hash(skipped) == weights_hash(first)


def _response_logprob(model_dir: Path, scored_path: Path) -> float:
    from transformers import AutoModelForCausalLM

    from stages.lm.logprobs import response_token_stats

    table = pa.parquet.read_table(scored_path)
    prompts, responses = table["prompt_token_ids"].to_pylist(), table["response_token_ids"].to_pylist()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs, _ = response_token_stats(model, [p + r for p, r in zip(prompts, responses)],
                                           [len(p) for p in prompts], pad_id=2, with_entropy=False)
    return float(torch.cat(logprobs).sum())


@pytest.mark.parametrize("method, direction", [("sd", +1), ("antisd", -1), ("rkl-ascent", -1)])
def test_method_sign_sets_direction_of_token_logprob(tmp_path, tiny_model_dir, method, direction):
    """Zero-variance rewards leave only λ·f(u); with u = +3 everywhere sd raises log π(y), antisd/rkl lower it."""
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir, rewards=[1.0] * 8, pmi=3.0)
    out = run(config(path, tiny_model_dir, tmp_path / method, method=method, gate="off", lr=1e-2))
    change = _response_logprob(out, path) - _response_logprob(tiny_model_dir, path)
    assert change * direction > 0.01, change


def test_gate_state_persists_and_counts_warmup(tmp_path, tiny_model_dir):
    paths = [make_scored(tmp_path / f"s{k}.parquet", tiny_model_dir, seed=k, entropy=2.0) for k in range(3)]
    model, lams, warm = tiny_model_dir, [], []
    for k, path in enumerate(paths):
        model = run(config(path, model, tmp_path / f"c{k}", warmup_steps=2, force=True))
        metrics = json.loads((model / "metrics.json").read_text())
        state = json.loads((model / checkpoint.STATE_FILE).read_text())
        assert metrics["step"] == k and state["step"] == k + 1 and state["gate"]["step"] == k + 1
        lams.append(metrics["gate/lambda"])
        warm.append(metrics["gate/h_warm"])
    assert lams == [0.0, 0.0, 0.5]
    assert warm[0] is None and warm[1] == pytest.approx(2.005, abs=0.01) and warm[2] == warm[1]
    # an explicit --state wins over <model>/antisd_state.json; --recalibrate-gate restarts the warm-up
    again = run(config(paths[0], model, tmp_path / "re", warmup_steps=2, recalibrate_gate=True, force=True))
    metrics = json.loads((again / "metrics.json").read_text())
    assert metrics["gate/lambda"] == 0.0 and metrics["gate/h_warm"] is None and metrics["step"] == 3


def test_sd_is_ungated_by_default(tmp_path, tiny_model_dir, scored):
    out = run(config(scored, tiny_model_dir, tmp_path / "sd", method="sd"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gate/lambda"] == 0.5 and metrics["gate/open"] == 1


def test_two_steps_in_process_equal_two_runs_through_checkpoints(tmp_path, tiny_model_dir):
    """Optimizer moments, step counts and gate state all travel through CKPT/deepspeed and antisd_state.json."""
    from stages.training import distributed
    from stages.training.batch import batch_from_table
    from stages.training.trainer import Trainer

    first = make_scored(tmp_path / "a.parquet", tiny_model_dir, seed=1)
    second = make_scored(tmp_path / "b.parquet", tiny_model_dir, seed=2, revision=None)
    ckpt1 = run(config(first, tiny_model_dir, tmp_path / "c1", warmup_steps=1))
    ckpt2 = run(config(second, ckpt1, tmp_path / "c2", warmup_steps=1))

    cfg = config(first, tiny_model_dir, tmp_path / "direct", warmup_steps=1)
    trainer = Trainer(cfg, Path(tiny_model_dir), None, distributed.DistEnv(), "cpu")
    for path in (first, second):
        trainer.train_step(batch_from_table(io.read_artifact(path, "scored")[0], str(path), 49152))
    trainer.save(tmp_path / "direct", {})
    trainer.close()
    assert weights_hash(tmp_path / "direct") == weights_hash(ckpt2)
    assert json.loads((ckpt2 / checkpoint.STATE_FILE).read_text())["gate"] == trainer.gate.state_dict()

    # without the optimizer state the second step differs: the test above can fail
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(ckpt1, bare, ignore=shutil.ignore_patterns(checkpoint.DEEPSPEED_DIR))
    ckpt2_fresh = run(config(second, bare, tmp_path / "c2fresh", warmup_steps=1))
    assert weights_hash(ckpt2_fresh) != weights_hash(ckpt2)


def test_engines_are_released_after_each_run(tmp_path, tiny_model_dir, scored):
    import gc

    from deepspeed.runtime.engine import DeepSpeedEngine

    def engines():
        gc.collect()
        return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())

    before = engines()
    model = tiny_model_dir
    for k in range(2):
        model = run(config(scored, model, tmp_path / f"c{k}", force=True))
    assert engines() == before  # an in-process loop must not keep one model + optimizer per step


def test_rerun_is_bitwise_identical(tmp_path, tiny_model_dir, scored):
    a = run(config(scored, tiny_model_dir, tmp_path / "a"))
    b = run(config(scored, tiny_model_dir, tmp_path / "b"))
    assert weights_hash(a) == weights_hash(b)


def test_micro_batching_and_mini_batches(tmp_path, tiny_model_dir, scored):
    """Token micro-batches do not change the step (global normalizer); mini-batches take several steps."""
    whole = run(config(scored, tiny_model_dir, tmp_path / "whole"))
    micro = run(config(scored, tiny_model_dir, tmp_path / "micro", micro_batch_tokens=12))
    for name, tensor in weights(whole).items():
        torch.testing.assert_close(weights(micro)[name], tensor, rtol=0, atol=2e-6)
    mini = run(config(scored, tiny_model_dir, tmp_path / "mini", mini_batch_size=4, ppo_epochs=2))
    metrics = json.loads((mini / "metrics.json").read_text())
    assert metrics["actor/approx_kl"] > 0  # later optimizer steps see an updated policy
    assert weights_hash(mini) != weights_hash(whole)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stages_agree_with_zero2(tmp_path, tiny_model_dir, scored, stage):
    """Several micro-batches per step: ZeRO-3 must accumulate them (it did not when the module was called bare)."""
    reference = run(config(scored, tiny_model_dir, tmp_path / "z2", micro_batch_tokens=12, lr=1e-4))
    other = run(config(scored, tiny_model_dir, tmp_path / f"z{stage}", micro_batch_tokens=12, lr=1e-4,
                       zero_stage=stage))
    for name, tensor in weights(reference).items():
        torch.testing.assert_close(weights(other)[name], tensor, rtol=0, atol=1e-6)
    grad_norms = [json.loads((p / "metrics.json").read_text())["actor/grad_norm"] for p in (reference, other)]
    assert grad_norms[1] == pytest.approx(grad_norms[0], rel=1e-5)


def test_is_correction_changes_the_step(tmp_path, tiny_model_dir, scored):
    plain = run(config(scored, tiny_model_dir, tmp_path / "plain"))
    corrected = run(config(scored, tiny_model_dir, tmp_path / "is", is_correction="token"))
    assert weights_hash(plain) != weights_hash(corrected)
    metrics = json.loads((corrected / "metrics.json").read_text())
    assert metrics["rollout/logprob_mismatch_mean"] == pytest.approx(0.01, abs=1e-5)


# --- pure helpers ---------------------------------------------------------------------------------------------

def test_split_by_tokens_balances_and_covers_every_row():
    from stages.training.distributed import split_by_tokens

    parts = split_by_tokens([30, 2, 5, 25, 4, 9], 2)  # 30→0, 25→1, 9→1, 5→0, 4→1, 2→0
    assert sorted(i for p in parts for i in p) == list(range(6))
    loads = [sum([30, 2, 5, 25, 4, 9][i] for i in p) for p in parts]
    assert loads == [37, 38] and split_by_tokens([1, 1], 3) == [[0], [1], []]


def test_pack_by_tokens_respects_padded_budget():
    from stages.lm.logprobs import pack_by_tokens

    lengths = [10, 4, 6, 30, 5]
    batches = pack_by_tokens(lengths, 20)
    assert batches == [[3], [0, 2], [4, 1]]  # the 30-token row goes alone; 2 × 10 ≤ 20 < 3 × 10
    assert all(len(b) * max(lengths[i] for i in b) <= 20 or len(b) == 1 for b in batches)


def test_deepspeed_config_layers_user_file_under_owned_keys():
    from stages.training.distributed import deepspeed_config

    config = deepspeed_config({"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 5.0}, 3, 1.0, 2,
                              "bf16")
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["overlap_comm"] is True
    assert config["gradient_clipping"] == 1.0 and config["train_batch_size"] == 2 and config["bf16"]["enabled"]
    assert config["managed_gradient_accumulation"] is False
    with pytest.raises(InputError, match="scheduler"):
        deepspeed_config({"scheduler": {}}, None, 1.0, 1, "fp32")


def test_rng_state_round_trip():
    random.seed(5)
    torch.manual_seed(3)
    saved = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (random.random(), torch.rand(3).tolist())
    random.seed(9)
    torch.manual_seed(9)
    checkpoint.restore_rng(saved)
    assert (random.random(), torch.rand(3).tolist()) == expected


def test_launch_environment_is_read_from_torchrun_and_slurm_variables():
    from stages.training.distributed import DistEnv, env_from

    assert env_from({}) == DistEnv()
    torchrun = env_from({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (3, 4, 1, "env")
    slurm = env_from({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1",
                      "MASTER_PORT": "1"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.launcher) == (5, 8, 1, "slurm")
    with pytest.raises(InputError, match="MASTER_ADDR"):
        env_from({"RANK": "0", "WORLD_SIZE": "2"})


# --- the checkpoint -------------------------------------------------------------------------------------------

def test_checkpoint_loads_with_transformers_and_has_chat_template(tmp_path, tiny_model_dir, scored):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run(config(scored, tiny_model_dir, tmp_path / "ckpt"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache is True
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    assert (out / "generation_config.json").exists() and (out / checkpoint.DEEPSPEED_DIR).is_dir()
    assert not list(tmp_path.glob(".*.tmp"))
    for name, tensor in weights(out).items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_metrics_json_has_every_key(tmp_path, tiny_model_dir, scored):
    out = run(config(scored, tiny_model_dir, tmp_path / "ckpt"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics) == sorted(METRIC_KEYS)
    assert metrics["privileged/peer"] == 8 and metrics["response/truncated_frac"] == 1 / 8
    assert metrics["reward/mean"] == 0.5 and metrics["reward/zero_variance_frac"] == 0.0
    assert metrics["actor/clip_frac"] == 0.0 and abs(metrics["actor/approx_kl"]) < 1e-6  # on-policy: ρ = 1
    assert metrics["actor/kl_ref"] is None  # no ref_logprobs in the file
    assert metrics["actor/grad_norm"] > 0 and metrics["throughput/update_tok_s"] > 0
    state = json.loads((out / checkpoint.STATE_FILE).read_text())
    assert {"step", "method", "gate", "rng"} <= set(state) and "data_cursor" not in state  # never set: dropped


def test_disk_full_leaves_previous_checkpoint_and_no_partial(tmp_path, tiny_model_dir, scored, monkeypatch):
    first = run(config(scored, tiny_model_dir, tmp_path / "c1"))
    digest = weights_hash(first)
    real = checkpoint._write_json

    def full(path, obj):
        real(path, obj)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "_write_json", full)
    result = CliRunner().invoke(cli, ["update", "--scored", str(scored), "--model", str(first), "--out",
                                      str(tmp_path / "c2"), "--lr", "1e-3", "--force"])
    assert result.exit_code == 1, result.output
    assert "No space left" in result.stderr
    assert not (tmp_path / "c2").exists() and not list(tmp_path.glob(".c2*"))
    assert weights_hash(first) == digest and (first / checkpoint.STATE_FILE).exists()


def test_too_little_free_space_is_refused_before_training(tmp_path, tiny_model_dir, scored, monkeypatch):
    needed = checkpoint.estimate_bytes(tiny_model_dir)
    weights = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    other = sum(f.stat().st_size for f in tiny_model_dir.iterdir() if f.is_file() and f.suffix != ".safetensors")
    # fp32 weights: 4 B + 16 B of optimizer state per parameter; the tokenizer and configs; 1 MiB for the run files
    assert needed == weights * 5 + other + (1 << 20)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    monkeypatch.setattr(update_stage.Trainer, "train_step", lambda *a: pytest.fail("trained despite a full disk"))
    result = CliRunner().invoke(cli, ["update", "--scored", str(scored), "--model", str(tiny_model_dir), "--out",
                                      str(tmp_path / "c"), "--lr", "1e-3"])
    assert result.exit_code == 2, result.output
    assert "--out" in result.stderr and "GiB is free there" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_overwrite_replaces_the_folder(tmp_path, tiny_model_dir, scored):
    out = run(config(scored, tiny_model_dir, tmp_path / "c"))
    again = run(config(scored, tiny_model_dir, tmp_path / "c", overwrite=True, lr=2e-3))
    assert again == out and not list(tmp_path.glob(".c.*"))


# --- bad input ------------------------------------------------------------------------------------------------

def _invoke(*args):
    return CliRunner().invoke(cli, ["update", *map(str, args)])


def test_cli_prints_checkpoint_path(tmp_path, tiny_model_dir, scored):
    result = _invoke("--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c", "--threads", 1)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "c")


def test_update_without_model_trains_the_model_the_scored_file_records(tmp_path, tiny_model_dir, scored):
    result = _invoke("--scored", scored, "--out", tmp_path / "c", "--threads", 1)
    assert result.exit_code == 0, result.stderr
    state = json.loads((tmp_path / "c" / checkpoint.STATE_FILE).read_text())
    assert state["parent_revision"] == model_revision(tiny_model_dir)
    assert "differ from the rollouts' sampling" not in result.stderr  # s − q is 0.01 nats in make_scored


def test_update_warns_when_the_old_logprobs_are_not_the_samplers(tmp_path, tiny_model_dir, scored, caplog):
    table, metadata = io.read_artifact(scored, "scored")
    shifted = [[s - 3.0 for s in row] for row in table.column("student_logprobs").to_pylist()]  # q 20× less likely
    table = table.set_column(table.schema.get_field_index("sampling_logprobs"), "sampling_logprobs",
                             pa.array(shifted, pa.list_(pa.float32())))
    io.write_artifact(table, tmp_path / "far.parquet", "scored", metadata)
    with caplog.at_level(logging.WARNING, logger="stages.lm.scoring"):
        run(config(tmp_path / "far.parquet", tiny_model_dir, tmp_path / "c"))
    assert "differ from the rollouts' sampling log-probs by 3 nats" in caplog.text


def test_stdout_holds_only_the_path_without_ds_accelerator(tmp_path, tiny_model_dir, scored):
    """`ckpt=$(antisd update …)` in a fresh process without DS_ACCELERATOR: DeepSpeed's accelerator warning (printed
    by its logger at import, to the stdout it found) must go to stderr."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = tmp_path / "c"
    done = subprocess.run([sys.executable, "-m", "antisd_cli", "update", "--scored", str(scored), "--model",
                           str(tiny_model_dir), "--out", str(out), "--threads", "1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n", done.stdout


def test_model_mismatch_needs_force(tmp_path, tiny_model_dir):
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir, revision="0123456789abcdef")
    result = _invoke("--scored", path, "--model", tiny_model_dir, "--out", tmp_path / "c")
    assert result.exit_code == 2
    assert "model revision 0123456789abcdef" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "c").exists()
    forced = _invoke("--scored", path, "--model", tiny_model_dir, "--out", tmp_path / "c", "--force")
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize("column", ["student_logprobs", "pmi"])
def test_nan_logprob_stops_without_checkpoint(tmp_path, tiny_model_dir, column):
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir)
    table = pa.parquet.read_table(path)
    values = table[column].to_pylist()
    values[3][2] = math.nan
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.list_(pa.float32())))
    io.write_artifact(table, path, "scored", io.read_metadata(path))
    result = _invoke("--scored", path, "--model", tiny_model_dir, "--out", tmp_path / "c")
    assert result.exit_code == 2  # bad input, found when the file is read
    assert "row 3 (prompt_id 'p0', sample_idx 3)" in result.stderr and column in result.stderr
    assert "non-finite" in result.stderr
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))


def test_output_exists_exits_2(tmp_path, tiny_model_dir, scored):
    (tmp_path / "c").mkdir()
    result = _invoke("--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "output exists" in result.stderr


def test_token_ids_outside_vocabulary_exit_2(tmp_path, tiny_model_dir):
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir, responses=[[100, 200]] * 7 + [[100, 60000]])
    result = _invoke("--scored", path, "--model", tiny_model_dir, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "token id 60000" in result.stderr and "row 7" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--kl-coef", "-0.1"], "--kl-coef: must be >= 0, got -0.1"),
    (["--method", "ppo"], "Invalid value for '--method'"),
    (["--zero-stage", "4"], "--zero-stage: must be one of 0, 1, 2, 3, got 4"),
    (["--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["--lr", "inf"], "--lr: must be a finite number, got inf"),
    (["--lam-max", "nan"], "--lam-max: must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip: must be a finite number"),
    (["--gate-down", "1.5", "--clip-low", "-1"], "--gate-down: must be in (0, 1], got 1.5; --clip-low: must be"),
])
def test_bad_options_exit_2(tmp_path, tiny_model_dir, scored, args, message):
    result = _invoke("--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c", *args)
    assert result.exit_code == 2 and message in result.stderr


def test_deepspeed_config_with_optimizer_is_refused(tmp_path, tiny_model_dir, scored):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    result = _invoke("--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c", "--deepspeed-config", ds)
    assert result.exit_code == 2 and "optimizer" in result.stderr


def test_state_of_another_method_needs_switch_method(tmp_path, tiny_model_dir, scored):
    first = run(config(scored, tiny_model_dir, tmp_path / "c1", method="sd"))
    with pytest.raises(InputError, match="written by method sd.*--switch-method"):
        run(config(scored, first, tmp_path / "c2", method="antisd", force=True))  # --force is about revisions only


def test_switching_method_carries_the_state_and_recalibrates_the_gate_once(tmp_path, tiny_model_dir):
    paths = [make_scored(tmp_path / f"s{k}.parquet", tiny_model_dir, seed=k) for k in range(3)]
    grpo = run(config(paths[0], tiny_model_dir, tmp_path / "grpo", method="grpo", warmup_steps=1))
    assert json.loads((grpo / "metrics.json").read_text())["gate/h_warm"] is not None
    model, h_warm = grpo, []
    for k in (1, 2):
        model = run(config(paths[k], model, tmp_path / f"antisd{k}", method="antisd", warmup_steps=2,
                           switch_method=True, force=True))
        h_warm.append(json.loads((model / "metrics.json").read_text())["gate/h_warm"])
    state = json.loads((model / checkpoint.STATE_FILE).read_text())
    assert state["method"] == "antisd" and state["step"] == 3 and state["gate"]["warmup_end"] == 3
    assert h_warm[0] is None and h_warm[1] is not None  # one new 2-step warm-up, not restarted at the 2nd step


def test_recalibrate_gate_is_one_shot_across_steps(tmp_path, tiny_model_dir):
    paths = [make_scored(tmp_path / f"s{k}.parquet", tiny_model_dir, seed=k, entropy=2.0 + k) for k in range(4)]
    model = run(config(paths[0], tiny_model_dir, tmp_path / "c0", warmup_steps=1))
    ends = []
    for k in (1, 2, 3):  # the same flag on every step, as a loop config or commands.sh gives it
        model = run(config(paths[k], model, tmp_path / f"c{k}", warmup_steps=1, recalibrate_gate=True, force=True))
        ends.append(json.loads((model / checkpoint.STATE_FILE).read_text())["gate"]["warmup_end"])
    assert ends == [2, 2, 2]  # re-calibrated at step 1 only


# --- k3 KL to a frozen reference (--kl-coef) ------------------------------------------------------------------

def test_kl_coef_without_ref_logprobs_exits_2(tmp_path, tiny_model_dir, scored):
    result = _invoke("--scored", scored, "--model", tiny_model_dir, "--out", tmp_path / "c", "--kl-coef", "0.1")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert str(scored) in result.stderr and "ref_logprobs" in result.stderr
    assert "antisd score --reference MODEL" in result.stderr
    assert not (tmp_path / "c").exists()


def test_kl_to_the_current_policy_changes_nothing(tmp_path, tiny_model_dir, scored):
    """ref = s_t: on-policy r = 0, so k3 = 0 and its gradient 1 − e^r = 0; the step equals one without the term.

    Full sequences (no shared prefix): the fixture's s_t were computed that way, so r is exactly 0, not rounding.
    """
    same = make_scored(tmp_path / "same.parquet", tiny_model_dir, ref_shift=0.0)
    plain = run(config(scored, tiny_model_dir, tmp_path / "plain", share_prefix=False))
    with_kl = run(config(same, tiny_model_dir, tmp_path / "kl", kl_coef=1.0, share_prefix=False))
    for name, tensor in weights(plain).items():
        torch.testing.assert_close(weights(with_kl)[name], tensor, rtol=0, atol=1e-6)
    assert abs(json.loads((with_kl / "metrics.json").read_text())["actor/kl_ref"]) < 1e-6


def test_kl_to_a_shifted_reference_moves_the_weights_and_is_logged(tmp_path, tiny_model_dir, scored):
    shifted = make_scored(tmp_path / "shifted.parquet", tiny_model_dir, ref_shift=-1.0)
    plain = run(config(scored, tiny_model_dir, tmp_path / "plain"))
    with_kl = run(config(shifted, tiny_model_dir, tmp_path / "kl", kl_coef=10.0))
    assert weights_hash(with_kl) != weights_hash(plain)
    table = pa.parquet.read_table(shifted)
    ref = torch.tensor([x for row in table["ref_logprobs"].to_pylist() for x in row], dtype=torch.float64)
    old = torch.tensor([x for row in table["student_logprobs"].to_pylist() for x in row], dtype=torch.float64)
    r = ref - old  # first (on-policy) PPO epoch: the new log-probs are s_t
    expected = float((torch.exp(r) - 1 - r).mean())
    metrics = json.loads((with_kl / "metrics.json").read_text())
    assert metrics["actor/kl_ref"] == pytest.approx(expected, abs=1e-4) and expected > 0.3
    # kl_coef 0 logs the KL of a file that has ref_logprobs but leaves the step alone
    logged = run(config(shifted, tiny_model_dir, tmp_path / "logged"))
    assert weights_hash(logged) == weights_hash(plain)
    assert json.loads((logged / "metrics.json").read_text())["actor/kl_ref"] == pytest.approx(expected, abs=1e-4)


def test_non_finite_or_short_ref_logprobs_name_the_row(tmp_path, tiny_model_dir):
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir, ref_shift=0.0)
    table = pa.parquet.read_table(path)
    values = table["ref_logprobs"].to_pylist()
    values[5][1] = math.inf
    index = table.schema.get_field_index("ref_logprobs")
    io.write_artifact(table.set_column(index, "ref_logprobs", pa.array(values, pa.list_(pa.float32()))), path,
                      "scored", io.read_metadata(path))
    result = _invoke("--scored", path, "--model", tiny_model_dir, "--out", tmp_path / "c", "--kl-coef", "0.1")
    assert result.exit_code == 2 and "row 5 (prompt_id 'p1', sample_idx 1)" in result.stderr
    assert "ref_logprobs" in result.stderr
    values[5] = values[5][:2]
    io.write_artifact(table.set_column(index, "ref_logprobs", pa.array(values, pa.list_(pa.float32()))), path,
                      "scored", io.read_metadata(path))
    result = _invoke("--scored", path, "--model", tiny_model_dir, "--out", tmp_path / "c", "--kl-coef", "0.1")
    assert result.exit_code == 2 and "row 5 (prompt_id 'p1', sample_idx 1)" in result.stderr
    assert "2 values for 6" in result.stderr


def test_checkpoint_files_are_readable_by_the_group_and_others(tmp_path, tiny_model_dir, scored):
    """A shared cluster's other accounts read the weights: modes are what plain file creation gives (umask)."""
    out = run(config(scored, tiny_model_dir, tmp_path / "ckpt"))
    mask = io.current_umask()
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert all(p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~mask for p in out.rglob("*"))


# --- the shared-prefix update ---------------------------------------------------------------------------------------

def _step_gradients(cfg: UpdateConfig, model_dir: Path, table: pa.Table) -> dict[str, torch.Tensor]:
    """The reduced gradient of every parameter at the (single) optimizer step of one in-process update."""
    from deepspeed.utils import safe_get_full_grad

    from stages.training import distributed
    from stages.training.batch import batch_from_table
    from stages.training.trainer import Trainer

    distributed.init_process_group(distributed.DistEnv(), "cpu")  # a world of 1 (kept if this process has one)
    trainer = Trainer(cfg, model_dir, None, distributed.DistEnv(), "cpu")
    captured = {}
    real_step = trainer.engine.optimizer.step

    def step(*args, **kwargs):
        captured.update({n: safe_get_full_grad(p).detach().clone() for n, p in trainer.engine.module.named_parameters()})
        return real_step(*args, **kwargs)

    trainer.engine.optimizer.step = step
    try:
        trainer.train_step(batch_from_table(table, "t", 49152))
    finally:
        trainer.close()
    return captured


@pytest.mark.parametrize("budget", [4096, 40])  # whole groups per micro-batch; groups cut over several micro-batches
def test_the_shared_prefix_update_gives_the_full_sequence_gradients(tmp_path, tiny_model_dir, budget):
    """Uneven groups (4, 3 and 1 rows), responses of 1–9 tokens (padding), one empty response, micro-batch splits."""
    rng = random.Random(5)
    responses = [[rng.randrange(100, 5000) for _ in range(rng.randrange(1, 10))] for _ in range(12)]
    responses[2] = []
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir, groups=3, group_size=4, responses=responses,
                       rewards=[1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0])
    table = pa.parquet.read_table(path).take([0, 1, 2, 3, 4, 5, 6, 8])
    grads = {share: _step_gradients(config(path, tiny_model_dir, tmp_path / str(share), gate="off", method="antisd",
                                           micro_batch_tokens=budget, share_prefix=share), Path(tiny_model_dir),
                                    table) for share in (True, False)}
    for name, full in grads[False].items():
        scale = float(full.abs().max())
        assert scale > 0, name
        # float32 sums of the same terms in other orders: ~1e-7 of the scale on this model; 1e-5 is the bound
        assert float((grads[True][name] - full).abs().max()) <= 1e-5 * scale, name


def test_a_method_that_reads_u_refuses_a_file_scored_without_the_teacher(tmp_path, tiny_model_dir):
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir)
    table = pa.parquet.read_table(path)
    metadata = {**io.read_metadata(path), "teacher": False}
    io.write_artifact(table, path, "scored", metadata)
    result = _invoke("--scored", path, "--model", tiny_model_dir, "--out", tmp_path / "c", "--method", "antisd")
    assert result.exit_code == 2 and "scored without the teacher pass" in result.stderr
    assert run(config(path, tiny_model_dir, tmp_path / "grpo", method="grpo")).exists()  # grpo does not read u


def test_progress_off_a_terminal_logs_lines_with_tokens_per_second_and_the_total(caplog):
    import io as std_io
    import logging

    from stages.common.progress import progress_line, token_progress

    ticks = iter([0.0, 10.0, 40.0, 50.0, 80.0])
    with caplog.at_level(logging.INFO, logger="stages.common.progress"):
        with token_progress("update", 400, every_s=30.0, clock=lambda: next(ticks), stream=std_io.StringIO()) as advance:
            advance(100)  # t = 10: too soon for a record
            advance(100)  # t = 40: 200 tokens in 40 s
            advance(100)  # t = 50: 10 s after the last record
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["update: 200 / 400 tokens (50 %), 5 tok/s, ETA 0m40s",
                     "update: 300 / 400 tokens (75 %), 4 tok/s, ETA 0m26s"]  # the last record: at t = 80
    assert progress_line("update", 0, 10, 0.0).endswith("ETA ?")
    caplog.clear()
    ticks = iter([0.0, 40.0, 41.0])
    with caplog.at_level(logging.INFO, logger="stages.common.progress"):
        with token_progress("update", 100, every_s=30.0, clock=lambda: next(ticks), stream=std_io.StringIO()) as advance:
            advance(100)  # t = 40: the last advance is also due for a record: the end adds no second one
    assert [r.getMessage() for r in caplog.records] == ["update: 100 / 100 tokens (100 %), 2 tok/s, ETA 0m00s"]


def test_an_update_reports_its_progress_in_tokens(tmp_path, tiny_model_dir, scored, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="stages.common.progress"):
        run(config(scored, tiny_model_dir, tmp_path / "ckpt"))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "stages.common.progress"]
    table = pa.parquet.read_table(scored)
    total = sum(len(p) + len(r) for p, r in zip(table.column("prompt_token_ids").to_pylist(),
                                               table.column("response_token_ids").to_pylist()))
    assert line.startswith(f"update: {total:,} / {total:,} tokens (100 %)")


# --- learning-rate schedule ----------------------------------------------------------------------------------------

def test_lr_schedule_shapes():
    from stages.training.schedule import lr_at

    assert [lr_at(k, 1.0, "constant", 2) for k in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_at(k, 1.0, "linear", 0, 4) for k in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    cosine = [lr_at(k, 2.0, "cosine", 1, 2, min_ratio=0.1) for k in range(5)]
    # warm-up 2·1/1, then 0.2 + 1.8·½(1 + cos πp) for p = 0, ½, 1, 1 (after the decay: the floor)
    assert cosine == pytest.approx([2.0, 2.0, 1.1, 0.2, 0.2])


def test_lr_schedule_follows_the_run_step_through_checkpoints(tmp_path, tiny_model_dir):
    from stages.training import distributed
    from stages.training.batch import batch_from_table
    from stages.training.trainer import Trainer

    paths = [make_scored(tmp_path / f"s{k}.parquet", tiny_model_dir, seed=k, revision=None if k else "auto")
             for k in range(3)]
    schedule = dict(lr_schedule="linear", lr_warmup_steps=1, lr_decay_steps=2, lr_min_ratio=0.5)
    model, logged = tiny_model_dir, []
    for k, path in enumerate(paths):  # three `antisd update` calls, each from the last checkpoint
        model = run(config(path, model, tmp_path / f"c{k}", force=True, **schedule))
        logged.append(json.loads((model / "metrics.json").read_text())["actor/lr"])
    assert logged == pytest.approx([1e-3, 1e-3, 0.75e-3])  # warm-up 1/1, then linear from 1 to the 0.5 floor
    cfg = config(paths[0], tiny_model_dir, tmp_path / "direct", force=True, **schedule)
    trainer = Trainer(cfg, Path(tiny_model_dir), None, distributed.DistEnv(), "cpu")
    for path in paths:  # one resident trainer: the same rates, the same weights
        trainer.train_step(batch_from_table(io.read_artifact(path, "scored")[0], str(path), 49152))
    trainer.save(tmp_path / "direct", {})
    trainer.close()
    assert weights_hash(tmp_path / "direct") == weights_hash(model)
    constant = run(config(paths[2], tmp_path / "c1", tmp_path / "const", force=True))
    assert weights_hash(constant) != weights_hash(model)  # the schedule acts: the test above can fail


def test_a_decaying_schedule_needs_its_length():
    with pytest.raises(InputError, match="--lr-decay-steps: must be >= 1 with lr_schedule cosine"):
        UpdateConfig(scored="s", out="o", lr_schedule="cosine")


# --- checkpoints for older transformers ----------------------------------------------------------------------------

def test_portable_config_spells_rope_for_transformers_4():
    from stages.lm.compat import portable_config, portable_tokenizer_config

    llama3 = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}, "dtype": "bfloat16"}
    assert portable_config(llama3) == {**llama3, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                                       "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    default = {"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}, "rope_theta": 1e5}
    assert portable_config(default) == default  # already portable: unchanged
    assert portable_tokenizer_config({"tokenizer_class": "TokenizersBackend"}) == {
        "tokenizer_class": "PreTrainedTokenizerFast"}


def test_a_checkpoint_reads_the_same_after_the_portable_spellings(tmp_path, tiny_model_dir, scored):
    """The config round trip: transformers 4 reads top-level rope_theta and PreTrainedTokenizerFast (checked against
    4.57.1 by scripts/check_checkpoint_compat.py, docs/stack-notes.md); this version must read the same model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = run(config(scored, tiny_model_dir, tmp_path / "ckpt"))
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 100000.0
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    bare = tmp_path / "bare"  # the folder as transformers 5 alone writes it
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns(checkpoint.DEEPSPEED_DIR))
    (bare / "config.json").write_text(json.dumps({k: v for k, v in written.items()
                                                  if k not in ("rope_theta", "torch_dtype")}))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "tokenizer_class": "TokenizersBackend"}))
    assert AutoConfig.from_pretrained(out).rope_parameters == AutoConfig.from_pretrained(bare).rope_parameters
    messages = [{"role": "user", "content": "What is 12 + 25?"}]
    encode = lambda folder: AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False)  # noqa: E731
    assert encode(out) == encode(bare)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(f).eval()(ids).logits for f in (out, bare)]
    assert torch.equal(logits[0], logits[1])
