"""One DiT training run: sharded state, jitted step, EMA, checkpoints, per-step records, automatic resume.

`train(config, workdir)` runs (or continues) the run in `workdir`, a run directory as `analysis.schema` defines
it: manifest.json, records.jsonl (one StepRecord per logged step), evaluations.jsonl (one EvaluationRecord per
evaluation step and protocol) and checkpoints/ (see scaling.checkpoints).

The same command continues a run killed at any moment: it restores the newest checkpoint that loads and
verifies, cuts records.jsonl back to that step (so every step has exactly one record), and replays the data
stream from the checkpointed iterator state. The records are made durable before each checkpoint is written, so a
checkpoint never outlives them; records missing up to the checkpoint resumed from (lost to a host crash, or
deleted) are named in the log and in the manifest's `records_gap`. A train.steps below the step the run has
reached is refused. With a fixed seed a resumed run ends bit-for-bit where an
uninterrupted one does: each step's timesteps, noise and label dropout come from fold_in(seed, step).
A non-finite loss stops the run: the last good state (before the step that produced it, replayed from the
newest checkpoint) is checkpointed, and `TrainingDiverged` names the step. A preemption notice (SIGTERM) stops the
run at the next step boundary, checkpointed there, and raises `scaling.preemption.Preempted`. Ctrl-C stops it at
once and raises `scaling.preemption.Interrupted`; any other error (`analysis.storage.DiskFull` for lack of space
anywhere) is recorded with the step reached and raised. Each of these endings is the manifest's status. A run
holds its workdir's lease (`scaling.lease`) while it trains: a second writer is refused with `WorkdirHeld`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import subprocess
import time

import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from analysis import schema, storage
from models.diffusion import GaussianDiffusion, linear_betas
from models.dit import parse_model_name
from models.flops import model_compute
from models.plugin import FactoryConfig, FactoryError, check_contract, config_to_json
from scaling import checkpoints, precision, tensorboard
from scaling import config as config_lib
from scaling import data as data_lib
from scaling.configs.common import base_config
from scaling.devices import BATCH_AXES, make_mesh, measure_matmul_peak, param_sharding
from scaling.evaluation.in_training import build_evaluator, pending_protocols
from scaling.host import return_freed_memory_if_large
from scaling.lease import RunLease, WorkdirHeld
from scaling.preemption import (
    Interrupted,
    InterruptNotice,
    Preempted,
    PreemptionNotice,
    deferring_interrupts,
    ignoring_interrupts,
)
from scaling.train_step import init_state, make_multi_step, make_optimizer, make_train_step, state_bytes

log = logging.getLogger("dit_scaling.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
    workdir: epath.Path
    step: int
    status: str
    final_loss: float | None


# ----------------------------------------------------------------------------------------------------------------
# Setting a run up
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """Everything the loop needs, built once by `_prepare`."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    primary: bool  # process 0: the one writer of the run's files
    model_config: object
    compute: object
    global_batch: int
    total_steps: int
    peak_flops: float
    init: object  # () -> a fresh sharded state
    abstract_state: dict
    data_sharding: NamedSharding
    stacked_data_sharding: NamedSharding  # batches of several steps: [steps, batch, ...]
    step_fn: object  # one step: (state, batch) -> (state, metrics)
    multi_step_fn: object | None  # train.steps_per_call > 1: (state, batches [n, ...]) -> (state, metrics [n])
    checkpoints: object
    iterator: object
    initial_data_state: dict
    evaluator: object | None
    start_step: int
    elapsed: float  # wall time of earlier starts
    state: dict
    checkpoint_bytes: int  # the state's size: about what a checkpoint needs on disk

    def batch(self) -> dict:
        """The next global batch, sharded over the mesh (each host gives its rows)."""
        local = next(self.iterator)
        return {k: jax.make_array_from_process_local_data(self.data_sharding, v) for k, v in local.items()}

    def batches(self, n: int) -> dict:
        """The next n global batches, stacked on a leading axis of steps."""
        local = [next(self.iterator) for _ in range(n)]
        return {k: jax.make_array_from_process_local_data(self.stacked_data_sharding, np.stack([b[k] for b in local]))
                for k in local[0]}

    def call_size(self, step: int) -> int:
        """Steps in the call that starts after `step`: train.steps_per_call, less after a resume off its grid."""
        per_call = self.config.train.steps_per_call
        return min(per_call - step % per_call, self.total_steps - step)

    def advance(self, step: int) -> tuple[int, dict]:
        """Dispatch the steps after `step` (one call); returns how many and their metrics (on the device)."""
        if self.multi_step_fn is None:
            self.state, metrics = self.step_fn(self.state, self.batch())
            return 1, metrics
        n = self.call_size(step)
        self.state, metrics = self.multi_step_fn(self.state, self.batches(n))
        return n, metrics

    def is_eval_step(self, step: int) -> bool:
        return self.evaluator is not None and bool(self.evaluator.protocols_at(step, self.total_steps))

    def is_checkpoint_step(self, step: int) -> bool:
        return (step % self.config.train.checkpoint_every == 0 or step == self.total_steps
                or self.evaluator is not None
                and bool(self.evaluator.protocols_at(step, self.total_steps, checkpoint_first=True)))

    def checkpoint_due(self, since: float, step: int) -> bool:
        """train.checkpoint_minutes have passed since the last checkpoint (`since`, time.monotonic()). Asked at the
        records' steps (train.log_every) only; process 0's clock decides for every host, which must save alike."""
        minutes = self.config.train.checkpoint_minutes
        if not minutes or step % self.config.train.log_every:
            return False
        due = time.monotonic() - since >= 60 * minutes
        if jax.process_count() > 1:
            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due


def _prepare(config: ml_collections.ConfigDict, workdir: epath.Path) -> _Run:
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    config_dict = json.loads(json.dumps(config.to_dict(), default=str))
    previous = schema.read_manifest(workdir)
    if previous is not None:
        _check_same_run(previous.config, config_dict, workdir)

    source = data_lib.open_source(config)
    height, width, channels = source.image_shape
    if height != width:
        raise ValueError(f"DiT takes square inputs; the data has {height}x{width} images or latents.")
    model_config = config_lib.model_config(config, input_size=height, in_channels=channels,
                                           num_classes=source.num_classes)
    if isinstance(model_config, FactoryConfig):
        _check_same_factory(previous, model_config, workdir)
        check_contract(model_config, seed=config.train.seed)
    compute = model_compute(dataclasses.replace(model_config, dtype="float32"))
    diffusion = GaussianDiffusion(linear_betas(config.diffusion.num_timesteps), learn_sigma=model_config.learn_sigma)
    optimizer = make_optimizer(config)
    global_batch = config.train.batch_size
    if global_batch % jax.device_count():
        raise ValueError(f"train.batch_size {global_batch} must be a multiple of the device count "
                         f"{jax.device_count()}.")
    mesh = make_mesh(config.train.slices)

    # -- state: restore the newest sound checkpoint, or initialise ---------------------------------------------
    abstract = jax.eval_shape(lambda: init_state(model_config, optimizer, config.train.seed))
    if jax.default_backend() == "cpu" and return_freed_memory_if_large(
            state_bytes(abstract) // jax.process_count()):
        log.info("The training state takes over a quarter of this machine's memory: freed large blocks go back "
                 "to the kernel.")
    state_sharding = jax.tree.map(lambda leaf: param_sharding(leaf, mesh, config.train.param_sharding), abstract)
    abstract_state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                  abstract, state_sharding)
    manager = checkpoints.manager(workdir, config)
    start_step, restored, damaged = checkpoints.restore_latest(manager, abstract_state)
    if damaged:
        manager.close()
        checkpoints.set_aside(workdir, damaged)
        manager = checkpoints.manager(workdir, config)
    dataset = data_lib.make_dataset(source, global_batch=global_batch, seed=config.train.seed,
                                    flip=config.data.flip, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    iterator = data_lib.make_iterator(dataset, config.data.num_threads)
    initial_data_state = iterator.get_state()
    init = jax.jit(lambda: init_state(model_config, optimizer, config.train.seed), out_shardings=state_sharding)
    if restored is not None:
        if start_step > config.train.steps:
            manager.close()
            raise ValueError(f"{workdir} has reached step {start_step} (its newest checkpoint), beyond train.steps "
                             f"{config.train.steps}. Give --config.train.steps={start_step} or more to continue it "
                             "(or leave it as it is), or use a new --workdir for a shorter run.")
        state, elapsed = restored["state"], restored["meta"]["wall_time"]
        iterator.set_state(restored["data"])
        log.info("Resuming %s from step %d.", workdir, start_step)
    else:
        if damaged:
            log.warning("No usable checkpoint in %s: starting the run again from step 0.", workdir)
        start_step, elapsed, state = 0, 0.0, init()

    peak = measure_matmul_peak(model_config.dtype) * jax.device_count()
    chosen_precision = precision.resolve(config.model.dtype, model_config.hidden_size)  # None: a plug-in's unknown
    if chosen_precision.requested == precision.AUTO:
        log.info("model.dtype auto: %s (%s).", chosen_precision.dtype, chosen_precision.reason)

    data_sharding, stacked_data_sharding = NamedSharding(mesh, P(BATCH_AXES)), NamedSharding(mesh, P(None, BATCH_AXES))
    train_step = make_train_step(model_config, diffusion, optimizer, config.train.ema_decay)
    step_fn = jax.jit(train_step, in_shardings=(state_sharding, data_sharding),
                      out_shardings=(state_sharding, None), donate_argnums=(0,))
    multi_step_fn = None if config.train.steps_per_call == 1 else jax.jit(
        make_multi_step(train_step), in_shardings=(state_sharding, stacked_data_sharding),
        out_shardings=(state_sharding, None), donate_argnums=(0,))
    evaluator = build_evaluator(config, source, model_config, diffusion, compute, mesh, workdir) \
        if config.eval.every or config.eval.validation_examples \
        else None
    # Written last: a start that fails before it leaves the manifest (and records) as the previous start left them.
    if primary:
        gap = _resume_records(workdir, start_step, config.train.log_every)
        manifest = previous or _new_manifest(config, config_dict, model_config, compute, source)
        start = {"time": time.time(), "step": start_step, "versions": _versions(),
                 "precision": chosen_precision.to_json(),
                 "devices": {"count": jax.device_count(), "processes": jax.process_count(),
                             "kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
                             "mesh": dict(mesh.shape)},
                 "matmul_peak_flops": peak}
        schema.write_manifest(workdir, manifest.with_changes(
            starts=[*manifest.starts, start], status="running", total_steps=config.train.steps, config=config_dict,
            error=None, stopped_step=None, records_gap=gap))
    return _Run(config=config, workdir=workdir, primary=primary, model_config=model_config, compute=compute,
                global_batch=global_batch, total_steps=config.train.steps, peak_flops=peak, init=init,
                abstract_state=abstract_state, data_sharding=data_sharding,
                stacked_data_sharding=stacked_data_sharding, step_fn=step_fn, multi_step_fn=multi_step_fn,
                checkpoints=manager,
                iterator=iterator, initial_data_state=initial_data_state, evaluator=evaluator,
                start_step=start_step, elapsed=elapsed, state=state, checkpoint_bytes=state_bytes(abstract))


def _new_manifest(config, config_dict: dict, model_config, compute, source) -> schema.Manifest:
    size, patch = (None, None) if isinstance(model_config, FactoryConfig) else parse_model_name(config.model.name)
    return schema.Manifest(
        model_name=config_lib.model_name(config), size=size, patch=patch, block=model_config.block,
        resolution=model_config.input_size * source.pixels_per_input, gflops_per_image=compute.gflops,
        macs_per_image=compute.macs, params=compute.params, tokens=compute.tokens,
        global_batch=config.train.batch_size, seed=config.train.seed, total_steps=config.train.steps,
        config=config_dict, model=config_to_json(model_config),
        data={"source": config.data.source, "examples": len(source)}, status="running",
        code_revision=code_revision())


def _check_same_factory(previous: schema.Manifest | None, model_config: FactoryConfig, workdir: epath.Path) -> None:
    """A plugged-in model's run resumes only with the factory source it started with (its weights mean nothing
    to changed code)."""
    started = (previous.model.get("source_sha256") if previous is not None else None) or model_config.source_sha256
    if started != model_config.source_sha256:
        raise FactoryError(f"{workdir} was trained with another version of the model factory "
                           f"{model_config.factory!r} (source SHA-256 {started[:12]}..., now "
                           f"{model_config.source_sha256[:12]}...). Restore the source the run started with, or "
                           "train the changed model in a new --workdir.")


def _check_same_run(previous: dict, current: dict, workdir: epath.Path) -> None:
    """A workdir continues only the run it holds; train.steps, train.steps_per_call, train.checkpoint_minutes,
    model.remat, model.remat_policy, data.validation_path, data.num_threads and the eval section may change. A
    field the run's config lacks (added since it started) counts as its default, which keeps the behaviour from
    before the field existed."""
    def without_steps(config):  # evaluation, steps per call and what the backward pass recomputes: same training
        return {**{k: v for k, v in config.items() if k not in ("data", "eval", "model", "train")},
                "data": {k: v for k, v in config["data"].items() if k not in ("validation_path", "num_threads")},
                "model": {k: v for k, v in config["model"].items() if k not in ("remat", "remat_policy")},
                "train": {k: v for k, v in config["train"].items()
                          if k not in ("steps", "steps_per_call", "checkpoint_minutes")}}

    defaults = base_config().to_dict()
    previous = {section: {**defaults[section], **values} if isinstance(values, dict) and section in defaults
                else values for section, values in previous.items()}
    before, after = without_steps(previous), without_steps(current)
    if before != after:
        changed = sorted(f"{section}.{key}" for section in set(before) | set(after)
                         for key in set(before.get(section, {})) | set(after.get(section, {}))
                         if before.get(section, {}).get(key) != after.get(section, {}).get(key))
        raise ValueError(f"{workdir} holds a run with a different config ({', '.join(changed)} differ). Use a new "
                         "--workdir, or the run's own config to resume it.")


def _resume_records(workdir: epath.Path, last_step: int, log_every: int) -> str | None:
    """Keep the step records up to last_step (the checkpoint resumed from: later steps are replayed, so each is
    recorded once), and name the logged steps up to it that have no record (None when every one has)."""
    path = workdir / schema.STEPS_FILE
    records = schema.read_jsonl(path)
    kept = [r for r in records if r["step"] <= last_step]
    if len(kept) < len(records):  # rewritten only when needed: a resume on a nearly full disk needs no copy
        schema.write_jsonl(path, kept)
    missing = sorted(set(range(log_every, last_step + 1, log_every)) - {r["step"] for r in kept})
    if not missing:
        return None
    gap = f"{_step_ranges(missing, log_every)} ({len(missing)} record{'s' if len(missing) > 1 else ''})"
    log.warning("%s lacks the records of %s before the checkpoint at step %d this run resumes from: they were lost "
                "after that checkpoint was written (a host crash, or a deletion) and cannot be recomputed; the run "
                "continues without them (the manifest's records_gap says so).", path, gap, last_step)
    return gap


def _step_ranges(steps: list[int], every: int) -> str:
    """[10, 20, 30, 50] (every 10) -> "steps 10-30, 50"."""
    ranges, first = [], steps[0]
    for step, following in zip(steps, [*steps[1:], None], strict=True):
        if following != step + every:
            ranges.append(str(step) if first == step else f"{first}-{step}")
            first = following
    return ("steps " if len(steps) > 1 else "step ") + ", ".join(ranges)


def _versions() -> dict:
    import flax
    import grain
    import orbax.checkpoint

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "orbax": orbax.checkpoint.__version__,
            "grain": getattr(grain, "__version__", "unknown"), "numpy": np.__version__}


def code_revision() -> str | None:
    """The git revision of this code (with "+dirty" for uncommitted changes), or None outside a git checkout."""
    root = epath.Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("+dirty" if dirty else "")


def _tensorboard_writer(workdir: epath.Path) -> tensorboard.ScalarWriter | None:
    """The run's TensorBoard scalars when the `tensorboard` extra is installed, else None."""
    if not tensorboard.available():
        log.info("TensorBoard logging is off: %s to turn it on.", tensorboard.EXTRA)
        return None
    return tensorboard.ScalarWriter(workdir / schema.TENSORBOARD_DIR)


# ----------------------------------------------------------------------------------------------------------------
# Records of the steps
# ----------------------------------------------------------------------------------------------------------------


class _StepLog:
    """Turns each step's metrics into a StepRecord every train.log_every steps: step times exclude the first step
    after a start (compilation) and evaluations; process 0 writes the record, to TensorBoard too, and prints
    progress with steps/s and the ETA."""

    def __init__(self, run: _Run):
        self.run = run
        self.first_call_end = run.start_step + run.call_size(run.start_step)  # its steps include compilation
        self.run_start = time.perf_counter()
        self.last_time, self.last_step = None, run.start_step
        self.step = run.start_step  # the last step whose metrics came back: how far the run got
        self.final_loss = None
        self.flops_per_step = schema.training_flops(run.compute.macs, run.global_batch)
        self.writer = _tensorboard_writer(run.workdir) if run.primary else None

    def wall_time(self) -> float:
        return self.run.elapsed + time.perf_counter() - self.run_start

    def restart_clock(self, step: int) -> None:
        """Time from now on (after an evaluation, whose seconds are not steps')."""
        self.last_time, self.last_step = time.perf_counter(), step

    def handle(self, step: int, metrics: dict) -> None:
        run = self.run
        metrics = jax.device_get(metrics)
        self.step = step
        if not metrics["finite"]:
            _stop_diverged(run, step, metrics, self.wall_time())
        self.final_loss = float(metrics["loss"])
        now = time.perf_counter()
        if step <= self.first_call_end:
            self.last_time, self.last_step = now, step  # the first call after a start includes compilation
        if step % run.config.train.log_every and step != run.total_steps:
            return
        step_time = (now - self.last_time) / (step - self.last_step) if step > self.last_step else None
        record = schema.StepRecord.of(
            step=step, global_batch=run.global_batch, gflops_per_image=run.compute.gflops,
            loss=float(metrics["loss"]), mse=float(metrics["mse"]),
            vb=float(metrics["vb"]) if "vb" in metrics else None, grad_norm=float(metrics["grad_norm"]),
            wall_time=self.wall_time(), time=time.time(), step_time=step_time,
            flops_per_step=self.flops_per_step, peak_flops=run.peak_flops)
        self.last_time, self.last_step = now, step
        if run.primary:
            written = record.to_json()
            schema.append_jsonl(run.workdir / schema.STEPS_FILE, written)
            if self.writer is not None:
                self.writer.write_scalars(step, {k: v for k, v in written.items()
                                                 if isinstance(v, float) and k not in ("time", "wall_time")})
            rate = f"{1 / step_time:.2f} steps/s, {record.images_per_s:.0f} img/s" if step_time else "compiling"
            eta = f"ETA {format_duration((run.total_steps - step) * step_time)}" if step_time else ""
            print(f"[{run.workdir.name}] step {step}/{run.total_steps}  loss {record.loss:.4f}  {rate}  {eta}",
                  flush=True)

    def handle_call(self, first_step: int, n: int, metrics: dict) -> None:
        """The records of the n steps after first_step, dispatched in one call."""
        if self.run.multi_step_fn is None:
            self.handle(first_step + 1, metrics)
            return
        metrics = jax.device_get(metrics)
        for i in range(n):
            self.handle(first_step + 1 + i, {k: v[i] for k, v in metrics.items()})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# ----------------------------------------------------------------------------------------------------------------
# Divergence and evaluation
# ----------------------------------------------------------------------------------------------------------------


def _replay(run: _Run, step: int) -> dict:
    """The state after `step`, replayed from the newest checkpoint (or from initialisation): the device state has
    moved past it. Steps are deterministic, so the replay reproduces it exactly."""
    start, restored, _ = checkpoints.restore_latest(run.checkpoints, run.abstract_state)
    if restored is None:
        start, state = 0, run.init()
        run.iterator.set_state(run.initial_data_state)
    else:
        state = restored["state"]
        run.iterator.set_state(restored["data"])
    for _ in range(start, step):
        state, _ = run.step_fn(state, run.batch())
    return state


def _stop_diverged(run: _Run, step: int, metrics: dict, wall_time: float) -> None:
    """Checkpoint the last good state (step - 1), mark the run diverged and raise TrainingDiverged."""
    with checkpoints.writing(run.checkpoints, run.checkpoint_bytes):
        run.checkpoints.wait_until_finished()
        if step - 1 not in run.checkpoints.all_steps():
            _save(run, step - 1, _replay(run, step - 1), wall_time)
        run.checkpoints.wait_until_finished()
    error = TrainingDiverged(
        f"Loss is {float(metrics['loss'])} (grad norm {float(metrics['grad_norm'])}) at step {step}. The last good "
        f"state (step {step - 1}) is checkpointed in {run.workdir / schema.CHECKPOINTS_DIR}. Lower "
        "train.learning_rate or use float32 (model.dtype) and start a new workdir.")
    _record_ending(run, "diverged", error=failure_cause(error), stopped_step=step)
    raise error


def _evaluate(run: _Run, step: int) -> None:
    """Score the EMA parameters under every protocol not yet recorded at this step (the final protocols too at
    the last step)."""
    wanted = run.evaluator.protocols_at(step, run.total_steps)
    protocols = pending_protocols(schema.read_evaluations(run.workdir), step, wanted)
    for record in run.evaluator.run(step, run.state["ema"], protocols) if protocols else []:
        if run.primary:
            schema.append_jsonl(run.workdir / schema.EVALUATIONS_FILE, record.to_json())
            protocol = record.protocol
            how = "held-out images" if not protocol.sampler else (
                f"{protocol.sampler} {protocol.sampling_steps} steps"
                + (f", guidance {protocol.guidance_scale:g}" if schema.is_guided(protocol.guidance_scale) else "")
                + (f", noise seed {protocol.seed}" if protocol.seed != int(run.config.eval.seed) else ""))
            accuracy = record.details.get("class_accuracy")
            accuracy = "" if accuracy is None else f", class accuracy {accuracy:.2f}"
            print(f"[{run.workdir.name}] eval step {step}: {record.metric} {record.value:.4f}{accuracy} "
                  f"({how}, {record.seconds:.0f} s)", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def failure_cause(error: BaseException) -> str:
    """An error in one line, as a manifest's `error` and a grid's outcome give it: its type and first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _save(run: _Run, step: int, state: dict, wall_time: float) -> None:
    """Checkpoint `state` as of `step`, after making the records before it durable (the checkpoint must not
    outlive them)."""
    if run.primary:
        schema.sync_records(run.workdir)
    with deferring_interrupts(), checkpoints.writing(run.checkpoints, run.checkpoint_bytes):
        checkpoints.save(run.checkpoints, step, state, run.iterator.get_state(), wall_time)


def _record_ending(run: _Run, status: str, **changes) -> None:
    """Mark the manifest with how the run ended (process 0)."""
    if run.primary:
        schema.write_manifest(run.workdir, schema.read_manifest(run.workdir).with_changes(status=status, **changes))


def _close(run: _Run, steps: _StepLog, status: str, **changes) -> None:
    """Wait for the checkpoints, close the writers and mark the manifest."""
    with checkpoints.writing(run.checkpoints, run.checkpoint_bytes):
        run.checkpoints.wait_until_finished()
    run.checkpoints.close()
    steps.close()
    _record_ending(run, status, **changes)


def _stop(run: _Run, steps: _StepLog, status: str, error: str | None = None) -> None:
    """Record a run stopped by an error or Ctrl-C: the checkpoint in flight is finished where it can be, the
    writers closed, and the manifest marked with the status, the error and the step reached. A manifest that
    cannot be written (no space for it) keeps its previous content, and standard error says so."""
    # The run is stopping on its own error: one from finishing its last checkpoint or closing would only hide it.
    with contextlib.suppress(Exception):
        with checkpoints.writing(run.checkpoints, run.checkpoint_bytes):
            run.checkpoints.wait_until_finished()
        run.checkpoints.close()
    with contextlib.suppress(Exception):
        steps.close()
    try:
        _record_ending(run, status, error=error, stopped_step=steps.step)
    except storage.DiskFull as e:
        log.error("%s could not be marked %s: %s It keeps its previous content.",
                  run.workdir / schema.MANIFEST_FILE, status, e)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> RunResult:
    """Run or resume the training run in `workdir` (see the module docstring)."""
    config_lib.validate(config)
    workdir = epath.Path(workdir)
    # The notice from the start: one during compilation stops the run at its first boundary.
    with RunLease(workdir) as lease, PreemptionNotice() as notice, InterruptNotice() as interrupt:
        return _train(config, workdir, lease, notice, interrupt)


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, lease: RunLease,
           notice: PreemptionNotice, interrupt: InterruptNotice) -> RunResult:
    """Prepare the run, train it, and record how it ended whichever way it did."""
    run = _prepare(config, workdir)
    steps = _StepLog(run)
    try:
        _loop(run, steps, lease, notice, interrupt)
    except (Preempted, TrainingDiverged, WorkdirHeld):
        raise  # recorded where raised (a run whose lease was taken over leaves the manifest to the new holder)
    except KeyboardInterrupt:
        with ignoring_interrupts():
            _stop(run, steps, "interrupted")
        raise Interrupted(run.workdir, steps.step) from None
    except Exception as e:
        if storage.is_no_space(e) and not isinstance(e, storage.DiskFull):  # a write not through analysis.storage
            disk_full = storage.DiskFull(getattr(e, "filename", None) or run.workdir)
            _stop(run, steps, "failed", error=failure_cause(disk_full))
            raise disk_full from None
        _stop(run, steps, "failed", error=failure_cause(e))
        raise
    return RunResult(workdir=run.workdir, step=run.total_steps, status="finished", final_loss=steps.final_loss)


def _loop(run: _Run, steps: _StepLog, lease: RunLease, notice: PreemptionNotice, interrupt: InterruptNotice) -> None:
    if run.is_eval_step(run.start_step):  # a run stopped during the evaluation that follows its checkpoint
        _evaluate(run, run.start_step)
    # (first step, steps, metrics) of the call dispatched last: fetched after the next dispatch, so the host never
    # stalls the device.
    pending, step = None, run.start_step
    last_checkpoint = time.monotonic()
    while step < run.total_steps:
        n, metrics = run.advance(step)
        if pending is not None:
            steps.handle_call(*pending)
        pending, step = (step, n, metrics), step + n
        if interrupt.requested:
            steps.handle_call(*pending)
            raise KeyboardInterrupt
        preempted = notice.reached()  # at every boundary, on every host alike
        if run.is_checkpoint_step(step) or preempted or run.checkpoint_due(last_checkpoint, step):
            steps.handle_call(*pending)
            pending = None
            lease.check()  # a run whose lease was taken over writes no checkpoint beside the new holder
            _save(run, step, run.state, steps.wall_time())
            last_checkpoint = time.monotonic()
        if preempted:  # a resumed run evaluates at this step if it is an evaluation step
            _close(run, steps, "preempted", stopped_step=step)
            raise Preempted(run.workdir, step)
        if run.is_eval_step(step):
            if pending is not None:  # the steps before an evaluation are timed (and checked) before it
                steps.handle_call(*pending)
                pending = None
            _evaluate(run, step)
            steps.restart_clock(step)
    if pending is not None:
        steps.handle_call(*pending)
    _close(run, steps, "finished", final_step=run.total_steps)
