"""How a run ends when something other than a kill stops it: a full disk (a real small tmpfs where this machine lets
one be mounted, else a write that fails with ENOSPC at the file layer), Ctrl-C, records lost after their checkpoint,
and a train.steps below the step a run has reached. Every ending is recorded, damages nothing and resumes."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_helpers import REPO, TINY, cli, smoke

from analysis import schema, storage
from analysis.schema import read_jsonl as read_records
from scaling.cli import main
from scaling.preemption import INTERRUPTED_EXIT_CODE, InterruptNotice, deferring_interrupts, ignoring_interrupts

QUICK = [f"--config.{o}" for o in TINY]


def _straight(directory: Path, fmnist_dir, *overrides: str) -> list[dict]:
    """The records of an uninterrupted run (the ones a resumed run must reproduce)."""
    assert main(["train", *smoke(fmnist_dir, *QUICK, *overrides), "--workdir", str(directory)]) == 0
    return read_records(directory / schema.STEPS_FILE)


def _whole_lines(path: Path) -> list[dict]:
    """The records of a JSONL file, every line of which must be whole."""
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# -- the file layer -------------------------------------------------------------------------------------------------


def _writes_fail_once_full(monkeypatch, path: Path, after: int) -> None:
    """os.write to `path` runs out of space after `after` writes: the next one writes half its bytes (a disk that
    fills midway), every later one fails with ENOSPC."""
    real_write, count = os.write, [0]

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target != str(path):
            return real_write(fd, data)
        count[0] += 1
        if count[0] <= after:
            return real_write(fd, data)
        if count[0] == after + 1 and len(data) > 1:
            return real_write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(sys.platform != "linux", reason="finds a descriptor's file through /proc")
def test_an_append_that_finds_no_space_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    schema.append_jsonl(path, {"step": 1})
    _writes_fail_once_full(monkeypatch, path, after=0)
    with pytest.raises(storage.DiskFull) as error:
        schema.append_jsonl(path, {"step": 2, "loss": 0.5})
    assert path.read_text() == '{"step": 1}\n'  # the half written was cut back off
    assert str(path) in str(error.value) and "the write needed 25 bytes" in str(error.value)
    assert " free)" in str(error.value) and "run the same command again" in str(error.value)
    monkeypatch.undo()
    schema.append_jsonl(path, {"step": 2})
    assert _whole_lines(path) == [{"step": 1}, {"step": 2}]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds a descriptor's file through /proc")
def test_records_on_a_full_disk_fail_the_run_cleanly_and_it_resumes(fmnist_dir, tmp_path, monkeypatch, capsys):
    straight = _straight(tmp_path / "straight", fmnist_dir)  # records at 5, 10, 15, 20; checkpoints at 10, 20
    run = tmp_path / "run"
    command = ["train", *smoke(fmnist_dir, *QUICK), "--workdir", str(run)]
    _writes_fail_once_full(monkeypatch, run / schema.STEPS_FILE, after=2)  # the record of step 15 finds no space
    assert main(command) == storage.DISK_FULL_EXIT_CODE
    err = capsys.readouterr().err
    assert f"No space left on the device of {run / schema.STEPS_FILE}" in err and "Traceback" not in err
    assert [r["step"] for r in _whole_lines(run / schema.STEPS_FILE)] == [5, 10]  # no torn line
    manifest = schema.read_manifest(run)
    assert manifest.status == "failed" and manifest.stopped_step == 15
    assert manifest.error.startswith(f"DiskFull: No space left on the device of {run / schema.STEPS_FILE}")
    assert main(["status", str(tmp_path)]) == 0
    assert "stopped at step 15; DiskFull: No space left" in capsys.readouterr().out
    monkeypatch.undo()  # space again: the same command resumes
    assert main(command) == 0
    assert [(r["step"], r["loss"]) for r in read_records(run / schema.STEPS_FILE)] == \
        [(r["step"], r["loss"]) for r in straight]
    assert schema.read_manifest(run).status == "finished" and schema.read_manifest(run).error is None


@pytest.mark.skipif(sys.platform != "linux", reason="finds a descriptor's file through /proc")
def test_a_manifest_with_no_room_either_keeps_its_previous_content(fmnist_dir, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    _writes_fail_once_full(monkeypatch, run / schema.STEPS_FILE, after=1)
    write_manifest = schema.write_manifest

    def no_room_once_running(workdir, manifest):  # the start's manifest fits, the failure's does not
        if manifest.status != "running":
            raise storage.DiskFull(Path(workdir) / schema.MANIFEST_FILE, 4096)
        write_manifest(workdir, manifest)

    monkeypatch.setattr(schema, "write_manifest", no_room_once_running)
    assert main(["train", *smoke(fmnist_dir, *QUICK), "--workdir", str(run)]) == storage.DISK_FULL_EXIT_CODE
    assert f"{run / schema.MANIFEST_FILE} could not be marked failed: No space left on the device of" in caplog.text
    assert "It keeps its previous content." in caplog.text
    assert schema.read_manifest(run).status == "running"  # as the start wrote it, whole


# -- a real full disk --------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs mounted for the test (root, as in CI); skipped, saying why, where it cannot be mounted."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True)
        problem = mounted.returncode and (mounted.stderr.strip() or f"mount exited {mounted.returncode}")
    except OSError as e:
        problem = str(e)
    if problem:
        print(f"no tmpfs for the full-disk tests: {problem}")
        pytest.skip(f"cannot mount a tmpfs here: {problem}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _fill(disk: Path, leave: int) -> Path:
    """A file that takes all of the disk's free space but `leave` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(max(0, storage.free_bytes(disk) - leave)))
    return filler


def _assert_one_clear_message(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == storage.DISK_FULL_EXIT_CODE, result.stderr[-3000:]
    assert f"No space left on the device of {path}" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) < 15, result.stderr[-3000:]


def test_a_run_started_on_a_full_disk_says_so(fmnist_dir, small_disk):
    _fill(small_disk, leave=0)
    run = small_disk / "run"
    result = cli("train", *smoke(fmnist_dir, *QUICK), "--workdir", str(run))
    _assert_one_clear_message(result, run)
    assert not (run / schema.MANIFEST_FILE).exists() and not (run / "lease.json").exists()


def test_figures_on_a_full_disk_say_so_and_leave_no_partial_file(small_disk):
    _fill(small_disk, leave=16 * 1024)  # room for a few small files, not for the figures
    out = small_disk / "figures"
    result = cli("figures", str(REPO / "runs" / "paper"), "--out", str(out))
    assert result.returncode == storage.DISK_FULL_EXIT_CODE, result.stderr[-3000:]
    assert "No space left on the device of" in result.stderr and str(out) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) < 15, result.stderr[-3000:]
    for path in out.glob("*.png"):  # what was written is whole: atomic writes leave no torn figure
        assert path.read_bytes().startswith(b"\x89PNG") and path.read_bytes().endswith(b"IEND\xaeB`\x82")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_checkpoint_on_a_full_disk_fails_cleanly_and_the_run_resumes(fmnist_dir, tmp_path, small_disk,
                                                                       asynchronous):
    overrides = ["--config.train.steps=30", f"--config.train.async_checkpoints={asynchronous}"]
    straight = tmp_path / "straight"
    _straight(straight, fmnist_dir, *overrides)
    overrides = [*QUICK, *overrides]
    checkpoint = sum(p.stat().st_blocks * 512 for p in (straight / schema.CHECKPOINTS_DIR / "20").rglob("*"))
    # Room for the run's small files and one checkpoint, not for a second: the one at step 20 fails.
    filler = _fill(small_disk, leave=int(1.5 * checkpoint) + 64 * 1024)
    run = small_disk / "run"
    command = ["train", *smoke(fmnist_dir, *overrides), "--workdir", str(run)]
    result = cli(*command)
    _assert_one_clear_message(result, run / schema.CHECKPOINTS_DIR)
    manifest = schema.read_manifest(run)
    assert manifest.status == "failed" and manifest.error.startswith("DiskFull: No space left on the device of")
    assert manifest.stopped_step >= 20  # an asynchronous save reports its failure at the next call
    assert [r["step"] for r in _whole_lines(run / schema.STEPS_FILE)][:4] == [5, 10, 15, 20]
    assert not list((run / schema.CHECKPOINTS_DIR).glob("*tmp*"))  # the partial checkpoint is gone
    filler.unlink()
    resumed = cli(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stderr
    assert [(r["step"], r["loss"]) for r in read_records(run / schema.STEPS_FILE)] == \
        [(r["step"], r["loss"]) for r in read_records(straight / schema.STEPS_FILE)]


# -- Ctrl-C -------------------------------------------------------------------------------------------------------


def test_ctrl_c_marks_the_run_interrupted_and_it_resumes(fmnist_dir, tmp_path):
    run = tmp_path / "run"
    args = smoke(fmnist_dir, *QUICK, "--config.train.log_every=1")
    process = subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", *args, "--config.train.steps=100000",
                                "--workdir", str(run)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 120
    while not ((run / schema.STEPS_FILE).is_file() and len(read_records(run / schema.STEPS_FILE)) > 25):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "interrupted (Ctrl-C) at step" in err
    assert "run the same command to resume" in err.strip().splitlines()[-1]
    manifest = schema.read_manifest(run)
    assert manifest.status == "interrupted" and manifest.stopped_step > 25 and manifest.error is None
    steps = 10 * (manifest.stopped_step // 10 + 2)  # train.steps may grow on resume
    resumed = cli("train", *args, f"--config.train.steps={steps}", "--workdir", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_records(run / schema.STEPS_FILE)] == list(range(1, steps + 1))
    assert schema.read_manifest(run).status == "finished"


# -- lost records, a shorter train.steps ------------------------------------------------------------------------


def test_records_lost_after_their_checkpoint_are_named_on_resume_and_in_status(fmnist_dir, tmp_path, caplog,
                                                                              capsys):
    run = tmp_path / "run"
    _straight(run, fmnist_dir)  # records at 5, 10, 15, 20; checkpoints at 10 and 20
    records = read_records(run / schema.STEPS_FILE)
    schema.write_jsonl(run / schema.STEPS_FILE, records[:2])  # the tail after step 10 lost
    assert main(["train", *smoke(fmnist_dir, *QUICK, "--config.train.steps=30"), "--workdir", str(run)]) == 0
    assert "lacks the records of steps 15-20 (2 records) before the checkpoint at step 20" in caplog.text
    assert schema.read_manifest(run).records_gap == "steps 15-20 (2 records)"
    assert [r["step"] for r in read_records(run / schema.STEPS_FILE)] == [5, 10, 25, 30]
    capsys.readouterr()
    assert main(["status", str(tmp_path)]) == 0
    assert "records lost: steps 15-20 (2 records)" in capsys.readouterr().out


def test_a_train_steps_below_the_step_reached_is_refused(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    records = _straight(run, fmnist_dir)
    manifest = (run / schema.MANIFEST_FILE).read_text()
    assert main(["train", *smoke(fmnist_dir, *QUICK, "--config.train.steps=10"), "--workdir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "has reached step 20 (its newest checkpoint), beyond train.steps 10" in err
    assert "--config.train.steps=20 or more" in err
    assert read_records(run / schema.STEPS_FILE) == records and (run / schema.MANIFEST_FILE).read_text() == manifest


@pytest.mark.skipif(sys.platform != "linux", reason="finds a descriptor's file through /proc")
def test_a_grid_reports_a_run_that_found_no_space_and_goes_on(fmnist_dir, tmp_path, monkeypatch, capsys):
    _writes_fail_once_full(monkeypatch, tmp_path / "DiT-S-8" / schema.STEPS_FILE, after=1)  # S/8's record of step 10
    assert main(["grid", "--config", "fmnist:smoke", "--workdir", str(tmp_path), "--models", "S/8,B/8",
                 f"--config.data.path={fmnist_dir}", *QUICK, "--config.train.steps=10"]) == 1
    out, err = capsys.readouterr()
    assert f"failed: DiskFull: No space left on the device of {tmp_path / 'DiT-S-8' / schema.STEPS_FILE}" in out
    assert "Traceback" not in err
    assert schema.read_manifest(tmp_path / "DiT-S-8").status == "failed"
    assert schema.read_manifest(tmp_path / "DiT-B-8").status == "finished"


def test_callbacks_that_find_a_failed_saves_loop_closed_are_not_reported():
    """After a save that found no space, array writes still finishing call back into orbax's closed event loop;
    those reports are dropped (the failure is reported once, as DiskFull), any other unraisable error is not."""
    import asyncio
    import types

    from scaling.checkpoints import _without_writes_after_a_failed_save

    def unraisable(call) -> types.SimpleNamespace:
        try:
            call()
        except RuntimeError as e:
            return types.SimpleNamespace(exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__,
                                         err_msg=None, object=None)

    loop = asyncio.new_event_loop()
    loop.close()
    reported = []
    hook = _without_writes_after_a_failed_save(reported.append)
    hook(unraisable(lambda: loop.call_soon_threadsafe(print)))
    assert reported == []

    def closed_elsewhere():
        raise RuntimeError("Event loop is closed")

    other = unraisable(closed_elsewhere)
    hook(other)
    assert reported == [other]


def test_status_names_a_running_run_whose_process_was_killed_outright(tmp_path, capsys):
    """SIGKILL leaves no chance to record an ending: the manifest still says running. status tells from the lease
    that the run's process on this host is gone, and says the same command resumes it."""
    from records_factory import a_manifest

    run = tmp_path / "runs" / "DiT-S-8"
    schema.write_manifest(run, a_manifest(status="running", final_step=None))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom scaling.lease import RunLease\n"
                               f"with RunLease({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert main(["status", str(run)]) == 0
    assert "its process is gone" not in capsys.readouterr().out  # alive: running is true
    holder.kill()
    holder.wait()
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "running" in out and "its process is gone (killed outright); the same command resumes it" in out


def test_ctrl_c_during_a_checkpoint_save_takes_effect_after_it():
    finished, before = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with deferring_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now: without deferring, KeyboardInterrupt is raised here
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_first_ctrl_c_is_noted_a_second_stops_at_once_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with InterruptNotice() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert interrupt.requested  # noted, nothing raised: the run stops at its next step boundary
        with ignoring_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
