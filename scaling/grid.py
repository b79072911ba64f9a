"""The grid: one training run per config of a study, resumable and splittable across machines.

With `workers` > 1 the runs go to that many worker processes at once, each confined to its share of this
machine's cores (single-threaded XLA on a single core): miniature DiTs spend much of a step in per-operation
overhead that extra threads do not shorten, so two one-core runs finish sooner than the same two runs one after
the other on two cores. The costliest runs start first, so the workers finish together.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback

import jax
import numpy as np
from etils import epath

from analysis import schema, storage
from models.dit import PAPER_MODELS, short_name
from models.flops import model_compute
from scaling import config as config_lib
from scaling import data as data_lib
from scaling.host import WORKER_CORES_VARIABLE
from scaling.lease import HELD_EXIT_CODE, WorkdirHeld
from scaling.preemption import EXIT_CODE, Preempted
from scaling.train import train

log = logging.getLogger("dit_scaling.grid")


def _short(model: str) -> str:
    """A model name as grids use it: DiT's "S/8" for "S/8" or "DiT-S/8"; a family's member names as given."""
    try:
        return short_name(model)
    except ValueError:
        return model


def grid_models(config_name: str, models: list[str] | None = None, only: list[str] | None = None) -> list[str]:
    """The configs of a grid: `models`, else the members of a plugged-in family (the config's model.family_sizes),
    else the paper's 12; then filtered by --only."""
    if not models:
        members = config_lib.family_members(config_lib.load_config(config_name.partition(":")[0]))
        models = members or list(PAPER_MODELS)
    models = [_short(m) for m in models]
    if only:
        known = {_short(m) for m in models}
        unknown = [m for m in only if _short(m) not in known]
        if unknown:
            raise ValueError(f"--only names configs outside the study: {unknown}; the study has {models}.")
        wanted = {_short(m) for m in only}
        models = [m for m in models if _short(m) in wanted]
    return models


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must be i/n (e.g. 0/4), got {shard!r}.") from e
    if not 0 <= index < count:
        raise ValueError(f"--shard {shard}: need 0 <= i < n.")
    return index, count


def planned_model(config):
    """The model config (DiTConfig, or a plug-in's FactoryConfig) a run of `config` trains, known before its data
    is at hand: Fashion-MNIST's shape, or the latents' manifest where they exist, else latents of the published SD
    autoencoder (KL-f8, 4 channels) with ImageNet's 1000 classes."""
    if config.data.source == "fashion_mnist":
        shape, classes = data_lib.FashionMNIST.image_shape, data_lib.FashionMNIST.num_classes
    elif (epath.Path(config.data.path) / "manifest.json").is_file():
        source = data_lib.open_source(config)
        shape, classes = source.image_shape, source.num_classes
    else:
        from models.autoencoder import AutoencoderConfig

        autoencoder = AutoencoderConfig()
        side = config.data.resolution // 2 ** (len(autoencoder.block_out_channels) - 1)
        shape, classes = (side, side, autoencoder.latent_channels), 1000
    return config_lib.model_config(config, input_size=shape[0], in_channels=shape[2], num_classes=classes,
                                   dtype="float32")


def training_flops(config) -> float:
    """A run's training compute in FLOPs: 3 x the forward pass (2 FLOPs per MAC) x batch x steps. (The paper's
    Gflops, and the records' cumulative training Gflops, count MACs: half of this.)"""
    return 6 * model_compute(planned_model(config)).macs * config.train.batch_size * config.train.steps


def remaining_costs(configs: dict, workdirs: dict | None = None) -> dict[str, float]:
    """Each run's cost still to pay, in seconds where any run has measured step times, else in training FLOPs: a
    run with step records costs its mean measured step time x the steps it has left; one without, its training
    FLOPs left x the median seconds per FLOP of the measured runs."""
    flops_left, step_time, steps_left = {}, {}, {}
    for model, config in configs.items():
        steps = schema.read_steps(workdirs[model]) if workdirs and (workdirs[model] / schema.STEPS_FILE).is_file() \
            else []
        steps_left[model] = max(0, config.train.steps - (steps[-1].step if steps else 0))
        flops_left[model] = training_flops(config) * steps_left[model] / config.train.steps
        times = [r.step_time for r in steps if r.step_time]
        if times:
            step_time[model] = float(np.mean(times))
    if not step_time:
        return flops_left
    rate = float(np.median([step_time[m] / (training_flops(configs[m]) / configs[m].train.steps)
                            for m in step_time]))
    return {m: step_time[m] * steps_left[m] if m in step_time else flops_left[m] * rate for m in configs}


def plan_shards(costs: dict[str, float], count: int) -> list[list[str]]:
    """The runs in `count` shards of about equal cost: the costliest run goes to the shard with the least so far
    (longest-processing-time first), ties to the lower shard and the lower name."""
    shards, totals = [[] for _ in range(count)], [0.0] * count
    for model in sorted(costs, key=lambda m: (-costs[m], m)):
        lightest = min(range(count), key=lambda i: (totals[i], i))
        shards[lightest].append(model)
        totals[lightest] += costs[model]
    return shards


def shard_plan_path(runs_dir: epath.Path, count: int) -> epath.Path:
    return runs_dir / f"shards-{count}.json"


def shard_plan(configs: dict, count: int, runs_dir: epath.Path, workdirs: dict, *, write: bool) -> list[list[str]]:
    """The grid's split into `count` shards: the one runs_dir/shards-COUNT.json holds, else planned now from the
    runs' remaining costs and (write=True) kept there, first writer wins, so that every machine, started now or
    restarted later when more runs have records, takes the same share."""
    path = shard_plan_path(runs_dir, count)
    if not path.is_file() and write:
        plan = plan_shards(remaining_costs(configs, workdirs), count)
        storage.create_only(path, json.dumps({"shards": plan}, indent=2) + "\n")  # a plan written first stands
    if not path.is_file():
        return plan_shards(remaining_costs(configs, workdirs), count)
    plan = json.loads(path.read_text())["shards"]
    if sorted(sum(plan, [])) != sorted(configs):
        raise ValueError(f"{path} splits other configs ({sorted(sum(plan, []))}) than this grid's "
                         f"({sorted(configs)}). Delete it to plan the split again, or give the grid its configs.")
    return plan


# A cost model of one run on a CPU, for the order of the runs and the ETA before any run has finished: seconds per
# step = STEP_OVERHEAD_S + training FLOPs / TRAIN_FLOP_RATE; per evaluation, EVAL_OVERHEAD_S + forward FLOPs of
# sampling and the held-out loss / EVAL_FLOP_RATE. Fitted to a study on one core each of a 2-core AMD EPYC, the
# slowest CPU seen (docs/benchmarks.md, "The miniature study"); the study rescales it by the runs that finish.
STEP_OVERHEAD_S = 0.003
TRAIN_FLOP_RATE = 50e9
EVAL_FLOP_RATE = 22e9
EVAL_OVERHEAD_S = 5.0
RUN_OVERHEAD_S = 20.0  # start, compilation, checkpoints


def predicted_seconds(config) -> float:
    """The cost model's seconds for one run of `config` on one core of the reference CPU."""
    model = planned_model(config)
    macs = model_compute(model).macs
    train_flops = 2 * 3 * macs * config.train.batch_size
    seconds = RUN_OVERHEAD_S + config.train.steps * (STEP_OVERHEAD_S + train_flops / TRAIN_FLOP_RATE)
    e = config.eval
    if e.every:
        steps = config.train.steps
        samples = steps // e.every + (steps % e.every != 0)
        every = e.validation_every or e.every
        validations = steps // every + (steps % every != 0)
        forward_passes = (samples * e.num_samples * sum(e.sampling_steps)
                          + validations * e.validation_examples * e.validation_timesteps)
        forward_passes += e.num_samples * sum(s for s in e.final_sampling_steps if s not in e.sampling_steps)
        # validation_every divides eval.every, so the held-out loss's steps include the samples'.
        evaluations = max(samples, validations) if e.validation_examples else samples
        seconds += evaluations * EVAL_OVERHEAD_S + 2 * macs * forward_passes / EVAL_FLOP_RATE
    return seconds


def load_grid_configs(config_name: str, models: list[str], overrides: list[str] = (), *,
                      validate: bool = True) -> dict:
    """{model: config} for every model of a grid, each loaded and checked before any run starts: a bad override
    or variant stops the grid at once, not hours later when its turn comes. validate=False skips what only a run
    needs (its data, decoder and reference), for planning."""
    base, _, options = config_name.partition(":")
    configs = {}
    for model in models:
        variant = model + (f",{options}" if options else "")
        try:
            configs[model] = config_lib.load_config(f"{base}:{variant}", overrides)
            if validate:
                config_lib.validate(configs[model])
        except Exception as e:
            raise ValueError(f"The config of {model} ({base}:{variant}) is not usable: {e}") from e
    return configs


def is_finished(workdir: epath.Path, config) -> bool:
    manifest = schema.read_manifest(workdir)
    return manifest is not None and manifest.status == "finished" and manifest.final_step == config.train.steps


def run_grid(config_name: str, runs_dir: str | epath.Path, *, models: list[str] | None = None,
             only: list[str] | None = None, shard: str | None = None, overrides: list[str] = (),
             workers: int = 1, on_finish=None) -> dict[str, str]:
    """Train every selected config into runs_dir/<run>; skip finished runs, resume the rest, keep going on
    failures. With workers > 1, that many runs at once in worker processes (see the module docstring).
    `on_finish(model, outcome)` is called as each run ends. A preemption notice (SIGTERM) checkpoints the runs in
    progress and starts no other; a run that another machine holds is skipped. Returns {model: "finished" |
    "skipped" | "skipped: held ..." | "failed: ..." | "preempted" | "not started"}."""
    selected = grid_models(config_name, models, only)
    runs_dir = epath.Path(runs_dir)
    configs = load_grid_configs(config_name, selected, overrides)
    workdirs = {model: runs_dir / config_lib.run_name(config) for model, config in configs.items()}
    if shard:
        index, count = parse_shard(shard)
        if jax.process_index() == 0:
            shard_plan(configs, count, runs_dir, workdirs, write=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("shard plan written")
        mine = set(shard_plan(configs, count, runs_dir, workdirs, write=False)[index])
        configs = {model: config for model, config in configs.items() if model in mine}
    outcome, pending = {}, []
    for model, config in configs.items():
        if is_finished(workdirs[model], config):
            outcome[model] = "skipped"
            log.info("%s: finished already, skipped.", model)
        else:
            pending.append(model)
    if workers > 1 and len(pending) > 1:
        pending.sort(key=lambda m: -predicted_seconds(configs[m]))  # costliest first: the workers end together
        outcome.update(_run_in_workers(config_name, workdirs, pending, overrides, workers, on_finish))
        return {model: outcome.get(model, "not started") for model in configs}
    for i, model in enumerate(pending):
        workdir = workdirs[model]
        log.info("[%d/%d] %s -> %s", i + 1, len(pending), model, workdir)
        try:
            train(configs[model], workdir)
            outcome[model] = "finished"
        except Preempted as e:
            log.warning("%s", e)
            outcome[model] = "preempted"
            break
        except WorkdirHeld as e:  # another machine trains it: its manifest is that run's to write
            log.warning("%s: skipped: %s", model, e)
            outcome[model] = f"skipped: {e}"
        except Exception as e:  # one failed run must not stop the grid
            outcome[model] = f"failed: {type(e).__name__}: {e}"
            log.error("%s failed:\n%s", model, traceback.format_exc())
            manifest = schema.read_manifest(workdir)
            if jax.process_index() == 0 and manifest is not None:
                schema.write_manifest(workdir, manifest.with_changes(status="failed", error=f"{type(e).__name__}: {e}"))
        if on_finish is not None:
            on_finish(model, outcome[model])
    return {model: outcome.get(model, "not started") for model in configs}


# ----------------------------------------------------------------------------------------------------------------
# Several runs at once
# ----------------------------------------------------------------------------------------------------------------

def core_shares(workers: int) -> list[list[int]]:
    """This process's cores split into `workers` shares of equal size (at least one core each)."""
    cores = sorted(os.sched_getaffinity(0))
    if workers > len(cores):
        raise ValueError(f"--workers {workers} exceeds the {len(cores)} cores this process may use.")
    size = len(cores) // workers
    return [cores[i * size:(i + 1) * size] for i in range(workers)]


def worker_environment(cores: list[int]) -> dict[str, str]:
    """The environment of a worker on `cores` (see host.confine_worker): on a single core, single-threaded XLA."""
    env = {**os.environ, WORKER_CORES_VARIABLE: ",".join(map(str, cores)), "PYTHONUNBUFFERED": "1"}
    if len(cores) == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    return env


class _RunLog:
    """A worker's output, appended to the run's train.log: line by line on a local disk, in one write when the
    worker ends on an object store (which cannot append)."""

    def __init__(self, path: epath.Path):
        self.path, self._lines = path, []
        self._file = None if storage.is_url(path) else open(path, "a")

    def __enter__(self) -> _RunLog:
        return self

    def write(self, line: str) -> None:
        if self._file is None:
            self._lines.append(line)
        else:
            self._file.write(line)
            self._file.flush()

    def __exit__(self, *exc) -> None:
        if self._file is None:
            storage.append_text(self.path, "".join(self._lines))
        else:
            self._file.close()


def _run_in_workers(config_name: str, workdirs: dict[str, epath.Path], models: list[str], overrides: list[str],
                    workers: int, on_finish) -> dict[str, str]:
    shares = core_shares(workers)
    queue, outcome, lock = list(models), {}, threading.Lock()
    children: set[subprocess.Popen] = set()

    def work(cores: list[int]) -> None:
        while True:
            with lock:
                if not queue:
                    return
                model = queue.pop(0)
            workdir = workdirs[model]
            workdir.mkdir(parents=True, exist_ok=True)
            base, _, options = config_name.partition(":")
            command = [sys.executable, "-m", "scaling.cli", "train", "--workdir", str(workdir),
                       "--config", f"{base}:{model}" + (f",{options}" if options else ""),
                       *(f"--config.{o}" for o in overrides)]
            log.info("%s -> %s (worker on core%s %s)", model, workdir, "s" if len(cores) > 1 else "",
                     ",".join(map(str, cores)))
            tail: list[str] = []
            with _RunLog(workdir / schema.LOG_FILE) as run_log:
                child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env=worker_environment(cores))
                with lock:
                    children.add(child)
                for line in child.stdout:
                    run_log.write(line)
                    tail = [*tail[-19:], line.rstrip()]
                    if line.startswith("["):  # the run's progress and evaluation lines
                        print(line.rstrip(), flush=True)
                code = child.wait()
            with lock:
                children.discard(child)
            if code == 0:
                result = "finished"
            elif code == EXIT_CODE:  # checkpointed and marked preempted by the run itself
                result = "preempted"
            elif code == HELD_EXIT_CODE:  # another machine trains it
                result = "skipped: " + next((t for t in reversed(tail) if "error:" in t), "held by another run")
            else:
                reason = next((t for t in reversed(tail) if "error" in t.lower() or "Error" in t), "") or \
                    (tail[-1] if tail else "")
                result = f"failed: exit code {code}: {reason}"
                manifest = schema.read_manifest(workdir)
                if manifest is not None and manifest.status == "running":  # a diverged run says so itself
                    schema.write_manifest(workdir, manifest.with_changes(status="failed", error=reason))
                log.error("%s failed (exit code %d); its output is in %s:\n%s", model, code,
                          workdir / schema.LOG_FILE, "\n".join(tail))
            with lock:
                outcome[model] = result
                if on_finish is not None:
                    on_finish(model, result)

    def pass_preemption_on(*_) -> None:  # the workers checkpoint and exit; no run starts after them
        with lock:
            queue.clear()
            for child in children:
                child.send_signal(signal.SIGTERM)

    threads = [threading.Thread(target=work, args=(cores,), daemon=True) for cores in shares]
    for thread in threads:
        thread.start()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, pass_preemption_on) if in_main_thread else None
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        with lock:
            queue.clear()
            for child in children:
                child.send_signal(signal.SIGINT)
        for child in list(children):
            child.wait()
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
    return outcome


def run_status(runs_dir: str | epath.Path) -> list[dict]:
    """One row per run under runs_dir: model, status, progress, compute spent, last loss, and the newest evaluation
    of each metric (a sample metric and the held-out loss keep their own schedules)."""
    rows = []
    for manifest_path in sorted(epath.Path(runs_dir).glob(f"*/{schema.MANIFEST_FILE}")):
        workdir = manifest_path.parent
        manifest = schema.read_manifest(workdir)
        steps = schema.read_steps(workdir)
        evaluations = schema.read_evaluations(workdir)
        last = steps[-1] if steps else None
        rows.append({
            "run": workdir.name, "model": manifest.model_name, "status": manifest.status,
            "step": last.step if last else 0, "total_steps": manifest.total_steps,
            "images_seen": last.images_seen if last else 0,
            "train_gflops_cumulative": last.train_gflops_cumulative if last else 0.0,
            "loss": last.loss if last else None, "wall_time": last.wall_time if last else None,
            "latest_evaluations": {r.metric: r.to_json() for r in sorted(evaluations, key=lambda r: r.step)},
            "error": manifest.error,
        })
    return rows
