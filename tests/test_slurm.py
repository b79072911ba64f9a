"""`grid --launcher slurm` against a real SLURM: a one-node cluster of Debian's slurmctld, slurmd and munge on this
machine (tests/slurm_cluster.py), with the grid's smoke runs as array tasks."""

import json
import os
import subprocess
import time

import pytest
import slurm_cluster

from analysis import schema
from scaling import slurm
from scaling.cli import main

SMOKE = ["--config", "fmnist:smoke", "--config.model.depth=1"]  # 20 steps of a one-block DiT: seconds per run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        pytest.skip(why)
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(cluster.environment)
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def _grid(runs, fmnist_dir, models, *extra):
    return main(["grid", *SMOKE, "--workdir", str(runs), "--models", models, "--launcher", "slurm",
                 f"--config.data.path={fmnist_dir}", *extra])


def _queued(cluster) -> list[str]:
    """The cluster's array tasks still pending or running, as "JOB_TASK STATE REASON"."""
    return cluster.run("squeue", "-h", "-r", "-o", "%i %T %r").stdout.splitlines()


def _wait(predicate, what: str, timeout: float = 240.0, cluster=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    queue = "\n".join(_queued(cluster)) if cluster else ""
    pytest.fail(f"timed out waiting for {what}; the queue:\n{queue}")


def _manifest(workdir):
    try:
        return schema.read_manifest(workdir)
    except (json.JSONDecodeError, OSError):  # being written
        return None


def _steps(workdir) -> list[int]:
    return [record.step for record in schema.read_steps(workdir)]


def _task_log(runs) -> str:
    return "".join(p.read_text() for p in sorted((runs / slurm.SCHEDULER_DIR).glob("array-*/task-*.out")))


def test_a_grid_is_one_job_array_that_trains_every_run_once(cluster, fmnist_dir, tmp_path, capsys):
    runs, models = tmp_path / "runs", "S/8,S/4,B/8"  # more tasks than a 2-core node runs at once
    assert _grid(runs, fmnist_dir, models, "--sbatch-arg=--cpus-per-task=1") == 0
    job = json.loads((runs / slurm.SCHEDULER_DIR / slurm.SUBMISSIONS_FILE).read_text())["job_id"]
    assert f"submitted job array {job}: 3 task(s)" in capsys.readouterr().out
    # Submitted again while its tasks wait or run: nothing is submitted twice.
    assert _grid(runs, fmnist_dir, models) == 0
    out = capsys.readouterr().out
    assert "nothing to submit" in out and out.count("of an earlier submission is still pending or running") == 3
    assert main(["status", str(runs)]) == 0
    assert capsys.readouterr().out.count(f"slurm {job}_") == 3
    _wait(lambda: not _queued(cluster), "the array to finish", cluster=cluster)
    for name in ("DiT-S-8", "DiT-S-4", "DiT-B-8"):
        manifest = schema.read_manifest(runs / name)
        assert (manifest.status, manifest.final_step) == ("finished", 20), _task_log(runs)
        assert _steps(runs / name) == [5, 10, 15, 20]  # every record once
    assert _grid(runs, fmnist_dir, models) == 0
    out = capsys.readouterr().out
    assert "finished already, left out: S/8, S/4, B/8" in out and "nothing to submit" in out
    assert len(slurm.submissions(runs)) == 1


def test_a_requeued_task_resumes_from_its_checkpoint(cluster, fmnist_dir, tmp_path):
    runs = tmp_path / "runs"
    long = ["--config.train.steps=6000", "--config.train.log_every=100", "--config.train.checkpoint_every=500"]
    assert _grid(runs, fmnist_dir, "S/8", *long) == 0
    workdir = runs / "DiT-S-8"
    _wait(lambda: len(_steps(workdir)) >= 10 if (workdir / schema.STEPS_FILE).is_file() else False,
          "1000 steps", cluster=cluster)
    (task,) = [line.split()[0] for line in _queued(cluster)]
    cluster.run("scontrol", "requeue", task)
    stopped = _wait(lambda: (m := _manifest(workdir)) and m.status == "preempted" and m.stopped_step,
                    "the run to checkpoint on the requeue's SIGTERM", cluster=cluster)
    _wait(lambda: any("PENDING" in line for line in _queued(cluster)), "the task to be pending again")
    cluster.run("scontrol", "update", f"JobId={task}", "StartTime=now")  # SLURM delays a requeued task 2 minutes
    _wait(lambda: not _queued(cluster), "the requeued task to finish", cluster=cluster)
    manifest = schema.read_manifest(workdir)
    assert (manifest.status, manifest.final_step) == ("finished", 6000), _task_log(runs)
    assert [start["step"] for start in manifest.starts] == [0, stopped]  # resumed where it stopped
    assert _steps(workdir) == list(range(100, 6001, 100))  # none lost, none twice
    assert f"Resuming {workdir} from step {stopped}" in _task_log(runs)


def test_a_two_task_step_trains_one_run_as_two_processes(cluster, fmnist_dir, tmp_path):
    runs = tmp_path / "runs"
    assert _grid(runs, fmnist_dir, "S/8", "--sbatch-arg=--ntasks=2", "--sbatch-arg=--cpus-per-task=1") == 0
    _wait(lambda: not _queued(cluster), "the two-process run to finish", cluster=cluster)
    manifest = schema.read_manifest(runs / "DiT-S-8")
    assert (manifest.status, manifest.final_step) == ("finished", 20), _task_log(runs)
    assert manifest.starts[-1]["devices"]["processes"] == 2
    assert _steps(runs / "DiT-S-8") == [5, 10, 15, 20]


def test_the_time_limit_warning_checkpoints_and_the_task_requeues_itself(cluster, fmnist_dir, tmp_path):
    runs = tmp_path / "runs"
    assert _grid(runs, fmnist_dir, "S/8", "--sbatch-arg=--time=10", "--sbatch-arg=--signal=TERM@50",
                 "--config.train.steps=1000000", "--config.train.log_every=500",
                 "--config.train.checkpoint_every=1000000") == 0
    workdir = runs / "DiT-S-8"
    _wait(lambda: (workdir / schema.STEPS_FILE).is_file() and _steps(workdir), "training", cluster=cluster)
    (task,) = [line.split()[0] for line in _queued(cluster)]
    # One minute in all: the warning, 50 s before the end, is due at once (SLURM checks about every 30 s).
    cluster.run("scontrol", "update", f"JobId={task}", "TimeLimit=1")
    stopped = _wait(lambda: (m := _manifest(workdir)) and m.status == "preempted" and m.stopped_step,
                    "the time limit's warning", timeout=120, cluster=cluster)
    assert (workdir / "checkpoints" / str(stopped)).is_dir()  # checkpointed where it stopped, not at a cadence
    # Pending again: requeued by its batch script (a task that ended otherwise would have left the queue).
    _wait(lambda: [line for line in _queued(cluster) if "PENDING" in line], "the task to requeue itself")
    cluster.run("scancel", task.split("_")[0])


def test_a_refusal_and_a_missing_sbatch_are_named_and_nothing_is_recorded(cluster, fmnist_dir, tmp_path, capsys,
                                                                         monkeypatch):
    runs = tmp_path / "runs"
    assert _grid(runs, fmnist_dir, "S/8", "--sbatch-arg=--partition=no-such-partition") == 2
    err = capsys.readouterr().err
    assert "sbatch refused the grid's job array" in err and "invalid partition" in err.lower()
    assert slurm.submissions(runs) == []
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands
    assert _grid(runs, fmnist_dir, "S/8") == 2
    assert "needs SLURM's `sbatch` on PATH" in capsys.readouterr().err
    assert not (runs / slurm.SCHEDULER_DIR / slurm.SUBMISSIONS_FILE).exists()


def test_a_notice_while_the_task_starts_stops_the_run_at_its_first_step(fmnist_dir, tmp_path):
    """SIGTERM while a task starts up, before the run's own handler: kept, the run checkpoints at its first step and
    exits with code 75, so that the batch script requeues it."""
    import signal
    import sys

    from run_helpers import REPO

    from scaling.config import load_config
    from scaling.preemption import EXIT_CODE

    config = load_config("fmnist:S/8,smoke", ["model.depth=1", f"data.path={fmnist_dir}"])
    plan = tmp_path / "runs.json"
    plan.write_text(json.dumps({"runs": [{"model": "S/8", "workdir": str(tmp_path / "run"),
                                          "config": config.to_dict()}]}, default=str))
    worker = subprocess.Popen([sys.executable, "-m", "scaling.worker", "--plan", str(plan)], cwd=REPO,
                              env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"})
    caught = lambda: int(next(line.split()[1] for line in open(f"/proc/{worker.pid}/status")  # noqa: E731
                              if line.startswith("SigCgt:")), 16) >> (signal.SIGTERM - 1) & 1
    _wait(caught, "the worker to catch SIGTERM", timeout=60)  # its first step: JAX is imported after it
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == EXIT_CODE
    manifest = schema.read_manifest(tmp_path / "run")
    assert (manifest.status, manifest.stopped_step) == ("preempted", 1)
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


def test_the_dry_run_prints_the_array_and_writes_nothing(fmnist_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert _grid(runs, fmnist_dir, "S/8,B/4", "--dry-run", "--sbatch-arg=--partition=gpu",
                 "--sbatch-arg=--time=4:00:00") == 0
    out = capsys.readouterr().out
    assert "the job array of 2 run(s) that would be submitted (S/8, B/4)" in out
    script = out[out.index("#!/bin/bash"):]
    options = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert options[:4] == ["--job-name=dit-grid", "--array=0-1", "--requeue", "--open-mode=append"]
    assert options[-2:] == ["--partition=gpu", "--time=4:00:00"]  # last: they override the defaults
    assert f"--signal=TERM@{slurm.SIGNAL_SECONDS}" in options
    assert "-m scaling.worker --plan" in script
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script  # its own task alone
    bash = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr
    assert not runs.exists()


@pytest.mark.parametrize("extra, message", [
    (["--launcher", "local", "--sbatch-arg=--partition=gpu"], "--sbatch-arg goes with --launcher slurm"),
    (["--launcher", "slurm", "--workers", "2"], "drop --shard and --workers"),
    (["--launcher", "slurm", "--sbatch-arg=partition=gpu"], "one sbatch option per flag"),
])
def test_bad_launcher_options_are_named(fmnist_dir, tmp_path, capsys, extra, message):
    argv = ["grid", *SMOKE, "--workdir", str(tmp_path / "runs"), "--models", "S/8", f"--config.data.path={fmnist_dir}"]
    assert main([*argv, *extra, "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_bucket_is_refused_as_the_scheduler_directory():
    from etils import epath

    with pytest.raises(slurm.LauncherError, match="shared file system"):
        slurm.scheduler_dir(epath.Path("gs://bucket/runs"))
