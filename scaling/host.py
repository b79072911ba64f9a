"""Process-level settings for the host (CPU) side of the JAX runtime, what the host's CPU is, and where the toolkit
keeps what it computes once for many runs (CACHE_DIR)."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import signal
import sys
from pathlib import Path

from etils import epath

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc mallopt parameters
_DEFAULT_MMAP_MAX = 65536  # glibc's own value of M_MMAP_MAX
_PR_SET_PDEATHSIG = 1
WORKER_CORES_VARIABLE = "DIT_SCALING_WORKER_CORES"  # set by the grid for the worker processes it starts
# Compiled XLA programs (jax/) and the small-data metric's trained classifier (fashion_cnn/).
CACHE_DIR = epath.Path(os.environ.get("DIT_SCALING_CACHE", Path.home() / ".cache" / "dit-scaling"))
_QUIET_LOGGERS = ("absl", "orbax", "jax", "fontTools")  # libraries whose INFO messages are noise in a run's output


def set_up_process(*, compiles: bool) -> None:
    """What every entry point (the command line, a grid's worker) does first, before JAX starts its threads: glibc
    keeps freed memory (keep_freed_memory), messages go to standard error at INFO (the libraries' at WARNING), and
    a process that compiles XLA programs keeps them in the compilation cache (enable_compilation_cache)."""
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if compiles:
        enable_compilation_cache()


def confine_worker() -> None:
    """In a worker process of the grid (WORKER_CORES_VARIABLE set: comma-separated core ids), keep to those cores
    and end with the grid's process, even when it is killed by SIGKILL: an orphaned run would keep writing to a
    directory that the next grid resumes. Done by the worker itself, so the grid starts it without forking a
    multithreaded process."""
    cores = os.environ.get(WORKER_CORES_VARIABLE)
    if not cores:
        return
    os.sched_setaffinity(0, [int(c) for c in cores.split(",")])
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the grid died before the line above
        sys.exit("the grid that started this worker has ended")


def join_processes(coordinator: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None) -> None:
    """Join the other processes of a multi-host run (jax.distributed): the coordinator, process count and id as
    given, else as JAX detects them (TPU pods, SLURM)."""
    import jax

    # Cross-process collectives on CPU devices need gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    XLA:CPU allocates every step's temporary buffers afresh (750 MB for a DiT-B/4 training step at batch 8) and
    frees them at the end of the step. glibc serves blocks that large with new memory maps, so each step pays
    for page faults and for the kernel zeroing every page again (docs/benchmarks.md has what that costs). Served
    from one never-trimmed heap, later steps reuse warm pages.
    The process keeps its peak heap size until it exits.

    Call before JAX starts its threads (before the first computation). Returns False (and does nothing)
    where the C library is not glibc.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def return_freed_memory_if_large(state_bytes: int) -> bool:
    """Undo keep_freed_memory's heap for large blocks (memory maps again, returned to the kernel when freed) when
    a training state of `state_bytes` takes more than a quarter of this machine's memory. A heap that is never
    trimmed holds the peak of every allocation pattern: for a large state that costs more memory than the page
    faults it spares cost time (docs/benchmarks.md, "What a recomputing block keeps"). Returns whether it changed
    anything (False where keep_freed_memory does nothing)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if state_bytes <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4:
        return False
    return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX))


def enable_compilation_cache() -> epath.Path:
    """Keep compiled XLA programs in CACHE_DIR/jax, so that a resumed run, the next run of a grid and (on shared
    storage) every host of a pod skip recompiling the same step (minutes for a DiT on a GPU, where XLA autotunes
    every matmul). A cache directory JAX already has (`$JAX_COMPILATION_CACHE_DIR`, or set in this process) is
    kept. Call before the first computation (through set_up_process); returns the directory in use. JAX is
    imported here, so that commands that compile nothing run without it."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR / "jax"))
    return epath.Path(jax.config.jax_compilation_cache_dir)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux): speeds differ across CPUs."""
    name = _cpuinfo_field("model name")
    return name or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (from /proc/cpuinfo on Linux; empty elsewhere)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in epath.Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
