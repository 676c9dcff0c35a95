"""`antisd loop --launcher slurm`: rendered scripts, the submitted dependency chain (fake sbatch/srun on PATH), and
the `antisd` commands inside being valid invocations equal to the local loop's; plus scripts/gpu_check.sh."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from antisd_cli.main import cli
from stages.runs import config as run_config
from stages.runs import slurm
from stages.runs.config import LoopConfig
from stages.runs.slurm import SlurmConfig

REPO = Path(__file__).resolve().parent.parent
STAGE_MODULES = ("rollout", "verify", "score", "update")


def loop_config(out: Path, steps: int = 2) -> LoopConfig:
    resolved = run_config.resolve({"loop": {"steps": steps, "prompts_per_step": 4, "eval_every": 0,
                                            "train": {"name": "arith", "num": 20}},
                                   "rollout": {"n": 2, "max_new_tokens": 8}, "update": {"lr": 2e-5}})
    return LoopConfig(out=str(out), run=resolved)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


FAKE_TOOLS = r"""
import json, os, subprocess, sys
from pathlib import Path

tool, args = sys.argv[1], sys.argv[2:]
log = Path(os.environ["FAKE_SLURM_LOG"])
rank_env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                           "CUDA_VISIBLE_DEVICES")}
with log.open("a") as handle:
    handle.write(json.dumps({"tool": tool, "argv": [tool] + args, "env": rank_env}) + "\n")

def options(argv):  # leading --x=y options, then the command
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    return argv[:split], argv[split:]

if tool == "sbatch":
    count = sum(json.loads(line)["tool"] == "sbatch" for line in log.read_text().splitlines())
    if os.environ.get("FAIL_AT") and count >= int(os.environ["FAIL_AT"]):
        sys.exit("sbatch: error: Batch job submission failed: Invalid account")
    print(f"{1000 + count};cluster")
elif tool == "squeue":  # the job ids FAKE_SQUEUE lists, one per line
    print("\n".join(filter(None, os.environ.get("FAKE_SQUEUE", "").split(","))))
elif tool == "scontrol":
    print("node7\nnode8")
elif tool == "srun":  # one task with --ntasks=1, else SLURM_NTASKS (default 2 nodes x 2 tasks), as srun sets them
    opts, command = options(args)
    tasks = 1 if "--ntasks=1" in opts else int(os.environ.get("SLURM_NTASKS", "4"))
    for p in range(tasks):
        env = {**os.environ, "SLURM_PROCID": str(p), "SLURM_NTASKS": str(tasks), "SLURM_LOCALID": str(p % 2)}
        if subprocess.run(command, env=env).returncode:
            sys.exit(1)
elif tool == "torchrun":  # torchrun [opts] -m antisd_cli ARGS: the variables torchrun sets, per rank of this node
    module, flags, i = args.index("-m"), {}, 0
    while i < module:  # --x=y, --x y, or a bare --x
        key, value = (args[i].split("=", 1) + [None])[:2]
        if value is None and i + 1 < module and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 1
        flags[key], i = value, i + 1
    procs, nodes = int(flags["--nproc-per-node"]), int(flags.get("--nnodes") or 1)
    node = int(os.environ.get("SLURM_PROCID", "0")) if nodes > 1 else 0
    for local in range(procs):
        env = {**os.environ, "RANK": str(node * procs + local), "WORLD_SIZE": str(nodes * procs),
               "LOCAL_RANK": str(local), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
        if subprocess.run(["antisd"] + args[module + 2:], env=env).returncode:
            sys.exit(1)
elif tool == "antisd" and "--out" in args and args[0] != "loop":  # leave the output the stage would write
    out = Path(args[args.index("--out") + 1])
    if "--shard" in args:
        index, count = map(int, args[args.index("--shard") + 1].split("/"))
        out.mkdir(exist_ok=True)
        (out / f"part-{index:05d}-of-{count:05d}.parquet").write_text("")
    elif args[0] == "update":
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("{}")
    else:
        out.write_text("")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A bin/ folder with fake sbatch, squeue, srun, scontrol, torchrun and antisd that log their argv and rank variables
    as JSON lines (antisd also leaves the output file its stage would write)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "slurm.log"
    (tmp_path / "fake_tools.py").write_text(FAKE_TOOLS)
    for tool in ("sbatch", "squeue", "srun", "scontrol", "torchrun", "antisd"):
        executable(bin_dir / tool, f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} '
                                   f'{shlex.quote(str(tmp_path / "fake_tools.py"))} {tool} "$@"\n')
    monkeypatch.setenv("FAKE_SLURM_LOG", str(log))
    return bin_dir, log


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --- pure pieces ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("indices, spec", [([0, 1, 2, 3], "0-3"), ([1, 3], "1,3"), ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"),
                                           ([4], "4")])
def test_array_spec_compresses_ranges(indices, spec):
    assert slurm.array_spec(indices) == spec


def test_multiline_keeps_the_arguments():
    command = shlex.join(["antisd", "verify", "--rollouts", "a b/c.parquet", "--seed", "3", "--no-overwrite"])
    text = slurm.multiline(command)
    assert text.count("\\\n") == 3
    assert shlex.split(text.replace("\\\n", " ")) == shlex.split(command)


# --- rendering -----------------------------------------------------------------------------------------------------

def test_rendered_scripts_pass_bash_n(tmp_path):
    jobs = slurm.render_run(loop_config(tmp_path / "run"), SlurmConfig(shards=2, nodes=2, gpus_per_node=4,
                                                                        partition="gpu", account="proj",
                                                                        setup=("module load cuda",),
                                                                        sbatch_args=("--qos=high",)), tmp_path)
    assert [job.name for job in jobs] == ["0000-rollout", "0000-verify", "0000-score", "0000-update", "0000-record",
                                          "0001-rollout", "0001-verify", "0001-score", "0001-update", "0001-record"]
    scripts = [job.script for job in jobs] + [tmp_path / "run" / "slurm" / "submit.sh"]
    for script in scripts:
        assert script.exists()
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)
    rollout = jobs[0].text
    for line in ("#SBATCH --array=0-1", "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --gpus-per-node=1", "module load cuda", '--shard "${SLURM_ARRAY_TASK_ID}/2"'):
        assert line in rollout
    update = jobs[3].text
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "srun "):
        assert line in update
    assert "--shard" not in jobs[1].text and "--array" not in jobs[1].text  # verify reads the parts directory


def test_one_shard_gives_plain_jobs_writing_files(tmp_path):
    jobs = slurm.render_run(loop_config(tmp_path / "run", steps=1), SlurmConfig(shards=1), tmp_path)
    assert all("--array" not in job.text and "--shard" not in job.text for job in jobs)


def test_resubmission_skips_finished_stages_and_shards(tmp_path):
    config, settings = loop_config(tmp_path / "run"), SlurmConfig(shards=3)
    slurm.render_run(config, settings, tmp_path)
    step0 = tmp_path / "run" / "step_0000"
    (step0 / "rollouts.parquet").mkdir()
    for name in ("part-00000-of-00003.parquet", "part-00001-of-00003.parquet", "part-00002-of-00003.parquet"):
        (step0 / "rollouts.parquet" / name).write_bytes(b"")
    (step0 / "verified.parquet").write_bytes(b"")
    (step0 / "scored.parquet").mkdir()
    (step0 / "scored.parquet" / "part-00001-of-00003.parquet").write_bytes(b"")
    jobs = slurm.render_run(config, settings, tmp_path)
    assert [(job.name, job.array, job.after) for job in jobs[:4]] == [
        ("0000-score", "0,2", ()), ("0000-update", None, ("0000-score",)), ("0000-record", None, ("0000-update",)),
        ("0001-rollout", "0-2", ("0000-update",))]  # the next step waits for the update, not for the record


# --- submission with a fake scheduler ------------------------------------------------------------------------------

def test_fake_sbatch_records_the_dependency_chain(tmp_path, fake_slurm):
    bin_dir, log = fake_slurm
    run_dir = tmp_path / "run"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(run_config.dump_yaml(loop_config(run_dir).run))
    result = CliRunner().invoke(cli, ["loop", "-c", str(config_path), "-o", str(run_dir), "--launcher", "slurm",
                                      "--shards", "2"], env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run_dir.resolve())
    calls = [entry["argv"] for entry in read_log(log) if entry["tool"] == "sbatch"]
    assert len(calls) == 10 and all(call[:2] == ["sbatch", "--parsable"] for call in calls)
    assert calls[0][2:] == [str(run_dir.resolve() / "slurm" / "step_0000" / "rollout.sbatch")]
    assert [Path(call[-1]).name for call in calls] == ["rollout.sbatch", "verify.sbatch", "score.sbatch",
                                                       "update.sbatch", "record.sbatch"] * 2
    # ids are 1001, 1002, … in submission order: rollout0 verify0 score0 update0 record0 rollout1 … record1
    waits = [next((a.split(":", 1)[1] for a in call if a.startswith("--dependency=afterok:")), None) for call in calls]
    assert waits == [None, "1001", "1002", "1003", "1004", "1004", "1006", "1007", "1008", "1009:1005"]
    assert all("--kill-on-invalid-dep=yes" in call for call in calls[1:])
    record = json.loads((run_dir / "slurm" / "jobs.json").read_text())
    jobs = record["submissions"][-1]["jobs"]
    assert [job["job_id"] for job in jobs] == [str(1001 + i) for i in range(10)]  # "id;cluster" → id
    assert jobs[5] == {**jobs[5], "name": "0001-rollout", "after": ["0000-update"], "array": "0-1", "step": 1}


def test_submit_sh_chains_the_same_dependencies(tmp_path, fake_slurm):
    bin_dir, log = fake_slurm
    slurm.render_run(loop_config(tmp_path / "run"), SlurmConfig(shards=2, window=1), tmp_path)
    script = tmp_path / "run" / "slurm" / "submit.sh"
    result = subprocess.run(["bash", str(script)], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = [entry["argv"] for entry in read_log(log) if entry["tool"] == "sbatch"]
    assert [Path(call[-1]).name for call in calls] == ["rollout.sbatch", "verify.sbatch", "score.sbatch",
                                                       "update.sbatch", "record.sbatch", "continue.sbatch"]
    waits = [next((a.split(":", 1)[1] for a in call if a.startswith("--dependency=afterok:")), None) for call in calls]
    assert waits == [None, "1001", "1002", "1003", "1004", "1005"]  # "id;cluster" → id
    continuation = (tmp_path / "run" / "slurm" / "continue.sbatch")
    assert subprocess.run(["bash", "-n", str(continuation)]).returncode == 0


def test_sbatch_failure_exits_1_and_keeps_the_ids_already_submitted(tmp_path, fake_slurm):
    bin_dir, _ = fake_slurm
    result = CliRunner().invoke(cli, ["-q", "loop", "-o", str(tmp_path / "run"), "--set", "loop.model=smollm2-135m",
                                      "--set", "loop.steps=1", "--set", "loop.eval_every=0", "--launcher", "slurm",
                                      "--shards", "2"],
                                env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAIL_AT": "3"})
    assert result.exit_code == 1
    assert "Invalid account" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    jobs = json.loads((tmp_path / "run" / "slurm" / "jobs.json").read_text())["submissions"][-1]["jobs"]
    assert [job["name"] for job in jobs] == ["0000-rollout", "0000-verify"]


def test_dry_run_prints_scripts_and_submits_nothing(tmp_path, fake_slurm):
    bin_dir, log = fake_slurm
    result = CliRunner().invoke(cli, ["loop", "-o", str(tmp_path / "run"), "--set", "loop.steps=1", "--set",
                                      "loop.model=smollm2-135m", "--launcher", "slurm", "--dry-run"],
                                env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.exit_code == 0, result.output
    assert not log.exists() and not (tmp_path / "run" / "slurm" / "jobs.json").exists()
    assert result.stdout.count("#!/usr/bin/env bash") == 6  # 4 stages + record + submit.sh
    assert "antisd rollout" in result.stdout and "--dependency=afterok:" in result.stdout


@pytest.mark.parametrize("args", [["--shards", "2"], ["--dry-run"], ["--partition", "gpu"], ["--sbatch-arg=--x"]])
def test_slurm_options_need_the_slurm_launcher(tmp_path, args):
    result = CliRunner().invoke(cli, ["loop", "-o", str(tmp_path / "run")] + args)
    assert result.exit_code == 2
    assert "only with --launcher slurm" in result.stderr
    assert not (tmp_path / "run").exists()


# --- the commands inside are valid and equal to the local loop's ---------------------------------------------------

def _run_scripts(jobs, bin_dir: Path) -> None:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "node[7-8]"}
    for job in jobs:
        result = subprocess.run(["bash", str(job.script)], env=env, capture_output=True, text=True)
        assert result.returncode == 0, (job.script, result.stderr)


def _parse_with_cli(argv: list[str], monkeypatch) -> object:
    """Invoke the real command with its stage's run() replaced: returns the Config the command built."""
    import importlib

    captured = []
    stage = argv[0]
    module = importlib.import_module(f"stages.{stage}")
    monkeypatch.setattr(module, "run", lambda config, loaded=None: captured.append(config) or "done")
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, (argv, result.output)
    return captured[0]


def test_commands_in_scripts_are_valid_antisd_invocations_of_the_loop_configs(tmp_path, fake_slurm, monkeypatch):
    bin_dir, log = fake_slurm
    config = loop_config(tmp_path / "run")
    jobs = slurm.render_run(config, SlurmConfig(shards=2, nodes=2, gpus_per_node=2), tmp_path)
    _run_scripts(jobs, bin_dir)
    entries = [entry for entry in read_log(log) if entry["tool"] == "antisd"]
    update_ranks = [e for e in entries if e["argv"][1] == "update"
                    and e["argv"][e["argv"].index("--out") + 1].endswith("step_0000/checkpoint")]
    assert [(e["env"]["RANK"], e["env"]["WORLD_SIZE"], e["env"]["LOCAL_RANK"]) for e in update_ranks] == [
        ("0", "4", "0"), ("1", "4", "1"), ("2", "4", "0"), ("3", "4", "1")]
    assert {(e["env"]["MASTER_ADDR"], e["env"]["MASTER_PORT"]) for e in update_ranks} == {("node7", "24321")}
    # each stage of each step ran once (update once per rank), plus one record loop per step
    assert len(entries) == 2 * (3 + 4 + 1)
    config = dataclasses.replace(config, out=str((tmp_path / "run").resolve()))
    from stages.runs.plan import with_run_variant
    from stages.runs.run_dir import Run

    config = with_run_variant(config)  # the run's config.yaml spells out update.variant (the default, official)

    run = Run(Path(config.out))
    for entry in entries:
        argv = entry["argv"][1:]
        if argv[0] == "loop":
            assert argv == ["loop", "--config", str(run.root / "config.yaml"), "--out", str(run.root), "--record-only"]
            assert run_config.load(argv[2]).digest() == config.run.digest()  # the record job resumes, not refuses
            continue
        built = _parse_with_cli(argv, monkeypatch)
        step = int(Path(built.out).parent.name.split("_")[1])  # out is step_XXXX/<output>
        expected = slurm.job_configs(config, run, step)[argv[0]]
        if argv[0] in slurm.ARRAY_STAGES:
            expected = dataclasses.replace(expected, shard="1/2")  # SLURM_ARRAY_TASK_ID=1
        assert built == expected


def _fake_stage_runs(monkeypatch):
    """Stage runs that write placeholder outputs, so the local loop goes through a step without a model."""
    from stages import loop as loop_module
    from stages import rollout, score, update, verify
    def placeholder(config, loaded=None):
        pq.write_table(pa.table({"x": [1]}), config.out)
        return config.out

    def fake_update(config, loaded=None):
        Path(config.out).mkdir()
        (Path(config.out) / "config.json").write_text("{}")
        (Path(config.out) / "metrics.json").write_text(json.dumps({"reward/mean": 0.0}))
        return config.out

    for module in (rollout, verify, score):
        monkeypatch.setattr(module, "run", placeholder)
    monkeypatch.setattr(update, "run", fake_update)
    monkeypatch.setattr(loop_module.StepRunner, "update", lambda self, step, config: fake_update(config))
    monkeypatch.setattr(loop_module.Resources, "policy", lambda self, model, purpose="score": None)


def test_slurm_commands_equal_the_local_loops_commands(tmp_path, monkeypatch):
    from stages import loop as loop_module
    from stages.runs.view import LoopView

    _fake_stage_runs(monkeypatch)
    local = loop_config(tmp_path / "local", steps=2)
    loop_module.run(local, view=LoopView(2, stream=open(os.devnull, "w")))
    jobs = slurm.render_run(loop_config(tmp_path / "cluster", steps=2), SlurmConfig(shards=2), tmp_path)
    for step in (0, 1):
        local_lines = (tmp_path / "local" / f"step_{step:04d}" / "commands.sh").read_text().splitlines()[2:]
        cluster_commands = [job.commands[0] for job in jobs if job.step == step and job.stage != "record"]
        # the one difference: every Slurm update job writes the full state (the next job is a new process)
        local_lines = [line.replace("--no-optimizer-state", "--optimizer-state") for line in local_lines]
        assert [line.replace(str(tmp_path / "local"), "RUN") for line in local_lines] == \
            [command.replace(str((tmp_path / "cluster").resolve()), "RUN") for command in cluster_commands]


# --- scripts/gpu_check.sh ------------------------------------------------------------------------------------------

def test_gpu_check_script_passes_bash_n():
    result = subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# scripts/gpu_check.sh --cpu-smoke runs in tests/test_gpu_check.py.


# --- examples/slurm ------------------------------------------------------------------------------------------------

EXAMPLES = {"single_node_8gpu.sbatch": (1, 2), "multi_node.sbatch": (2, 2)}  # (nodes, GPUs per node) of the test


def _loop_ranks(log: Path) -> list[tuple[str, str, list[str]]]:
    """(RANK, WORLD_SIZE, antisd argv) of every `antisd` a launch started."""
    return [(e["env"]["RANK"], e["env"]["WORLD_SIZE"], e["argv"][1:]) for e in read_log(log) if e["tool"] == "antisd"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_starts_one_resident_rank_per_gpu_of_the_same_loop(tmp_path, fake_slurm, monkeypatch, name):
    """The examples hold one allocation for the whole run: torchrun on the node (srun + one torchrun per node with a
    c10d rendezvous on the first node across nodes) starts every rank of one `antisd loop` command."""
    bin_dir, log = fake_slurm
    nodes, gpus = EXAMPLES[name]
    script = REPO / "examples" / "slurm" / name
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CONFIG": str(_config_file(tmp_path)),
           "RUN": str(tmp_path / "run"), "GPUS": str(gpus), "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[7-8]",
           "SLURM_CPUS_PER_TASK": "4", "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes)}
    result = subprocess.run(["bash", str(script), "--set", "loop.steps=3"], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ranks = _loop_ranks(log)
    command = ["loop", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"), "--set", "loop.steps=3"]
    assert sorted(int(rank) for rank, _, _ in ranks) == list(range(nodes * gpus))
    assert all(world == str(nodes * gpus) and argv == command for _, world, argv in ranks)
    _parse_with_cli(command, monkeypatch)
    launches = [e["argv"] for e in read_log(log) if e["tool"] == "torchrun"]
    assert len(launches) == nodes  # one torchrun per node
    if nodes > 1:
        assert {" ".join(argv) for argv in launches} == {
            f"torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint node7:20077 --rdzv-id 77 -m "
            f"antisd_cli {' '.join(command)}"}
    else:
        assert launches[0][:4] == ["torchrun", "--standalone", "--nproc-per-node", "2"]


def test_the_rendered_resident_job_is_the_example_for_the_run(tmp_path, fake_slurm, monkeypatch):
    """`--launcher slurm --resident --dry-run` writes RUN/slurm/resident.sbatch: a path with spaces and shell syntax
    stays one quoted word, and the job starts every rank of `antisd loop` on the run's own config.yaml."""
    bin_dir, log = fake_slurm
    hostile = tmp_path / "my runs $(touch PWN1); `touch PWN2`"
    result = CliRunner().invoke(cli, ["loop", "-c", str(_config_file(tmp_path)), "-o", str(hostile), "--launcher",
                                      "slurm", "--resident", "--nodes", "2", "--gpus-per-node", "2", "--dry-run",
                                      "--cpus-per-task", "3", "--partition", "gpu"])
    assert result.exit_code == 0, result.output
    script = hostile / "slurm" / "resident.sbatch"
    text = script.read_text()
    assert text in result.output and subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=2", "--cpus-per-task=6", "--partition=gpu"):
        assert f"#SBATCH {directive}\n" in text
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "node[7-8]"}
    assert subprocess.run(["bash", str(script)], env=env, cwd=tmp_path).returncode == 0
    command = ["loop", "--config", str(hostile / "config.yaml"), "--out", str(hostile)]
    assert sorted(_loop_ranks(log)) == [(str(rank), "4", command) for rank in range(4)]
    assert not list(tmp_path.rglob("PWN*")) and not list(Path.cwd().glob("PWN*"))
    assert not (hostile / "slurm" / "jobs.json").exists()  # a dry run submits nothing


@pytest.mark.parametrize("args, message", [
    (["--set", "update.zero_stage=3"], "ZeRO-3 on 16 ranks"),
    (["--shards", "4"], "--shards: only without --resident"),
    (["--partition", "gpu\ntouch PWN"], "--partition"),
])
def test_a_resident_job_the_ranks_would_refuse_is_refused_before_anything_is_written(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["loop", "-c", str(_config_file(tmp_path)), "-o", str(tmp_path / "run"),
                                      "--launcher", "slurm", "--resident", "--nodes", "2", "--dry-run", *args])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "run").exists()


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(loop_config(tmp_path / "unused").run.to_dict()))
    return path


@pytest.mark.parametrize("settings, message", [({"shards": 0}, "--shards: must be >= 1"),
                                               ({"time": " "}, "--time: must not be empty"),
                                               ({"sbatch_args": ("qos=high",)}, "--sbatch-args: 'qos=high'")])
def test_impossible_slurm_settings_fail_before_anything_is_written(tmp_path, settings, message):
    from stages.common.errors import InputError
    with pytest.raises(InputError, match=message):
        slurm.render_run(loop_config(tmp_path / "run"), SlurmConfig(**settings), tmp_path)
    assert not (tmp_path / "run").exists()


# --- at scale: job window, CPU partition, pruning, resubmission ----------------------------------------------------

def _directives(job) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in job.text.splitlines() if line.startswith("#SBATCH ")]


def test_the_200_step_example_is_submitted_a_window_at_a_time(tmp_path, tiny_model_dir):
    example = str(REPO / "examples" / "configs" / "gsm8k_gpu.yaml")
    placeholder = CliRunner().invoke(cli, ["loop", "-c", example, "-o", str(tmp_path / "dry"), "--launcher", "slurm",
                                           "--dry-run"])
    assert placeholder.exit_code == 2 and "loop.model /path/to/hf/model: no such folder" in placeholder.stderr
    assert not (tmp_path / "dry").exists()  # nothing queued, nothing stamped with the placeholder
    resolved = run_config.load(example, [f"loop.model={tiny_model_dir}"])
    assert resolved.loop.steps == 200
    config = LoopConfig(out=str(tmp_path / "gsm8k"), run=resolved)
    settings = SlurmConfig(partition="gpu", cpu_partition="cpu", window=4, shards=8, nodes=2)
    jobs = slurm.render_run(config, settings, tmp_path)
    assert len(jobs) == 4 * 5 + 1 and jobs[-1].stage == "continue"
    assert {job.step for job in jobs if job.step is not None} == {0, 1, 2, 3}
    assert not (tmp_path / "gsm8k" / "step_0004").exists()  # later windows draw their prompts when submitted
    assert {job.array for job in jobs if job.stage in slurm.ARRAY_STAGES} == {"0-7"}
    continuation = jobs[-1]
    assert continuation.after == ("0003-record",)
    argv = shlex.split(continuation.commands[0])
    assert argv[:7] == ["antisd", "loop", "--config", str((tmp_path / "gsm8k").resolve() / "config.yaml"), "--out",
                        str((tmp_path / "gsm8k").resolve()), "--launcher"]
    assert argv[argv.index("--window") + 1] == "4" and argv[argv.index("--cpu-partition") + 1] == "cpu"
    assert "--dry-run" not in argv
    by_stage = {}
    for job in jobs:
        by_stage.setdefault(job.stage, []).append(job)
    for job in by_stage["verify"] + by_stage["continue"]:  # CPU jobs: the CPU partition, no GPU
        assert "--partition=cpu" in _directives(job) and not any("gpus" in d for d in _directives(job))
    for job in by_stage["rollout"] + by_stage["score"] + by_stage["update"]:
        assert "--partition=gpu" in _directives(job)
    # eval_every 10: the first record evaluates the base model (one GPU), the others only record (CPU)
    records = by_stage["record"]
    assert ["--gpus-per-node=1" in _directives(job) for job in records] == [True, False, False, False]
    assert ["--partition=cpu" in _directives(job) for job in records] == [False, True, True, True]
    assert all(job.commands[0].endswith("--record-only") for job in records)
    printed = CliRunner().invoke(cli, ["loop", "-c", example, "-o", str(tmp_path / "dry"), "--set",
                                       f"loop.model={tiny_model_dir}", "--launcher", "slurm", "--dry-run", "--window",
                                       "3"])
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.count("#!/usr/bin/env bash") == 3 * 5 + 1 + 1  # the window's jobs, continue, submit.sh


def test_the_continue_job_submits_the_next_window(tmp_path, fake_slurm):
    bin_dir, log = fake_slurm
    config = loop_config(tmp_path / "run", steps=3)
    jobs = slurm.render_run(config, SlurmConfig(window=2, cpu_partition="cpu"), tmp_path)
    assert [job.name for job in jobs][-3:] == ["0001-update", "0001-record", "continue"]
    for step in (0, 1):  # what the window's record jobs leave
        (tmp_path / "run" / f"step_{step:04d}" / "metrics.json").write_text("{}")
    argv = shlex.split(jobs[-1].commands[0])[1:]
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1012"}
    result = CliRunner().invoke(cli, argv, env=env)
    assert result.exit_code == 0, result.output
    submitted = [Path(entry["argv"][-1]) for entry in read_log(log) if entry["tool"] == "sbatch"]
    assert [(path.parent.name, path.name) for path in submitted] == [
        ("step_0002", name) for name in ("rollout.sbatch", "verify.sbatch", "score.sbatch", "update.sbatch",
                                         "record.sbatch")]  # the last window: no further continue job


def test_resubmitting_while_jobs_are_queued_is_refused(tmp_path, fake_slurm):
    bin_dir, log = fake_slurm
    args = ["-q", "loop", "-o", str(tmp_path / "run"), "--set", "loop.model=smollm2-135m", "--set", "loop.steps=1",
            "--set", "loop.eval_every=0", "--launcher", "slurm", "--shards", "1"]
    path = f"{bin_dir}:{os.environ['PATH']}"
    assert CliRunner().invoke(cli, args, env={"PATH": path}).exit_code == 0
    submitted = len([e for e in read_log(log) if e["tool"] == "sbatch"])
    again = CliRunner().invoke(cli, args, env={"PATH": path, "FAKE_SQUEUE": "1003,99"})
    assert again.exit_code == 2 and "1 job(s) of an earlier submission are still queued or running (1003)" in \
        again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert len([e for e in read_log(log) if e["tool"] == "sbatch"]) == submitted
    # the queued job is the caller itself (a continue job): allowed; and once nothing is queued: allowed
    assert CliRunner().invoke(cli, args, env={"PATH": path, "FAKE_SQUEUE": "1003", "SLURM_JOB_ID": "1003"}
                              ).exit_code == 0
    assert CliRunner().invoke(cli, args, env={"PATH": path, "FAKE_SQUEUE": "99"}).exit_code == 0


def test_a_speed_only_change_resubmits_without_force_and_a_real_change_is_refused(tmp_path, fake_slurm):
    bin_dir, _ = fake_slurm
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    base = ["-q", "loop", "-o", str(tmp_path / "run"), "--set", "loop.model=smollm2-135m", "--set", "loop.steps=1",
            "--set", "loop.eval_every=0", "--launcher", "slurm", "--shards", "1"]
    assert CliRunner().invoke(cli, base, env=env).exit_code == 0
    faster = CliRunner().invoke(cli, base + ["--set", "rollout.threads=3", "--set", "score.micro_batch_tokens=999"],
                                env=env)
    assert faster.exit_code == 0, faster.output
    rollout = (tmp_path / "run" / "slurm" / "step_0000" / "rollout.sbatch").read_text()
    assert "--threads 3" in rollout
    changed = CliRunner().invoke(cli, base + ["--set", "update.lr=3e-5"], env=env)
    assert changed.exit_code == 2 and "update.lr" in changed.stderr and "--force" in changed.stderr


def test_record_only_records_finished_steps_prunes_and_stops_at_the_first_unfinished(tmp_path, monkeypatch):
    from stages import loop as loop_module
    from stages import rollout
    from stages.runs.view import LoopView

    _fake_stage_runs(monkeypatch)
    config = loop_config(tmp_path / "run", steps=4)
    config = dataclasses.replace(config, run=run_config.resolve({**config.run.to_dict(),
                                                                 "loop": {**config.run.to_dict()["loop"],
                                                                          "keep_checkpoints": 1}}))
    slurm.render_run(config, SlurmConfig(shards=1), tmp_path)  # draws the prompts, as the submission does
    run = tmp_path / "run"
    for step in (0, 1, 2):  # what the stage jobs of steps 0-2 leave; step 3 has not started
        for name in ("rollouts", "verified", "scored"):
            pq.write_table(pa.table({"x": [step]}), run / f"step_{step:04d}" / f"{name}.parquet")
        (run / f"step_{step:04d}" / "checkpoint" / "deepspeed" / "engine").mkdir(parents=True)  # Slurm: full state
        (run / f"step_{step:04d}" / "checkpoint" / "config.json").write_text("{}")
        (run / f"step_{step:04d}" / "checkpoint" / "metrics.json").write_text(json.dumps({"reward/mean": step / 4}))
    monkeypatch.setattr(rollout, "run", lambda *a, **k: pytest.fail("--record-only ran a stage"))
    loop_module.run(dataclasses.replace(config, record_only=True), view=LoopView(4, stream=open(os.devnull, "w")))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["reward/mean"]) for row in rows] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert [(run / f"step_{s:04d}" / "checkpoint").exists() for s in range(3)] == [False, False, True]  # keep 1
    assert not (run / "step_0003" / "metrics.json").exists() and not (run / "step_0003" / "rollouts.parquet").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # trackers log as each step is recorded


def test_record_only_needs_the_local_launcher(tmp_path):
    result = CliRunner().invoke(cli, ["loop", "-o", str(tmp_path / "run"), "--launcher", "slurm", "--record-only"])
    assert result.exit_code == 2 and "--record-only: only with --launcher local" in result.stderr
