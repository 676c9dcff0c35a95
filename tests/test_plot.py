"""`antisd plot`: run folders → curves PNG or tidy CSV; grouping by method, bands over seeds, bad run folders."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from antisd_cli.main import cli
from stages.common.figures import group_band
from stages.common.validation import ConfigError
from stages.plot import PlotConfig, load_run, metric_series, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 6


def write_run(folder, method, seed, manifest="run.json", eval_every=2):
    """A run folder: STEPS records; eval/accuracy every `eval_every` steps; gate metrics only for antisd."""
    folder.mkdir(parents=True)
    records = []
    for step in range(STEPS):
        record = {"step": step, "reward/mean": 0.2 + 0.05 * step + 0.01 * seed, "response/length_mean": 25.0 - step,
                  "teacher/entropy_median": 1.5}
        if step % eval_every == 0:
            record["eval/accuracy"] = 0.25 + 0.02 * step
        if method == "antisd":
            record.update({"gate/open": step >= 2, "gate/lambda": 0.5 * (step >= 2), "pmi/antisd_term_mean": -0.1})
        records.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if manifest == "run.json":  # the loop's layout: {"config": {"loop": {...}, "update": {...}}, ...}
        config = {"loop": {"seed": seed, "steps": STEPS}, "update": {"method": method} if method else {}}
        (folder / "run.json").write_text(json.dumps({"config": config, "finished": list(range(STEPS))}))
    elif manifest == "config.yaml":
        (folder / "config.yaml").write_text(f"loop:\n  seed: {seed}\nupdate:\n  method: {method}\n")
    return folder


@pytest.fixture
def runs(tmp_path):
    """2 methods × 2 seeds; folder names say nothing about the method, the manifests do."""
    return [write_run(tmp_path / "runs" / f"r{i}", method, seed)
            for i, (method, seed) in enumerate([("grpo", 0), ("grpo", 1), ("antisd", 0), ("antisd", 1)])]


def read_rows(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


# --- pure parts ---------------------------------------------------------------------------------------------------


def test_metric_series_keeps_present_points_and_the_last_of_a_repeated_step():
    records = [{"step": 0, "m": 1.0}, {"step": 1}, {"step": 2, "m": float("nan")}, {"step": 3, "m": True},
               {"step": 3, "m": 5}, {"step": 4, "m": "x"}]
    steps, values = metric_series(records, "m")
    assert steps.tolist() == [0, 3] and values.tolist() == [1.0, 5.0]


def test_group_band_uses_common_steps_minmax_and_std():
    a = (np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0]))
    b = (np.array([0, 2]), np.array([3.0, 5.0]))
    steps, mean, low, high = group_band([a, b], "minmax")
    assert steps.tolist() == [0, 2] and mean.tolist() == [2.0, 4.0]
    assert low.tolist() == [1.0, 3.0] and high.tolist() == [3.0, 5.0]
    _, mean, low, high = group_band([a, b], "std")
    assert low.tolist() == [1.0, 3.0] and high.tolist() == [3.0, 5.0]  # std of two points = half their gap


def test_method_comes_from_yaml_manifest_label_or_folder_name(tmp_path):
    assert load_run(write_run(tmp_path / "a", "sd", 3, manifest="config.yaml"), None).method == "sd"
    assert load_run(tmp_path / "a", None).seed == 3
    bare = load_run(write_run(tmp_path / "antisd-s2", "x", 0, manifest=None), None)
    assert (bare.method, bare.seed) == ("antisd", 2)
    assert load_run(tmp_path / "antisd-s2", "mine").method == "mine"
    assert load_run(write_run(tmp_path / "baseline", "x", 0, manifest=None), None).method == "baseline"


def test_loop_manifest_without_a_method_means_the_update_default(tmp_path):
    from stages.training.config import UpdateConfig

    loaded = load_run(write_run(tmp_path / "r", None, 4), None)
    assert (loaded.method, loaded.seed) == (UpdateConfig.method, 4)


# --- the stage ----------------------------------------------------------------------------------------------------


def test_png_is_rendered(runs, tmp_path):
    out = run(PlotConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "curves.png")))
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_csv_has_one_row_per_logged_point(runs, tmp_path):
    out = run(PlotConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "curves.csv"), format="csv"))
    rows = read_rows(out)
    assert list(rows[0]) == ["run", "method", "seed", "step", "metric", "value"]
    # every run: 6 reward + 3 eval + 6 length + 6 entropy; antisd also 6 each of gate/lambda, gate/open, pmi term
    assert len(rows) == 4 * 21 + 2 * 18
    evals = [r for r in rows if r["run"] == "r0" and r["metric"] == "eval/accuracy"]
    assert [int(r["step"]) for r in evals] == [0, 2, 4]
    assert float(evals[1]["value"]) == pytest.approx(0.29)
    assert {(r["run"], r["method"], r["seed"]) for r in rows} == {("r0", "grpo", "0"), ("r1", "grpo", "1"),
                                                                   ("r2", "antisd", "0"), ("r3", "antisd", "1")}
    gate = [r["value"] for r in rows if r["run"] == "r2" and r["metric"] == "gate/open"]
    assert gate == ["0.0", "0.0", "1.0", "1.0", "1.0", "1.0"]


def test_base_evaluation_is_step_minus_one_of_eval_metrics_only(runs, tmp_path):
    (runs[0] / "eval_base.json").write_text(json.dumps({"eval/accuracy": 0.125, "eval/n": 1, "timing": 3.0}))
    steps, values = metric_series(load_run(runs[0], None).records, "eval/accuracy")
    assert steps.tolist() == [-1, 0, 2, 4] and values[0] == 0.125
    assert metric_series(load_run(runs[0], None).records, "reward/mean")[0].tolist() == list(range(STEPS))
    out = run(PlotConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "curves.csv"), format="csv"))
    base = [r for r in read_rows(out) if r["step"] == "-1"]
    assert [(r["run"], r["metric"], r["value"]) for r in base] == [("r0", "eval/accuracy", "0.125")]  # default set
    (runs[1] / "eval_base.json").write_text("{broken")
    result = CliRunner().invoke(cli, ["plot", str(runs[1]), "--out", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and "eval_base.json: not a JSON file" in result.stderr


def test_csv_all_metrics_and_a_selection(runs, tmp_path):
    out = run(PlotConfig(runs=(str(runs[0]),), out=str(tmp_path / "all.csv"), format="csv", metrics=("all",)))
    assert {r["metric"] for r in read_rows(out)} == {"reward/mean", "eval/accuracy", "response/length_mean",
                                                     "teacher/entropy_median"}
    out = run(PlotConfig(runs=(str(runs[0]),), out=str(tmp_path / "one.csv"), format="csv", metrics=("reward/mean",)))
    assert len(read_rows(out)) == STEPS


def test_torn_last_line_of_a_running_run_is_skipped(runs, tmp_path):
    with open(runs[0] / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "reward/me')
    out = run(PlotConfig(runs=(str(runs[0]),), out=str(tmp_path / "c.csv"), format="csv", metrics=("reward/mean",)))
    assert len(read_rows(out)) == STEPS


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_writes_png_and_echoes_the_path(runs, tmp_path):
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["plot", *map(str, runs), "--out", str(out), "--band", "std"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and out.read_bytes().startswith(PNG_MAGIC)


def test_cli_labels_override_the_method(runs, tmp_path):
    out = tmp_path / "c.csv"
    args = ["plot", str(runs[0]), str(runs[2]), "--label", "A", "--label", "B", "--format", "csv", "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert {r["method"] for r in read_rows(out)} == {"A", "B"}


def test_cli_run_without_metrics_exits_2_naming_it(runs, tmp_path):
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(cli, ["plot", str(runs[0]), str(empty), "--out", str(out)])
    assert result.exit_code == 2 and str(empty) in result.stderr and "metrics.jsonl" in result.stderr
    assert not out.exists()


def _corrupt_middle_line(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[2] = "{not json"
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return "line 3"


@pytest.mark.parametrize("case, message", [
    ("missing_folder", "no such run folder"),
    ("corrupt", "line 3 is not JSON"),
    ("empty_metrics", "no metric records"),
    ("label_count", "--label"),
    ("output_exists", "--overwrite"),
])
def test_cli_bad_input_exits_2(runs, tmp_path, case, message):
    out = tmp_path / "curves.png"
    args = ["plot", str(runs[0]), "--out", str(out)]
    if case == "missing_folder":
        args[1] = str(tmp_path / "nope")
    elif case == "corrupt":
        _corrupt_middle_line(runs[0])
    elif case == "empty_metrics":
        (runs[0] / "metrics.jsonl").write_text("\n")
    elif case == "label_count":
        args += ["--label", "a", "--label", "b"]
    elif case == "output_exists":
        out.write_bytes(b"keep")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert case == "output_exists" and out.read_bytes() == b"keep" or not out.exists()


def test_the_format_follows_the_out_suffix_unless_given(runs, tmp_path):
    csv_out = run(PlotConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "x.csv")))
    assert csv_out.read_text().startswith("run,method,seed,step,metric,value")
    png_out = run(PlotConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "x.png")))
    assert png_out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ConfigError, match="format: png, but --out .*x.csv ends in .csv"):
        PlotConfig(runs=("r",), out=str(tmp_path / "x.csv"), format="png")


def test_runs_of_one_method_with_different_settings_are_separate_groups_named_by_the_difference(tmp_path):
    folders = [write_run(tmp_path / f"r{i}", "antisd", seed) for i, seed in enumerate([0, 1, 0])]
    for folder, lr in zip(folders, [1e-5, 1e-5, 2e-5]):
        manifest = json.loads((folder / "run.json").read_text())
        manifest["config"]["update"]["lr"] = lr
        manifest["config"]["rollout"] = {"threads": 1 + len(str(folder))}  # a speed-only setting never splits
        (folder / "run.json").write_text(json.dumps(manifest))
    out = run(PlotConfig(runs=tuple(map(str, folders)), out=str(tmp_path / "c.csv")))
    methods = {row["run"]: row["method"] for row in read_rows(out)}
    assert methods == {"r0": "antisd (update.lr=1e-05)", "r1": "antisd (update.lr=1e-05)",
                       "r2": "antisd (update.lr=2e-05)"}
    labelled = run(PlotConfig(runs=tuple(map(str, folders)), out=str(tmp_path / "l.csv"), labels=("a", "a", "b")))
    assert {row["method"] for row in read_rows(labelled)} == {"a", "b"}  # --label wins


def test_a_curves_csv_redraws_the_same_data(runs, tmp_path):
    (runs[0] / "eval_base.json").write_text(json.dumps({"eval/accuracy": 0.125}))
    table = run(PlotConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "curves.csv"), metrics=("all",)))
    again = run(PlotConfig(runs=(str(table),), out=str(tmp_path / "again.csv"), metrics=("all",)))
    assert read_rows(again) == read_rows(table)  # the CSV holds every point, group and seed of the runs
    figure = run(PlotConfig(runs=(str(table),), out=str(tmp_path / "again.png")))
    assert figure.read_bytes().startswith(PNG_MAGIC)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for args, message in ((["other.csv"], "other.csv: not a curves table of `antisd plot`"),
                          (["curves.csv", "--label", "x"], "--label names run folders")):
        result = CliRunner().invoke(cli, ["plot", *[str(tmp_path / a) if a.endswith(".csv") else a for a in args],
                                          "--out", str(tmp_path / "x.png")])
        assert result.exit_code == 2 and message in result.stderr, result.output


# --- issue 26: formats, legends, gates as steps, the base point in TensorBoard ------------------------------------

def _captured_figure(monkeypatch):
    """Keep the figure draw_curves makes (and still write it)."""
    from stages.common import figures

    captured = []
    original = figures.save_png

    def keep(figure, path, image_format="png"):
        captured.append(figure)
        original(figure, path, image_format)

    monkeypatch.setattr(figures, "save_png", keep)
    return captured


def test_an_svg_out_is_svg_and_an_unknown_suffix_is_refused(runs, tmp_path):
    out = run(PlotConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "x.svg")))
    head = out.read_bytes()[:400]
    assert not head.startswith(PNG_MAGIC) and b"<svg" in head
    result = CliRunner().invoke(cli, ["plot", str(runs[0]), "--out", str(tmp_path / "x.jpg")])
    assert result.exit_code == 2 and "give a .png, .svg or .csv file" in result.stderr
    assert not (tmp_path / "x.jpg").exists()


def test_gate_values_are_drawn_as_steps_and_curves_as_lines(runs, tmp_path, monkeypatch):
    captured = _captured_figure(monkeypatch)
    run(PlotConfig(runs=tuple(map(str, runs)), out=str(tmp_path / "c.png"),
                   metrics=("gate/open", "reward/mean")))
    gate, reward = captured[0].axes[:2]
    assert gate.get_title() == "gate/open" and list(gate.get_yticks()) == [0, 1]
    assert {line.get_drawstyle() for line in gate.lines if line.get_xdata().size} == {"steps-mid"}
    assert {line.get_drawstyle() for line in reward.lines if line.get_xdata().size} == {"default"}


def test_two_runs_legend_fits_the_image_and_names_only_what_differs(tmp_path, monkeypatch):
    long_path = "/data/" + "a-rather-long-dataset-folder-name/" * 3 + "train.jsonl"
    folders = []
    for i, lr in enumerate([1e-5, 2e-5]):
        folder = write_run(tmp_path / f"r{i}", "antisd", 0)
        manifest = json.loads((folder / "run.json").read_text())
        manifest["config"]["update"]["lr"] = lr
        manifest["config"]["loop"]["train"] = {"name": "jsonl", "path": long_path.replace("train", f"train{i}")}
        manifest["config"]["loop"]["prompts_per_step"] = 16 * (i + 1)
        if i == 0:
            manifest["config"]["rollout"] = {"n": 8}  # the default, written out: the same as leaving it out
        (folder / "run.json").write_text(json.dumps(manifest))
        folders.append(folder)
    table = run(PlotConfig(runs=tuple(map(str, folders)), out=str(tmp_path / "c.csv")))
    methods = {row["method"] for row in read_rows(table)}
    assert all("update.lr=" in m and "loop.train.path=" in m and "loop.prompts_per_step=" in m for m in methods)
    assert not any("rollout.n" in m for m in methods)
    captured = _captured_figure(monkeypatch)
    run(PlotConfig(runs=tuple(map(str, folders)), out=str(tmp_path / "c.png")))
    figure = captured[0]
    renderer = figure.canvas.get_renderer()
    figure.canvas.draw()
    box, frame = figure.legends[0].get_window_extent(renderer), figure.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (box, frame)


def test_the_base_evaluation_is_a_tensorboard_point_at_step_minus_one(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stages.runs.tracking import Trackers

    trackers = Trackers(tmp_path, {}, "digest", tensorboard=True, wandb_project=None)
    trackers.log_base({"eval/accuracy": 0.25, "eval/n": 1})
    trackers.log({"step": 0, "eval/accuracy": 0.5, "reward/mean": 0.1})
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(-1, 0.25), (0, 0.5)]
    assert [e.step for e in events.Scalars("reward/mean")] == [0]


def test_the_default_panels_show_the_gate_statistic_each_run_logged(tmp_path, monkeypatch):
    """The official variant (the default) logs the teacher's mean perplexity, the paper's text its median entropy:
    the default panels show the one the runs have, not an empty "not logged" panel (seen in the demo's plot)."""
    import stages.plot as plot

    panels = []
    monkeypatch.setattr(plot, "draw_curves", lambda curves, *args, **kwargs: panels.append(list(curves)))
    official = write_run(tmp_path / "official", "antisd", 0)
    records = [json.loads(line) for line in (official / "metrics.jsonl").read_text().splitlines()]
    (official / "metrics.jsonl").write_text("".join(
        json.dumps({**{k: v for k, v in r.items() if k != "teacher/entropy_median"}, "teacher/ppl_mean": 1.3}) + "\n"
        for r in records))
    run(PlotConfig(runs=(str(official),), out=str(tmp_path / "a.png")))
    assert "teacher/ppl_mean" in panels[-1] and "teacher/entropy_median" not in panels[-1]
    paper = write_run(tmp_path / "paper", "grpo", 1)
    run(PlotConfig(runs=(str(official), str(paper)), out=str(tmp_path / "b.png")))
    assert {"teacher/ppl_mean", "teacher/entropy_median"} <= set(panels[-1])
    assert "gate/open" in panels[-1]  # logged by one run of the two
    chosen = ("reward/mean", "teacher/entropy_median")  # what the user names is drawn, logged or not
    run(PlotConfig(runs=(str(official),), out=str(tmp_path / "c.png"), metrics=chosen))
    assert panels[-1] == list(chosen)
