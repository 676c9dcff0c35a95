"""Slurm rendering with hostile values (issue 21, bug 3): a newline in --out, --partition, --account or --time once
injected shell lines into every rendered sbatch script. Control characters are now refused before anything is
written; every other character is quoted, and the scripts, run with stub sbatch/srun/antisd, run nothing extra."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_slurm import _run_scripts, fake_slurm, loop_config, read_log  # noqa: F401  (fake_slurm: a fixture)

from antisd_cli.main import cli
from stages.common.errors import InputError
from stages.runs import slurm
from stages.runs.slurm import SlurmConfig


@pytest.mark.parametrize("option, value", [("--partition", "gpu\ntouch PWN"), ("--account", "a\rb"),
                                           ("--time", "1:00:00\ntouch PWN"), ("--cpu-partition", "cpu b"),
                                           ("--setup", "source x\ntouch PWN"), ("--sbatch-arg", '--qos="hi"')])
def test_control_characters_and_quotes_in_slurm_values_are_refused(tmp_path, option, value):
    result = CliRunner().invoke(cli, ["loop", "-o", str(tmp_path / "run"), "--launcher", "slurm", "--dry-run",
                                      "--set", "loop.model=smollm2-135m", option, value])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Error: {option}")  # --sbatch-arg's field is sbatch_args: --sbatch-args
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["runs/nl\ntouch PWN", "tab\there", "quote\"d"])
def test_a_run_directory_a_script_cannot_hold_is_refused_before_writing(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["loop", "-o", name, "--launcher", "slurm", "--dry-run", "--set",
                                      "loop.model=smollm2-135m"])
    assert result.exit_code == 2, result.output
    assert "--out" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_shell_syntax_in_paths_is_quoted_and_runs_nothing(tmp_path, fake_slurm):  # noqa: F811
    """A run directory with spaces, `$(…)`, `;` and backticks: the scripts pass `bash -n`, cd into it, and running
    them with the stub tools creates no file the values spell."""
    bin_dir, log = fake_slurm
    hostile = tmp_path / "my runs $(touch PWN1); touch PWN2 `touch PWN3`"
    jobs = slurm.render_run(loop_config(hostile, steps=1), SlurmConfig(shards=2, partition="gpu"), tmp_path)
    for job in jobs:
        assert subprocess.run(["bash", "-n", str(job.script)]).returncode == 0
        output = next(line for line in job.text.splitlines() if line.startswith("#SBATCH --output="))
        assert output.startswith('#SBATCH --output="') and output.endswith('"')
    _run_scripts(jobs, bin_dir)
    assert not list(tmp_path.rglob("PWN*")) and not list(Path.cwd().glob("PWN*"))
    outs = [e["argv"][e["argv"].index("--out") + 1] for e in read_log(log) if e["tool"] == "antisd"
            and "--out" in e["argv"]]
    assert outs and all(out.startswith(str(hostile.resolve())) for out in outs)


def test_the_pure_checks_name_the_path(tmp_path):
    with pytest.raises(InputError, match="control characters"):
        slurm.check_paths(Path("/a\nb"), tmp_path)
    with pytest.raises(InputError, match="working directory"):
        slurm.check_paths(tmp_path, Path("/w\x7f"))
    assert slurm.directive_value(Path("/a b/c")) == '"/a b/c"' and slurm.directive_value("x") == "x"
    assert os.sep not in slurm.directive_value("antisd-run-0000-rollout")
