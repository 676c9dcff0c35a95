"""`antisd report` on the loop's held-out evaluation: a copy of two methods × two seeds of the committed arith study
(docs/reproduction/arith/runs, as scripts/collect_run_files.sh flattened them), its numbers checked against values
computed here from the summary JSONs by a separate loop; the same runs in a live run folder's layout; the choice of
evaluation; the grouping rules; and the Speedup's pairing on hand-made curves."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from antisd_cli.main import cli
from stages import report as report_stage
from stages.verifier import scores

ARITH = Path(__file__).resolve().parent.parent / "docs" / "reproduction" / "arith" / "runs"
RUNS = ("grpo_s0", "grpo_s1", "antisd-nogate_s0", "antisd-nogate_s1")
LABELS = ("grpo", "grpo", "antisd-nogate", "antisd-nogate")


def rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def invoke(*args: str):
    return CliRunner().invoke(cli, ["-q", "report", *args])


@pytest.fixture
def collected(tmp_path) -> Path:
    for run in RUNS:
        shutil.copytree(ARITH / run, tmp_path / "runs" / run)
    return tmp_path / "runs"


def expected_curve(folder: Path) -> dict[int, float]:
    """updates → accuracy, read here: eval_base.json's eval/accuracy at 0, step_XXXX's accuracy at XXXX + 1."""
    curve = {0: json.loads((folder / "eval_base.json").read_text())["eval/accuracy"]}
    for path in folder.glob("step_*.eval.summary.json"):
        curve[int(path.name.split(".")[0].removeprefix("step_")) + 1] = json.loads(path.read_text())["accuracy"]
    return curve


def expected_speedup(baseline: dict[int, float], method: dict[int, float]) -> float | None:
    """g / u by a plain scan: g = the baseline's first best, u = the method's first updates at or above its score."""
    g = b = None
    for updates in sorted(baseline):
        if b is None or baseline[updates] > b:
            g, b = updates, baseline[updates]
    reached = [updates for updates in sorted(method) if method[updates] >= b - 1e-12]
    return g / reached[0] if reached else None


def mean_of(curves: list[dict[int, float]]) -> dict[int, float]:
    return {u: sum(c[u] for c in curves) / len(curves) for u in curves[0]}


def test_report_on_the_committed_arith_runs_recomputes_from_the_summaries(collected, tmp_path):
    out = tmp_path / "report"
    folders = [str(collected / run) for run in RUNS]
    labels = [arg for label in LABELS for arg in ("--label", label)]
    result = invoke(*folders, *labels, "--baseline", "grpo", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"] == "held-out" and report["benchmarks"] == ["arith"]  # chosen: the only kind held
    assert report["protocol"] == {"arith": {"n": 1, "problems": 200}}

    curves = {run: expected_curve(collected / run) for run in RUNS}
    assert {int(u) for u in report["curves"]["grpo_s0"]} == {0, 2, 4, 6, 8}
    best = {row["run"]: row for row in rows(out / "runs.csv")}
    for run, curve in curves.items():
        top = max(curve.values())
        assert int(best[run]["best_updates"]) == min(u for u in curve if curve[u] == top)
        assert float(best[run]["arith"]) == pytest.approx(top, abs=5e-7)  # the CSV keeps 6 significant digits

    speedups = {(row["method"], row["pairing"]): row for row in rows(out / "speedup.csv")}
    by_seed = {0: ("grpo_s0", "antisd-nogate_s0"), 1: ("grpo_s1", "antisd-nogate_s1")}
    values = []
    for seed, (base, method) in by_seed.items():
        value = expected_speedup(curves[base], curves[method])
        row = next(r for r in rows(out / "speedup.csv") if r["pairing"] == "seed" and r["seeds"] == str(seed))
        assert (float(row["value"]) if row["value"] else None) == pytest.approx(value, rel=1e-5)
        values.append(value)
    assert values[0] != 1.0  # the copy holds a non-trivial case (seed 0: GRPO's best at 4, reached at 6)
    paired = expected_speedup(mean_of([curves["grpo_s0"], curves["grpo_s1"]]),
                              mean_of([curves["antisd-nogate_s0"], curves["antisd-nogate_s1"]]))
    mean_row = speedups[("antisd-nogate", "paired seed means")]
    assert (float(mean_row["value"]) if mean_row["value"] else None) == paired

    spread = {row["method"]: row for row in rows(out / "methods.csv") if row["score"] == "arith"}
    tops = [max(curves[run].values()) for run in ("antisd-nogate_s0", "antisd-nogate_s1")]
    mean, sd = sum(tops) / 2, abs(tops[0] - tops[1]) / math.sqrt(2)  # ddof 1 with two values
    assert float(spread["antisd-nogate"]["mean"]) == pytest.approx(mean, rel=1e-5)
    assert float(spread["antisd-nogate"]["ci_high"]) == pytest.approx(mean + 12.706 * sd / math.sqrt(2), rel=1e-5)

    # n = 1 and no per-problem counts in these summaries: pass@1 only, the stored value (= accuracy at the best)
    pass_rows = [row for row in rows(out / "pass_at_k.csv") if row["run"] != "mean"]
    assert {row["k"] for row in pass_rows} == {"1"}
    assert all(float(row["pass_at_k"]) == pytest.approx(max(curves[row["run"]].values()), abs=5e-7)
               for row in pass_rows)
    table = (out / "table.md").read_text()
    assert "4 of the 4 summaries read hold no per-problem counts" in table
    assert f"`{collected / 'grpo_s0' / 'step_0007.eval.summary.json'}`" in table


def live_layout(collected: Path, root: Path) -> Path:
    """The same runs as a live run folder keeps them: step_XXXX/eval.summary.json, eval_base.summary.json."""
    for run in RUNS:
        folder = root / run
        folder.mkdir(parents=True)
        shutil.copy(collected / run / "config.yaml", folder)
        shutil.copy(collected / run / "eval_base.json", folder)
        base = json.loads((collected / run / "eval_base.json").read_text())
        summary = {key.removeprefix("eval/"): value for key, value in base.items()}
        (folder / "eval_base.summary.json").write_text(json.dumps(summary))
        for path in (collected / run).glob("step_*.eval.summary.json"):
            (folder / path.name.split(".")[0]).mkdir()
            shutil.copy(path, folder / path.name.split(".")[0] / "eval.summary.json")
    return root


def test_a_live_run_folder_gives_the_same_report(collected, tmp_path):
    live = live_layout(collected, tmp_path / "live")
    labels = [arg for label in LABELS for arg in ("--label", label)]
    outputs = {}
    for name, root in (("collected", collected), ("live", live)):
        result = invoke(*(str(root / run) for run in RUNS), *labels, "--evaluation", "held-out",
                        "--out", str(tmp_path / f"report_{name}"))
        assert result.exit_code == 0, result.output
        outputs[name] = tmp_path / f"report_{name}"
    for table in ("speedup.csv", "methods.csv", "pass_at_k.csv"):
        assert (outputs["live"] / table).read_text() == (outputs["collected"] / table).read_text(), table
    live_sources = json.loads((outputs["live"] / "report.json").read_text())["sources"]
    assert str(live / "grpo_s0" / "step_0007" / "eval.summary.json") in live_sources
    assert str(live / "grpo_s0" / "eval_base.summary.json") in live_sources


def test_auto_asks_for_a_choice_when_runs_hold_two_kinds(collected, tmp_path):
    suite_folder = collected / "grpo_s0" / "step_0001" / "eval-aime25-check"
    suite_folder.mkdir(parents=True)
    (suite_folder / "summary.json").write_text(json.dumps({"suite": "aime25-check", "per_benchmark": {}}))
    for run in RUNS[1:]:
        shutil.copytree(collected / "grpo_s0" / "step_0001", collected / run / "step_0001")
    result = invoke(*(str(collected / run) for run in RUNS), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "every run holds several evaluations (held-out, aime25-check); pick one" in result.stderr
    assert not (tmp_path / "r").exists()


def test_unlabelled_runs_group_by_method_and_a_missing_config_key_reads_as_its_default(collected, tmp_path):
    config = yaml.safe_load((collected / "grpo_s1" / "config.yaml").read_text())
    config["loop"]["dynamic_sampling"] = False  # written out at its default (a newer run), absent from the other
    (collected / "grpo_s1" / "config.yaml").write_text(yaml.safe_dump(config))
    result = invoke(*(str(collected / run) for run in RUNS), "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    groups = json.loads((tmp_path / "r" / "report.json").read_text())["groups"]
    # antisd-nogate runs are update.method antisd with the gate off: one group, named by their manifest
    assert groups == {"grpo": [0, 1], "antisd": [0, 1]}


def test_two_runs_of_one_seed_in_a_group_are_refused(collected, tmp_path):
    shutil.copytree(collected / "grpo_s0", tmp_path / "again" / "grpo_rerun_s0")
    result = invoke(str(collected / "grpo_s0"), str(collected / "grpo_s1"), str(tmp_path / "again" / "grpo_rerun_s0"),
                    "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "grpo_rerun_s0: a second run of grpo with seed 0" in result.stderr


# --- the Speedup's pairing, on hand-made curves ---------------------------------------------------------------------

def hand_made(name: str, method: str, seed: int | None, curve: dict[int, float]) -> report_stage.RunEvals:
    summaries = {u: {"average": value, "per_benchmark": {}} for u, value in curve.items()}
    return report_stage.RunEvals(name, method, seed, {}, summaries, {u: Path(f"{name}/{u}") for u in curve})


def test_seed_means_pair_only_the_seeds_both_ran():
    # grpo's seed 2 is its weakest: over all three seeds its best mean (0.5) is lower than over seeds 0, 1 (0.6)
    base = [hand_made("g0", "grpo", 0, {0: 0.1, 4: 0.6}), hand_made("g1", "grpo", 1, {0: 0.1, 4: 0.6}),
            hand_made("g2", "grpo", 2, {0: 0.1, 4: 0.3})]
    method = [hand_made("m0", "m", 0, {0: 0.1, 2: 0.55, 4: 0.6}), hand_made("m1", "m", 1, {0: 0.1, 2: 0.55, 4: 0.6})]
    speedups = {(row["pairing"], row["seeds"]): row for row in report_stage.speedup_rows(
        {"grpo": base, "m": method}, "grpo")}
    assert speedups[("paired seed means", "0 1")]["baseline_seeds"] == "0 1"
    assert speedups[("paired seed means", "0 1")]["value"] == 1.0  # 0.6 first reached at 4; all seeds: 0.55 at 2
    assert speedups[("seed", "0")]["value"] == 1.0


def test_no_common_seed_compares_all_seeds_unpaired():
    base = [hand_made("g0", "grpo", 0, {0: 0.1, 4: 0.6}), hand_made("g1", "grpo", 1, {0: 0.1, 4: 0.4})]
    method = [hand_made("m5", "m", 5, {0: 0.1, 2: 0.5, 4: 0.5})]
    rows_ = report_stage.speedup_rows({"grpo": base, "m": method}, "grpo")
    assert [(row["pairing"], row["seeds"], row["baseline_seeds"]) for row in rows_] == \
        [("unpaired seed means", "5", "0 1")]
    assert rows_[0]["value"] == 2.0  # grpo's mean {0: 0.1, 4: 0.5}: g = 4; m reaches 0.5 at 2


def test_pass_at_k_values_use_the_counts_and_else_the_stored_values():
    with_counts = {"n": 4, "correct_per_problem": {"a": 1, "b": 0}, "pass@1": 0.0}
    # pass@k = mean over problems of 1 − C(n−c, k)/C(n, k): problem a (c = 1) gives k/4, problem b 0
    assert scores.pass_at_k_values(with_counts) == pytest.approx({k: k / 4 / 2 for k in range(1, 5)})
    stored = {"n": 4, "pass@1": 0.25, "pass@2": 0.4, "pass@4": 0.5}
    assert scores.pass_at_k_values(stored) == {1: 0.25, 2: 0.4, 4: 0.5}
