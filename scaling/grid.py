"""The grid: one training run per config of a study, resumable and splittable across machines.

With `workers` > 1 the runs go to that many worker processes at once, each confined to its share of this
machine's cores (single-threaded XLA on a single core): miniature DiTs spend much of a step in per-operation
overhead that extra threads do not shorten, so two one-core runs finish sooner than the same two runs one after
the other on two cores. The costliest runs start first, so the workers finish together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback

import jax
from etils import epath

from analysis import schema, storage
from models.dit import PAPER_MODELS, short_name
from scaling import config as config_lib
from scaling.cost import predicted_seconds, remaining_costs
from scaling.host import WORKER_CORES_VARIABLE
from scaling.lease import HELD_EXIT_CODE, WorkdirHeld, describe_holder, gone_from_this_host, read_holder
from scaling.preemption import EXIT_CODE, INTERRUPTED_EXIT_CODE, Interrupted, Preempted
from scaling.train import failure_cause, train

log = logging.getLogger("dit_scaling.grid")


def _grid_name(model: str) -> str:
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
    models = [_grid_name(m) for m in models]
    if only:
        known = {_grid_name(m) for m in models}
        unknown = [m for m in only if _grid_name(m) not in known]
        if unknown:
            raise ValueError(f"--only names configs outside the study: {unknown}; the study has {models}.")
        wanted = {_grid_name(m) for m in only}
        models = [m for m in models if _grid_name(m) in wanted]
    return models


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must be i/n (e.g. 0/4), got {shard!r}.") from e
    if not 0 <= index < count:
        raise ValueError(f"--shard {shard}: need 0 <= i < n.")
    return index, count


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
    progress and starts no other, as Ctrl-C stops them and starts no other; a run that another machine holds is
    skipped. Returns {model: "finished" | "skipped" | "skipped: ... is being written by another run ..." |
    "failed: ..." | "preempted" | "interrupted" | "not started"}."""
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
        pending.sort(key=lambda m: -_ordering_cost(configs[m]))  # costliest first: the workers end together
        outcome.update(_run_in_workers({m: configs[m] for m in pending}, workdirs, workers, on_finish))
        return {model: outcome.get(model, "not started") for model in configs}
    for i, model in enumerate(pending):
        log.info("[%d/%d] %s -> %s", i + 1, len(pending), model, workdirs[model])
        outcome[model] = train_run(configs[model], workdirs[model])
        if on_finish is not None:
            on_finish(model, outcome[model])
        if outcome[model] in ("preempted", "interrupted"):
            break
    return {model: outcome.get(model, "not started") for model in configs}


def _ordering_cost(config) -> float:
    """predicted_seconds, or 0 for a config whose model cannot be built: its run fails at once, in its worker."""
    try:
        return predicted_seconds(config)
    except ValueError:
        return 0.0


def train_run(config, workdir: epath.Path) -> str:
    """Train (or resume) one run of a grid and say how it ended: "finished", "preempted" (checkpointed),
    "interrupted" (Ctrl-C), "skipped: ..." (another command holds its workdir; its manifest is that command's to
    write) or "failed: ..." (the reason, in one line, written to its manifest too, where it has one)."""
    try:
        train(config, workdir)
        return "finished"
    except Preempted as e:
        log.warning("%s", e)
        return "preempted"
    except KeyboardInterrupt as e:  # Interrupted once training began; before, nothing of this start to record
        log.warning("%s", e if isinstance(e, Interrupted) else Interrupted(workdir))
        return "interrupted"
    except WorkdirHeld:
        outcome = held_outcome(workdir)
        log.warning("%s: %s", workdir.name, outcome)
        return outcome
    except Exception as e:  # one failed run must not stop the grid
        error = failure_cause(e)
        if isinstance(e, storage.DiskFull):  # the message says all there is
            log.error("%s failed: %s", workdir.name, e)
        else:
            log.error("%s failed:\n%s", workdir.name, traceback.format_exc().rstrip())
        if jax.process_index() == 0:
            _record_failure(workdir, error)
        return f"failed: {error}"


def held_outcome(workdir: epath.Path) -> str:
    """The outcome of a run whose workdir another command holds, naming the holder its lease names."""
    return f"skipped: {workdir} is being written by another run: {describe_holder(read_holder(workdir))}"


def _record_failure(workdir: epath.Path, error: str) -> None:
    """Write a failed run's reason into its manifest (where it has one yet); a run that said it diverged keeps
    that status. A manifest with no space to be written keeps its previous content."""
    manifest = schema.read_manifest(workdir)
    if manifest is not None:
        status = "diverged" if manifest.status == "diverged" else "failed"
        try:
            schema.write_manifest(workdir, manifest.with_changes(status=status, error=error))
        except storage.DiskFull as e:
            log.error("%s could not be marked failed: %s", workdir / schema.MANIFEST_FILE, e)


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
    """The environment of a worker on `cores` (see host.confine_worker): on a single core, single-threaded XLA and
    BLAS. (OpenBLAS, under numpy and scipy's Frechet distances, starts a thread per core of the machine; its idle
    threads spin on the cores of the other workers.)"""
    env = {**os.environ, WORKER_CORES_VARIABLE: ",".join(map(str, cores)), "PYTHONUNBUFFERED": "1"}
    if len(cores) == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return env


class _RunLog:
    """A worker's output, appended to the run's train.log (from two pipes, so one line at a time): line by line on
    a local disk, in one write when the worker ends on an object store (which cannot append). Keeps the last lines
    that say something, for the message of a failed run."""

    def __init__(self, path: epath.Path):
        self.path, self._lines, self.tail = path, [], []
        self._lock = threading.Lock()
        self._file = None if storage.is_url(path) else open(path, "a")
        self._full = False  # no space left for the log: its lines are kept in the tail alone

    def __enter__(self) -> _RunLog:
        return self

    def write(self, line: str) -> None:
        with self._lock:
            if line.strip():
                self.tail = [*self.tail[-19:], line.rstrip()]
            if self._file is None:
                self._lines.append(line)
            elif not self._full:
                try:
                    self._file.write(line)
                    self._file.flush()
                except OSError as e:
                    if not storage.is_no_space(e):
                        raise
                    self._full = True
                    log.error("%s", storage.DiskFull(self.path, len(line.encode())))

    def __exit__(self, *exc) -> None:
        if self._file is None:
            storage.append_text(self.path, "".join(self._lines))
        else:
            with contextlib.suppress(OSError):  # what did not fit was reported when it was written
                self._file.close()


def _copy_lines(stream, run_log: _RunLog) -> None:
    for line in stream:
        run_log.write(line)


def worker_exit_code(outcome: str) -> int:
    """The exit code a worker (scaling.worker) answers a run's outcome with (`_worker_outcome` reads it back): 0
    finished, scaling.preemption's for preempted and interrupted, scaling.lease's when another command holds the
    workdir, analysis.storage's for lack of space, 1 for another failure."""
    if outcome == "finished":
        return 0
    if outcome == "preempted":
        return EXIT_CODE
    if outcome == "interrupted":
        return INTERRUPTED_EXIT_CODE
    if outcome.startswith("skipped"):
        return HELD_EXIT_CODE
    return storage.DISK_FULL_EXIT_CODE if outcome.startswith(f"failed: {storage.DiskFull.__name__}") else 1


def _worker_outcome(workdir: epath.Path, code: int, run_log: _RunLog) -> str:
    """A worker's outcome from its exit code (`worker_exit_code`), and for a failure the reason its manifest
    gives. Without one (no manifest yet, a manifest that a full disk kept from being marked, or a worker killed
    or crashed outside Python, whose manifest still says `running`) the reason is the exit code and the last line
    of its log, and a `running` manifest is marked failed with it."""
    if code == 0:
        return "finished"
    if code == EXIT_CODE:  # checkpointed and marked preempted by the run itself
        return "preempted"
    if code == INTERRUPTED_EXIT_CODE:  # marked interrupted by the run itself
        return "interrupted"
    if code == HELD_EXIT_CODE:
        return held_outcome(workdir)
    manifest = schema.read_manifest(workdir)
    if manifest is not None and manifest.status != "running" and manifest.error:
        return f"failed: {manifest.error}"
    reason = f"exit code {code}" + (f": {run_log.tail[-1]}" if run_log.tail else "")
    if manifest is not None and manifest.status == "running":
        _record_failure(workdir, reason)
    return f"failed: {reason}"


def _run_in_workers(configs: dict, workdirs: dict[str, epath.Path], workers: int, on_finish) -> dict[str, str]:
    """Train `configs` (in this order) in `workers` worker processes (`python -m scaling.worker WORKDIR`, the
    config as JSON on its standard input), each confined to its share of the cores. A worker's output goes to its
    run's train.log; its standard output, the run's progress lines, to this process's too."""
    shares = core_shares(workers)
    queue, outcome, lock = list(configs), {}, threading.Lock()
    children: set[subprocess.Popen] = set()

    def work(cores: list[int], done: threading.Event) -> None:
        try:
            run_queued(cores)
        finally:
            done.set()

    def run_queued(cores: list[int]) -> None:
        while True:
            with lock:
                if not queue:
                    return
                model = queue.pop(0)
            workdir = workdirs[model]
            workdir.mkdir(parents=True, exist_ok=True)
            log.info("%s -> %s (worker on core%s %s)", model, workdir, "s" if len(cores) > 1 else "",
                     ",".join(map(str, cores)))
            config_json = json.dumps(configs[model].to_dict(), default=str)  # as the run's manifest records it
            with _RunLog(workdir / schema.LOG_FILE) as run_log:
                # In a process group of its own: Ctrl-C at a terminal reaches the grid alone, which passes it on
                # once (a second SIGINT could cut short a worker's recording of the first).
                child = subprocess.Popen([sys.executable, "-m", "scaling.worker", str(workdir)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=worker_environment(cores), process_group=0)
                with lock:
                    children.add(child)
                with contextlib.suppress(BrokenPipeError):  # a worker that ended at once says why in its log
                    child.stdin.write(config_json)
                    child.stdin.close()
                details = threading.Thread(target=_copy_lines, args=(child.stderr, run_log), daemon=True)
                details.start()
                for line in child.stdout:  # progress lines
                    run_log.write(line)
                    print(line.rstrip(), flush=True)
                details.join()
                code = child.wait()
            with lock:
                children.discard(child)
            result = _worker_outcome(workdir, code, run_log)
            if result.startswith("failed"):
                log.error("%s %s; its output is in %s:\n%s", model, result, workdir / schema.LOG_FILE,
                          "\n".join(run_log.tail))
            with lock:
                outcome[model] = result
                if on_finish is not None:
                    on_finish(model, result)

    def pass_preemption_on(*_) -> None:  # the workers checkpoint and exit; no run starts after them
        with lock:
            queue.clear()
            for child in children:
                child.send_signal(signal.SIGTERM)

    # Each thread says when it is done with an event: a Thread.join cut short by Ctrl-C can leave the thread
    # looking finished while it still runs (CPython 3.11), an Event.wait cannot.
    finished = [threading.Event() for _ in shares]
    for cores, done in zip(shares, finished, strict=True):
        threading.Thread(target=work, args=(cores, done), daemon=True).start()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, pass_preemption_on) if in_main_thread else None
    try:
        while not all(done.is_set() for done in finished):
            for done in finished:
                done.wait(timeout=0.5)
    except KeyboardInterrupt:  # the workers record their runs as interrupted; their outcomes say so
        with lock:
            queue.clear()
            for child in children:
                child.send_signal(signal.SIGINT)
        for done in finished:
            done.wait()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
    return outcome


def _holder_gone(workdir: epath.Path) -> bool:
    """A run whose manifest says running, but whose lease holder was a process of this host that no longer lives:
    it was killed outright (SIGKILL, out of memory, a lost machine) with no chance to record why."""
    holder = read_holder(workdir)
    return holder is not None and gone_from_this_host(holder)


def _scheduler_states(runs_dir: epath.Path) -> dict:
    """{run: its SLURM task and state} for a grid submitted with --launcher slurm; {None: why unknown} when SLURM
    cannot be asked."""
    from scaling import slurm

    if storage.is_url(runs_dir) or not (runs_dir / slurm.SCHEDULER_DIR / slurm.SUBMISSIONS_FILE).is_file():
        return {}
    try:
        return {run: f"slurm {state}" for run, state in slurm.task_states(runs_dir).items()}
    except slurm.LauncherError as e:
        return {None: f"unknown: {e}"}


def run_status(path: str | epath.Path) -> list[dict]:
    """One row per run, of the run directory `path` or of every run directory under it (a directory that is
    neither has none): model, status, progress, compute spent, last loss, the newest evaluation of each metric (a
    sample metric and the held-out loss keep their own schedules), how an unfinished run stopped (the error and the
    step) and the records it lost, if any, whether a run said to be running lost its process (`holder_gone`), and
    for a grid submitted to SLURM, its task's state there (`scheduler`: "slurm JOB_TASK STATE", or None once SLURM
    no longer lists it)."""
    path = epath.Path(path)
    if (path / schema.MANIFEST_FILE).is_file():
        workdirs = [path]
    else:
        workdirs = [manifest_path.parent for manifest_path in sorted(path.glob(f"*/{schema.MANIFEST_FILE}"))]
    scheduled = _scheduler_states(path)
    rows = []
    for workdir in workdirs:
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
            "error": manifest.error, "stopped_step": manifest.stopped_step, "records_gap": manifest.records_gap,
            "holder_gone": manifest.status == "running" and _holder_gone(workdir),
            "scheduler": scheduled.get(workdir.name, scheduled.get(None)),
        })
    if scheduled:  # runs of a submitted grid that have not started yet
        from scaling import slurm

        started = {row["run"] for row in rows}
        for submission in slurm.submissions(path):
            for run, model, steps in zip(submission["runs"], submission["models"], submission["steps"], strict=True):
                if run in scheduled and run not in started:
                    started.add(run)
                    rows.append({"run": run, "model": model, "status": "not started", "step": 0, "total_steps": steps,
                                 "images_seen": 0, "train_gflops_cumulative": 0.0, "loss": None, "wall_time": None,
                                 "latest_evaluations": {}, "error": None, "stopped_step": None, "records_gap": None,
                                 "holder_gone": False, "scheduler": scheduled[run]})
    return rows
