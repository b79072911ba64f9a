"""Training runs across processes: SIGKILL and resume, four simulated devices, two hosts training one model."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_helpers import REPO, TINY, cli, cli_on_hosts, leaves, smoke

from analysis.schema import read_jsonl as read_records
from scaling.checkpoints import load_final_params


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_result(fmnist_dir, tmp_path):
    # Asynchronous checkpoints (the default of real runs), often enough that the kill may land during a save.
    args = [*smoke(fmnist_dir, "--config.train.steps=300", "--config.train.checkpoint_every=50",
                    "--config.train.async_checkpoints=true", "--config.train.log_every=10",
                    *[f"--config.{o}" for o in TINY])]
    assert cli("train", *args, "--workdir", str(tmp_path / "straight")).returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "scaling.cli", "train", *args, "--workdir", str(killed)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it mid-run: after a checkpoint is committed and some later steps are recorded.
        assert _wait_for(lambda: read_records(killed / "records.jsonl")[-1:] != []
                         and read_records(killed / "records.jsonl")[-1]["step"] > 120)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert read_records(killed / "records.jsonl")[-1]["step"] < 300
    resumed = cli("train", *args, "--workdir", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stderr

    steps = [r["step"] for r in read_records(killed / "records.jsonl")]
    assert steps == list(range(10, 301, 10))  # every step exactly once
    straight_records = read_records(tmp_path / "straight" / "records.jsonl")
    assert [r["loss"] for r in read_records(killed / "records.jsonl")] == [r["loss"] for r in straight_records]
    for ema in (True, False):
        a, b = load_final_params(killed, ema=ema), load_final_params(tmp_path / "straight", ema=ema)
        for x, y in zip(leaves(a), leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


EVALUATED_SMOKE = ["--config.train.steps=10", "--config.eval.every=10", "--config.eval.num_samples=16",
                   "--config.eval.batch_size=8", "--config.eval.sampling_steps=(5,)",
                   "--config.eval.num_reference=64", "--config.eval.classifier_epochs=1"]


@pytest.fixture(scope="module")
def one_device_run(fmnist_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one-device") / "run"
    result = cli("train", *smoke(fmnist_dir, *EVALUATED_SMOKE), "--workdir", str(run))
    assert result.returncode == 0, result.stderr
    return run


def _assert_same_run(run: Path, reference: Path) -> None:
    np.testing.assert_allclose([r["loss"] for r in read_records(run / "records.jsonl")],
                               [r["loss"] for r in read_records(reference / "records.jsonl")], rtol=1e-5)
    # Sampling for evaluation is sharded too: the same starting noise, the same samples, recorded once.
    (evaluation,), (expected,) = (read_records(r / "evaluations.jsonl") for r in (run, reference))
    assert evaluation["value"] == pytest.approx(expected["value"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_four_simulated_devices_give_the_losses_of_one(fmnist_dir, one_device_run, tmp_path, sharding):
    four = cli("train", *smoke(fmnist_dir, *EVALUATED_SMOKE, f"--config.train.param_sharding={sharding}"),
                "--workdir", str(tmp_path / "four"), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert four.returncode == 0, four.stderr
    manifest = json.loads((tmp_path / "four" / "manifest.json").read_text())
    assert manifest["starts"][0]["devices"]["count"] == 4
    assert manifest["config"]["train"]["param_sharding"] == sharding
    _assert_same_run(tmp_path / "four", one_device_run)


@pytest.mark.slow
def test_two_processes_train_one_model_together(fmnist_dir, one_device_run, tmp_path):
    hosts = cli_on_hosts("train", *smoke(fmnist_dir, *EVALUATED_SMOKE), "--workdir", str(tmp_path / "pair"))
    assert all(code == 0 for code, _, _ in hosts), hosts[0][2][-3000:] + hosts[1][2][-3000:]
    assert "step 10/10" in hosts[0][1] and "step 10/10" not in hosts[1][1]  # only process 0 reports
    manifest = json.loads((tmp_path / "pair" / "manifest.json").read_text())
    assert manifest["starts"][0]["devices"]["processes"] == 2
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
