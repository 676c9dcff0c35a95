"""`antisd loop --launcher slurm`: render one sbatch script per stage per step and submit them as a dependency chain,
a bounded window of steps at a time.

Per step k (the same run directory layout and the same `antisd` commands as the local loop, `stages.loop`):

    rollout   array job, one task per shard: `antisd rollout … --shard $SLURM_ARRAY_TASK_ID/N` → rollouts.parquet/
    verify    one CPU job reading the parts directory → verified.parquet (on `cpu_partition` when given)
    score     array job like rollout → scored.parquet/
    update    multi-node job: `srun` starts one rank per GPU with RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/
              SLURM_NTASKS/SLURM_LOCALID and MASTER_ADDR/MASTER_PORT from the first node → checkpoint/
    record    `antisd loop --record-only` over the run: the step's metrics.json, metrics.jsonl, TensorBoard/W&B,
              checkpoint pruning (loop.keep_checkpoints) and, when due, the held-out evaluation (one GPU; else a
              CPU job), so metrics appear as each step finishes

each `afterok` on the one before; step k+1's rollout waits for step k's update only (its record runs alongside), and
each record also waits for the record before it. A submission holds at most `window` steps; when steps remain, its
last job (`continue`, CPU, after the window's last record) runs `antisd loop --launcher slurm` again on the run, which
submits the next window: a 200-step run never has more than ~5 × window jobs queued (cluster limits such as
MaxSubmitJobs), and compute nodes must be able to call `sbatch` (they can on most clusters).

Scripts go to RUN/slurm/step_XXXX/<stage>.sbatch, the window's chain as a plain shell script to RUN/slurm/submit.sh,
the submitted job ids to RUN/slurm/jobs.json. Resubmitting skips finished stages (and finished shards of an array),
and is refused while jobs of an earlier submission of the run are still queued or running (`squeue`), so no stage
runs twice at once. Speed-only settings (`stages.runs.config.RESUMABLE_CHANGES`) may change between submissions.
Each step's prompts are drawn at render time, exactly as the local loop draws them. This module renders text and
calls `sbatch`/`squeue`; it runs no stage itself.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from stages.common import validation
from stages.runs.scheduler import queued_jobs, sbatch_argv, submit

log = logging.getLogger(__name__)

ARRAY_STAGES = ("rollout", "score")  # sharded over array tasks
UNSAFE_IN_DIRECTIVE = set(' \t"\'\\') | {chr(c) for c in range(32)} | {chr(127)}


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (a newline would end an #SBATCH line and start a shell line)."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def directive_value(text: str | Path) -> str:
    """A path or name as an #SBATCH value: double-quoted when it holds a space (sbatch reads quoted values;
    `check_paths` keeps double quotes and control characters out of the run directory)."""
    text = str(text)
    return f'"{text}"' if " " in text else text


def check_paths(root: Path, workdir: Path) -> None:
    """Refuse a run directory or working directory that a script cannot hold safely, before anything is written:
    control characters anywhere (every other character is quoted in the shell lines), a double quote in the run
    directory (it is an #SBATCH value)."""
    from stages.common.errors import InputError

    for path, label in ((root, "--out"), (workdir, "the working directory")):
        if has_control(str(path)):
            raise InputError(f"{label} {str(path)!r}: control characters (a newline, a tab, …) in a path cannot go "
                             "into a Slurm script; rename it")
    if '"' in str(root):
        raise InputError(f"--out {str(root)!r}: a double quote in the run directory cannot go into an #SBATCH line")


@dataclass(frozen=True)
class SlurmConfig:
    """Options of `antisd loop --launcher slurm`."""

    partition: str | None = None  # --partition of every job (None: the cluster's default)
    cpu_partition: str | None = None  # --partition of the jobs that need no GPU (verify, record, continue)
    account: str | None = None  # --account of every job
    time: str = "04:00:00"  # --time limit of each job
    nodes: int = 1  # nodes of the update job
    gpus_per_node: int = 8  # GPUs per update node; one rank per GPU
    shards: int = 8  # array tasks (one GPU each) of rollout and score; 1 = a plain one-GPU job
    cpus_per_task: int = 8  # --cpus-per-task of every task (a shard, a rank, verify)
    setup: tuple[str, ...] = ()  # shell lines run first in every job, e.g. "source ~/venvs/antisd/bin/activate"
    sbatch_args: tuple[str, ...] = ()  # extra #SBATCH options for every job, e.g. "--qos=high"
    window: int = 10  # steps per submission; the last job submits the next window
    dry_run: bool = False  # write and print the scripts and the sbatch commands; submit nothing

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "nodes", "gpus_per_node", "shards", "cpus_per_task", "window")
        check.require(bool(self.time.strip()), "time", "must not be empty")
        for name in ("partition", "cpu_partition", "account", "time"):  # one #SBATCH word each
            value = getattr(self, name)
            check.require(value is None or not set(value) & UNSAFE_IN_DIRECTIVE, name,
                          f"{value!r}: no spaces, quotes or control characters in an #SBATCH value")
        for arg in self.sbatch_args:
            check.require(arg.startswith("-") and not has_control(arg) and '"' not in arg, "sbatch_args",
                          f"{arg!r}: expected an option such as --qos=high, without quotes or control characters")
        for line in self.setup:
            check.require(not has_control(line), "setup", f"{line!r}: one shell line, without control characters")
        check.done()


@dataclass(frozen=True)
class Job:
    """One rendered sbatch script and where it sits in the chain."""

    name: str  # e.g. "0003-rollout"; also the shell variable of its id in submit.sh
    step: int | None  # None for the continue job
    stage: str
    script: Path
    text: str
    array: str | None = None  # "0-7" or "1,5": the array tasks still to run
    after: tuple[str, ...] = ()  # names of the jobs this one waits for (afterok on all)
    commands: tuple[str, ...] = ()  # the antisd command lines inside


# --- pure rendering ------------------------------------------------------------------------------------------------

def array_spec(indices: list[int]) -> str:
    """Compress task indices for `--array`: [0,1,2,5,7,8] → "0-2,5,7-8"."""
    ranges, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            ranges.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(ranges)


def multiline(command: str, tail: str = "") -> str:
    """`command` (a shlex-joined line) with one `--option value` per continued line, then `tail` verbatim."""
    lines: list[list[str]] = [[]]
    for token in shlex.split(command):
        if token.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(token))
    if tail:
        lines.append([tail])
    return " \\\n    ".join(" ".join(line) for line in lines)


def sbatch_header(slurm: SlurmConfig, job_name: str, log_path: Path, title: str, directives: list[str],
                  partition: str | None = None,
                  origin: str = "`antisd loop --launcher slurm`; submitted with dependencies by RUN/slurm/submit.sh"
                  ) -> list[str]:
    lines = ["#!/usr/bin/env bash", f"# {title}", f"# Rendered by {origin}.",
             f"#SBATCH --job-name={directive_value(job_name)}",
             f"#SBATCH --output={directive_value(log_path)}"]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += [f"#SBATCH --time={slurm.time}"]
    partition = partition or slurm.partition
    lines += [f"#SBATCH --partition={partition}"] if partition else []
    lines += [f"#SBATCH --account={slurm.account}"] if slurm.account else []
    lines += [f"#SBATCH {arg}" for arg in slurm.sbatch_args]
    return lines


def job_preamble(slurm: SlurmConfig, workdir: Path) -> list[str]:
    return ["", "set -euo pipefail", f"cd {shlex.quote(str(workdir))}", *slurm.setup]


def render_single(slurm: SlurmConfig, job_name: str, log_path: Path, title: str, command: str, workdir: Path,
                  gpus: int) -> str:
    """A one-task job: on `cpu_partition` (when given) without a GPU, else on the GPU partition with `gpus`."""
    directives = ["--nodes=1", "--ntasks=1", f"--cpus-per-task={slurm.cpus_per_task}"]
    directives += [f"--gpus-per-node={gpus}"] if gpus else []
    partition = None if gpus else slurm.cpu_partition
    return "\n".join(sbatch_header(slurm, job_name, log_path, title, directives, partition)
                     + job_preamble(slurm, workdir) + ["", multiline(command), ""])


def render_array(slurm: SlurmConfig, job_name: str, log_path: Path, title: str, command: str, workdir: Path,
                 array: str | None) -> str:
    """One task per shard, one GPU each; `command` gets `--shard $SLURM_ARRAY_TASK_ID/N` (nothing when N is 1)."""
    directives = ["--nodes=1", "--ntasks=1", f"--cpus-per-task={slurm.cpus_per_task}", "--gpus-per-node=1"]
    directives += [f"--array={array}"] if array else []
    shard = f'--shard "${{SLURM_ARRAY_TASK_ID}}/{slurm.shards}"' if slurm.shards > 1 else ""
    return "\n".join(sbatch_header(slurm, job_name, log_path, title, directives) + job_preamble(slurm, workdir)
                     + ["", multiline(command, shard), ""])


# Per-rank environment for torchrun/DeepSpeed-style code, from what srun sets in each task.
RANK_ENV = ('export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"; '
            'exec "$@"')


def render_update(slurm: SlurmConfig, job_name: str, log_path: Path, title: str, command: str, workdir: Path) -> str:
    """`nodes` × `gpus_per_node` ranks under srun; the first node hosts the rendezvous on a port from the job id."""
    directives = [f"--nodes={slurm.nodes}", f"--ntasks-per-node={slurm.gpus_per_node}",
                  f"--gpus-per-node={slurm.gpus_per_node}", f"--cpus-per-task={slurm.cpus_per_task}"]
    body = [
        "",
        "# Rendezvous: the first node of the allocation; a port per job so that jobs sharing a node do not clash.",
        "# (awk reads all of scontrol's output: `head -n 1` could make it die of SIGPIPE under pipefail)",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk \'NR == 1\')"',
        'MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"',
        "export MASTER_ADDR MASTER_PORT",
        "# One process per GPU; each sees every GPU of its node and trains on cuda:$LOCAL_RANK. srun does not inherit",
        "# sbatch's --cpus-per-task since Slurm 22.05 (each rank would get one core): it is passed on explicitly.",
        f"export SRUN_CPUS_PER_TASK={slurm.cpus_per_task}",
        f"srun --kill-on-bad-exit=1 --cpus-per-task={slurm.cpus_per_task} bash -c {shlex.quote(RANK_ENV)} antisd-rank "
        "\\\n    " + multiline(command),
        "",
    ]
    return "\n".join(sbatch_header(slurm, job_name, log_path, title, directives) + job_preamble(slurm, workdir)
                     + body)


def submit_script(jobs: list[Job]) -> str:
    """The chain as a shell script: each job's id in a variable, `--dependency=afterok:` on the one before."""
    lines = ["#!/usr/bin/env bash", "# Submit the rendered jobs of this run in dependency order.", "set -euo pipefail"]
    for job in jobs:
        command = shlex.join(sbatch_argv(job, ["AFTER"] if job.after else []))
        if job.after:
            waits = ":".join(f'"${{{_variable(name)}}}"' for name in job.after)
            command = command.replace("afterok:AFTER", f"afterok:{waits}")
        variable = _variable(job.name)  # --parsable prints "id" or "id;cluster": keep the id
        lines += [f"{variable}=$({command})", f'{variable}="${{{variable}%%;*}}"', f'echo "{job.name} ${{{variable}}}"']
    return "\n".join(lines) + "\n"


def _variable(name: str) -> str:
    return "job_" + name.replace("-", "_")


# --- the run: configs, prompts, scripts ----------------------------------------------------------------------------

def pending_shards(output: Path, shards: int) -> list[int]:
    """Shards of a stage output still to compute (all of them, or none, when the output is one file)."""
    from stages.common.parts import missing_shards

    if shards == 1:
        return [] if output.is_file() else [0]
    return missing_shards(output, shards)


def job_configs(config, run, step: int) -> dict:
    """The step's stage configs as Slurm jobs run them: every update is its own process, so each writes the full
    checkpoint (optimizer state included) that the next step's job starts from."""
    from stages.runs.plan import step_configs

    configs = step_configs(config, run, step)
    return {**configs, "update": replace(configs["update"], optimizer_state=True)}


def render_step(config, run, step: int, slurm: SlurmConfig, workdir: Path, after: str | None) -> list[Job]:
    """The stage jobs still to run for `step`, chained after the job named `after` (None: nothing to wait for)."""
    from stages.runs.plan import cli_command

    configs = job_configs(config, run, step)
    script_dir = run.root / "slurm" / f"step_{step:04d}"
    jobs = []
    for stage, stage_config in configs.items():
        if stage in ARRAY_STAGES:  # a folder of parts: done when no shard is missing
            pending = pending_shards(run.output(step, stage), slurm.shards)
            done, array = not pending, array_spec(pending) if slurm.shards > 1 else None
        else:
            done, array = run.done(step, stage), None
        if done:
            continue
        name, command = f"{step:04d}-{stage}", cli_command(stage, stage_config)
        job_name, title = f"antisd-{run.root.name}-{name}", f"step {step}, {stage}"
        log_path = script_dir / (f"{stage}-%A_%a.log" if array else f"{stage}-%j.log")
        if stage in ARRAY_STAGES:
            text = render_array(slurm, job_name, log_path, title + f" ({slurm.shards} shards)", command, workdir, array)
        elif stage == "update":
            text = render_update(slurm, job_name, log_path, title + f" ({slurm.nodes} × {slurm.gpus_per_node} GPUs)",
                                 command, workdir)
        else:
            text = render_single(slurm, job_name, log_path, title, command, workdir, gpus=0)
        jobs.append(Job(name, step, stage, script_dir / f"{stage}.sbatch", text, array, (after,) if after else (),
                        (command,)))
        after = name
    return jobs


def render_record(config, run, step: int, slurm: SlurmConfig, workdir: Path, after: tuple[str, ...],
                  evaluates: bool) -> Job:
    """`antisd loop --record-only` once step `step`'s update is done: its metrics, trackers, pruning and (when
    `evaluates`: one GPU) the held-out evaluation."""
    command = shlex.join(["antisd", "loop", "--config", str(run.root / "config.yaml"), "--out", str(run.root),
                          "--record-only"])
    name = f"{step:04d}-record"
    what = "metrics, held-out evaluation, checkpoint pruning" if evaluates else "metrics, checkpoint pruning"
    log_path = run.root / "slurm" / f"step_{step:04d}" / "record-%j.log"
    text = render_single(slurm, f"antisd-{run.root.name}-{name}", log_path, f"step {step}, record: {what}", command,
                         workdir, gpus=1 if evaluates else 0)
    return Job(name, step, "record", log_path.parent / "record.sbatch", text, None, after, (command,))


def continue_flags(slurm: SlurmConfig) -> list[str]:
    """The `antisd loop --launcher slurm` options that render `slurm` again (dry_run excluded)."""
    flags = ["--time", slurm.time, "--nodes", str(slurm.nodes), "--gpus-per-node", str(slurm.gpus_per_node),
             "--shards", str(slurm.shards), "--cpus-per-task", str(slurm.cpus_per_task), "--window", str(slurm.window)]
    for option, value in (("--partition", slurm.partition), ("--cpu-partition", slurm.cpu_partition),
                          ("--account", slurm.account)):
        flags += [option, value] if value else []
    for line in slurm.setup:
        flags += ["--setup", line]
    return flags + [f"--sbatch-arg={arg}" for arg in slurm.sbatch_args]


def render_continue(run, slurm: SlurmConfig, workdir: Path, after: tuple[str, ...], next_step: int) -> Job:
    """The window's last job: submits the next window (from step `next_step`) by running this launcher again."""
    command = shlex.join(["antisd", "loop", "--config", str(run.root / "config.yaml"), "--out", str(run.root),
                          "--launcher", "slurm", *continue_flags(slurm)])
    log_path = run.root / "slurm" / f"continue-{next_step:04d}-%j.log"
    text = render_single(slurm, f"antisd-{run.root.name}-continue", log_path,
                         f"submit the next window of steps (from step {next_step})", command, workdir, gpus=0)
    return Job("continue", None, "continue", run.root / "slurm" / "continue.sbatch", text, None, after, (command,))


def render_run(config, slurm: SlurmConfig, workdir: Path | None = None) -> list[Job]:
    """Create/reopen the run directory, draw the prompts of the next window of unfinished steps and write their
    scripts; returns the jobs to submit (empty when every step is finished)."""
    from stages.common.io import atomic_write_text
    from stages.runs.plan import eval_due, opened_run, with_run_variant, write_commands, write_step_prompts

    workdir = (workdir or Path.cwd()).resolve()
    config = with_run_variant(replace(config, out=str(Path(config.out).resolve())))
    check_paths(Path(config.out), workdir)
    settings = config.run.loop
    with opened_run(config) as (run, _, train_table, eval_path):
        unfinished = [step for step in range(settings.steps) if not run.done(step, "step")]
        window = unfinished[:slurm.window]
        jobs: list[Job] = []
        chain, record = None, None  # the last stage job (the next step waits for it), the last record job
        base_pending = eval_path is not None and not run.base_record.exists()
        for step in window:
            run.step_dir(step).mkdir(exist_ok=True)
            write_step_prompts(config, run, step, train_table)
            write_commands(run, step, job_configs(config, run, step))
            stage_jobs = render_step(config, run, step, slurm, workdir, chain)
            jobs += stage_jobs
            chain = stage_jobs[-1].name if stage_jobs else chain
            waits = tuple(name for name in (stage_jobs[-1].name if stage_jobs else None, record) if name)
            evaluates = eval_path is not None and (eval_due(settings, step) or (base_pending and record is None))
            jobs.append(render_record(config, run, step, slurm, workdir, waits, evaluates))
            record = jobs[-1].name
        if len(unfinished) > len(window):
            jobs.append(render_continue(run, slurm, workdir, (record,), unfinished[len(window)]))
        for job in jobs:
            job.script.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(job.script, job.text)
        atomic_write_text(run.root / "slurm" / "submit.sh", submit_script(jobs))
    return jobs


def dry_run_text(jobs: list[Job], submit_path: Path) -> str:
    """Every script, then the sbatch commands of the chain (what `--dry-run` prints)."""
    blocks = [f"# ==> {job.script} <==\n{job.text}" for job in jobs]
    blocks.append(f"# ==> {submit_path} (sbatch commands; run it to submit) <==\n{submit_script(jobs)}")
    return "\n".join(blocks)


def check_update_ranks(config, world_size: int) -> None:
    """What each update job would refuse at its start: ZeRO-3 on several ranks (stages.training.batch)."""
    from stages.training.batch import check_zero3_ranks, zero_stage

    check_zero3_ranks(zero_stage(config.run.update), world_size)


def run(config, slurm: SlurmConfig, workdir: Path | None = None, echo=print) -> Path:
    """Render the run's next window of jobs and submit them (or, with `slurm.dry_run`, print them); returns the run
    directory. Refused (before anything is written) while jobs of an earlier submission are still queued."""
    from stages.common.errors import InputError

    root = Path(config.out).resolve()
    if config.run.loop.dynamic_sampling:
        raise InputError("loop.dynamic_sampling: not available with --launcher slurm (a step's draws depend on its "
                         "verified rewards, one job chain cannot plan them); run it with the local launcher")
    check_update_ranks(config, slurm.nodes * slurm.gpus_per_node)
    if not slurm.dry_run:
        queued = queued_jobs(root / "slurm" / "jobs.json")
        if queued:
            raise InputError(f"--out {root}: {len(queued)} job(s) of an earlier submission are still queued or "
                             f"running ({', '.join(queued[:5])}{', …' if len(queued) > 5 else ''}); wait for them "
                             "or scancel them before submitting again")
    jobs = render_run(config, slurm, workdir)
    if slurm.dry_run:
        echo(dry_run_text(jobs, root / "slurm" / "submit.sh"))
        return root
    if not jobs:
        log.info("%s: every step is finished; nothing to submit", root)
        return root
    submit(jobs, root / "slurm" / "jobs.json")
    return root
