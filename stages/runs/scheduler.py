"""The calls to the Slurm scheduler of `antisd loop --launcher slurm`: `sbatch` for the rendered jobs
(`stages.runs.slurm`), with their ids recorded in RUN/slurm/jobs.json, and `squeue` for the jobs still queued."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


def sbatch_argv(job, after_ids: list[str]) -> list[str]:
    """`sbatch --parsable [--dependency=afterok:ID[:ID] --kill-on-invalid-dep=yes] SCRIPT` (the array is in the
    script)."""
    argv = ["sbatch", "--parsable"]
    if after_ids:
        argv += [f"--dependency=afterok:{':'.join(after_ids)}", "--kill-on-invalid-dep=yes"]
    return argv + [str(job.script)]


def submit(jobs: list, jobs_json: Path, sbatch_runner=None) -> dict[str, str]:
    """Submit `jobs` (`stages.runs.slurm.Job`s) in order with `sbatch --parsable`, each after the jobs it waits for;
    record their ids in `jobs_json`.

    The record is written after every submission, so a failure half-way leaves the ids already submitted.
    """
    from stages.common.io import atomic_write_json
    runner = sbatch_runner or _run_sbatch
    history = json.loads(jobs_json.read_text()) if jobs_json.exists() else {"submissions": []}
    entry = {"submitted_unix": time.time(), "jobs": []}
    history["submissions"].append(entry)
    ids: dict[str, str] = {}
    for job in jobs:
        argv = sbatch_argv(job, [ids[name] for name in job.after])
        ids[job.name] = runner(argv)
        entry["jobs"].append({"name": job.name, "step": job.step, "stage": job.stage, "job_id": ids[job.name],
                              "after": list(job.after), "array": job.array, "script": str(job.script), "argv": argv})
        atomic_write_json(jobs_json, history)
        log.info("submitted %s as job %s%s", job.name, ids[job.name],
                 f" (after {', '.join(job.after)})" if job.after else "")
    return ids


def _run_sbatch(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError("sbatch: not found on PATH (run on a Slurm login node, or pass --dry-run)") from None
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): {message[-1] if message else ''}")
    job_id = result.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    if not job_id.isdigit():
        raise RuntimeError(f"{shlex.join(argv)}: unexpected output {result.stdout.strip()!r}")
    return job_id


def queued_jobs(jobs_json: Path, squeue_runner=None) -> list[str]:
    """Ids of this run's earlier submissions (RUN/slurm/jobs.json) that `squeue` still lists, the calling job
    (SLURM_JOB_ID: a `continue` job submitting the next window) excluded; [] when squeue is not on PATH."""
    if not jobs_json.exists():
        return []
    submitted = {job["job_id"] for entry in json.loads(jobs_json.read_text())["submissions"] for job in entry["jobs"]}
    submitted.discard(os.environ.get("SLURM_JOB_ID", ""))
    listed = (squeue_runner or _run_squeue)()
    return sorted(submitted & listed, key=int) if listed is not None else []


def _run_squeue() -> set[str] | None:
    """Job ids the scheduler lists for this user (arrays by their array job id); None when squeue is missing."""
    import getpass

    try:
        result = subprocess.run(["squeue", "--noheader", f"--user={getpass.getuser()}", "--format=%A"],
                                capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    if result.returncode != 0:
        raise RuntimeError(f"squeue failed ({result.returncode}): {result.stderr.strip()}")
    return {line.strip() for line in result.stdout.splitlines() if line.strip()}
