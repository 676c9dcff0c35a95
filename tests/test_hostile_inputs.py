"""Every bad input a user can give ends in one line (issue 21): a fuzz-style table of hostile and broken inputs.

The cases seed from the audit's lists (bad files, bad options, hostile models, configs and rewards). For each: the exit
code is the one expected (2 = refused before work, 1 = failed on the way, 0 = done), stderr holds no traceback and
ends in one `Error:` line, no file that existed before the command changed, nothing was created outside the
command's output, and no `*.tmp` is left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_update import make_scored

import schemas
from antisd_cli.main import cli
from stages.common import io

REWARDS = '''
def raises(problem, answer, response, row):
    return helper(response)

def helper(text):
    raise ValueError("broken reward")

def nan(problem, answer, response, row):
    return float("nan")

def text(problem, answer, response, row):
    return "yes"

def exits(problem, answer, response, row):
    import sys
    sys.exit(3)

def sleeps(problem, answer, response, row):
    import time
    time.sleep(60)
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> Path:
    """One folder of well-formed and broken inputs, made once; each case runs on a fresh copy of it."""
    base = tmp_path_factory.mktemp("hostile_inputs")
    scored = make_scored(base / "scored.parquet", tiny_model_dir)
    table = pq.read_table(scored)
    for artifact in ("rollouts", "verified"):
        columns = [c for c in table.column_names if c in schemas.SCHEMAS[artifact].names]
        io.write_artifact(table.select(columns), base / f"{artifact}.parquet", artifact,
                          io.build_metadata(artifact, {}))
    io.write_artifact(table.select(schemas.PROMPTS.names).slice(0, 1), base / "prompts.parquet", "prompts",
                      io.build_metadata("prompts", {}))
    nan_logprobs = [[math.nan] + row[1:] for row in table.column("sampling_logprobs").to_pylist()]
    rollouts = pq.read_table(base / "rollouts.parquet")
    index = rollouts.schema.get_field_index("sampling_logprobs")
    pq.write_table(rollouts.set_column(index, rollouts.schema.field(index), pa.array(nan_logprobs,
                                                                                    pa.list_(pa.float32()))),
                   base / "nan_rollouts.parquet")
    (base / "latin1.jsonl").write_bytes('{"question": "café?", "answer": "1"}\n'.encode("latin-1"))
    (base / "null.jsonl").write_text('{"question": "q", "answer": null}\n')
    (base / "notjson.jsonl").write_text('{"question": "q", "answer": "1"}\nnot json\n')
    (base / "text.txt").write_text("not parquet\n")
    (base / "latin1.yaml").write_bytes("loop:\n  steps: 1  # café\n".encode("latin-1"))
    (base / "unknown.yaml").write_text("loop:\n  stepz: 1\n")
    (base / "nomodel.yaml").write_text(f"loop:\n  model: {base / 'no_such_model'}\n  steps: 1\n")
    (base / "broken.jinja").write_text("{% for x in undefined_function() %}{% endfor %}")
    (base / "rewards.py").write_text(REWARDS)
    garbage = base / "garbage_model"
    shutil.copytree(tiny_model_dir, garbage)
    (garbage / "model.safetensors").write_text("not safetensors\n")
    remote = base / "remote_model"
    shutil.copytree(tiny_model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "model_type": "planted",
                                                    "auto_map": {"AutoConfig": "planted.C",
                                                                 "AutoModelForCausalLM": "planted.M"}}))
    (remote / "planted.py").write_text("open('RAN', 'w')\n")
    parts = base / "parts"
    parts.mkdir()
    shutil.copy(base / "rollouts.parquet", parts / "part-00000-of-00002.parquet")
    return base


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# (id, argv with {in} for the inputs folder and {out} for the output, expected exit code, outputs it may create)
CASES = [
    ("jsonl-not-utf8", ["data", "prepare", "jsonl", "--path", "{in}/latin1.jsonl", "--problem-field", "question",
                        "--answer-field", "answer", "--out", "{out}"], 2),
    ("jsonl-null-answer", ["data", "prepare", "jsonl", "--path", "{in}/null.jsonl", "--problem-field", "question",
                           "--answer-field", "answer", "--out", "{out}"], 2),
    ("jsonl-not-json", ["data", "prepare", "jsonl", "--path", "{in}/notjson.jsonl", "--problem-field", "question",
                        "--answer-field", "answer", "--out", "{out}"], 2),
    ("jsonl-missing-field", ["data", "prepare", "jsonl", "--path", "{in}/null.jsonl", "--problem-field", "q",
                             "--out", "{out}"], 2),
    ("parquet-is-text", ["data", "prepare", "parquet", "--path", "{in}/text.txt", "--out", "{out}"], 2),
    ("out-in-missing-folder", ["data", "prepare", "arith", "--num", "2", "--out", "{in}/nope/p.parquet"], 2),
    ("out-is-a-folder", ["data", "prepare", "arith", "--num", "2", "--out", "{in}/parts"], 2),
    ("rollout-prompts-is-text", ["rollout", "--model", "{model}", "--prompts", "{in}/text.txt", "--out", "{out}"], 2),
    ("rollout-template-fails", ["rollout", "--model", "{model}", "--prompts", "{in}/prompts.parquet",
                                "--chat-template", "{in}/broken.jinja", "--max-new-tokens", "2", "--out", "{out}"], 2),
    ("rollout-template-not-utf8", ["rollout", "--model", "{model}", "--prompts", "{in}/prompts.parquet",
                                   "--prompt-template", "{in}/latin1.yaml", "--out", "{out}"], 2),
    ("rollout-weights-not-safetensors", ["rollout", "--model", "{in}/garbage_model", "--prompts",
                                         "{in}/prompts.parquet", "--out", "{out}"], 2),
    ("rollout-model-with-code", ["rollout", "--model", "{in}/remote_model", "--prompts", "{in}/prompts.parquet",
                                 "--max-new-tokens", "2", "--out", "{out}"], 2),
    ("rollout-no-model", ["rollout", "--model", "{in}/no_such_model", "--prompts", "{in}/prompts.parquet",
                          "--out", "{out}"], 2),
    ("rollout-nan-temperature", ["rollout", "--prompts", "{in}/prompts.parquet", "--temperature", "nan", "--out",
                                 "{out}"], 2),
    ("verify-wrong-stage", ["verify", "--rollouts", "{in}/prompts.parquet", "--out", "{out}"], 2),
    ("verify-nan-sampling-logprobs", ["verify", "--rollouts", "{in}/nan_rollouts.parquet", "--out", "{out}"], 2),
    ("verify-missing-part", ["verify", "--rollouts", "{in}/parts", "--out", "{out}"], 2),
    ("verify-reward-raises", ["verify", "--rollouts", "{in}/rollouts.parquet", "--workers", "1", "--reward",
                              "{in}/rewards.py:raises", "--out", "{out}"], 1),
    ("verify-reward-nan", ["verify", "--rollouts", "{in}/rollouts.parquet", "--workers", "1", "--reward",
                           "{in}/rewards.py:nan", "--out", "{out}"], 1),
    ("verify-reward-text", ["verify", "--rollouts", "{in}/rollouts.parquet", "--workers", "1", "--reward",
                            "{in}/rewards.py:text", "--out", "{out}"], 1),
    ("verify-reward-exits", ["verify", "--rollouts", "{in}/rollouts.parquet", "--workers", "1", "--reward",
                             "{in}/rewards.py:exits", "--out", "{out}"], 1),
    ("verify-reward-hangs", ["verify", "--rollouts", "{in}/rollouts.parquet", "--workers", "2", "--timeout", "0.5",
                             "--reward", "{in}/rewards.py:sleeps", "--out", "{out}"], 1),
    ("verify-reward-missing", ["verify", "--rollouts", "{in}/rollouts.parquet", "--reward", "{in}/rewards.py:nope",
                               "--out", "{out}"], 2),
    ("score-wrong-stage", ["score", "--model", "{model}", "--verified", "{in}/rollouts.parquet", "--out", "{out}"], 2),
    ("update-wrong-stage", ["update", "--model", "{model}", "--scored", "{in}/verified.parquet", "--out", "{out}"], 2),
    ("update-inf-lr", ["update", "--model", "{model}", "--scored", "{in}/scored.parquet", "--lr", "inf", "--out",
                       "{out}"], 2),
    ("loop-config-not-utf8", ["loop", "--config", "{in}/latin1.yaml", "--out", "{out}"], 2),
    ("loop-config-unknown-key", ["loop", "--config", "{in}/unknown.yaml", "--out", "{out}"], 2),
    ("loop-model-missing", ["loop", "--config", "{in}/nomodel.yaml", "--out", "{out}"], 2),
    ("loop-slurm-newline-out", ["loop", "--out", "{in}/run\ntouch PWN", "--launcher", "slurm", "--dry-run"], 2),
    ("inspect-not-parquet", ["inspect", "{in}/text.txt"], 2),
    ("merge-missing-part", ["merge", "{in}/parts", "--out", "{out}"], 2),
    ("plot-no-run", ["plot", "{in}/no_such_run", "--out", "{in}/plot.png"], 2),
    ("eval-unknown-benchmark", ["eval", "--benchmark", "nope", "--out", "{out}"], 2),
    ("analyze-wrong-stage", ["analyze", "pmi", "{in}/verified.parquet", "--out", "{in}/pmi"], 2),
    ("data-prepare-good", ["data", "prepare", "arith", "--num", "2", "--out", "{out}"], 0),
]


@pytest.mark.parametrize("argv, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_input_ends_in_one_line_and_touches_nothing(tmp_path, inputs, tiny_model_dir, monkeypatch, argv,
                                                          expected):
    work = tmp_path / "in"
    shutil.copytree(inputs, work)
    monkeypatch.chdir(work)  # a model folder's code, were it run, would write RAN here
    out = work / "out.parquet"
    before, model_before = snapshot(work), snapshot(tiny_model_dir)
    args = [a.format(**{"in": work, "out": out, "model": tiny_model_dir}) for a in argv]
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == expected, result.output
    if "Traceback" in result.stderr and "--reward" in argv:  # the user's function raised: only its own frames
        assert "rewards.py" in result.stderr and "stages/" not in result.stderr.split("Traceback", 1)[-1]
    else:
        assert "Traceback" not in result.stderr, result.stderr
    if expected:
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and len(last) < 2000, last
    after = snapshot(work)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that existed changed
    assert set(after) - set(before) <= ({"out.parquet"} if expected == 0 else set())
    assert snapshot(tiny_model_dir) == model_before
    assert not [p for p in work.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".lock")]
    assert not (work / "RAN").exists() and not list(work.rglob("PWN"))


def test_a_run_refused_for_a_missing_model_is_not_stamped_and_the_corrected_command_runs(tmp_path, tiny_model_dir):
    import yaml
    from test_loop import tiny_config

    raw = tiny_config(tiny_model_dir, steps=1)
    raw["loop"].update(eval_every=0, model=str(tmp_path / "typo"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    refused = CliRunner().invoke(cli, ["loop", "--config", str(config), "--out", str(tmp_path / "run")])
    assert refused.exit_code == 2 and "loop.model" in refused.stderr and "typo" in refused.stderr
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "run" / "config.yaml").exists()
    raw["loop"]["model"] = str(tiny_model_dir)
    config.write_text(yaml.safe_dump(raw))
    corrected = CliRunner().invoke(cli, ["loop", "--config", str(config), "--out", str(tmp_path / "run")])
    assert corrected.exit_code == 0, corrected.output


def test_the_manifest_and_commands_name_absolute_paths(tmp_path, tiny_model_dir, monkeypatch):
    import yaml
    from test_loop import tiny_config

    raw = tiny_config(tiny_model_dir, steps=1)
    raw["loop"]["eval_every"] = 0
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["loop", "--config", "c.yaml", "--out", "runs/r"]).exit_code == 0
    manifest = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    assert manifest["latest_checkpoint"] == str(tmp_path / "runs" / "r" / "step_0000" / "checkpoint")
    commands = (tmp_path / "runs" / "r" / "step_0000" / "commands.sh").read_text()
    assert f"--out {tmp_path / 'runs' / 'r' / 'step_0000' / 'rollouts.parquet'}" in commands


def test_the_free_space_estimate_counts_every_file_of_the_checkpoint(tiny_model_dir):
    from stages.training import checkpoint

    files = sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.is_file())
    tokenizer = sum(p.stat().st_size for p in tiny_model_dir.glob("tokenizer*"))
    assert tokenizer > 0
    assert checkpoint.estimate_bytes(tiny_model_dir, optimizer_state=False) >= files


def test_a_failed_run_is_one_error_line_without_an_exception_type_for_our_runtime_errors():
    """Issue 26: `Error: RuntimeError: sbatch …` read as a crash; our RuntimeErrors are sentences, other types keep
    their name (they are not ours)."""
    from antisd_cli.options import one_line_error

    assert one_line_error(RuntimeError("sbatch failed: no partition gpu")).message == "sbatch failed: no partition gpu"
    assert one_line_error(ValueError("bad")).message == "ValueError: bad"
    assert one_line_error(RuntimeError("first\nsecond")).message == "first (more with antisd -v)"
