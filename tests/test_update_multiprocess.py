"""`antisd update` as 2 ranks over gloo (plain processes with RANK/WORLD_SIZE/MASTER_PORT, as torchrun sets them).

The 2-rank ZeRO-2 step must be the 1-process step: each rank trains on its token-balanced share with the loss
normalizer of the whole batch, the ranks run equal numbers of backward passes, and the all-reduced gradient is the
1-process gradient. The tests compare what the ranks compute (the reduced gradients and Adam's moments, recorded by
tests/grad_probe.py), not the weights elementwise: Adam's first step is w − lr·g/(|g| + ε), so for a weight whose
gradient sits at the float noise floor (|g| ≲ 1e-8) a reordering of the same sum flips g/(|g| + ε) anywhere in
[−1, 1] and moves the weight by up to 2·lr; no weight tolerance below that holds on every CPU.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from test_update import make_scored, weights

from stages.common import io
from stages.training import checkpoint, distributed

TIMEOUT_S = 300


PROBE = Path(__file__).resolve().parent / "grad_probe.py"

# Tolerance of a reduced gradient (and of Adam's moments, linear in it), relative to the tensor's largest entry:
# 1 and 2 ranks add the same per-position float32 contributions in other orders (other micro-batches, paddings and a
# rank all-reduce). The worst-case reordering error of a sum of N terms is ≈ N·u·Σ|x| (u = 2^-24 ≈ 6e-8); here
# N ≈ 190 positions, so N·u ≈ 1.1e-5, and 1e-4 leaves room for 10× cancellation (Σ|x| ≫ |Σx|). Measured: ≤ 2.6e-6,
# the same as a 1-process step regrouped into other micro-batches. A real defect is ≥ 1e-2: a missing × world size
# halves every gradient, a per-rank normalizer shifts it by the ranks' token imbalance, a moment not resumed from
# the shards is off by 0.09·g₁ (~40 %).
GRAD_RTOL = 1e-4
ADAM_EPS = 1e-8  # torch AdamW's default ε, the one update uses


def launch(args: list[str], world_size: int, cwd: Path, probe_dir: Path) -> dict:
    """Run `antisd update ARGS` under tests/grad_probe.py as `world_size` ranks; return the probe's record."""
    port = distributed.free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        procs.append(subprocess.Popen([sys.executable, str(PROBE), str(probe_dir), "-q", "update", *args, "--threads", "1"],
                                      env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{stderr[-3000:]}"
    return torch.load(probe_dir / "probe.pt")


@pytest.fixture
def uneven_scored(tmp_path, tiny_model_dir):
    """12 rows of very different lengths: the token split and micro-batch counts differ between the ranks."""
    rng = random.Random(3)
    lengths = [2, 30, 5, 7, 11, 3, 25, 4, 9, 2, 16, 6]
    responses = [[rng.randrange(100, 5000) for _ in range(n)] for n in lengths]
    return make_scored(tmp_path / "scored.parquet", tiny_model_dir, groups=3, group_size=4, responses=responses,
                       rewards=[1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0])


def assert_tensors_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    for name, reference in expected.items():
        scale = float(reference.abs().max())
        assert scale > 0, f"{what} {name} is all zero: the check would prove nothing"
        worst = float((actual[name] - reference).abs().max())
        assert worst <= GRAD_RTOL * scale, f"{what} {name}: differs by {worst:.3g}, {worst / scale:.2g} of its max"


def clip_coefficient(grads: dict, grad_clip: float = 1.0) -> float:
    norm = sum(float((g.double() ** 2).sum()) for g in grads.values()) ** 0.5
    return min(1.0, grad_clip / norm)


def assert_first_adam_step_agrees(before: dict, one: dict, two: dict, grads: dict, lr: float) -> dict[str, int]:
    """Weights after a first Adam step, where they are well conditioned; returns how many entries of each tensor
    were compared. Entries whose gradient is exactly 0 must not move at all.

    Step 1 is w₁ = w₀ − lr·f(c·g) with f(x) = x/(|x| + ε) and c the clip coefficient. A gradient error δ moves it by
    ≤ lr·c·δ·ε/(c·(|g| − δ))² (f′(x) = ε/(|x| + ε)²), plus the roundings of each run's step and of w₁ (a few ulps
    of |w₀| + lr: when w₀ ≈ lr·f the subtraction cancels and the step's own rounding is what remains). Entries with |g| ≤ 10·δ
    are not compared (f is then ill-conditioned: see the module docstring).
    """
    c = clip_coefficient(grads)
    compared = {}
    for name, g in grads.items():
        key = name.removeprefix("model.")
        g = g.reshape(before[key].shape)
        delta = GRAD_RTOL * float(g.abs().max())
        conditioned = g.abs() > 10 * delta
        untouched = g == 0
        assert torch.equal(one[key][untouched], before[key][untouched])
        assert torch.equal(two[key][untouched], before[key][untouched])
        bound = lr * c * delta * ADAM_EPS / (c * (g.abs() - delta).clamp(min=delta)) ** 2
        bound = bound + 2 * torch.finfo(torch.float32).eps * (before[key].abs() + lr)
        gap = (two[key] - one[key]).abs()
        assert bool((gap[conditioned] <= bound[conditioned]).all()), f"weights {key} differ beyond the Adam bound"
        compared[key] = int(conditioned.sum())
    return compared


def test_two_rank_zero2_step_equals_one_process(tmp_path, tiny_model_dir, uneven_scored):
    lr = 1e-4
    common = ["--scored", str(uneven_scored), "--lr", str(lr), "--micro-batch-tokens", "64", "--zero-stage", "2",
              "--warmup-steps", "1", "--variant", "paper"]  # token-mean: the normalizer of every token of all ranks
    one = launch([*common, "--model", str(tiny_model_dir), "--out", str(tmp_path / "one")], 1, tmp_path,
                 tmp_path / "probe_one")
    two = launch([*common, "--model", str(tiny_model_dir), "--out", str(tmp_path / "two")], 2, tmp_path,
                 tmp_path / "probe_two")
    assert len(one["grads"]) == len(two["grads"]) == 1  # one optimizer step each
    assert_tensors_close(two["grads"][0], one["grads"][0], "reduced gradient")
    assert_tensors_close(two["exp_avg"][0], one["exp_avg"][0], "exp_avg")
    before = weights(tiny_model_dir)
    w_one, w_two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert any(not torch.equal(w_one[k], before[k]) for k in w_one)
    compared = assert_first_adam_step_agrees(before, w_one, w_two, one["grads"][0], lr)
    assert all(count > 0 for count in compared.values()), compared  # the check reaches every tensor
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["actor/pg_loss"] == pytest.approx(m1["actor/pg_loss"], rel=GRAD_RTOL, abs=1e-7)
    assert m2["actor/grad_norm"] == pytest.approx(m1["actor/grad_norm"], rel=GRAD_RTOL)
    state = json.loads((tmp_path / "two" / checkpoint.STATE_FILE).read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 2
    # every rank wrote its ZeRO shard into the one folder; nothing was left next to it
    shards = sorted(p.name for p in (tmp_path / "two" / checkpoint.DEEPSPEED_DIR).rglob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert not list(tmp_path.glob(".two*"))

    # a second 2-rank step resumes the sharded optimizer state: its moments are the 1-process step's
    # (--force: the scored file is reused, so its old log-probs come from the step-0 weights)
    one2 = launch([*common, "--model", str(tmp_path / "one"), "--out", str(tmp_path / "one2"), "--force"], 1, tmp_path,
                  tmp_path / "probe_one2")
    two2 = launch([*common, "--model", str(tmp_path / "two"), "--out", str(tmp_path / "two2"), "--force"], 2, tmp_path,
                  tmp_path / "probe_two2")
    assert_tensors_close(two2["grads"][0], one2["grads"][0], "step-2 reduced gradient")
    assert_tensors_close(two2["exp_avg"][0], one2["exp_avg"][0], "step-2 exp_avg")
    assert_tensors_close(two2["exp_avg_sq"][0], one2["exp_avg_sq"][0], "step-2 exp_avg_sq")


def test_two_ranks_calibrate_the_official_gate_as_one_process(tmp_path, tiny_model_dir, uneven_scored):
    """METHOD §9's warm-up (σ_ref, M, target, reactivate) from a 2-rank step equals the 1-process one exactly: every
    rank reads the whole file, and the trainer checks that the ranks' gate states agree before it trains."""
    table, metadata = io.read_artifact(uneven_scored, "scored")
    ppl = [1.2, 1.5, 2.0, 2.5, 3.5, 1.1, 1.3, 1.4, 2.2, 1.9, 1.6, 4.0]  # the random model's own are all spikes
    io.write_artifact(table.append_column("teacher_ppl", pa.array(ppl, pa.float64())), uneven_scored, "scored",
                      metadata)
    common = ["--scored", str(uneven_scored), "--lr", "1e-4", "--micro-batch-tokens", "64", "--variant", "official",
              "--warmup-steps", "1", "--model", str(tiny_model_dir)]
    launch([*common, "--out", str(tmp_path / "one")], 1, tmp_path, tmp_path / "probe_one")
    launch([*common, "--out", str(tmp_path / "two")], 2, tmp_path, tmp_path / "probe_two")
    one = json.loads((tmp_path / "one" / checkpoint.STATE_FILE).read_text())["gate"]
    two = json.loads((tmp_path / "two" / checkpoint.STATE_FILE).read_text())["gate"]
    assert one["ppl_m"] == sorted(p for p in ppl if p < 3)[5] and one["sigma_ref"] > 0  # calibrated
    assert two == one
