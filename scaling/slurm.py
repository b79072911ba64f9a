"""The grid as a SLURM job array: `dit-scaling grid ... --launcher slurm` hands its runs to the cluster's scheduler
instead of running them itself.

One array task per run. The runs' resolved configs go to a plan file (runs.json) beside the batch script; task i
runs `python -m scaling.worker --plan runs.json` under srun, which trains the plan's run i (one process, or one
per task of a multi-task step, joined by jax.distributed from SLURM's environment). The array is requeueable, and
`--signal` sends SIGTERM to the tasks SIGNAL_SECONDS before the time limit: a run checkpoints at its next step and
exits with scaling.preemption.EXIT_CODE, after which the batch script requeues its own task, so a grid longer than
the time limit continues where it stopped. A task requeued by SLURM itself (`scontrol requeue`, preemption) gets
the same SIGTERM.

Every submission is recorded in the scheduler directory's submissions.jsonl (job id, plan, models by task). A
second submission of the same grid leaves out the finished runs and those whose task of an earlier submission is
still pending or running; a run that another writer holds anyway is refused by its lease (scaling.lease).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from etils import epath

from analysis import storage
from scaling.preemption import EXIT_CODE

SCHEDULER_DIR = "slurm"  # in the grid's runs directory
SUBMISSIONS_FILE = "submissions.jsonl"
SIGNAL_SECONDS = 300  # the warning before the time limit: a checkpoint of the largest config takes well under this
ACTIVE_STATES = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING")


class LauncherError(ValueError):
    """The scheduler cannot take the grid (its commands are missing, it refused the job, it cannot be asked)."""


def scheduler_dir(runs_dir: epath.Path) -> epath.Path:
    """Where the batch scripts, plans, task logs and submissions go: on the runs directory's file system, which
    SLURM's nodes share (SLURM writes task logs to local paths, so not an object store)."""
    if storage.is_url(runs_dir):
        raise LauncherError(f"--launcher slurm: {runs_dir} is on an object store, where SLURM cannot write its task "
                            "logs; give the grid a --workdir on the cluster's shared file system.")
    return runs_dir / SCHEDULER_DIR


def _command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LauncherError(f"--launcher slurm needs SLURM's `{name}` on PATH, and this machine has none: run the "
                            "grid on a login node of the cluster (or add --dry-run to print the batch script only).")
    return path


def batch_script(plan: epath.Path, count: int, logs: epath.Path, sbatch_args: list[str], *,
                 python: str = sys.executable) -> str:
    """The job array's batch script: one task per planned run. `sbatch_args` come last, so that they override the
    defaults (e.g. --signal=TERM@900 for a slower checkpoint)."""
    for arg in sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise LauncherError(f"--sbatch-arg {arg!r}: give one sbatch option per flag, e.g. "
                                "--sbatch-arg=--partition=gpu (no newlines).")
    options = ["--job-name=dit-grid", f"--array=0-{count - 1}", "--requeue", "--open-mode=append",
               f"--output={logs}/task-%a.out", f"--signal=TERM@{SIGNAL_SECONDS}", *sbatch_args]
    task = f"{shlex.quote(python)} -m scaling.worker --plan {shlex.quote(str(plan))}"
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        "# SIGTERM (the time limit's warning, a requeue, a preemption) goes to the tasks, which checkpoint and exit",
        f"# with {EXIT_CODE}; this shell outlives it and requeues its own task when the run stopped early.",
        "trap '' TERM",
        f"srun --kill-on-bad-exit=1 {task}",
        "code=$?",
        f'if [ "$code" -eq {EXIT_CODE} ]; then',
        '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" || true',
        "fi",
        'exit "$code"',
        ""])


def submissions(runs_dir: epath.Path) -> list[dict]:
    path = scheduler_dir(runs_dir) / SUBMISSIONS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def task_states(runs_dir: epath.Path) -> dict[str, str]:
    """{run directory name: "JOB_TASK STATE"} for the runs whose task of a recorded submission SLURM still knows
    (pending, running, requeued, ...)."""
    recorded = submissions(runs_dir)
    if not recorded:
        return {}
    squeue = _command("squeue")
    jobs = ",".join(str(s["job_id"]) for s in recorded)
    result = subprocess.run([squeue, "-h", "-r", "-j", jobs, "-o", "%i %T"], capture_output=True, text=True)
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        raise LauncherError(f"squeue could not say what the grid's jobs are doing ({result.stderr.strip()}); "
                            "without it a resubmission could start a second writer: try again when it answers.")
    run_of = {(str(s["job_id"]), str(i)): run for s in recorded for i, run in enumerate(s["runs"])}
    states = {}
    for line in result.stdout.splitlines():
        task, _, state = line.strip().partition(" ")
        job, _, index = task.partition("_")
        run = run_of.get((job, index))
        if run is not None:
            states[run] = f"{task} {state}"
    return states


def submit(runs: dict[str, epath.Path], configs: dict, runs_dir: epath.Path, sbatch_args: list[str], *,
           dry_run: bool = False) -> dict:
    """Hand `runs` ({model: workdir}, the unfinished runs of a grid) to SLURM as one job array. Runs whose task of
    an earlier submission is still pending or running are left out. Returns {"job_id", "script", "runs",
    "waiting"}; job_id is None when nothing was submitted (dry_run, or no run left)."""
    directory = scheduler_dir(runs_dir)
    known = {} if dry_run and shutil.which("squeue") is None else task_states(runs_dir)
    waiting = {run: state for run, state in known.items() if state.split()[-1] in ACTIVE_STATES}
    todo = {model: workdir for model, workdir in runs.items() if workdir.name not in waiting}
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    array_dir = directory / f"array-{stamp}"
    plan = array_dir / "runs.json"
    script = batch_script(plan, max(1, len(todo)), array_dir, sbatch_args)
    result = {"job_id": None, "script": script, "runs": list(todo), "waiting": waiting, "directory": array_dir}
    if dry_run or not todo:
        return result
    sbatch = _command("sbatch")
    array_dir.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps({"runs": [{"model": model, "workdir": str(workdir),
                                          "config": configs[model].to_dict()} for model, workdir in todo.items()]},
                               indent=1, default=str) + "\n")
    (array_dir / "array.sbatch").write_text(script)
    submitted = subprocess.run([sbatch, "--parsable", str(array_dir / "array.sbatch")], capture_output=True,
                               text=True)
    if submitted.returncode != 0:
        raise LauncherError(f"sbatch refused the grid's job array ({submitted.stderr.strip() or submitted.stdout}); "
                            f"its script is {array_dir / 'array.sbatch'}: fix the --sbatch-arg options it names and "
                            "run the same command again.")
    job_id = submitted.stdout.strip().split(";")[0]
    record = {"job_id": job_id, "plan": str(plan), "runs": [todo[m].name for m in todo], "models": list(todo),
              "steps": [int(configs[m].train.steps) for m in todo],
              "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(directory / SUBMISSIONS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    return {**result, "job_id": job_id}


def planned_run(plan_path: str) -> tuple[str, epath.Path, dict]:
    """The (model, workdir, config dict) of this array task's run (SLURM_ARRAY_TASK_ID) in a plan file."""
    index = os.environ.get("SLURM_ARRAY_TASK_ID")
    if index is None:
        raise LauncherError("scaling.worker --plan runs inside a SLURM array task (SLURM_ARRAY_TASK_ID unset).")
    runs = json.loads(epath.Path(plan_path).read_text())["runs"]
    entry = runs[int(index)]
    return entry["model"], epath.Path(entry["workdir"]), entry["config"]
