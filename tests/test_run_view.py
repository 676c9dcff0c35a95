"""What a run's table says (issue 26): warm-up steps named as such, the evaluation's interval, the held-out change
split at the end of the warm-up, steps without learning signal, and the next commands; `antisd demo` ends with it,
`antisd inspect RUN_DIR` shows it with the step folders, and inspect's own panels (metadata, --row) read well."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from antisd_cli.main import cli
from stages.common import io
from stages.common import metrics as keys
from stages.runs.view import next_commands, run_notes, steps_table

FLOAT_17 = re.compile(r"\d\.\d{7,}")  # a float printed with all its digits


def row(step: int, *, warmup: int, lam: float, accuracy: float | None = None, ci=(None, None), **more) -> dict:
    values = {keys.STEP: step, keys.REWARD_MEAN: 0.25 + 0.1 * step, keys.GATE_WARMUP: warmup, keys.GATE_OPEN: 1,
              keys.GATE_LAMBDA: lam, keys.TEACHER_PPL_MEAN: 1.2, keys.TEACHER_ENTROPY_MEDIAN: None,
              keys.GRAD_NORM: 1.1277605295181274, keys.NO_SIGNAL: 0, keys.LENGTH_MEAN: 12.0, **more}
    if accuracy is not None:
        values.update({keys.EVAL_ACCURACY: accuracy, keys.evaluation("accuracy_ci_low"): ci[0],
                       keys.evaluation("accuracy_ci_high"): ci[1], keys.evaluation("problems"): 48,
                       keys.evaluation("n"): 1})
    return values


# the demo's shape: 2 warm-up steps (the last one with gate/open 1, as the entropy gate reports it), eval every 2
ROWS = [row(0, warmup=1, lam=0.0), row(1, warmup=1, lam=0.0, accuracy=0.479, ci=(0.333, 0.625)),
        row(2, warmup=0, lam=0.12), row(3, warmup=0, lam=0.0, accuracy=0.458, ci=(0.312, 0.604),
                                        **{keys.NO_SIGNAL: 1, keys.GRAD_NORM: None})]
BASE = {keys.EVAL_ACCURACY: 0.208, keys.evaluation("accuracy_ci_low"): 0.104,
        keys.evaluation("accuracy_ci_high"): 0.333}


def text_of(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_the_table_names_warm_up_steps_and_shows_the_interval():
    text = text_of(steps_table(ROWS, "demo"))
    lines = {int(line.split("│")[1]): line for line in text.splitlines() if re.match(r"^│\s*\d", line)}
    assert "warm-up" in lines[0] and "warm-up" in lines[1] and " on " not in lines[1]  # no "gate 1, λ 0.00"
    assert "warm-up" not in lines[2] and " on " in lines[2]
    assert "0.479 [0.33, 0.62]" in lines[1] and "no signal" in lines[3]
    assert "H teacher" not in text  # a column no row fills is left out
    assert "1.13" in lines[0] and not FLOAT_17.search(text)


def test_a_step_record_in_a_log_file_is_one_line_however_long():
    """In a log file (no terminal) each step is one `key=value` record: rich wrapped the demo's 165-character records
    at 160 columns ("step \\ns=43.6")."""
    import io as stdio

    from stages.runs.view import LoopView

    stream = stdio.StringIO()
    wide = {**ROWS[3], keys.EVAL_ACCURACY: 0.521, keys.timing("step"): 43.6,
            keys.evaluation("accuracy_ci_low"): 0.375, keys.evaluation("accuracy_ci_high"): 0.667}
    with LoopView(steps=4, stream=stream) as view:
        view.row({**wide, keys.TEACHER_ENTROPY_MEDIAN: 0.088, keys.PMI_ANTISD_TERM_MEAN: 0.0119,
                  keys.ROLLOUT_TOK_S: 133.0, keys.LENGTH_MEAN: 1e30})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and len(lines[0]) > 160 and lines[0].startswith("step=3") and "[0.38, 0.67]" in lines[0]


def test_the_notes_split_the_held_out_change_at_the_end_of_the_warm_up():
    notes = run_notes(ROWS, BASE)
    assert any(note.startswith("steps 0–1: the gate's warm-up, λ = 0") and "plain GRPO" in note and
               "antisd's token term acts only after them" in note for note in notes)
    assert any("48 held-out problems" in note and "95 % bootstrap interval" in note and "0.208 [0.10, 0.33]" in note
               for note in notes)
    (change,) = [note for note in notes if note.startswith("held-out change")]
    assert "0.208 → 0.479 by step 1 (warm-up: GRPO's, not antisd's)" in change and "→ 0.458 by step 3" in change
    assert any(note.startswith("step 3: no learning signal") for note in notes)
    # a run without a warm-up (grpo, sd) claims no split
    plain = [{**r, keys.GATE_WARMUP: None} for r in ROWS]
    assert not [note for note in run_notes(plain, BASE) if "warm-up" in note or note.startswith("held-out change")]


def test_the_next_commands_point_at_the_run_a_step_file_and_plot(tmp_path):
    commands = next_commands(tmp_path / "run", ROWS)
    assert commands[0].startswith(f"antisd inspect {tmp_path / 'run'} ")
    assert f"antisd inspect {tmp_path / 'run' / 'step_0003' / 'scored.parquet'} --row 0" in commands[1]
    assert commands[2].startswith(f"antisd plot {tmp_path / 'run'} --out ")


def write_run(root: Path, rows=ROWS) -> Path:
    root.mkdir(parents=True)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval_base.json").write_text(json.dumps(BASE))
    config = {"loop": {"model": "smollm2-135m", "steps": len(rows)}, "update": {"method": "antisd",
                                                                               "variant": "official"}}
    (root / "run.json").write_text(json.dumps({"config": config, "config_digest": "abc", "finished": [0, 1, 2, 3],
                                               "latest_checkpoint": None}))
    for r in rows:
        (root / f"step_{r['step']:04d}").mkdir()
    return root


def test_the_demo_ends_with_the_table_its_notes_and_the_next_commands(tmp_path, monkeypatch):
    import stages.loop

    run_dir = write_run(tmp_path / "out" / "run")
    monkeypatch.setattr(stages.loop, "run", lambda config: run_dir)  # the loop itself: tests/test_loop.py
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "antisd demo: antisd on arith" in out and "warm-up" in out and "0.479 [0.33, 0.62]" in out
    assert "GRPO's, not antisd's" in out and "Next:" in out and f"antisd plot {run_dir}" in out
    assert f"antisd demo --out {tmp_path / 'out_grpo'} --set update.method=grpo" in out  # the paired GRPO arm
    assert out.strip().splitlines()[-1] == str(run_dir)  # the result line stays last


def test_inspect_a_run_folder(tmp_path):
    run_dir = write_run(tmp_path / "run")
    result = CliRunner().invoke(cli, ["inspect", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "antisd loop run of smollm2-135m" in result.stdout and "4 of 4 steps done" in result.stdout
    assert "warm-up" in result.stdout and "step_0003" in result.stdout and "pruned" in result.stdout
    as_json = json.loads(CliRunner().invoke(cli, ["inspect", str(run_dir), "--json"]).stdout)
    assert [r["step"] for r in as_json["steps"]] == [0, 1, 2, 3] and as_json["manifest"]["config_digest"] == "abc"
    refused = CliRunner().invoke(cli, ["inspect", str(run_dir), "--row", "0"])
    assert refused.exit_code == 2 and "run folder" in refused.stderr and not refused.stdout


# --- inspect's panels ----------------------------------------------------------------------------------------------

@pytest.fixture
def long_metadata_file(tmp_path) -> Path:
    table = pa.table({"prompt_id": ["a", "b"], "dataset": ["d", "d"], "problem": ["p", "q"], "answer": ["1", "2"],
                      "solution": [None, None], "few_shot": [[], []]})
    nested = {"artifact": "rollouts", "sampling": {"temperature": 0.7000000000000001, "deep": {"deeper": {"x": 1}}}}
    metadata = io.build_metadata("prompts", {"k": 1}, notes="x" * 5000, ratio=1 / 3, rollouts_metadata=nested,
                                 zeta_last_key=1)
    return io.write_artifact(table.cast(pa.schema([f for f in __import__("schemas").PROMPTS])), tmp_path / "p.parquet",
                             "prompts", metadata)


def test_the_metadata_panel_keeps_every_key_whole(long_metadata_file):
    result = CliRunner().invoke(cli, ["inspect", str(long_metadata_file)], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "zeta_last_key: 1" in out  # a key after a 5,000-character value is still shown, whole
    assert "(5000 characters)" in out and "ratio: 0.3333" in out and "temperature: 0.7" in out
    assert "deeper" not in out and "{… 1 keys}" in out and not FLOAT_17.search(out)


def test_inspect_row_checks_the_row_first_and_rounds_floats(long_metadata_file, tmp_path, tiny_model_dir):
    bad = CliRunner().invoke(cli, ["inspect", str(long_metadata_file), "--row", "7"])
    assert bad.exit_code == 2 and "--row 7" in bad.stderr and "rows 0..1" in bad.stderr and not bad.stdout
    from test_update import make_scored

    scored = make_scored(tmp_path / "scored.parquet", tiny_model_dir)
    result = CliRunner().invoke(cli, ["inspect", str(scored), "--row", "2", "--model", str(tiny_model_dir)],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "student_logprobs: [-" in result.stdout and not FLOAT_17.search(result.stdout)
