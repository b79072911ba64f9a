"""Preemption: stop at a step boundary that every host agrees on, checkpointed, when the machine is going away;
and interruption (Ctrl-C), which stops at once.

A preempted TPU VM, a spot instance, a queued resource's eviction and SLURM's `scancel` all send SIGTERM, then
kill the process after a grace period. A run that receives it checkpoints at its next step boundary, marks its
manifest `preempted` and exits with EXIT_CODE; the same command resumes it losing no step.

On several hosts the boundary must be the same everywhere, though perhaps only one host got the signal: JAX's
coordination service spreads the notice and picks the first boundary that every host has yet to pass
(`multihost_utils.reached_preemption_sync_point`, whose SIGTERM handler `jax.distributed.initialize` installs).
A single process catches SIGTERM itself.

Ctrl-C (SIGINT) stops a run where it is: its manifest says `interrupted`, the command exits with
INTERRUPTED_EXIT_CODE and the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): try again later; a scheduler may requeue on it
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT  # what shells report for a command stopped by Ctrl-C


class Preempted(RuntimeError):
    """Stopped on a preemption notice with everything checkpointed (the run at `step`): run the same command to
    resume."""

    def __init__(self, workdir, step: int | None = None):
        where = f"checkpointed at step {step}" if step is not None else "its runs are checkpointed"
        super().__init__(f"{workdir}: preempted (SIGTERM), {where}; run the same command to resume.")
        self.workdir, self.step = workdir, step


class Interrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C (the run at `step`, its manifest marked interrupted): run the same command to resume from
    the newest checkpoint."""

    def __init__(self, workdir, step: int | None = None):
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"{workdir}: interrupted (Ctrl-C){where}; run the same command to resume from the newest "
                         "checkpoint.")
        self.workdir, self.step = workdir, step


@contextlib.contextmanager
def handling_signal(signum: int, handler):
    """`handler` for `signum` inside the block, the previous handler restored after it. Only the main thread can
    set signal handlers: elsewhere the block runs under the handler it has."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        # None: the previous handler was not set from Python, i.e. the interpreter's own (SIGINT) or the default.
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, default if previous is None else previous)


def ignoring_interrupts():
    """Ctrl-C ignored inside the block, so that a second one does not cut short the recording of how the run
    ended."""
    return handling_signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def deferring_interrupts():
    """Ctrl-C inside the block takes effect at its end: a KeyboardInterrupt inside a checkpoint's save would leave
    the checkpointer's threads mid-write, to hang the run's ending or die at interpreter shutdown with a
    traceback."""
    received = []
    with handling_signal(signal.SIGINT, lambda *_: received.append(True)):
        yield
    if received:
        raise KeyboardInterrupt


class InterruptNotice:
    """Ctrl-C asked at each step boundary: the first one is noted and stops the run at the next boundary (no thread
    of the checkpointer or the lease is cut mid-write), a second one at once. Use as a context manager around the
    run (the main thread's SIGINT handler is installed on entry, the previous one restored on exit)."""

    def __init__(self):
        self.requested = False
        self._handlers = contextlib.ExitStack()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> InterruptNotice:
        self._handlers.enter_context(handling_signal(signal.SIGINT, self._handle))
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.close()


_notice_before_start = threading.Event()


def keep_notices_before_start() -> None:
    """From now on, a SIGTERM that comes before a run's own handler is in place (a scheduler's notice can come while
    a task still starts) is kept: the run stops at its first step boundary, checkpointed, as if it had come then.
    Call from the main thread, first thing."""
    signal.signal(signal.SIGTERM, lambda *_: _notice_before_start.set())


class PreemptionNotice:
    """Whether a preemption notice has reached every host, asked at each step boundary (in the same order on
    every host). Use as a context manager around the loop: a single process's SIGTERM handler is installed on
    entry and the previous one restored on exit."""

    def __init__(self):
        import jax  # here, so that the exit codes above come without it

        self._hosts = jax.process_count() > 1
        self._boundary = 0
        self._received = threading.Event()
        self._handlers = contextlib.ExitStack()

    def __enter__(self) -> PreemptionNotice:
        if not self._hosts:  # on several hosts, jax.distributed's handler spreads the notice
            if _notice_before_start.is_set():
                self._received.set()
            self._handlers.enter_context(handling_signal(signal.SIGTERM, lambda *_: self._received.set()))
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.close()

    def reached(self) -> bool:
        """True at the boundary where every host stops; call at every boundary."""
        self._boundary += 1
        if self._hosts:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(self._boundary)
        return self._received.is_set()
