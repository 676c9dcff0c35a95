"""The `official` variant (METHOD §9) through the stages: the warm-up calibration from files and across a resume,
a run state from before variants continuing as paper, `update --advantages-out` (with and without training),
score's teacher perplexity, §9 teacher turn and entropy skip, and the loop's presets."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from test_update import config as paper_config
from test_update import make_scored, weights_hash

from antisd_cli.main import cli
from stages.common import io
from stages.method.perplexity import perplexity_lambdas
from stages.training import checkpoint
from stages.training.config import UpdateConfig
from stages.update import run

# teacher perplexities of the 8 rows of each step's file (make_scored: 2 groups × 4); those ≥ 3 are spikes
PPL = [[1.2, 1.5, 2.0, 2.5, 3.5, 1.1, 1.3, 1.4],
       [2.2, 1.9, 1.6, 4.0, 1.05, 1.7, 2.8, 1.25],
       [1.1, 2.9, 1.5, 2.4, 1.8, 2.0, 5.0, 1.3]]


def official_scored(path: Path, model_dir: Path, seed: int, ppl: list[float]) -> Path:
    """make_scored's file plus a teacher_ppl column (the random-init model's own perplexity is ~10⁵: every row
    would be a spike and the warm-up would never calibrate)."""
    make_scored(path, model_dir, seed=seed, revision=None)
    table, metadata = io.read_artifact(path, "scored")
    io.write_artifact(table.append_column("teacher_ppl", pa.array(ppl, pa.float64())), path, "scored", metadata)
    return path


def official(scored, model, out, **kw) -> UpdateConfig:
    return UpdateConfig(scored=str(scored), model=str(model), out=str(out), lr=1e-3, threads=1, **kw)


def pmi_rows(path: Path) -> list[list[float]]:
    return io.read_artifact(path, "scored")[0].column("pmi").to_pylist()


# --- the warm-up calibration ------------------------------------------------------------------------------------

def test_the_warm_up_calibrates_from_the_files_and_a_resume_keeps_it(tmp_path, tiny_model_dir):
    from stages.training import distributed
    from stages.training.batch import batch_from_table
    from stages.training.trainer import Trainer

    files = [official_scored(tmp_path / f"s{k}.parquet", tiny_model_dir, k, PPL[k]) for k in range(3)]
    model = tiny_model_dir
    for k, path in enumerate(files):  # three `antisd update` runs, each from the previous checkpoint's files
        model = run(official(path, model, tmp_path / f"c{k}", warmup_steps=2))
    state = json.loads((model / checkpoint.STATE_FILE).read_text())
    gate = state["gate"]
    # by hand: σ_ref = mean over the warm-up's responses of the unbiased std of u; M = upper median of tppl < 3
    stds = [statistics.stdev(u) for path in files[:2] for u in pmi_rows(path)]
    pool = sorted(p for ppl in PPL[:2] for p in ppl if p < 3)
    assert gate["kind"] == "perplexity" and state["variant"] == "official"
    assert gate["sigma_ref"] == pytest.approx(statistics.fmean(stds), rel=1e-12)
    assert gate["ppl_m"] == pool[len(pool) // 2] == 1.6  # 14 values below 3: the 8th smallest
    assert gate["target"] == pytest.approx(max(0.93 * 1.6, 1.01)) and gate["reactivate"] == pytest.approx(1.07 * 1.6)
    assert state["update_settings"]["adv_scale"] == "none" and state["update_settings"]["loss_agg"] == \
        "seq-mean-token-mean"
    metrics = json.loads((model / checkpoint.METRICS_FILE).read_text())
    lam = perplexity_lambdas(torch.tensor(PPL[2], dtype=torch.float64), gate["target"], 0.2, 3.0, 0.5, 3.0)
    assert metrics["gate/open"] == 1  # the first step after the warm-up
    assert metrics["gate/lambda_max"] == pytest.approx(float(lam.max()), rel=1e-12) and metrics["gate/lambda_max"] > 0
    assert metrics["gate/lambda"] == pytest.approx(float(lam.mean()), rel=1e-12)
    assert metrics["gate/statistic"] == pytest.approx(statistics.fmean(p for p in PPL[2] if p < 3), rel=1e-12)
    assert json.loads((tmp_path / "c0" / checkpoint.METRICS_FILE).read_text())["gate/lambda"] == 0.0  # warm-up

    # one resident trainer over the same three files: the same calibration, gate and weights
    trainer = Trainer(official(files[0], tiny_model_dir, tmp_path / "direct", warmup_steps=2), Path(tiny_model_dir),
                      None, distributed.DistEnv(), "cpu")
    for path in files:
        trainer.train_step(batch_from_table(io.read_artifact(path, "scored")[0], str(path), 49152))
    trainer.save(tmp_path / "direct", {})
    trainer.close()
    assert trainer.gate.state_dict() == gate
    assert weights_hash(tmp_path / "direct") == weights_hash(model)


def test_a_run_state_from_before_variants_continues_as_paper(tmp_path, tiny_model_dir):
    first = make_scored(tmp_path / "a.parquet", tiny_model_dir, seed=1, revision=None)
    second = make_scored(tmp_path / "b.parquet", tiny_model_dir, seed=2, revision=None)
    older = run(paper_config(first, tiny_model_dir, tmp_path / "c1", warmup_steps=1))
    state_path = older / checkpoint.STATE_FILE
    state = json.loads(state_path.read_text())
    del state["variant"], state["update_settings"]  # what an antisd from before variants wrote
    state_path.write_text(json.dumps(state))
    inherited = run(official(second, older, tmp_path / "inherited", warmup_steps=1))  # no --variant
    explicit = run(paper_config(second, older, tmp_path / "explicit", warmup_steps=1))
    assert weights_hash(inherited) == weights_hash(explicit)
    assert json.loads((inherited / checkpoint.STATE_FILE).read_text())["variant"] == "paper"
    result = CliRunner().invoke(cli, ["update", "--scored", str(second), "--model", str(older), "--out",
                                      str(tmp_path / "refused"), "--variant", "official"])
    assert result.exit_code == 2 and "written by variant paper (before variants existed" in result.stderr
    switched = run(official(second, older, tmp_path / "switched", warmup_steps=1, variant="official",
                            switch_method=True))
    assert json.loads((switched / checkpoint.STATE_FILE).read_text())["gate"]["kind"] == "perplexity"


# --- --advantages-out ----------------------------------------------------------------------------------------------

def test_advantages_out_is_what_the_step_trains_on_with_or_without_training(tmp_path, tiny_model_dir):
    warm = official_scored(tmp_path / "s0.parquet", tiny_model_dir, 0, PPL[0])
    step = official_scored(tmp_path / "s1.parquet", tiny_model_dir, 1, PPL[1])
    calibrated = run(official(warm, tiny_model_dir, tmp_path / "c0", warmup_steps=1))
    dry = tmp_path / "dry.parquet"
    result = CliRunner().invoke(cli, ["update", "--scored", str(step), "--model", str(calibrated), "--no-train",
                                      "--advantages-out", str(dry), "--warmup-steps", "1", "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(dry) and not (tmp_path / "c1").exists()
    trained = run(official(step, calibrated, tmp_path / "c1", warmup_steps=1,
                           advantages_out=str(tmp_path / "trained.parquet")))
    table, metadata = io.read_artifact(tmp_path / "trained.parquet", "advantages")
    assert table.equals(io.read_artifact(dry, "advantages")[0])
    gate = json.loads((trained / checkpoint.STATE_FILE).read_text())["gate"]
    assert metadata["gate"] == gate and metadata["variant"] == "official" and metadata["step"] == 1
    lam = perplexity_lambdas(torch.tensor(PPL[1], dtype=torch.float64), gate["target"], 0.2, 3.0, 0.5, 3.0).tolist()
    scored = io.read_artifact(step, "scored")[0].to_pylist()
    for row, want_lam, source in zip(table.to_pylist(), lam, scored):
        assert (row["prompt_id"], row["sample_idx"]) == (source["prompt_id"], source["sample_idx"])
        assert row["lam"] == pytest.approx(want_lam, rel=1e-12)
        assert len(row["u"]) == len(row["advantage"]) == len(source["response_token_ids"])
        # the adaptive clip: a kept u is within 2σ_ref of 0 and equals the scored u; a dropped one is 0
        for u, raw in zip(row["u"], source["pmi"]):
            assert u == (raw if abs(raw) <= 2 * gate["sigma_ref"] else 0.0)
        # the z-score sums to 0 over the response (float32 terms of size ≤ 5: 1e-5 is 20 ulps at that size)
        assert abs(sum(row["term_normalized"])) < 1e-5
        for a, p in zip(row["advantage"], row["term_normalized"]):
            assert a == pytest.approx(row["seq_advantage"] + row["lam"] * p, rel=1e-6, abs=1e-6)  # float32
    shown = CliRunner().invoke(cli, ["inspect", str(dry), "--row", "1", "--model", str(tiny_model_dir)])
    assert shown.exit_code == 0, shown.output
    assert "A = A_seq + λ·p" in shown.stdout and f"λ_i {lam[1]:.4f}" in shown.stdout


def test_the_paper_variant_writes_its_unnormalised_term(tmp_path, tiny_model_dir):
    from stages.method.terms import antisd_term

    scored = make_scored(tmp_path / "s.parquet", tiny_model_dir, revision=None)
    out = tmp_path / "adv.parquet"
    run(paper_config(scored, tiny_model_dir, "", train=False, advantages_out=str(out), gate="off"))
    for row in io.read_artifact(out, "advantages")[0].to_pylist():
        assert row["lam"] == 0.5 and row["term"] == row["term_normalized"]
        expected = antisd_term(torch.tensor(row["u"], dtype=torch.float32)).tolist()
        # the same float32 softplus, but the vectorised and the scalar (tail) kernels differ by a few ulps: 4·2⁻²³
        assert row["term"] == pytest.approx(expected, rel=4 * 2.0**-23, abs=1e-12)


def test_sd_is_minus_antisd_token_by_token_through_the_stage(tmp_path, tiny_model_dir):
    scored = official_scored(tmp_path / "s.parquet", tiny_model_dir, 3, PPL[0])
    tables = {}
    for method in ("sd", "antisd"):
        out = tmp_path / f"{method}.parquet"
        run(official(scored, tiny_model_dir, "", method=method, train=False, advantages_out=str(out)))
        tables[method] = io.read_artifact(out, "advantages")[0].to_pylist()
    for sd, antisd in zip(tables["sd"], tables["antisd"]):
        assert sd["term_normalized"] == [-x for x in antisd["term_normalized"]] and any(sd["term_normalized"])


# --- score -------------------------------------------------------------------------------------------------------

def test_score_writes_teacher_perplexity_the_official_turn_and_can_skip_the_entropy(tmp_path, tiny_model_dir):
    from test_score import verified_table, write_verified

    from stages.lm.models import load_model
    from stages.lm.scoring import ScoreConfig
    from stages.score import run as score

    tiny = load_model(tiny_model_dir)
    verified = write_verified(tmp_path / "v.parquet", verified_table(tiny.tokenizer))
    with_entropy = score(ScoreConfig(verified=str(verified), out=str(tmp_path / "a.parquet"), model=str(tiny.path),
                                     teacher_layout="official", peer_assessment=False), loaded=tiny)
    without = score(ScoreConfig(verified=str(verified), out=str(tmp_path / "b.parquet"), model=str(tiny.path),
                                teacher_layout="official", peer_assessment=False, entropy=False), loaded=tiny)
    rows, meta = io.read_artifact(with_entropy, "scored")
    plain, plain_meta = io.read_artifact(without, "scored")
    for row, other in zip(rows.to_pylist(), plain.to_pylist()):
        assert other["teacher_logprobs"] == row["teacher_logprobs"] and other["pmi"] == row["pmi"]
        assert set(other["teacher_entropy"]) <= {0.0} and set(other["student_entropy"]) <= {0.0}
        if row["privileged_source"] == "none":
            assert row["teacher_ppl"] is None
        elif row["response_token_ids"]:
            lp = row["teacher_logprobs"]
            assert row["teacher_ppl"] == math.exp(-math.fsum(lp) / len(lp))
        if row["privileged_source"] == "peer":
            text = tiny.tokenizer.decode(row["teacher_prompt_token_ids"])
            assert f"\nYour previous attempt:\n\n{row['privileged_text']}\n\nNow solve this problem" in text
            assert "Previous assessment" not in text
    assert meta["entropy"] is True and plain_meta["entropy"] is False and plain_meta["median_teacher_entropy"] is None
    result = CliRunner().invoke(cli, ["update", "--scored", str(without), "--model", str(tiny_model_dir), "--out",
                                      str(tmp_path / "c"), "--variant", "paper"])
    assert result.exit_code == 2 and "scored without entropies" in result.stderr


# --- the loop ------------------------------------------------------------------------------------------------------

def test_the_loop_derives_the_teacher_prompt_and_entropy_from_the_variant():
    from stages.runs import config as run_config
    from stages.runs.plan import prompt_settings, run_variant

    official_run = run_config.resolve({}, ["update.variant=official"])
    assert prompt_settings(official_run, "verify") == {
        "privileged_fallback": "assessment", "privileged_max_chars": 0, "privileged_max_tokens": 3072,
        "privileged_cut_boxed": True, "privileged_context_tokens": 4096, "privileged_keep_head": 0.25,
        "model": "smollm2-135m"}
    assert prompt_settings(official_run, "score") == {"teacher_layout": "official", "peer_assessment": False,
                                                      "entropy": False}
    chosen = run_config.resolve({}, ["update.variant=official", "score.entropy=true", "verify.privileged_max_tokens=9",
                                     "update.gate_statistic=entropy", "update.lam_mode=batch", "update.u_clip=off"])
    assert "entropy" not in prompt_settings(chosen, "score") and "privileged_max_tokens" not in \
        prompt_settings(chosen, "verify")
    paper = run_config.resolve({}, ["update.variant=paper"])
    assert prompt_settings(paper, "score") == {"teacher_layout": "paper", "peer_assessment": True, "entropy": True}
    assert run_variant(run_config.resolve({}), None) == "official"
    assert run_variant(run_config.resolve({}), {"config": {"update": {}}}) == "paper"  # made before variants
    assert run_variant(run_config.resolve({}), {"config": {"update": {"variant": "official"}}}) == "official"


def test_an_official_loop_runs_and_says_so_everywhere(tmp_path, tiny_model_dir):
    import yaml
    from test_loop import run_loop, tiny_config

    raw = tiny_config(tiny_model_dir, steps=2)
    raw["loop"]["eval_every"] = 0
    raw["update"] = {"method": "antisd", "lr": 1.0e-3, "warmup_steps": 1}  # no variant: the default
    path = tmp_path / "official.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_loop(path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    root = tmp_path / "run"
    assert yaml.safe_load((root / "config.yaml").read_text())["update"]["variant"] == "official"
    manifest = json.loads((root / "run.json").read_text())
    assert manifest["update_settings"]["gate_statistic"] == "perplexity" and manifest["update_settings"]["variant"] == \
        "official"
    commands = (root / "step_0001" / "commands.sh").read_text()
    for flag in ("--variant official", "--privileged-fallback assessment", "--teacher-layout official",
                 "--no-peer-assessment", "--no-entropy", "--privileged-cut-boxed"):
        assert flag in commands, flag
    verified = io.read_artifact(root / "step_0000" / "verified.parquet", "verified")[0]
    assert set(verified.column("privileged_source").to_pylist()) <= {"peer", "assessment"}
    scored, meta = io.read_artifact(root / "step_0000" / "scored.parquet", "scored")
    assert meta["entropy"] is False and "teacher_ppl" in scored.column_names
    state = json.loads((root / "step_0001" / "checkpoint" / checkpoint.STATE_FILE).read_text())
    assert state["variant"] == "official" and state["gate"]["kind"] == "perplexity"
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert all("gate/statistic" in row and row["teacher/entropy_median"] is None for row in rows)
