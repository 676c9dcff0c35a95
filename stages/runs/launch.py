"""Launching `antisd loop` as N resident ranks: `antisd loop --nproc N` (torchrun on this node, started for you) and
`antisd loop --launcher slurm --resident` (one sbatch job holding nodes × GPUs for the whole run: `srun` starts one
`torchrun` per node, which meet at a c10d rendezvous on the first node and start one rank per GPU).

Both run the same command as `torchrun --nproc-per-node N -m antisd_cli loop -c CONFIG -o RUN` typed by hand; what
the ranks do is `stages.loop` and `stages.runs.ranks`. The rendered job quotes every value as the per-stage renderer
does (`stages.runs.slurm`: paths in shell lines shell-quoted, #SBATCH values double-quoted when they hold a space,
control characters refused); its id goes to RUN/slurm/jobs.json, and submitting again while it is queued or running
is refused. A job that ends before the run (its time limit): submit the same command again, the run resumes. This
module renders text and starts processes; it runs no stage.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from stages.common.errors import InputError

log = logging.getLogger(__name__)


def torchrun_argv(nproc: int, loop_args: list[str], global_args: list[str] = ()) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m antisd_cli [GLOBAL] loop LOOP_ARGS`: the
    launch `antisd loop --nproc N` runs (this interpreter's torchrun, a rendezvous on a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "antisd_cli", *global_args, "loop", *loop_args]


def check_not_launched(environ) -> None:
    """`--nproc` starts the ranks itself: refused inside a launch (torchrun, srun) that started this process."""
    from stages.training.distributed import env_from

    env = env_from(environ)
    if env.world_size > 1:
        raise InputError(f"--nproc: this process is rank {env.rank} of {env.world_size} already ({env.launcher} "
                         "launcher); drop --nproc, or start antisd without the launcher")


def resident_script(config, slurm, workdir: Path) -> str:
    """The sbatch script of a resident run of `config` (a LoopConfig with an absolute out) on `slurm.nodes` ×
    `slurm.gpus_per_node` GPUs: one task per node, `torchrun` in it starting a rank per GPU."""
    from stages.runs.slurm import job_preamble, sbatch_header

    root, ranks = Path(config.out), slurm.nodes * slurm.gpus_per_node
    node_cpus = slurm.cpus_per_task * slurm.gpus_per_node
    directives = [f"--nodes={slurm.nodes}", "--ntasks-per-node=1", f"--gpus-per-node={slurm.gpus_per_node}",
                  f"--cpus-per-task={node_cpus}"]
    title = f"the whole run, {ranks} resident ranks ({slurm.nodes} node(s) × {slurm.gpus_per_node} GPUs)"
    header = sbatch_header(slurm, f"antisd-{root.name}-resident", root / "slurm" / "resident-%j.log", title,
                           directives, origin="`antisd loop --launcher slurm --resident`; submit it again to resume")
    config_file, out = shlex.quote(str(root / "config.yaml")), shlex.quote(str(root))
    torchrun = (f"torchrun --nnodes {slurm.nodes} --nproc-per-node {slurm.gpus_per_node} \\\n"
                '    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \\\n'
                f"    -m antisd_cli loop --config {config_file} --out {out}")
    body = [
        "",
        "# The rendezvous: torchrun's c10d store on the first node, a port per job (jobs sharing a node do not clash).",
        "# (awk reads all of scontrol's output: `head -n 1` could make it die of SIGPIPE under pipefail)",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk \'NR == 1\')"',
        'MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"',
        "export MASTER_ADDR MASTER_PORT",
        f"export OMP_NUM_THREADS={slurm.cpus_per_task}  # per rank",
        "# One task per node holds the node's GPUs and CPUs; srun does not inherit sbatch's --cpus-per-task since",
        "# Slurm 22.05, so it is passed on.",
        f"export SRUN_CPUS_PER_TASK={node_cpus}",
        f"srun --kill-on-bad-exit=1 --cpus-per-task={node_cpus} \\\n    " + torchrun,
        "",
    ]
    return "\n".join(header + job_preamble(slurm, workdir) + body)


def run_resident(config, slurm, workdir: Path | None = None, echo=print) -> Path:
    """Render (and, without `slurm.dry_run`, submit) the resident job of `config`; returns the run directory.
    Everything the ranks would refuse at their start is refused here first, before anything is written."""
    from dataclasses import replace

    from stages.common.io import atomic_write_text
    from stages.runs.plan import opened_run, with_run_variant
    from stages.runs.ranks import check_launch
    from stages.runs.scheduler import queued_jobs, submit
    from stages.runs.slurm import Job, check_paths
    from stages.training.distributed import DistEnv

    workdir = (workdir or Path.cwd()).resolve()
    config = with_run_variant(replace(config, out=str(Path(config.out).resolve())))
    root = Path(config.out)
    check_paths(root, workdir)
    ranks = slurm.nodes * slurm.gpus_per_node
    check_launch(config.run, DistEnv(world_size=ranks), config.run.rollout.engine,
                 out=config.out, node_ranks=slurm.gpus_per_node)
    if not slurm.dry_run:
        queued = queued_jobs(root / "slurm" / "jobs.json")
        if queued:
            raise InputError(f"--out {root}: job(s) {', '.join(queued[:5])} of an earlier submission are still queued "
                             "or running; wait for them or scancel them before submitting again")
    with opened_run(config) as (run, _, _, _):
        script = run.root / "slurm" / "resident.sbatch"
        text = resident_script(config, slurm, workdir)
        script.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(script, text)
    job = Job("resident", None, "resident", script, text)
    if slurm.dry_run:
        echo(f"# ==> {script} <==\n{text}\n# submit with: sbatch {shlex.quote(str(script))}")
        return root
    submit([job], root / "slurm" / "jobs.json")
    return root
