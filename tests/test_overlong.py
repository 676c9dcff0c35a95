"""DAPO's overlong shaping in `antisd update`: the soft length penalty on the reward and the truncated-row filter."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from test_update import config, make_scored, weights

from stages.common import io
from stages.common.errors import InputError
from stages.method.advantages import overlong_penalty
from stages.update import run


def test_the_penalty_is_zero_then_linear_over_the_buffer():
    got = overlong_penalty([5, 6, 7, 8, 10, 12], max_tokens=10, buffer=4)
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]  # quarters: exact in binary floating point
    assert overlong_penalty([9], max_tokens=10, buffer=4, penalty=2.0).tolist() == [-1.5]
    with pytest.raises(ValueError):
        overlong_penalty([1], max_tokens=4, buffer=4)


def _responses(lengths):
    return [[100 + i for i in range(n)] for n in lengths]


def test_the_penalty_gives_equal_rewards_an_advantage(tmp_path, tiny_model_dir):
    """All rewards 1: plain GRPO learns nothing; with the penalty the short response of group 1 stands out."""
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir, rewards=[1.0] * 8,
                       responses=_responses([6, 6, 6, 6, 2, 6, 6, 6]))
    plain = run(config(path, tiny_model_dir, tmp_path / "plain", method="grpo"))
    shaped = run(config(path, tiny_model_dir, tmp_path / "shaped", method="grpo", overlong_buffer=2,
                        overlong_max_tokens=6))
    before = weights(tiny_model_dir)
    assert all(torch.equal(t, before[k]) for k, t in weights(plain).items())
    assert sum(int(not torch.equal(t, before[k])) for k, t in weights(shaped).items()) > 0
    metrics = json.loads((shaped / "metrics.json").read_text())
    assert metrics["reward/overlong_penalty_mean"] == pytest.approx(-7 / 8)
    assert json.loads((plain / "metrics.json").read_text())["reward/overlong_penalty_mean"] is None


def test_the_limit_comes_from_the_rollouts_metadata_or_is_refused(tmp_path, tiny_model_dir):
    path = make_scored(tmp_path / "s.parquet", tiny_model_dir)  # its metadata holds no max_new_tokens
    with pytest.raises(InputError, match="--overlong-buffer needs the rollouts' max_new_tokens"):
        run(config(path, tiny_model_dir, tmp_path / "a", overlong_buffer=2))
    table, metadata = io.read_artifact(path, "scored")
    metadata["verified_metadata"] = {"rollouts_metadata": {"config": {"max_new_tokens": 6}}}
    io.write_artifact(table, tmp_path / "m.parquet", "scored", metadata)
    with pytest.raises(InputError, match="--overlong-buffer 6: must be below the response limit 6"):
        run(config(tmp_path / "m.parquet", tiny_model_dir, tmp_path / "b", overlong_buffer=6))
    out = run(config(tmp_path / "m.parquet", tiny_model_dir, tmp_path / "c", overlong_buffer=2))
    assert json.loads((out / "metrics.json").read_text())["reward/overlong_penalty_mean"] == -1.0  # all 6 long


def test_the_filter_trains_as_if_truncated_rows_had_no_loss(tmp_path, tiny_model_dir):
    """Group 1 truncated and filtered out: the step equals one on group 0 alone (group advantages are per group)."""
    path = make_scored(tmp_path / "all.parquet", tiny_model_dir, groups=2)
    table, metadata = io.read_artifact(path, "scored")
    finish = ["stop"] * 4 + ["length"] * 4
    table = table.set_column(table.schema.get_field_index("finish_reason"), "finish_reason", pa.array(finish))
    io.write_artifact(table, tmp_path / "marked.parquet", "scored", metadata)
    io.write_artifact(table.slice(0, 4), tmp_path / "first.parquet", "scored", metadata)
    filtered = run(config(tmp_path / "marked.parquet", tiny_model_dir, tmp_path / "filtered", method="grpo",
                          overlong_filter=True))
    alone = run(config(tmp_path / "first.parquet", tiny_model_dir, tmp_path / "alone", method="grpo"))
    unfiltered = run(config(tmp_path / "marked.parquet", tiny_model_dir, tmp_path / "unfiltered", method="grpo"))
    a, b, c = weights(filtered), weights(alone), weights(unfiltered)
    for name in a:  # same rows, same micro-batches: the same float operations
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a[name], c[name]) for name in a)
    assert json.loads((filtered / "metrics.json").read_text())["response/overlong_filtered"] == 4
