"""One writer per run: a run holds an exclusive lease on its workdir while it trains.

Two commands on one workdir (a repeated command, or two machines given overlapping shards) would otherwise both
write its checkpoints and records. Process 0 of a run takes the lease; every process of a multi-host run learns
its answer, so all of them stop alike. WORKDIR/lease.json says who holds it (command, host, process id, since
when), for the message that refuses a second writer.

- A local workdir: an exclusive `flock` on WORKDIR/lease.lock, held as long as the process lives. The kernel lets
  go of it when the holder exits or is killed, so a killed run resumes at once.
- A gs:// workdir (no locks on an object store): lease.json itself is the lease, created only where none exists
  and rewritten only over the generation its holder last wrote (GCS preconditions). The holder rewrites it every
  `heartbeat_s` seconds; a lease whose heartbeat is older than `stale_after_s` is taken over, as is at once one
  whose holder was on this host and is no longer alive. A holder that finds its lease taken over stops at its
  next checkpoint (`check`) instead of writing beside the new one.
A workdir with no space left for the lease refuses the run with `analysis.storage.DiskFull`, holding nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid

import jax
from etils import epath

from analysis import storage

LOCK_FILE = "lease.lock"
HOLDER_FILE = "lease.json"
HELD_EXIT_CODE = 73  # EX_CANTCREAT (sysexits.h): another writer holds the workdir
HEARTBEAT_S = 60.0
STALE_AFTER_S = 300.0  # five missed heartbeats: the holder is gone (preempted, or its machine lost)


class WorkdirHeld(RuntimeError):
    """Another run holds the workdir's lease."""


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not said which yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["since"]))
    return (f"{holder['command']} on host {holder['host']}, pid {holder['pid']} (process {holder['process']} of "
            f"{holder['processes']}), since {since}")


def read_holder(workdir: epath.Path) -> dict | None:
    try:
        return json.loads((epath.Path(workdir) / HOLDER_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def gone_from_this_host(holder: dict) -> bool:
    """Whether the holder ran on this host and its process no longer lives (elsewhere nobody here can tell)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _token(text: str) -> str | None:
    try:
        return json.loads(text).get("token")
    except json.JSONDecodeError:
        return None  # a damaged lease is no one's


class RunLease:
    """The lease of `workdir` for the duration of a `with` block; raises WorkdirHeld on entry when another run
    holds it."""

    def __init__(self, workdir: str | os.PathLike, command: str = "dit-scaling train", *,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.workdir, self.command = epath.Path(workdir), command
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._fd = None
        self._object: storage.GcsObject | None = None
        self._generation = 0
        self._holder: dict = {}
        self._lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

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

    def _new_holder(self) -> dict:
        now = time.time()
        return {"command": self.command, "host": socket.gethostname(), "pid": os.getpid(),
                "process": jax.process_index(), "processes": jax.process_count(), "since": now, "heartbeat": now,
                "token": uuid.uuid4().hex}

    def _refusal(self, holder: dict | None) -> str:
        free = (f"once its heartbeat is {self.stale_after_s:.0f} s old, at once if it ran on this host"
                if storage.is_url(self.workdir) else "at once")
        return (f"{self.workdir} is being written by another run: {describe_holder(holder)}. Wait for it to end or "
                f"stop it (a killed run's lease is free {free}), or use another --workdir.")

    def _take(self) -> str | None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self._take_object() if storage.is_url(self.workdir) else self._take_local()

    def _take_local(self) -> str | None:
        with storage.raising_disk_full(self.workdir / LOCK_FILE):
            fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._refusal(read_holder(self.workdir))
        try:
            storage.write_atomic(self.workdir / HOLDER_FILE, json.dumps(self._new_holder()) + "\n")
        except BaseException:  # no space for lease.json, say: let go of the lock, a later try in this process takes it
            os.close(fd)
            raise
        self._fd = fd
        return None

    def _take_object(self) -> str | None:
        self._object = storage.GcsObject(self.workdir / HOLDER_FILE)
        found = self._object.read()
        generation = 0
        if found is not None:
            text, generation = found
            try:
                holder = json.loads(text)
            except json.JSONDecodeError:
                holder = {}  # a damaged lease names no one: taken over
            if holder and not self._expired(holder):
                return self._refusal(holder)
        self._holder = self._new_holder()
        written = self._object.write(json.dumps(self._holder) + "\n", generation=generation)
        if written is None:  # another run wrote it between the read and this write
            return self._refusal(read_holder(self.workdir))
        self._generation = written
        self._heartbeat = threading.Thread(target=self._beat, name="lease heartbeat", daemon=True)
        self._heartbeat.start()
        return None

    def _expired(self, holder: dict) -> bool:
        return time.time() - holder.get("heartbeat", 0) > self.stale_after_s or gone_from_this_host(holder)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            found = self._object.read()
            written = None
            if found is not None and _token(found[0]) == self._holder["token"]:
                self._holder["heartbeat"] = time.time()
                written = self._object.write(json.dumps(self._holder) + "\n", generation=found[1])
            if written is None:  # rewritten by another run (or deleted) since this one's last heartbeat
                self._lost = (f"{self.workdir}'s lease was taken over by {describe_holder(read_holder(self.workdir))} "
                              "(this run's heartbeat had stopped for too long); this run stops so as not to write "
                              "beside it.")
                return
            self._generation = written

    def check(self) -> None:
        """Raise WorkdirHeld when another run has taken the lease over (on every process of the run alike)."""
        lost = self._lost is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            lost = bool(multihost_utils.broadcast_one_to_all(int(lost)))
        if lost:
            raise WorkdirHeld(self._lost or f"{self.workdir}'s lease was taken over by another run.")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            (self.workdir / HOLDER_FILE).unlink(missing_ok=True)
            os.close(self._fd)  # lets go of the flock
            self._fd = None
        if self._object is not None:
            self._stop.set()
            if self._heartbeat is not None:
                self._heartbeat.join()
            if self._lost is None:
                self._object.delete(generation=self._generation)
            self._object = None
