"""One DiT training run: sharded state, jitted step, EMA, checkpoints, per-step records, automatic resume.

`train(config, workdir)` runs (or continues) the run in `workdir`:

    workdir/manifest.json      config, model Gflops/params, versions, devices, seed, status, every (re)start
    workdir/records.jsonl      one JSON object per logged step (fields: RECORD_FIELDS)
    workdir/checkpoints/<step> orbax checkpoints: train state, data-iterator state, run metadata
    workdir/evaluations.jsonl  sample quality of the EMA model at eval steps, each with its protocol

The same command continues a run killed at any moment: it restores the newest checkpoint that loads and
verifies, cuts records.jsonl back to that step (so every step has exactly one record), and replays the data
stream from the checkpointed iterator state. With a fixed seed a resumed run ends bit-for-bit where an
uninterrupted one does: each step's timesteps, noise and label dropout come from fold_in(seed, step).
A non-finite loss stops the run: the last good state (before the step that produced it, replayed from the
newest checkpoint) is checkpointed, and `TrainingDiverged` names the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.diffusion import GaussianDiffusion, linear_betas
from models.flops import dit_compute
from scaling import config as config_lib
from scaling import data as data_lib
from scaling.train_step import (
    init_state,
    make_mesh,
    make_optimizer,
    make_train_step,
    measure_matmul_peak,
    param_sharding,
    state_checksum,
)

log = logging.getLogger("dit_scaling.train")

RECORD_FIELDS = {
    "step": "optimizer steps completed",
    "images_seen": "step x global batch",
    "loss": "mean training loss of this step (mse + vb with learned sigma)",
    "mse": "epsilon mean-squared error of this step",
    "vb": "variational-bound term of this step, bits per dimension (learned sigma only)",
    "grad_norm": "global L2 norm of the gradient of this step",
    "gflops_per_image": "forward GMACs per image (the paper's 'Gflops')",
    "train_gflops_cumulative": "3 x gflops_per_image x global batch x step (paper units)",
    "wall_time": "seconds of training so far, summed over restarts: compilation, evaluation and checkpoint "
                 "writes included; start-up (restore, peak measurement) and steps lost to a kill not",
    "time": "Unix time of this record",
    "step_time": "mean seconds per step since the previous record, evaluation excluded; the first step after a "
                 "start (compilation) is left out, and a record of that step alone has null here",
    "images_per_s": "global batch / step_time",
    "utilization": "achieved FLOP/s (2 x 3 x MACs x images/s) over the matmul peak measured on one device times "
                   "the device count (simulated CPU devices share the cores, so it reads low there)",
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------------------
# Records and manifest
# ----------------------------------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """The valid records of a records.jsonl (a torn last line from a killed writer is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _truncate_records(path: Path, last_step: int) -> None:
    kept = [r for r in read_records(path) if r.get("step", math.inf) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _versions() -> dict:
    import flax
    import grain
    import orbax.checkpoint

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "orbax": orbax.checkpoint.__version__,
            "grain": getattr(grain, "__version__", "unknown"), "numpy": np.__version__}


def _tensorboard_writer(workdir: Path):
    """clu's TensorBoard writer when TensorFlow is installed (the `tensorboard` extra), else None."""
    if importlib.util.find_spec("tensorflow") is None:
        log.info("TensorBoard logging is off: pip install 'dit-scaling[tensorboard]' to turn it on.")
        return None
    from clu import metric_writers

    return metric_writers.create_default_writer(str(workdir / "tensorboard"))


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line (a reader skips a torn last line, see read_records)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    workdir: Path
    step: int
    status: str
    final_loss: float | None


def _checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints, keep_period=config.train.keep_every or None,
        enable_async_checkpointing=config.train.async_checkpoints, create=True)
    return ocp.CheckpointManager(workdir.resolve() / "checkpoints", options=options)


def _restore_latest(manager: ocp.CheckpointManager, abstract_state: dict):
    """Newest checkpoint that restores and matches its checksum; corrupt ones are skipped with a warning.
    Returns (step, restored, corrupt steps)."""
    corrupt = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged files
            log.warning("Checkpoint at step %d cannot be restored (%s: %s); skipping it.", step,
                        type(e).__name__, str(e).splitlines()[0][:200])
            corrupt.append(step)
            continue
        problem = _checksum_problem(restored, f"Checkpoint at step {step}")
        if problem:
            log.warning("Checkpoint at step %d is corrupt (%s); skipping it.", step, problem)
            corrupt.append(step)
            continue
        return step, restored, corrupt
    return None, None, corrupt


def _data_checksum(data_state) -> str:
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()


def _checksum_problem(restored: dict, name: str) -> str | None:
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


def _set_aside(workdir: Path, steps: list[int]) -> None:
    """Move unusable checkpoints to workdir/corrupt_checkpoints/ (kept for inspection, out of the way)."""
    if jax.process_index() == 0:
        target = workdir / "corrupt_checkpoints"
        target.mkdir(exist_ok=True)
        for step in steps:
            destination = target / f"{step}-{int(time.time())}"
            os.replace(workdir / "checkpoints" / str(step), destination)
            log.warning("Moved the unusable checkpoint of step %d to %s.", step, destination)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("set aside corrupt checkpoints")


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> RunResult:
    """Run or resume the training run in `workdir` (see the module docstring)."""
    config_lib.validate(config)
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    manifest_path, records_path = workdir / "manifest.json", workdir / "records.jsonl"
    config_dict = json.loads(json.dumps(config.to_dict(), default=str))
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if previous is not None:
        _check_same_run(previous["config"], config_dict, workdir)

    source = data_lib.open_source(config)
    height, width, channels = source.image_shape
    if height != width:
        raise ValueError(f"DiT takes square inputs; the data has {height}x{width} images or latents.")
    model_config = config_lib.model_config(config, input_size=height, in_channels=channels,
                                           num_classes=source.num_classes)
    compute = dit_compute(dataclasses.replace(model_config, dtype="float32"))
    diffusion = GaussianDiffusion(linear_betas(config.diffusion.num_timesteps), learn_sigma=model_config.learn_sigma)
    optimizer = make_optimizer(config)
    global_batch = config.train.batch_size
    mesh = make_mesh()
    if global_batch % jax.device_count():
        raise ValueError(f"train.batch_size {global_batch} must be a multiple of the device count "
                         f"{jax.device_count()}.")

    # -- state: restore or initialise --------------------------------------------------------------------------
    abstract = jax.eval_shape(lambda: init_state(model_config, optimizer, config.train.seed))
    state_sharding = jax.tree.map(lambda leaf: param_sharding(leaf, mesh, config.train.param_sharding), abstract)
    abstract_state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                  abstract, state_sharding)
    manager = _checkpoint_manager(workdir, config)
    start_step, restored, corrupt = _restore_latest(manager, abstract_state)
    if corrupt:
        manager.close()
        _set_aside(workdir, corrupt)
        manager = _checkpoint_manager(workdir, config)
    dataset = data_lib.make_dataset(source, global_batch=global_batch, seed=config.train.seed,
                                    flip=config.data.flip, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    iterator = data_lib.make_iterator(dataset, config.data.num_threads)
    if restored is not None:
        state, elapsed = restored["state"], restored["meta"]["wall_time"]
        iterator.set_state(restored["data"])
        log.info("Resuming %s from step %d.", workdir, start_step)
    else:
        if corrupt:
            log.warning("No usable checkpoint in %s: starting the run again from step 0.", workdir)
        start_step, elapsed = 0, 0.0
        state = jax.jit(lambda: init_state(model_config, optimizer, config.train.seed),
                        out_shardings=state_sharding)()

    initial_data_state = iterator.get_state()
    peak = measure_matmul_peak(model_config.dtype) * jax.device_count()
    total = config.train.steps
    if primary:
        _truncate_records(records_path, start_step)
        manifest = previous or {
            "config": config_dict, "model": dataclasses.asdict(model_config),
            "model_name": "DiT-" + config.model.name.removeprefix("DiT-"),
            "gflops_per_image": compute.gflops, "macs_per_image": compute.macs, "params": compute.params,
            "tokens": compute.tokens, "seed": config.train.seed, "global_batch": global_batch,
            "data": {"source": config.data.source, "examples": len(source)},
            "starts": []}
        manifest["starts"].append({"time": time.time(), "step": start_step, "versions": _versions(),
                                   "devices": {"count": jax.device_count(), "processes": jax.process_count(),
                                               "kind": jax.devices()[0].device_kind,
                                               "platform": jax.default_backend()},
                                   "matmul_peak_flops": peak})
        manifest["status"], manifest["total_steps"], manifest["config"] = "running", total, config_dict
        write_json(manifest_path, manifest)

    # -- the loop ----------------------------------------------------------------------------------------------
    data_sharding = NamedSharding(mesh, P("data"))
    step_fn = jax.jit(make_train_step(model_config, diffusion, optimizer, config.train.ema_decay),
                      in_shardings=(state_sharding, data_sharding), out_shardings=(state_sharding, None),
                      donate_argnums=(0,))
    flops_per_step = 2 * 3 * compute.macs * global_batch
    run_start, last_log_time, last_log_step = time.perf_counter(), None, start_step
    pending = None  # (step number, metrics) of the step dispatched last: fetched after the next dispatch
    writer = _tensorboard_writer(workdir) if primary else None
    final_loss = None

    def save(step: int, state: dict) -> None:
        data_state = iterator.get_state()
        meta = {"wall_time": elapsed + time.perf_counter() - run_start, "checksum": state_checksum(state),
                "data_checksum": _data_checksum(data_state)}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)

    def rebuild(step: int) -> dict:
        """The state after `step`, replayed from the newest checkpoint (or from initialisation): the device state
        has moved past it. Steps are deterministic, so the replay reproduces it exactly."""
        start, restored, _ = _restore_latest(manager, abstract_state)
        if restored is None:
            start, replayed = 0, jax.jit(lambda: init_state(model_config, optimizer, config.train.seed),
                                         out_shardings=state_sharding)()
            iterator.set_state(initial_data_state)
        else:
            replayed = restored["state"]
            iterator.set_state(restored["data"])
        for _ in range(start, step):
            batch = next(iterator)
            replayed, _ = step_fn(replayed, {k: jax.make_array_from_process_local_data(data_sharding, v)
                                             for k, v in batch.items()})
        return replayed

    def handle(step: int, metrics: dict) -> None:
        nonlocal last_log_time, last_log_step, final_loss
        metrics = jax.device_get(metrics)
        if not metrics["finite"]:
            manager.wait_until_finished()
            if step - 1 not in manager.all_steps():
                save(step - 1, rebuild(step - 1))
            manager.wait_until_finished()
            if primary:
                write_json(manifest_path, {**json.loads(manifest_path.read_text()), "status": "diverged"})
            raise TrainingDiverged(
                f"Loss is {float(metrics['loss'])} (grad norm {float(metrics['grad_norm'])}) at step {step}. The "
                f"last good state (step {step - 1}) is checkpointed in {workdir / 'checkpoints'}. Lower "
                "train.learning_rate or use float32 (model.dtype) and start a new workdir.")
        final_loss = float(metrics["loss"])
        now = time.perf_counter()
        if step == start_step + 1:
            last_log_time, last_log_step = now, step  # the first step after a start includes compilation
        if step % config.train.log_every and step != total:
            return
        step_time = (now - last_log_time) / (step - last_log_step) if step > last_log_step else None
        record = {"step": step, "images_seen": step * global_batch,
                  **{k: float(metrics[k]) for k in ("loss", "mse", "vb", "grad_norm") if k in metrics},
                  "gflops_per_image": compute.gflops,
                  "train_gflops_cumulative": 3 * compute.gflops * global_batch * step,
                  "wall_time": elapsed + now - run_start, "time": time.time(), "step_time": step_time,
                  "images_per_s": global_batch / step_time if step_time else None,
                  "utilization": flops_per_step / step_time / peak if step_time else None}
        last_log_time, last_log_step = now, step
        if primary:
            append_record(records_path, record)
            if writer is not None:
                writer.write_scalars(step, {k: v for k, v in record.items()
                                            if isinstance(v, float) and k not in ("time", "wall_time")})
            rate = f"{1 / step_time:.2f} steps/s, {record['images_per_s']:.0f} img/s" if step_time else "compiling"
            eta = f"ETA {_duration((total - step) * step_time)}" if step_time else ""
            print(f"[{workdir.name}] step {step}/{total}  loss {record['loss']:.4f}  {rate}  {eta}", flush=True)

    evaluator = None
    if config.eval.every:
        from scaling.evaluate import EVALUATIONS_FILE, RunEvaluator, pending_evaluations

        evaluator = RunEvaluator(config, source, model_config, diffusion, compute, mesh)

    def is_eval_step(step: int) -> bool:
        return evaluator is not None and step > 0 and (step % config.eval.every == 0 or step == total)

    def evaluate(step: int) -> None:
        nonlocal last_log_time, last_log_step
        protocols = pending_evaluations(workdir, step, config)
        if not protocols:
            return
        for record in evaluator.evaluate(step, state["ema"], protocols):
            if primary:
                append_record(workdir / EVALUATIONS_FILE, record)
                print(f"[{workdir.name}] eval step {step}: {record['metric']} {record['value']:.4f} "
                      f"({record['protocol']['sampler']} {record['protocol']['sampling_steps']} steps, "
                      f"{record['seconds']:.0f} s)", flush=True)
        last_log_time, last_log_step = time.perf_counter(), step  # step times exclude evaluations

    if is_eval_step(start_step):  # a run stopped during the evaluation that follows its checkpoint
        evaluate(start_step)
    for step in range(start_step, total):
        batch = next(iterator)
        batch = {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in batch.items()}
        state, metrics = step_fn(state, batch)
        if pending is not None:
            handle(*pending)
        pending = (step + 1, metrics)
        if (step + 1) % config.train.checkpoint_every == 0 or step + 1 == total or is_eval_step(step + 1):
            handle(*pending)
            pending = None
            save(step + 1, state)
        if is_eval_step(step + 1):
            evaluate(step + 1)
    if pending is not None:
        handle(*pending)
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
        writer.close()
    if primary:
        write_json(manifest_path, {**json.loads(manifest_path.read_text()), "status": "finished",
                                    "final_step": total})
    return RunResult(workdir=workdir, step=total, status="finished", final_loss=final_loss)


def _check_same_run(previous: dict, current: dict, workdir: Path) -> None:
    """A workdir continues only the run it holds; train.steps and the eval section may change."""
    def without_steps(config):  # evaluation settings do not change training either
        return {**{k: v for k, v in config.items() if k != "eval"},
                "train": {k: v for k, v in config["train"].items() if k != "steps"}}

    before, after = without_steps(previous), without_steps(current)
    if before != after:
        changed = sorted(f"{section}.{key}" for section in set(before) | set(after)
                         for key in set(before.get(section, {})) | set(after.get(section, {}))
                         if before.get(section, {}).get(key) != after.get(section, {}).get(key))
        raise ValueError(f"{workdir} holds a run with a different config ({', '.join(changed)} differ). Use a new "
                         "--workdir, or the run's own config to resume it.")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def load_final_params(workdir: str | os.PathLike, *, ema: bool = True) -> dict:
    """The parameters (EMA by default) of the newest checkpoint of a run, as a pure dict of numpy arrays."""
    manager = ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints")
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    manager.close()
    if _checksum_problem(restored, f"The newest checkpoint of {workdir}"):
        raise ValueError(f"The newest checkpoint of {workdir} (step {step}) does not match its checksum: it is "
                         "corrupt. Run the run's training command again: it sets the checkpoint aside and resumes "
                         "from an older one.")
    return jax.device_get(restored["state"]["ema" if ema else "params"])

