"""Benchmark: host memory and read throughput while training from latents on gs://, with a data set larger than
the memory the training processes may use.

    python -m scaling.benchmarks.latent_stream --sizes-gb 0.8,3.2 --memory-limit-gb 2.5 --processes 2

For each size, a synthetic latent set of ImageNet-256's shape (32x32x4 latents, crop and flip: 64 KiB an
example, shards of 2500) is written to the local GCS emulator (tests/gcs_emulator.py), and `dit-scaling train`
runs on it as --processes hosts joined on 127.0.0.1, all in one memory cgroup limited to --memory-limit-gb (cgroup
v2 or v1: run it as root on Linux). The model is one block
of width 32, so the steps wait on the data: the images/s of the step records is the read throughput. Prints each
process's peak RSS (from wait4) and the throughput; a loader that held the set in memory would be killed by the
limit at the larger size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from analysis import schema

REPO = Path(__file__).resolve().parents[2]
LATENT = (32, 32, 4)  # ImageNet-256 through the SD autoencoder
SHARD = 2500
EXAMPLE_BYTES = 2 * LATENT[0] * LATENT[1] * 2 * LATENT[2] * 4


def _write_set(root: str, size_gb: float) -> int:
    from scaling.latents import latents_manifest, shard_counts, write_latent_shard, write_manifest

    num = int(size_gb * 2**30 / EXAMPLE_BYTES)
    rng = np.random.default_rng(0)
    for shard, count in enumerate(shard_counts(num, SHARD)):
        moments = rng.standard_normal((count, 2, LATENT[0], LATENT[1], 2 * LATENT[2]), np.float32)
        write_latent_shard(root, shard, moments, rng.integers(0, 1000, count).astype(np.int32))
    write_manifest(root, latents_manifest(num_examples=num, shard_size=SHARD, latent_shape=LATENT,
                                          classes=[f"n{i:08d}" for i in range(1000)], resolution=256, scale=0.18215,
                                          autoencoder={"file": "none", "sha256": ""}))
    return num


def _memory_cgroup(limit: int) -> Path | None:
    """A new memory cgroup limited to `limit` bytes, or None where none can be made."""
    name = f"dit-scaling-latent-stream-{os.getpid()}"
    for base, limit_file in ((Path("/sys/fs/cgroup/unified"), "memory.max"), (Path("/sys/fs/cgroup"), "memory.max"),
                             (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes")):
        try:
            if not (base / "cgroup.procs").exists() or (limit_file == "memory.max" and "memory" not in (
                    base / "cgroup.subtree_control").read_text()):
                continue
            group = base / name
            group.mkdir()
            (group / limit_file).write_text(str(limit))
            return group
        except OSError:
            continue
    return None


def _train(data: str, workdir: str, processes: int, steps: int, batch: int, group: Path,
           environment: dict) -> tuple[list[int], float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    command = [sys.executable, "-m", "scaling.cli", "train", "--config", "imagenet256:S/8", "--workdir", workdir,
               f"--config.data.path={data}", "--config.model.depth=1", "--config.model.hidden_size=32",
               "--config.model.num_heads=1", f"--config.train.steps={steps}", f"--config.train.batch_size={batch}",
               "--config.train.log_every=10", f"--config.train.checkpoint_every={steps}", "--config.eval.every=0",
               "--config.train.checkpoint_minutes=0"]

    def confine():
        (group / "cgroup.procs").write_text(str(os.getpid()))

    pids = [subprocess.Popen(command + ["--coordinator", coordinator, "--num-processes", str(processes),
                                        "--process-id", str(i)], cwd=REPO, env=environment,
                             preexec_fn=confine, stdout=subprocess.DEVNULL).pid for i in range(processes)]
    peaks, failed = [], []
    for pid in pids:
        _, status, usage = os.wait4(pid, 0)
        peaks.append(usage.ru_maxrss * 1024)
        if status:
            failed.append(os.waitstatus_to_exitcode(status))
    if failed:
        raise SystemExit(f"training failed (exit codes {failed}); a negative code is a signal (-9: killed at the "
                         "memory limit)")
    rates = [batch / r.step_time for r in schema.read_steps(workdir) if r.step_time]
    return peaks, statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", default="0.8,3.2", help="latent set sizes, comma-separated")
    parser.add_argument("--memory-limit-gb", type=float, default=2.5, help="for all training processes together")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from run_helpers import GcsEmulator

    limit = int(args.memory_limit_gb * 2**30)
    group = _memory_cgroup(limit)
    if group is None:
        raise SystemExit("No memory cgroup could be made (cgroup v2's memory controller or v1's memory hierarchy, "
                         "writable): run the benchmark as root on Linux.")
    print(f"memory limit {args.memory_limit_gb:g} GiB (cgroup {group})", flush=True)
    emulator = GcsEmulator()
    environment = {**os.environ, **emulator.environment}
    os.environ.update(emulator.environment)
    import fsspec

    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    try:
        for size in (float(s) for s in args.sizes_gb.split(",")):
            data = emulator.path(f"latents-{size:g}gb")
            start = time.perf_counter()
            num = _write_set(data, size)
            written = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as workdir:
                peaks, rate = _train(data, workdir, args.processes, args.steps, args.batch, group, environment)
            print(json.dumps({"set_gb": round(num * EXAMPLE_BYTES / 2**30, 2), "examples": num,
                              "upload_s": round(written, 1), "processes": args.processes,
                              "memory_limit_gb": args.memory_limit_gb,
                              "peak_rss_mb": [round(p / 2**20) for p in peaks], "images_per_s": round(rate, 1),
                              "read_mb_per_s": round(rate * EXAMPLE_BYTES / 2**20, 1)}), flush=True)
    finally:
        emulator.close()
        group.rmdir()


if __name__ == "__main__":
    main()
