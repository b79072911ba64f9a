"""Training runs across processes: SIGKILL and resume, SIGTERM (preemption) and resume on one and two hosts, four
simulated devices, two hosts training one model."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_helpers import REPO, TINY, cli, cli_on_hosts, finish_on_hosts, leaves, smoke, start_on_hosts

from analysis.schema import read_jsonl as read_records
from scaling.checkpoints import kept_steps, load_final_params
from scaling.lease import HELD_EXIT_CODE
from scaling.preemption import EXIT_CODE, INTERRUPTED_EXIT_CODE


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# Asynchronous checkpoints (the default of real runs), often enough that a signal may land during a save.
INTERRUPTED = ["--config.train.steps=300", "--config.train.checkpoint_every=50",
               "--config.train.async_checkpoints=true", "--config.train.log_every=10", *[f"--config.{o}" for o in TINY]]


def _trained_run(directory: Path, fmnist_dir, overrides: list[str]) -> Path:
    """A smoke run with `overrides`, trained through the CLI into directory/run."""
    run = directory / "run"
    result = cli("train", *smoke(fmnist_dir, *overrides), "--workdir", str(run))
    assert result.returncode == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def straight_run(fmnist_dir, tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones must reproduce."""
    return _trained_run(tmp_path_factory.mktemp("straight"), fmnist_dir, INTERRUPTED)


def _last_step(run: Path) -> int:
    records = read_records(run / "records.jsonl") if (run / "records.jsonl").is_file() else []
    return records[-1]["step"] if records else 0


def _assert_resumed_exactly(run: Path, straight: Path, steps: int = 300) -> None:
    """Every step recorded once, with the straight run's losses, and the straight run's final parameters."""
    records, straight_records = read_records(run / "records.jsonl"), read_records(straight / "records.jsonl")
    assert [r["step"] for r in records] == list(range(10, steps + 1, 10))
    assert [r["loss"] for r in records] == [r["loss"] for r in straight_records]
    for ema in (True, False):
        a, b = load_final_params(run, ema=ema), load_final_params(straight, ema=ema)
        for x, y in zip(leaves(a), leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_result(fmnist_dir, straight_run, tmp_path):
    args = smoke(fmnist_dir, *INTERRUPTED)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", *args, "--workdir", str(killed)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it mid-run: after a checkpoint is committed and some later steps are recorded
        assert _wait_for(lambda: _last_step(killed) > 120)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert _last_step(killed) < 300
    resumed = cli("train", *args, "--workdir", str(killed))  # at once: the killed holder's lease is free
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stderr
    _assert_resumed_exactly(killed, straight_run)


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder_and_the_grid_skips_the_run(fmnist_dir, tmp_path):
    args = smoke(fmnist_dir, *INTERRUPTED, "--config.train.steps=100000")  # trains until preempted below
    held = tmp_path / "DiT-S-8"  # the grid's name for S/8's run
    holder = subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", *args, "--workdir", str(held)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: _last_step(held) > 20)
        second = cli("train", *args, "--workdir", str(held))
        assert second.returncode == HELD_EXIT_CODE, second.stderr
        assert "is being written by another run: dit-scaling train on host " + socket.gethostname() in second.stderr
        assert f"pid {holder.pid} (process 0 of 1), since " in second.stderr
        grid = cli("grid", "--config", "fmnist:smoke", "--workdir", str(tmp_path), "--models", "S/8",
                   f"--config.data.path={fmnist_dir}", *INTERRUPTED, "--config.train.steps=100000")
        assert grid.returncode == 0 and "skipped: " in grid.stdout and "another run" in grid.stdout, grid.stdout
        assert json.loads((held / "manifest.json").read_text())["status"] == "running"  # the grid left it alone
    finally:
        holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=120) == EXIT_CODE, holder.stderr.read()
    steps = [r["step"] for r in read_records(held / "records.jsonl")]
    assert steps == list(range(10, steps[-1] + 1, 10))  # the holder's records alone: no step twice


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_resumes_losing_nothing(fmnist_dir, straight_run, tmp_path):
    args = smoke(fmnist_dir, *INTERRUPTED)
    preempted = tmp_path / "preempted"
    process = subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", *args, "--workdir", str(preempted)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: _last_step(preempted) > 120)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_CODE, stderr
    step = int(re.search(r"preempted \(SIGTERM\), checkpointed at step (\d+)", stderr).group(1))
    assert 120 < step < 300
    assert json.loads((preempted / "manifest.json").read_text())["status"] == "preempted"
    assert max(kept_steps(preempted)) == step  # the notice's step, not the last of checkpoint_every's
    resumed = cli("train", *args, "--workdir", str(preempted))
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {preempted} from step {step}." in resumed.stderr
    _assert_resumed_exactly(preempted, straight_run)


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_one_step(fmnist_dir, straight_run, tmp_path):
    args = ["train", *smoke(fmnist_dir, *INTERRUPTED, "--config.train.steps=100")]  # two hosts step slower
    preempted = tmp_path / "preempted"
    hosts = start_on_hosts(*args, "--workdir", str(preempted))
    assert _wait_for(lambda: _last_step(preempted) > 50)
    hosts[1].send_signal(signal.SIGTERM)  # the notice reaches one host; the coordination service tells the other
    ended = finish_on_hosts(hosts, timeout=120)
    assert [code for code, _, _ in ended] == [EXIT_CODE, EXIT_CODE], ended[0][2][-2000:] + ended[1][2][-2000:]
    steps = {int(re.search(r"checkpointed at step (\d+)", stderr).group(1)) for _, _, stderr in ended}
    assert len(steps) == 1 and 50 < max(kept_steps(preempted)) == steps.pop() < 100
    resumed = cli_on_hosts(*args, "--workdir", str(preempted))
    assert all(code == 0 for code, _, _ in resumed), resumed[0][2][-3000:]
    # Every step recorded once, on the one-host run's course (a constant learning rate: its first 100 steps are a
    # 100-step run's). Two hosts sum gradients in another order: equal to rounding, where a resume that lost any
    # optimizer state would be off by far more.
    records = read_records(preempted / "records.jsonl")
    assert [r["step"] for r in records] == list(range(10, 101, 10))
    np.testing.assert_allclose([r["loss"] for r in records],
                               [r["loss"] for r in read_records(straight_run / "records.jsonl")][:10], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_to_the_grid_checkpoints_its_runs_and_starts_no_other(fmnist_dir, tmp_path):
    """Two worker processes (the grid's own handling of a signal in process is the Ctrl-C test's)."""
    workers = 2
    grid_command = [sys.executable, "-m", "scaling.cli", "grid", "--config", "fmnist:smoke", "--workdir",
                    str(tmp_path), "--models", "S/8,B/8,S/4", "--workers", str(workers),
                    f"--config.data.path={fmnist_dir}", *INTERRUPTED]
    # Runs too long to end before the notice: a run that ended would let the grid start the next one.
    grid = subprocess.Popen([*grid_command, "--config.train.steps=100000"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    runs = ["DiT-S-8", "DiT-B-8", "DiT-S-4"]

    def started() -> list[str]:
        return [run for run in runs if (tmp_path / run / "manifest.json").is_file()]

    assert _wait_for(lambda: len(started()) == workers and all(_last_step(tmp_path / run) > 20 for run in started()))
    grid.send_signal(signal.SIGTERM)
    out, err = grid.communicate(timeout=120)
    assert grid.returncode == EXIT_CODE, err[-3000:]
    assert "preempted (SIGTERM)" in err and "run the same command to resume" in err
    assert len(started()) == workers and out.count("not started") == len(runs) - workers
    for run in started():
        assert json.loads((tmp_path / run / "manifest.json").read_text())["status"] == "preempted"
        assert _last_step(tmp_path / run) <= max(kept_steps(tmp_path / run))
    steps = 10 * (max(_last_step(tmp_path / run) for run in started()) // 10 + 3)  # train.steps may change on resume
    resumed = subprocess.run([*grid_command, f"--config.train.steps={steps}"], cwd=REPO, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run in runs:
        assert [r["step"] for r in read_records(tmp_path / run / "records.jsonl")] == list(range(10, steps + 1, 10))


@pytest.mark.slow
def test_ctrl_c_to_the_grid_marks_its_runs_interrupted_and_starts_no_other(fmnist_dir, tmp_path):
    """The grid training in its own process (workers: the SIGTERM test and the worker killed outright)."""
    workers = 1
    grid = subprocess.Popen([sys.executable, "-m", "scaling.cli", "grid", "--config", "fmnist:smoke", "--workdir",
                             str(tmp_path), "--models", "S/8,B/8,S/4", "--workers", str(workers),
                             f"--config.data.path={fmnist_dir}", *INTERRUPTED, "--config.train.steps=100000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = ["DiT-S-8", "DiT-B-8", "DiT-S-4"]

    def started() -> list[str]:
        return [run for run in runs if (tmp_path / run / "manifest.json").is_file()]

    assert _wait_for(lambda: len(started()) == workers and all(_last_step(tmp_path / run) > 20 for run in started()))
    grid.send_signal(signal.SIGINT)  # as Ctrl-C at its terminal
    out, err = grid.communicate(timeout=120)
    assert grid.returncode == INTERRUPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and "interrupted (Ctrl-C); run the same command to resume" in err
    assert out.count("interrupted") == workers and out.count("not started") == len(runs) - workers
    for run in started():
        manifest = json.loads((tmp_path / run / "manifest.json").read_text())
        assert manifest["status"] == "interrupted" and manifest["stopped_step"] >= _last_step(tmp_path / run)


@pytest.mark.slow
def test_a_worker_killed_outright_is_marked_failed_with_the_last_line_of_its_log(fmnist_dir, tmp_path):
    grid = subprocess.Popen([sys.executable, "-m", "scaling.cli", "grid", "--config", "fmnist:smoke", "--workdir",
                             str(tmp_path), "--models", "S/8,B/8", "--workers", "2", f"--config.data.path={fmnist_dir}",
                             *INTERRUPTED, "--config.train.steps=100000"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed, preempted = tmp_path / "DiT-S-8", tmp_path / "DiT-B-8"
    assert _wait_for(lambda: _last_step(killed) > 20 and _last_step(preempted) > 20)
    worker = json.loads((killed / "lease.json").read_text())["pid"]  # the run's writer: its worker process
    os.kill(worker, signal.SIGKILL)  # no exit code of its own, no word in its manifest
    assert _wait_for(lambda: json.loads((killed / "manifest.json").read_text())["status"] == "failed")
    grid.send_signal(signal.SIGTERM)
    out, err = grid.communicate(timeout=120)
    assert grid.returncode == EXIT_CODE, err[-3000:]
    last_line = (killed / "train.log").read_text().rstrip().splitlines()[-1]
    error = json.loads((killed / "manifest.json").read_text())["error"]
    assert error == f"exit code -{int(signal.SIGKILL)}: {last_line}" and f"failed: {error}" in out
    assert json.loads((preempted / "manifest.json").read_text())["status"] == "preempted"


EVALUATED_SMOKE = ["--config.train.steps=10", "--config.eval.every=10", "--config.eval.num_samples=16",
                   "--config.eval.batch_size=8", "--config.eval.sampling_steps=(5,)",
                   "--config.eval.num_reference=64", "--config.eval.classifier_epochs=1"]


@pytest.fixture(scope="module")
def one_device_run(fmnist_dir, tmp_path_factory) -> Path:
    return _trained_run(tmp_path_factory.mktemp("one-device"), fmnist_dir, EVALUATED_SMOKE)


def _assert_same_run(run: Path, reference: Path) -> None:
    np.testing.assert_allclose([r["loss"] for r in read_records(run / "records.jsonl")],
                               [r["loss"] for r in read_records(reference / "records.jsonl")], rtol=1e-5)
    # Sampling for evaluation is sharded too: the same starting noise, the same samples, recorded once.
    (evaluation,), (expected,) = (read_records(r / "evaluations.jsonl") for r in (run, reference))
    assert evaluation["value"] == pytest.approx(expected["value"], rel=1e-3)


@pytest.mark.slow
def test_four_simulated_devices_give_the_losses_of_one(fmnist_dir, one_device_run, tmp_path):
    """Data parallel with replicated parameters (fsdp: the two-slice test)."""
    four = cli("train", *smoke(fmnist_dir, *EVALUATED_SMOKE), "--workdir", str(tmp_path / "four"),
               env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert four.returncode == 0, four.stderr
    manifest = json.loads((tmp_path / "four" / "manifest.json").read_text())
    assert manifest["starts"][0]["devices"]["count"] == 4
    assert manifest["config"]["train"]["param_sharding"] == "replicated"
    _assert_same_run(tmp_path / "four", one_device_run)


@pytest.mark.slow
def test_two_hosts_of_two_slices_train_one_model_together(fmnist_dir, one_device_run, tmp_path):
    """Two processes, each a slice of two simulated devices with the parameters sharded (fsdp) within it: every
    level of a multi-slice pod at once."""
    hosts = cli_on_hosts("train", *smoke(fmnist_dir, *EVALUATED_SMOKE, "--config.train.slices=2",
                                         "--config.train.param_sharding=fsdp"), "--workdir", str(tmp_path / "pair"),
                         env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert all(code == 0 for code, _, _ in hosts), hosts[0][2][-3000:] + hosts[1][2][-3000:]
    assert "step 10/10" in hosts[0][1] and "step 10/10" not in hosts[1][1]  # only process 0 reports
    manifest = json.loads((tmp_path / "pair" / "manifest.json").read_text())
    assert manifest["starts"][0]["devices"]["processes"] == 2 and manifest["starts"][0]["devices"]["count"] == 4
    assert manifest["starts"][0]["devices"]["mesh"] == {"slice": 2, "data": 2}
    assert manifest["config"]["train"]["param_sharding"] == "fsdp"
    _assert_same_run(tmp_path / "pair", one_device_run)


_HEAP_PROBE = """
import ctypes, os
from scaling.host import keep_freed_memory, return_freed_memory_if_large

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p

def mapped_after_malloc(size):  # bytes that go into memory maps while a fresh block of `size` is held
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd - before
    libc.free(ctypes.c_void_p(block))
    return mapped

memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
assert keep_freed_memory()
# Each block is larger than the last, so none fits into the heap's room from an earlier one.
print(mapped_after_malloc(64 << 20), return_freed_memory_if_large(memory // 8), mapped_after_malloc(128 << 20),
      return_freed_memory_if_large(memory // 2), mapped_after_malloc(256 << 20))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_freed_memory_stays_in_the_heap_unless_the_state_is_large():
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    held, small_state, held_again, large_state, mapped = out.stdout.split()
    assert (int(held), small_state, int(held_again)) == (0, "False", 0)  # from the heap, kept there when freed
    assert large_state == "True" and int(mapped) >= 256 << 20  # a memory map, given back when freed
