"""`antisd update` as 2 ranks over gloo (plain processes with RANK/WORLD_SIZE/MASTER_PORT, as torchrun sets them).

The 2-rank ZeRO-2 step must equal the 1-process step within float tolerance: each rank trains on its token-balanced
share with the loss normalizer of the whole batch, and the ranks run equal numbers of backward passes.
Adam's first step is ≈ lr·sign(g), so a weight whose gradient is ~1e-8 amplifies summation-order noise up to lr:
the tests use lr 1e-4 and atol 1e-6 (1% of a step); the gradient norms must agree to 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages import checkpoint, distributed
from stages.update import run
from test_update import config, make_scored, weights

TIMEOUT_S = 300


def launch(args: list[str], world_size: int, cwd: Path) -> None:
    """Run `python -m antisd_cli update ARGS` as `world_size` ranks and wait for all of them."""
    port = distributed.free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
        procs.append(subprocess.Popen([sys.executable, "-m", "antisd_cli", "-q", "update", *args, "--threads", "1"],
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


@pytest.fixture
def uneven_scored(tmp_path, tiny_model_dir):
    """12 rows of very different lengths: the token split and micro-batch counts differ between the ranks."""
    rng = random.Random(3)
    lengths = [2, 30, 5, 7, 11, 3, 25, 4, 9, 2, 16, 6]
    responses = [[rng.randrange(100, 5000) for _ in range(n)] for n in lengths]
    return make_scored(tmp_path / "scored.parquet", tiny_model_dir, groups=3, group_size=4, responses=responses,
                       rewards=[1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0])


def test_two_rank_zero2_step_equals_one_process(tmp_path, tiny_model_dir, uneven_scored):
    common = ["--scored", uneven_scored, "--lr", "1e-4", "--micro-batch-tokens", "64", "--zero-stage", "2",
              "--warmup-steps", "1"]
    single = run(config(uneven_scored, tiny_model_dir, tmp_path / "one", micro_batch_tokens=64, zero_stage=2,
                        warmup_steps=1, lr=1e-4))
    launch([*map(str, common), "--model", str(tiny_model_dir), "--out", str(tmp_path / "two")], 2, tmp_path)
    one, two = weights(single), weights(tmp_path / "two")
    assert any(not torch.equal(one[k], weights(tiny_model_dir)[k]) for k in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
    m1 = json.loads((single / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["actor/pg_loss"] == pytest.approx(m1["actor/pg_loss"], rel=1e-5, abs=1e-7)
    assert m2["actor/grad_norm"] == pytest.approx(m1["actor/grad_norm"], rel=1e-5)
    state = json.loads((tmp_path / "two" / checkpoint.STATE_FILE).read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 2
    # every rank wrote its ZeRO shard into the one folder; nothing was left next to it
    shards = sorted(p.name for p in (tmp_path / "two" / checkpoint.DEEPSPEED_DIR).rglob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert not list(tmp_path.glob(".two*"))

    # a second 2-rank step resumes the sharded optimizer state: equal to a second 1-process step
    single2 = run(config(uneven_scored, single, tmp_path / "one2", micro_batch_tokens=64, zero_stage=2,
                         warmup_steps=1, lr=1e-4, force=True))
    launch([*map(str, common), "--model", str(tmp_path / "two"), "--out", str(tmp_path / "two2"), "--force"], 2,
           tmp_path)
    one2, two2 = weights(single2), weights(tmp_path / "two2")
    for name in one2:
        torch.testing.assert_close(two2[name], one2[name], rtol=0, atol=1e-6)
