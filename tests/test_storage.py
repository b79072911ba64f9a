"""gs:// paths, for real, against a local GCS emulator: the storage operations, the run lease on an object store,
and a run trained, killed, resumed, skipped by the grid, listed by `status` and drawn by `figures` on a bucket."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath
from run_helpers import REPO, TINY, cli, leaves, smoke

from analysis import schema, storage
from scaling.checkpoints import load_final_params
from scaling.cli import main
from scaling.lease import HOLDER_FILE, RunLease, WorkdirHeld, read_holder


def test_storage_operations_behave_alike_on_a_disk_and_a_bucket(storage_root):
    root = storage_root
    assert storage.is_url(root) == str(root).startswith("gs://")
    path = root / "a" / "file.json"
    storage.write_atomic(path, "old")
    with pytest.raises(RuntimeError), storage.atomic_writer(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("the writer fails midway")
    assert path.read_text() == "old"  # a failed write leaves the old file whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.json"]  # and nothing beside it
    storage.append_text(root / "log.txt", "one\n")
    storage.append_text(root / "log.txt", "two\n")
    assert (root / "log.txt").read_text() == "one\ntwo\n"
    assert storage.create_only(root / "plan.json", "first") and not storage.create_only(root / "plan.json", "second")
    assert (root / "plan.json").read_text() == "first"
    records = root / "run" / schema.EVALUATIONS_FILE
    for value in (1.5, 2.5):
        schema.append_jsonl(records, {"value": value})
    assert schema.read_jsonl(records) == [{"value": 1.5}, {"value": 2.5}]
    assert storage.absolute(root) == root if storage.is_url(root) else storage.absolute(root).is_absolute()
    (root / "bytes").write_bytes(bytes(range(200)))
    assert storage.read_range(root / "bytes", 10, 5) == bytes(range(10, 15))
    assert storage.read_range(root / "bytes", 190, 50) == bytes(range(190, 200))  # cut where the file ends


def test_the_grid_skips_a_gs_run_another_machine_holds(gcs, fmnist_dir):
    runs = epath.Path(gcs.path("held-runs"))
    with RunLease(runs / "DiT-S-8", command="dit-scaling grid"):  # another machine's run, as its lease says
        grid = cli("grid", "--config", "fmnist:smoke", "--workdir", str(runs), "--models", "S/8",
                   f"--config.data.path={fmnist_dir}", *[f"--config.{o}" for o in TINY])
    assert grid.returncode == 0, grid.stderr
    assert "skipped: " in grid.stdout and "is being written by another run: dit-scaling grid" in grid.stdout
    assert not (runs / "DiT-S-8" / schema.MANIFEST_FILE).exists()  # nothing written beside the holder


def test_the_lease_of_a_gs_workdir(gcs):
    workdir = epath.Path(gcs.path("leased"))
    with RunLease(workdir, heartbeat_s=0.2) as lease:
        holder = read_holder(workdir)
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(WorkdirHeld, match=f"dit-scaling train on host {socket.gethostname()}, pid {os.getpid()}"):
            RunLease(workdir).__enter__()
        assert storage.GcsObject(workdir / HOLDER_FILE).write("mine", generation=0) is None  # create-only: refused
        deadline = time.time() + 10
        while read_holder(workdir)["heartbeat"] == holder["heartbeat"] and time.time() < deadline:
            time.sleep(0.05)
        assert read_holder(workdir)["heartbeat"] > holder["heartbeat"]  # the holder renews it
        lease.check()
    assert not (workdir / HOLDER_FILE).exists()  # given back at the end

    def write_holder(**fields):
        storage.write_atomic(workdir / HOLDER_FILE, json.dumps({
            "command": "dit-scaling train", "host": "another-host", "pid": 1, "process": 0, "processes": 1,
            "since": time.time(), "heartbeat": time.time(), "token": "theirs", **fields}))

    write_holder()  # a live holder elsewhere
    with pytest.raises(WorkdirHeld, match="another-host, pid 1 .* free once its heartbeat is 300 s old"):
        RunLease(workdir).__enter__()
    write_holder(heartbeat=time.time() - 301)  # one whose heartbeat stopped five minutes ago
    with RunLease(workdir):
        assert read_holder(workdir)["pid"] == os.getpid()
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_holder(host=socket.gethostname(), pid=gone.pid)  # a holder on this host that is gone: taken over at once
    with RunLease(workdir):
        assert read_holder(workdir)["pid"] == os.getpid()

    lease = RunLease(workdir, heartbeat_s=0.1).__enter__()
    write_holder(heartbeat=time.time() + 3600)  # another run took it over (this one had stalled)
    deadline = time.time() + 10
    while lease._lost is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(WorkdirHeld, match="taken over by dit-scaling train on host another-host"):
        lease.check()
    lease.__exit__(None, None, None)
    assert read_holder(workdir)["host"] == "another-host"  # the new holder's lease is left alone


INTERRUPTED = ["--config.train.steps=200", "--config.train.checkpoint_every=50", "--config.train.log_every=10",
               *[f"--config.{o}" for o in TINY]]


def _last_step(run: epath.Path) -> int:
    records = schema.read_jsonl(run / schema.STEPS_FILE)
    return records[-1]["step"] if records else 0


@pytest.mark.slow
def test_a_run_on_a_bucket_resumes_after_sigkill_and_matches_the_same_run_on_disk(gcs, fmnist_dir, tmp_path, capsys):
    args = smoke(fmnist_dir, *INTERRUPTED)
    local = tmp_path / "local"
    assert cli("train", *args, "--workdir", str(local)).returncode == 0
    runs = epath.Path(gcs.path("runs"))
    run = runs / "DiT-S-8"  # the grid's name for S/8's run
    process = subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", *args, "--workdir", str(run)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # killed after a checkpoint is committed and later steps are recorded
        deadline = time.time() + 300
        while _last_step(run) <= 70 and time.time() < deadline:
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert 70 < _last_step(run) < 200
    resumed = cli("train", *args, "--workdir", str(run))  # at once: the killed holder was on this host
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {run} from step" in resumed.stderr
    records, local_records = schema.read_jsonl(run / schema.STEPS_FILE), schema.read_jsonl(local / schema.STEPS_FILE)
    assert [r["step"] for r in records] == list(range(10, 201, 10))
    assert [r["loss"] for r in records] == [r["loss"] for r in local_records]
    for a, b in zip(leaves(load_final_params(run)), leaves(load_final_params(local)), strict=True):
        np.testing.assert_array_equal(a, b)

    grid = cli("grid", "--config", "fmnist:smoke", "--workdir", str(runs), "--models", "S/8,S/4",
               f"--config.data.path={fmnist_dir}", *INTERRUPTED)
    assert grid.returncode == 0, grid.stderr
    assert "S/8" in grid.stdout and "skipped" in grid.stdout and "finished" in grid.stdout, grid.stdout
    capsys.readouterr()
    assert main(["status", str(runs), "--json"]) == 0
    rows = {row["run"]: row for row in json.loads(capsys.readouterr().out)}
    assert [(rows[r]["status"], rows[r]["step"]) for r in ("DiT-S-8", "DiT-S-4")] == [("finished", 200)] * 2
    assert main(["figures", str(runs)]) == 0
    drawn = sorted(p.name for p in (runs / "figures").iterdir())
    assert {"fig13_loss.png", "fig13_loss.pdf", "report.md"} <= set(drawn), drawn  # no evaluations: the loss
