"""`antisd loop`: run or resume rollout → verify → score → update (→ eval) for N steps, here or on Slurm."""

from __future__ import annotations

import click
from click.core import ParameterSource

from antisd_cli.options import BadInput, config_option, stage_errors
from stages.runs.config import LoopConfig
from stages.runs.slurm import SlurmConfig

SLURM = SlurmConfig()  # defaults shown in --help come from the dataclass
SLURM_OPTIONS = ("dry_run", "partition", "cpu_partition", "account", "time", "nodes", "gpus_per_node", "shards",
                 "cpus_per_task", "window", "setup", "sbatch_args")


@click.command("loop")
@click.option("--config", "-c", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Run config YAML (sections: loop, rollout, verify, score, update).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Run directory; rerunning the same command resumes it.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one config value, e.g. --set update.lr=2e-6 --set loop.steps=50 (repeatable).")
@config_option(LoopConfig, "force", "Resume a run directory made with a different config.")
@click.option("--print-config", is_flag=True, help="Print every setting of the run at the value a step uses (defaults, "
                                                    "the variant's presets and --set applied) as YAML, and exit.")
@click.option("--record-only", is_flag=True, default=LoopConfig.record_only,
              help="Run no stage: write the metrics, trackers, checkpoint pruning and due evaluations of the steps "
                   "whose update is done, and stop at the first that is not (what each Slurm record job runs).")
@click.option("--nproc", default=1, type=click.IntRange(min=1),
              help="local: run as this many resident ranks on this node (one per GPU): starts torchrun "
                   "--standalone --nproc-per-node N -m antisd_cli loop with the same arguments.")
@click.option("--launcher", type=click.Choice(["local", "slurm"]), default="local",
              help="local: run every stage here (as one process, or as the ranks torchrun started). slurm: write one "
                   "sbatch script per stage per step under OUT/slurm/ and submit them as a dependency chain, or with "
                   "--resident one job for the whole run (the options below).")
@click.option("--resident", is_flag=True,
              help="slurm: one job holding --nodes × --gpus-per-node GPUs for the whole run: srun starts one torchrun "
                   "per node (c10d rendezvous), one resident rank per GPU (OUT/slurm/resident.sbatch).")
@click.option("--dry-run", is_flag=True, help="slurm: write and print the scripts and sbatch commands; submit nothing.")
@click.option("--partition", default=SLURM.partition, help="slurm: partition of every job.")
@click.option("--cpu-partition", default=SLURM.cpu_partition,
              help="slurm: partition of the jobs that need no GPU (verify, record without evaluation, continue); "
                   "default: --partition.")
@click.option("--account", default=SLURM.account, help="slurm: account charged for every job.")
@click.option("--time", "time_limit", default=SLURM.time, help="slurm: time limit of each job (HH:MM:SS).")
@click.option("--nodes", default=SLURM.nodes, type=click.IntRange(min=1),
              help="slurm: nodes of the update job (--resident: of the one job).")
@click.option("--gpus-per-node", default=SLURM.gpus_per_node, type=click.IntRange(min=1),
              help="slurm: GPUs per update node (--resident: per node of the job), one rank each.")
@click.option("--shards", default=SLURM.shards, type=click.IntRange(min=1),
              help="slurm: array tasks (one GPU each) of rollout and score; 1 = one plain job.")
@click.option("--cpus-per-task", default=SLURM.cpus_per_task, type=click.IntRange(min=1),
              help="slurm: CPUs of every task (a shard, a training rank, verify).")
@click.option("--window", default=SLURM.window, type=click.IntRange(min=1),
              help="slurm: steps per submission (~5 jobs each); the window's last job submits the next one.")
@click.option("--setup", multiple=True, metavar="SHELL-LINE",
              help="slurm: a shell line run first in every job, e.g. 'source ~/venvs/antisd/bin/activate' "
                   "(repeatable).")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="OPTION",
              help="slurm: an extra #SBATCH option for every job, e.g. --sbatch-arg=--qos=high (repeatable).")
@click.pass_context
@stage_errors
def loop_command(ctx, config_path, out, overrides, force, print_config, record_only, nproc, launcher, resident,
                 dry_run, partition, cpu_partition, account, time_limit, nodes, gpus_per_node, shards, cpus_per_task,
                 window, setup, sbatch_args):
    """Train with GRPO / SD / AntiSD: each step runs rollout → verify → score → update.

    Every stage writes its ordinary Parquet output under OUT/step_XXXX/, with the equivalent `antisd` commands in
    commands.sh. After a crash or kill -9, rerunning the same command resumes at the first unfinished stage and gives
    the same final weights as an uninterrupted run.

    As N ranks (`torchrun --nproc-per-node N -m antisd_cli loop …`, or --nproc N) every rank keeps its part
    resident: its ZeRO shard of the trainer, its policy or vLLM engine, its share of each step's sampling and scoring;
    rank 0 owns the run directory and merges the ranks' part files into the same files.

    With --launcher slurm the same commands run as Slurm jobs: rollout and score as array jobs over --shards,
    verify as one CPU job, update on --nodes × --gpus-per-node GPUs under srun, then a record job that writes the
    step's metrics (and evaluates when due), --window steps per submission, the last job submitting the next window.
    Job ids go to OUT/slurm/jobs.json; resubmitting skips finished stages and is refused while earlier jobs of the
    run are still queued. With --resident one job runs the whole run as --nodes × --gpus-per-node resident ranks.

    \b
    Example:
      antisd loop --config examples/configs/arith_antisd.yaml --out runs/antisd_s0
      antisd loop -c examples/configs/arith_antisd.yaml -o runs/grpo_s0 --set update.method=grpo
      torchrun --standalone --nproc-per-node 8 -m antisd_cli loop -c examples/configs/gsm8k_gpu.yaml -o runs/gsm8k
      antisd loop -c examples/configs/gsm8k_gpu.yaml -o runs/gsm8k --launcher slurm --resident --nodes 4 \\
        --gpus-per-node 8 --setup 'source ~/venvs/antisd/bin/activate' --dry-run
      antisd loop -c examples/configs/gsm8k_gpu.yaml -o runs/gsm8k --launcher slurm --partition gpu \\
        --shards 8 --nodes 2 --gpus-per-node 8 --setup 'source ~/venvs/antisd/bin/activate' --dry-run
    """
    import os

    from stages.loop import run
    from stages.runs import config as run_config

    _check_launch_options(ctx, launcher, record_only, nproc, resident)
    resolved = run_config.load(config_path, list(overrides))
    loop_config = LoopConfig(out=out, run=resolved, force=force, record_only=record_only)
    if print_config:
        import yaml

        from stages.runs.plan import resolved_settings, with_run_variant

        click.echo(yaml.safe_dump(resolved_settings(with_run_variant(loop_config).run), sort_keys=False), nl=False)
        return
    if nproc > 1:
        _start_ranks(ctx, nproc, config_path, out, overrides, force, record_only)
        return
    if launcher == "local":
        from stages.training.distributed import env_from

        root = run(loop_config)
        if env_from(os.environ).is_main:  # one line per run, not per rank
            click.echo(str(root))
        return
    from stages.runs import slurm
    settings = SlurmConfig(partition=partition, cpu_partition=cpu_partition, account=account, time=time_limit,
                           nodes=nodes, gpus_per_node=gpus_per_node, shards=shards, cpus_per_task=cpus_per_task,
                           setup=tuple(setup), sbatch_args=tuple(sbatch_args), window=window, dry_run=dry_run)
    if resident:
        from stages.runs.launch import run_resident

        root = run_resident(loop_config, settings, echo=click.echo)
    else:
        root = slurm.run(loop_config, settings, echo=click.echo)
    if not dry_run:
        click.echo(str(root))


def _check_launch_options(ctx, launcher: str, record_only: bool, nproc: int, resident: bool) -> None:
    """Options that belong to another launcher, refused in one line (exit 2) before anything runs."""
    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    if launcher == "local":
        flags = [name for name in SLURM_OPTIONS if given(name)] + (["time"] if given("time_limit") else []) + \
            (["resident"] if resident else [])
        if flags:
            flags = ", ".join("--" + name.replace("_", "-").replace("sbatch-args", "sbatch-arg") for name in flags)
            raise BadInput(f"{flags}: only with --launcher slurm")
    elif record_only:
        raise BadInput("--record-only: only with --launcher local (the Slurm record jobs run it)")
    elif nproc > 1:
        raise BadInput("--nproc: only with --launcher local (Slurm: --nodes and --gpus-per-node)")
    elif resident:
        chain_only = [name for name in ("shards", "window", "cpu_partition") if given(name)]
        if chain_only:
            raise BadInput(f"--{chain_only[0].replace('_', '-')}: only without --resident (the per-stage chain)")


def _start_ranks(ctx, nproc: int, config_path, out, overrides, force, record_only) -> None:
    """`--nproc N`: the same loop as N ranks under torchrun on this node; exits with torchrun's status."""
    import os
    import subprocess

    from stages.runs.launch import check_not_launched, torchrun_argv

    if record_only:
        raise BadInput("--record-only: one process (what each Slurm record job runs), not --nproc")
    check_not_launched(os.environ)
    root = ctx.find_root().params
    global_args = ["-v"] * root.get("verbose", 0) + (["-q"] if root.get("quiet") else [])
    loop_args = ["--out", out] + (["--config", config_path] if config_path else []) + \
        [arg for value in overrides for arg in ("--set", value)] + (["--force"] if force else [])
    code = subprocess.call(torchrun_argv(nproc, loop_args, global_args))
    if code:
        raise click.exceptions.Exit(code)
