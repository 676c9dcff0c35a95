"""`antisd loop` as 2 resident ranks under `torchrun --nproc-per-node 2` (gloo on CPU, the HF engine, the tiny model):
the same files as one process, weights within the arithmetic of reduction order, a kill -9 of one rank resumed to
the uninterrupted run's bits, a second launch refused; plus the pure pieces the ranks share work by.

The end-to-end tests are marked `ranks` (run by `make test`, never skipped): a 1-process run in this process, and
four torchrun launches of 2 ranks (~60 s together on 2 cores).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from antisd_cli.main import cli

REPO = Path(__file__).resolve().parent.parent
KILLER = Path(__file__).resolve().parent / "rank_killer.py"
LR = 1e-3
STAGE_FILES = ("prompts", "rollouts", "verified", "scored")
FLOAT_COLUMNS = {"sampling_logprobs", "student_logprobs", "teacher_logprobs", "teacher_entropy", "student_entropy",
                 "pmi", "teacher_ppl"}


def ranks_config(model_dir: Path) -> dict:
    """2 steps of 2 prompts × 2 samples; rollout.batch_size 2 (one prompt per HF batch), so both ranks sample."""
    return {
        "loop": {"model": str(model_dir), "steps": 2, "prompts_per_step": 2, "seed": 3, "eval_every": 2,
                 "eval_max_new_tokens": 4, "train": {"name": "arith", "split": "train"},
                 "eval": {"name": "arith", "split": "test", "num": 3}, "tensorboard": False},
        "rollout": {"n": 2, "max_new_tokens": 6, "progress": False, "batch_size": 2},
        "verify": {"workers": 1},
        # sd is ungated: λ > 0 from the first step, so the weights move even when every reward is 0
        "update": {"method": "sd", "lr": LR, "variant": "paper", "progress": False},
    }


def torchrun(args: list[str], cwd: Path, script: list[str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2` of `antisd ARGS` (or of `script` + ARGS)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    target = script or ["-m", "antisd_cli"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *target, "-q", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    """One process and 2 ranks (`antisd loop --nproc 2`) on the same config."""
    tmp = tmp_path_factory.mktemp("ranks")
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(ranks_config(tiny_model_dir)))
    one = CliRunner().invoke(cli, ["-q", "loop", "-c", str(config), "-o", str(tmp / "one")])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    two = subprocess.run([sys.executable, "-m", "antisd_cli", "-q", "loop", "-c", str(config), "-o", str(tmp / "two"),
                          "--nproc", "2"], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip() == str((tmp / "two").absolute())  # one line per run, not per rank
    return {"config": config, "one": tmp / "one", "two": tmp / "two", "tmp": tmp, "start": tiny_model_dir}


def table(run: Path, step: int, name: str):
    return pq.read_table(run / f"step_{step:04d}" / f"{name}.parquet")


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.ranks
def test_two_ranks_write_the_files_of_one_process(runs):
    """Step 0 samples and scores the start model: the ranks compute the 1-process run's engine batches and forward
    pieces, so every file is the same, bit for bit. Step 1 samples from weights one reordered gradient sum apart
    (below): the same tokens, texts and rewards, and floats within 1e-4 nats. Why 1e-4: the step-0 weights agree to
    about an ulp (measured relative L2 gap 1.2e-7), and a float32 forward through them moves a log-prob of ~10
    nats by a few of its own ulps (9.5e-7 each; measured: 1 ulp); a policy one update apart differs by ~1e-3."""
    one, two = runs["one"], runs["two"]
    for name in STAGE_FILES:
        assert table(two, 0, name).equals(table(one, 0, name)), f"step 0 {name}"
    for name in STAGE_FILES:
        a, b = table(one, 1, name), table(two, 1, name)
        assert a.column_names == b.column_names and a.num_rows == b.num_rows
        for column in a.column_names:
            x, y = a.column(column).to_pylist(), b.column(column).to_pylist()
            if column not in FLOAT_COLUMNS:
                assert x == y, f"step 1 {name}.{column}"
            elif column == "teacher_ppl":  # exp(−mean t): the same relative gap
                assert y == pytest.approx(x, rel=1e-4), column
            else:
                assert all(len(p) == len(q) and max(map(abs, torch.tensor(p) - torch.tensor(q)), default=0) <= 1e-4
                           for p, q in zip(x, y)), f"step 1 {name}.{column}"
    for step in (0, 1):  # the parts were merged and removed
        assert not list((two / f"step_{step:04d}").glob("*.parts"))
    # the shared evaluation, rank 0's files: of the start model the same bits, of step 1's weights the same tokens
    base = [pq.read_table(run / "eval_base.parquet") for run in (one, two)]
    assert base[0].num_rows == 3 and base[1].equals(base[0])
    evals = [table(run, 1, "eval") for run in (one, two)]
    assert evals[1].column("response_token_ids").equals(evals[0].column("response_token_ids"))


# Weights after 2 steps, as the relative L2 gap of their displacement from the start (all tensors together): 1 and 2
# ranks add the same float32 per-position gradient contributions in another order (two partial sums and a gloo
# all-reduce instead of one running sum). A reordered sum of K terms differs by ≤ K·u·Σ|x| (u = 2^-24 ≈ 6e-8); with
# K ≈ 300 positions per step here and cancellation up to 10× (Σ|x| ≫ |Σx|) a gradient entry moves by ≲ 2e-4 of
# itself, and Adam's step η·m̂/(√v̂ + ε) is a ratio of such sums, so a well-conditioned entry's step moves by about
# as much; step 1's inputs, sampled and scored by weights an ulp apart, add their own rounding only. 1e-3 is 5× that
# worst case (measured 1.5e-5; one process with its micro-batches regrouped, the same kind of reordering: 2.8e-5); a
# defect (a rank's rows lost or counted twice, a per-rank normalizer) moves most steps by O(1), a gap of O(0.1–1).
DISPLACEMENT_RTOL = 1e-3
# An entry whose gradient sits at the float noise floor (|g| ≲ ε) may land anywhere in Adam's range, so per entry only
# that range holds: |step 1| ≤ η (|g|/(|g| + ε)), |step 2| ≤ 1.0013·η (Cauchy–Schwarz on m̂₂/√v̂₂ with β = 0.9,
# 0.999), no weight decay (variant paper): two runs differ by at most twice the sum.
ADAM_RANGE = 2 * (1 + 1.0013) * LR


def assert_weights_agree(one: dict, two: dict, start: dict) -> None:
    gaps, moved = [], []
    for name, reference in one.items():
        displacement = (reference - start[name]).double()
        gap = (two[name] - reference).double()
        assert float(gap.abs().max()) <= ADAM_RANGE * (1 + 1e-3), name
        gaps.append(gap.flatten())
        moved.append(displacement.flatten())
    norm = float(torch.cat(moved).norm())
    assert norm > 0, "the weights did not move: the check would prove nothing"
    assert float(torch.cat(gaps).norm()) <= DISPLACEMENT_RTOL * norm


@pytest.mark.ranks
def test_two_ranks_train_the_weights_of_one_process_to_reduction_order(runs):
    start = weights(runs["start"])
    for step in (0, 1):
        checkpoint = f"step_{step:04d}/checkpoint"
        assert_weights_agree(weights(runs["one"] / checkpoint), weights(runs["two"] / checkpoint), start)
    state = yaml.safe_load((runs["two"] / "step_0001" / "checkpoint" / "antisd_state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 2
    shards = sorted((runs["two"] / "step_0001" / "checkpoint" / "deepspeed").rglob("*optim_states.pt"))
    assert len(shards) == 2  # each rank's ZeRO shard, written into the one folder


@pytest.mark.ranks
def test_a_kill_of_one_rank_resumes_to_the_uninterrupted_runs_bits(runs):
    """Rank 1 is SIGKILLed at step 1 as it is about to write its score part (rank 0's may be written: it is kept);
    torchrun stops rank 0. The resume (a plain 2-rank launch) replays step 0's update from its scored file, scores
    the missing part, trains step 1: the files and weights of the uninterrupted 2-rank run."""
    out, config = runs["tmp"] / "killed", runs["config"]
    killed = torchrun(["loop", "-c", str(config), "-o", str(out)], runs["tmp"], script=[str(KILLER), "1", "scored",
                                                                                         "1"])
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert (out / "step_0001" / "verified.parquet").exists() and not (out / "step_0001" / "scored.parquet").exists()
    assert not (out / "step_0001" / "scored.parts" / "part-00001-of-00002.parquet").exists()
    resumed = torchrun(["loop", "-c", str(config), "-o", str(out)], runs["tmp"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step in (0, 1):
        for name in STAGE_FILES:
            assert table(out, step, name).equals(table(runs["two"], step, name)), f"step {step} {name}"
        checkpoint = f"step_{step:04d}/checkpoint/model.safetensors"
        assert (out / checkpoint).read_bytes() == (runs["two"] / checkpoint).read_bytes()
    assert not list(out.rglob("*.parts")) and not list(out.rglob("*.tmp"))


@pytest.mark.ranks
def test_a_second_launch_on_a_held_run_directory_is_refused_on_every_rank(runs):
    from stages.common.io import output_lock

    before = sorted(str(p) for p in runs["two"].rglob("*"))
    with output_lock(runs["two"]):  # what a running launch holds (its rank 0)
        second = torchrun(["loop", "-c", str(runs["config"]), "-o", str(runs["two"])], runs["tmp"])
    assert second.returncode != 0
    refusals = [line for line in second.stderr.splitlines() if "another process" in line]
    assert len(refusals) == 2 and all(line.startswith("Error: ") for line in refusals), second.stderr[-3000:]
    assert sorted(str(p) for p in runs["two"].rglob("*")) == before


# --- the pure pieces ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_a_share_of_whole_batches_cut_again_gives_the_same_batches(seed):
    """What makes N ranks sample the 1-rank bits: the prompts of any share, cut by the HF engine, are exactly the
    share's batches of the unsharded cut (same rows in the same order), for any lengths, n and batch size."""
    from stages.lm.engine import prompt_batches
    from stages.runs.shared_sampling import sampling_share

    rng = random.Random(seed)
    lengths = [rng.choice([5, 7, 7, 9, 12, 30]) for _ in range(rng.randrange(1, 40))]
    n, rows, count = rng.choice([1, 2, 4, 8]), rng.choice([1, 3, 8, 16, 64]), rng.choice([1, 2, 3, 8])
    whole = [tuple(batch) for batch in prompt_batches(lengths, n, rows)]
    assert all(len(batch) == max(1, rows // n) for batch in whole[:-1])
    shares = [sampling_share(lengths, n, rows, count, index) for index in range(count)]
    assert sorted(p for share in shares for p in share) == list(range(len(lengths)))  # each prompt once
    for share in shares:
        again = [tuple(share[i] for i in batch) for batch in prompt_batches([lengths[p] for p in share], n, rows)]
        assert set(again) <= set(whole)


def test_merge_in_order_puts_the_rows_in_the_unsharded_order(tmp_path):
    from test_merge import write_parts

    from stages import merge

    parts = write_parts(tmp_path / "parts", "verified", ["p0", "p1", "p2", "p3"], count=2)[0].parent
    order = [(f"p{i}", sample) for i in (3, 0, 2, 1) for sample in (1, 0)]  # 2 samples each
    out = merge.run(merge.MergeConfig(parts=str(parts), out=str(tmp_path / "merged.parquet")), order=order)
    assert list(zip(*(pq.read_table(out).column(c).to_pylist() for c in ("prompt_id", "sample_idx")))) == order
    with pytest.raises(ValueError, match="not the same keys"):
        merge.run(merge.MergeConfig(parts=str(parts), out=str(tmp_path / "bad.parquet")), order=order[:-1])


def test_parts_of_another_dealing_are_cleared_and_the_missing_ones_named(tmp_path):
    """A resumed launch keeps a killed launch's finished parts only when they hold what their shard holds now:
    another rank count, or a resumable setting (rollout.batch_size) that deals the prompts otherwise, removes them."""
    from test_merge import write_parts

    from stages.common.parts import Shard
    from stages.runs.ranks import parts_dir, pending_parts

    parts = parts_dir(tmp_path / "rollouts.parquet")
    assert parts == tmp_path / "rollouts.parts"
    write_parts(parts, "rollouts", ["p0", "p1", "p2", "p3"], count=2)  # round-robin: p0, p2 | p1, p3
    for stale in write_parts(parts, "rollouts", ["p0", "p1", "p2", "p3"], count=4)[1:]:
        stale.unlink()  # part 0 of 4 stays: a launch of another rank count
    (parts / "notes.txt").write_text("x")
    now = {0: {"p0", "p2"}, 1: {"p1"}}  # shard 1's prompts are dealt otherwise now
    assert pending_parts(parts, 2, lambda shard: now[shard.index]) == [1]
    assert sorted(p.name for p in parts.iterdir()) == ["notes.txt", Shard(0, 2).part_name()]


def test_a_resume_with_another_rank_count_than_the_optimizer_state_is_refused(tmp_path):
    import json

    from stages.common.errors import InputError
    from stages.runs.ranks import check_resumed_ranks
    from stages.training.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG

    checkpoint = tmp_path / "run" / "step_0000" / "checkpoint"
    (checkpoint / DEEPSPEED_DIR / DEEPSPEED_TAG).mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "antisd_state.json").write_text(json.dumps({"world_size": 2}))
    check_resumed_ranks(tmp_path / "run", 3, 2)
    with pytest.raises(InputError, match="optimizer state of 2 rank\\(s\\), this launch has 1; resume it with 2"):
        check_resumed_ranks(tmp_path / "run", 3, 1)
    check_resumed_ranks(tmp_path / "run", 1, 1)  # finished: nothing to resume


def test_the_docs_hold_the_computed_step_costs():
    """docs/benchmarks.md holds `bench/step.py --costs` (stages.runs.costs) verbatim, README its two step totals; the
    resident step reads nothing and writes the weights plus a fifth of the state, the chain reads every process's
    model and the state and writes both every step."""
    from stages.runs import costs
    from stages.runs.memory import PUBLISHED_SHAPES

    shape = PUBLISHED_SHAPES["Qwen3-4B"]
    resident, chain = costs.resident_step(shape, costs.Batch(), 8), costs.slurm_chain_step(shape, costs.Batch(), 8)
    assert resident.read_bytes == 0 and resident.written_bytes == shape.params * (2 + 14 / 5)
    assert chain.read_bytes == shape.params * (3 * 8 * 2 + 14) and chain.written_bytes == 16 * shape.params
    assert chain.total_s > resident.total_s > resident.generation_s + resident.score_s + resident.update_s
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import step as bench_step
    finally:
        sys.path.pop(0)
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    assert bench_step.costs_text() in doc
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"~{resident.total_s:.0f} s | ~{chain.total_s:.0f} s" in readme
