"""`antisd report` over a tiny study (2 methods × 2 seeds, 3 checkpoints each) whose evaluations are real suite runs
(`antisd eval --suite aime25-check`) with a fake engine that answers a chosen number of samples right, so the best
checkpoints, the Speedups, the seed spread and the pass@k curves are known exactly; plus the Speedup's rules on
hand-made curves."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from click.testing import CliRunner
from fake_engine import GoldEngine, gold_answers

from antisd_cli.main import cli
from stages import eval as eval_stage
from stages.lm.models import load_tokenizer
from stages.method import comparison

N, PROBLEMS = 4, 4  # aime25-check: mean@4; the first 4 AIME 2025 problems
# correct samples (of PROBLEMS × N = 16) at 0 (the base model), 2 and 4 updates (step_0001, step_0003)
STUDY = {"grpo_s0": ("grpo", 0, {0: 2, 2: 4, 4: 6}), "grpo_s1": ("grpo", 1, {0: 2, 2: 6, 4: 5}),
         "antisd_s0": ("antisd", 0, {0: 2, 2: 6, 4: 8}), "antisd_s1": ("antisd", 1, {0: 2, 2: 4, 4: 5})}


def checkpoint(folder, updates: int):
    """(model folder, its suite evaluation folder) as a run keeps them: the base model, or step_XXXX/checkpoint."""
    if updates == 0:
        return folder / "base_model", folder / "eval_base-aime25-check"
    step = folder / f"step_{updates - 1:04d}"
    return step / "checkpoint", step / "eval-aime25-check"


def spread(total: int) -> list[int]:
    """Correct samples per problem adding up to `total`, as even as possible: 6 → [2, 2, 1, 1]."""
    return [total // PROBLEMS + (1 if i < total % PROBLEMS else 0) for i in range(PROBLEMS)]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir):
    """The run folders, each checkpoint evaluated by the real suite code with the gold engine."""
    root = tmp_path_factory.mktemp("study")
    golds = gold_answers(["aime25"], num=PROBLEMS)
    plans = {}
    for run, (method, seed, totals) in STUDY.items():
        folder = root / run
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump({"loop": {"seed": seed}, "update": {"method": method}}))
        for updates, total in totals.items():
            model, evaluation = checkpoint(folder, updates)
            model.parent.mkdir(exist_ok=True)
            model.symlink_to(tiny_model_dir, target_is_directory=True)
            plans[str(model)] = (evaluation, dict(zip(golds, spread(total))))
    tokenizer = load_tokenizer(tiny_model_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("stages.lm.sampling.open_engine", lambda name, config, model_path, rows, loaded=None:
                      GoldEngine(tokenizer, model_path, golds, plans[config.model][1]))
        for model, (evaluation, _) in plans.items():
            eval_stage.run(eval_stage.EvalConfig(benchmark=None, suite="aime25-check", model=model,
                                                 out=str(evaluation), num=PROBLEMS, engine="hf", workers=1,
                                                 bootstrap_resamples=100, progress=False))
    return root


@pytest.fixture(scope="module")
def report(study, tmp_path_factory):
    """The report with the defaults: the one evaluation the runs hold (aime25-check), pass@k on its one benchmark."""
    out = tmp_path_factory.mktemp("report") / "report"
    result = CliRunner().invoke(cli, ["-q", "report", *(str(study / run) for run in STUDY), "--baseline", "grpo",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.stdout


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_prints_the_table_then_the_folder(report):
    out, stdout = report
    assert stdout.strip().splitlines()[-1] == str(out)
    assert "| method | seeds | aime25 | best updates | Speedup vs grpo |" in stdout  # one benchmark: no average
    for name in ("table.md", "runs.csv", "methods.csv", "speedup.csv", "curves.csv", "pass_at_k.csv",
                 "pass_at_k.png", "curves.png", "report.json"):
        assert (out / name).exists(), name
    for figure in ("pass_at_k.png", "curves.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_run_is_taken_at_its_best_average_checkpoint(report):
    best = {row["run"]: (int(row["best_updates"]), float(row["average"])) for row in rows(report[0] / "runs.csv")}
    assert best == {"grpo_s0": (4, 6 / 16), "grpo_s1": (2, 6 / 16), "antisd_s0": (4, 8 / 16),
                    "antisd_s1": (4, 5 / 16)}


def test_speedup_is_paired_by_seed_and_over_seed_means(report):
    speedups = {(row["method"], row["pairing"], row["seeds"]): row for row in rows(report[0] / "speedup.csv")}
    assert set(speedups) == {("antisd", "seed", "0"), ("antisd", "seed", "1"), ("antisd", "paired seed means", "0 1")}
    # seed 0: grpo's best 6/16 at 4 updates, antisd reaches 6/16 at 2 → 4/2
    assert float(speedups[("antisd", "seed", "0")]["value"]) == 2.0
    assert speedups[("antisd", "seed", "0")]["display"] == "2.00×"
    # seed 1: grpo's best 6/16 at 2 updates, antisd's best is 5/16 → never within 4 updates: below 2/4
    assert speedups[("antisd", "seed", "1")]["value"] == "" and speedups[("antisd", "seed", "1")]["display"] == \
        "<0.50× (never)"
    # seed means: grpo {0: 2/16, 2: 5/16, 4: 5.5/16} best at 4; antisd {.., 2: 5/16, 4: 6.5/16} reaches at 4 → 1
    assert float(speedups[("antisd", "paired seed means", "0 1")]["value"]) == 1.0
    table = (report[0] / "table.md").read_text()
    assert "| 1.00×; seeds 0: 2.00×, 1: <0.50× |" in table


def test_seed_spread_is_the_t_interval_over_seeds(report):
    averages = {row["method"]: row for row in rows(report[0] / "methods.csv") if row["score"] == "average"}
    values = [8 / 16, 5 / 16]
    mean, sd = sum(values) / 2, math.sqrt(sum((v - sum(values) / 2) ** 2 for v in values))  # ddof 1 with 2 seeds
    half = 12.706 * sd / math.sqrt(2)  # t_{0.975, 1}
    row = averages["antisd"]
    # the CSV holds 6 significant digits (figures.to_csv)
    assert float(row["mean"]) == pytest.approx(mean, rel=1e-5)
    assert float(row["ci_low"]) == pytest.approx(mean - half, rel=1e-5)
    assert float(row["ci_high"]) == pytest.approx(mean + half, rel=1e-5)
    assert float(averages["grpo"]["std"]) == 0.0  # both grpo seeds peak at 6/16


def test_pass_at_k_curves_are_exact_at_the_best_checkpoints(report):
    def expected(total: int, k: int) -> float:  # 1 − C(n−c, k)/C(n, k), averaged over problems
        return sum(1 - math.comb(N - c, k) / math.comb(N, k) for c in spread(total)) / PROBLEMS

    curves = {(row["run"], int(row["k"])): float(row["pass_at_k"]) for row in rows(report[0] / "pass_at_k.csv")}
    for run, total in (("grpo_s0", 6), ("grpo_s1", 6), ("antisd_s0", 8), ("antisd_s1", 5)):
        for k in range(1, N + 1):
            assert curves[(run, k)] == pytest.approx(expected(total, k), rel=1e-5), (run, k)
    mean = [row for row in rows(report[0] / "pass_at_k.csv") if row["method"] == "antisd" and row["run"] == "mean"]
    assert [int(row["k"]) for row in mean] == [1, 2, 3, 4]
    assert float(mean[1]["pass_at_k"]) == pytest.approx((expected(8, 2) + expected(5, 2)) / 2, rel=1e-5)


def test_every_number_names_its_source_files(report, study):
    report_json = json.loads((report[0] / "report.json").read_text())
    summaries = {str(path) for path in study.glob("*/*-aime25-check/summary.json")}
    summaries |= {str(path) for path in study.glob("*/step_*/eval-aime25-check/summary.json")}
    assert len(summaries) == 12 and summaries <= set(report_json["sources"])
    best_files = [row["summary"] for row in report_json["runs"]]
    assert all(f"`{source}`" in (report[0] / "table.md").read_text() for source in best_files)


@pytest.mark.parametrize("args, message", [
    (["--baseline", "ppo"], "--baseline ppo: no such method among the runs (found: "),
    (["--evaluation", "aime25-check", "--pass-at-k", "aime24"], "--pass-at-k: must be one of aime25, got 'aime24'"),
    (["--pass-at-k", "aime24"], "--pass-at-k aime24: not a benchmark of the aime25-check evaluation (its benchmarks: "
                                "aime25)"),
    (["--evaluation", "paper"], "no evaluation of suite paper"),
    (["--evaluation", "held-out"], "no held-out evaluation (step_XXXX/eval.summary.json"),
])
def test_report_bad_input_exits_2(study, tmp_path, args, message):
    runs = [str(study / run) for run in STUDY]
    result = CliRunner().invoke(cli, ["report", *runs, *args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "r").exists()


def test_report_refuses_runs_evaluated_differently(study, tmp_path):
    import shutil

    odd = tmp_path / "grpo_s2"
    shutil.copytree(study / "grpo_s0", odd, symlinks=True)
    summary_file = odd / "step_0001" / "eval-aime25-check" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary["per_benchmark"]["aime25"]["problems"] = 30
    summary_file.write_text(json.dumps(summary))
    result = CliRunner().invoke(cli, ["report", str(study / "grpo_s0"), str(odd), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert str(summary_file) in result.stderr


# --- the rules on hand-made curves --------------------------------------------------------------------------------

@pytest.mark.parametrize("baseline, method, value, display", [
    ({0: 0.1, 3: 0.5, 10: 0.6}, {0: 0.1, 3: 0.6, 6: 0.7}, 10 / 3, "3.33×"),  # g = 10, u = 3
    ({0: 0.1, 10: 0.6}, {0: 0.1, 5: 0.3, 8: 0.5}, None, "<1.25× (never)"),  # never within 8: below 10/8
    ({0: 0.6, 10: 0.5}, {0: 0.6, 5: 0.7}, None, "n/a (baseline best at base)"),
    ({0: 0.1, 10: 0.6}, {0: 0.6}, None, "∞ (base model)"),
    ({0: 0.1, 4: 0.6, 8: 0.6}, {0: 0.1, 4: 0.6}, 1.0, "1.00×"),  # ties: the baseline's earliest best
])
def test_speedup_rules(baseline, method, value, display):
    result = comparison.speedup(baseline, method)
    assert result.display == display
    assert result.value == (pytest.approx(value) if value is not None else None)


def test_reaching_tolerates_float_rounding_of_equal_averages():
    target = (0.1 + 0.2 + 0.3) / 3
    assert comparison.first_reaching({1: sum([0.3, 0.2, 0.1]) / 3}, target) == 1
    assert comparison.first_reaching({1: target - 1e-6}, target) is None


@pytest.mark.parametrize("df, expected", [(1, 12.706), (5, 2.571), (30, 2.042), (40, 2.021), (60, 2.000),
                                          (120, 1.980), (1000, 1.962)])
def test_t_quantiles_match_the_table_values(df, expected):
    assert comparison.t_quantile_975(df) == pytest.approx(expected, abs=1e-3)  # tables give 3 decimals


def test_one_seed_has_no_interval():
    spread_ = comparison.seed_spread([0.4])
    assert (spread_.mean, spread_.low, spread_.high) == (0.4, None, None)
