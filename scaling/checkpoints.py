"""A run's checkpoints: saving, restoring the newest sound one, verifying checksums, setting damaged ones aside,
and loading a finished run's parameters.

A checkpoint holds the train state (parameters, EMA, optimizer, step, RNG), the data iterator's state and
metadata: the wall time so far, an exact checksum of every array of the state (`state_checksum`) and
a SHA-256 of the iterator state. A checkpoint that fails to restore or to match its checksums is never used: it
is moved to corrupt_checkpoints/ and an older one is taken. A checkpoint that runs out of space is removed and
raises `storage.DiskFull` (`writing`); the checkpoints before it stay.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from analysis import schema, storage

log = logging.getLogger("dit_scaling.checkpoints")


def _not_a_lack_of_space(record: logging.LogRecord) -> bool:
    """orbax logs every write of a checkpoint that finds no space with its traceback (three for one full disk, and
    more for the writes still running); `writing` reports the lack of space once, as storage.DiskFull."""
    return not (record.exc_info and storage.is_no_space(record.exc_info[1]))


def _without_writes_after_a_failed_save(report_unraisable):
    """sys.unraisablehook, less one report: when a save fails (a full disk), orbax closes the event loop it wrote
    with while array writes are still finishing, and each finished write's callback then finds the loop closed.
    The callbacks had nothing left to do; the failure itself is reported as storage.DiskFull."""
    def hook(unraisable) -> None:
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
        raised_by = [frame.name for frame in frames[-2:]]
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and raised_by == ["call_soon_threadsafe", "_check_closed"]):
            report_unraisable(unraisable)
    hook.filters_failed_saves = True
    return hook


def manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
    """The run's checkpoint manager, keeping the newest `train.keep_checkpoints` and every `train.keep_every`-th."""
    # orbax logs through absl; the writes it left running when a save failed report through asyncio's logger when
    # their event loop goes. Added once (a logger keeps one copy of a filter).
    for logger in ("absl", "asyncio"):
        logging.getLogger(logger).addFilter(_not_a_lack_of_space)
    if not getattr(sys.unraisablehook, "filters_failed_saves", False):
        sys.unraisablehook = _without_writes_after_a_failed_save(sys.unraisablehook)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints, keep_period=config.train.keep_every or None,
        enable_async_checkpointing=config.train.async_checkpoints, create=True,
        cleanup_tmp_directories=True)  # a checkpoint cut short (a kill, a full disk) frees its space at the next start
    return ocp.CheckpointManager(storage.absolute(workdir) / schema.CHECKPOINTS_DIR, options=options)


def _data_checksum(data_state) -> str:
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def save(checkpoints: ocp.CheckpointManager, step: int, state: dict, data_state, wall_time: float) -> None:
    meta = {"wall_time": wall_time, "checksum": state_checksum(state), "data_checksum": _data_checksum(data_state)}
    checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)


@contextlib.contextmanager
def writing(checkpoints: ocp.CheckpointManager, needed: int | None = None):
    """Around a save, or the wait for an asynchronous one: a checkpoint write that runs out of space (orbax raises
    it wrapped in its own errors, from the save or, asynchronous, from a later call) becomes storage.DiskFull
    naming the checkpoints directory and `needed`, the state's size. The partial checkpoint is removed at once, so
    that its space is free for the run's records and manifest."""
    try:
        yield
    except Exception as e:
        if not storage.is_no_space(e):
            raise
        if jax.process_index() == 0:
            for partial in epath.Path(checkpoints.directory).glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        raise storage.DiskFull(checkpoints.directory, needed) from None


def checksum_problem(restored: dict, name: str) -> str | None:
    """How a restored checkpoint (its state, meta and, where restored, data) differs from the checksums stored
    with it; None when it matches. Checkpoints written before checksums pass, with a warning."""
    meta = restored["meta"]
    if "checksum" not in meta:
        log.warning("%s was written before checkpoints carried checksums; loading it unverified.", name)
        return None
    found = state_checksum(restored["state"])
    if found != meta["checksum"]:
        return f"state checksum {found}, expected {meta['checksum']}"
    if "data" in restored and _data_checksum(restored["data"]) != meta.get("data_checksum"):
        return "the data-iterator state differs from its SHA-256"
    return None


def restore_latest(checkpoints: ocp.CheckpointManager, abstract_state: dict):
    """The newest checkpoint that restores and matches its checksums; damaged ones are skipped with a warning.
    Returns (step, restored, damaged steps); (None, None, damaged) when none is usable."""
    damaged = []
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            restored = checkpoints.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged files
            log.warning("Checkpoint at step %d cannot be restored (%s: %s); skipping it.", step,
                        type(e).__name__, str(e).splitlines()[0][:200])
            damaged.append(step)
            continue
        problem = checksum_problem(restored, f"Checkpoint at step {step}")
        if problem:
            log.warning("Checkpoint at step %d is corrupt (%s); skipping it.", step, problem)
            damaged.append(step)
            continue
        return step, restored, damaged
    return None, None, damaged


def set_aside(workdir: epath.Path, steps: list[int]) -> None:
    """Move unusable checkpoints to workdir/corrupt_checkpoints/ (kept for inspection, out of the way)."""
    if jax.process_index() == 0:
        target = workdir / schema.CORRUPT_CHECKPOINTS_DIR
        target.mkdir(exist_ok=True)
        for step in steps:
            destination = target / f"{step}-{int(time.time())}"
            (workdir / schema.CHECKPOINTS_DIR / str(step)).rename(destination)
            log.warning("Moved the unusable checkpoint of step %d to %s.", step, destination)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("set aside corrupt checkpoints")


def kept_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of a run's kept checkpoints, in order."""
    checkpoints = ocp.CheckpointManager(storage.absolute(workdir) / schema.CHECKPOINTS_DIR)
    steps = sorted(checkpoints.all_steps())
    checkpoints.close()
    return steps


def load_params(workdir: str | os.PathLike, *, step: int | None = None, ema: bool = True) -> tuple[int, dict]:
    """(step, parameters) of a run's checkpoint at `step` (default: the newest), EMA by default, as a pure dict
    of numpy arrays."""
    checkpoints = ocp.CheckpointManager(storage.absolute(workdir) / schema.CHECKPOINTS_DIR, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})
    steps = checkpoints.all_steps()
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {workdir}/{schema.CHECKPOINTS_DIR}.")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it keeps steps {sorted(steps)}.")
    # Restoring into host arrays of the stored shapes reads the checkpoint on any topology, not only the one that
    # wrote it.
    on_host = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), checkpoints.item_metadata(step)["state"])
    restored = checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(on_host),
                                                                 meta=ocp.args.JsonRestore()))
    checkpoints.close()
    if checksum_problem(restored, f"The checkpoint of {workdir} at step {step}"):
        raise ValueError(f"The checkpoint of {workdir} at step {step} does not match its checksum: it is corrupt. "
                         "Run the run's training command again: it sets the checkpoint aside and resumes from an "
                         "older one.")
    return step, jax.device_get(restored["state"]["ema" if ema else "params"])


def load_final_params(workdir: str | os.PathLike, *, ema: bool = True) -> dict:
    """The parameters (EMA by default) of the newest checkpoint of a run, as a pure dict of numpy arrays."""
    return load_params(workdir, ema=ema)[1]


# ----------------------------------------------------------------------------------------------------------------
# The state's checksum
# ----------------------------------------------------------------------------------------------------------------


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of every element of x as uint32 (8-byte elements gain a trailing axis of two words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)


@jax.jit
def _checksum(leaves: list, salts: jax.Array) -> jax.Array:
    total = jnp.uint32(0)
    for index, leaf in enumerate(leaves):
        bits = _as_uint32(leaf)
        # Each element's bits times an odd weight from its position: odd numbers are invertible modulo 2^32, so
        # any change to one element changes the sum (several changes can cancel, with odds of about 2^-32).
        position = jnp.zeros(bits.shape, jnp.uint32)
        for axis, stride in enumerate(np.cumprod((1, *bits.shape[::-1]))[-2::-1]):
            position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
        total = total + jnp.sum(bits * (2 * position + 1), dtype=jnp.uint32) * salts[index]
    return total


def _path_salt(path) -> int:
    """An odd number from a leaf's path, the same whether a checkpoint restored its containers as dicts with
    string keys or as the tuples, named tuples and integer-keyed dicts of the live state."""
    name = "/".join(str(getattr(key, "name", getattr(key, "idx", getattr(key, "key", key)))) for key in path)
    return zlib.crc32(name.encode()) | 1


def state_checksum(state: dict) -> int:
    """An exact checksum of every array of the state (parameters, optimizer, EMA, step, RNG): a weighted sum of
    the bits modulo 2^32, stored with each checkpoint and checked on restore. Integer sums are exact in any
    order, so the value depends neither on how the state is sharded nor on the order of its leaves.

    One jitted program: per-array eager reductions of sharded arrays would put one collective program per
    array in flight at once, and XLA:CPU's simulated devices can deadlock on those (4 devices, 2 cores)."""
    paths_and_leaves = jax.tree_util.tree_leaves_with_path(state)
    salts = np.asarray([_path_salt(path) for path, _ in paths_and_leaves], np.uint32)
    return int(_checksum([leaf for _, leaf in paths_and_leaves], salts))
