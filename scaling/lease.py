"""One writer per run: a run holds an exclusive lease on its workdir while it trains.

Two commands on one workdir (a repeated command, or two machines given overlapping shards) would otherwise both
write its checkpoints and records. Process 0 of a run takes the lease on WORKDIR/lease.lock with an exclusive
`flock`, held as long as the process lives: the kernel lets go of it when the holder exits or is killed, so a
killed run resumes at once. WORKDIR/lease.json says who holds it (host, process id, since when), for the message
that refuses a second writer. Every process of a multi-host run learns process 0's answer, so all of them stop
alike.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import jax

LOCK_FILE = "lease.lock"
HOLDER_FILE = "lease.json"
HELD_EXIT_CODE = 73  # EX_CANTCREAT (sysexits.h): another writer holds the workdir


class WorkdirHeld(RuntimeError):
    """Another run holds the workdir's lease."""


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not said which yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["since"]))
    return (f"{holder['command']} on host {holder['host']}, pid {holder['pid']} (process {holder['process']} of "
            f"{holder['processes']}), since {since}")


def read_holder(workdir: Path) -> dict | None:
    try:
        return json.loads((workdir / HOLDER_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class RunLease:
    """The lease of `workdir` for the duration of a `with` block; raises WorkdirHeld on entry when another run
    holds it."""

    def __init__(self, workdir: Path, command: str = "dit-scaling train"):
        self.workdir, self.command = workdir, command
        self._fd = None

    def __enter__(self) -> RunLease:
        problem = self._take() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            refused = int(multihost_utils.broadcast_one_to_all(int(problem is not None)))
            if refused and problem is None:
                problem = f"{self.workdir} is held by another run (process 0 says by whom)."
        if problem:
            raise WorkdirHeld(problem)
        return self

    def _take(self) -> str | None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return (f"{self.workdir} is being written by another run: {describe_holder(read_holder(self.workdir))}. "
                    "Wait for it to end or stop it (a killed run's lease is free at once), or use another "
                    "--workdir.")
        self._fd = fd
        holder = {"command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                  "process": jax.process_index(), "processes": jax.process_count(), "since": time.time()}
        temporary = self.workdir / f".{HOLDER_FILE}.{os.getpid()}"
        temporary.write_text(json.dumps(holder) + "\n")
        os.replace(temporary, self.workdir / HOLDER_FILE)
        return None

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            (self.workdir / HOLDER_FILE).unlink(missing_ok=True)
            os.close(self._fd)  # lets go of the flock
            self._fd = None
