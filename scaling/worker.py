"""A worker of the grid: one run in a process of its own. Started by `scaling.grid` for `workers` > 1 as

    python -m scaling.worker WORKDIR < CONFIG.json

and by a SLURM array task (`scaling.slurm`) as

    srun python -m scaling.worker --plan runs.json

It gets the run's resolved config as data (the ConfigDict as JSON on standard input, or run SLURM_ARRAY_TASK_ID of
the plan file) and answers with its exit code and the manifest the run writes (`scaling.grid.worker_exit_code`): 0
finished (or found finished); scaling.preemption.EXIT_CODE preempted, checkpointed;
scaling.preemption.INTERRUPTED_EXIT_CODE interrupted by Ctrl-C; scaling.lease.HELD_EXIT_CODE when another command
holds the workdir (its lease.json names which); analysis.storage.DISK_FULL_EXIT_CODE when no space was left;
anything else failed. A failure's reason is in the manifest's `error` where the run has a manifest it could write.
Standard output carries the run's progress lines alone (scaling.train prints them there), which the grid shows; the
details (logging, warnings, a failure's traceback) go to standard error. The grid keeps both in the run's train.log.
Under srun with several tasks, the tasks are the processes of one run, joined by jax.distributed from SLURM's
environment.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
from etils import epath

from scaling.host import confine_worker, join_processes, set_up_process
from scaling.preemption import INTERRUPTED_EXIT_CODE, keep_notices_before_start


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    keep_notices_before_start()
    confine_worker()
    set_up_process(compiles=True)
    try:
        from scaling.grid import is_finished, train_run, worker_exit_code  # JAX comes with it, after the set-up

        if argv[:1] == ["--plan"]:
            from scaling.slurm import planned_run

            model, workdir, config = planned_run(argv[1])
            config = ml_collections.ConfigDict(config)
            if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # one run in the step's processes
                join_processes()  # jax.distributed reads the coordinator, count and id from SLURM's environment
            if is_finished(workdir, config):
                print(f"{model}: finished already ({workdir})", flush=True)
                return 0
            print(f"{model} -> {workdir}", flush=True)
        else:
            (workdir,) = argv
            workdir, config = epath.Path(workdir), ml_collections.ConfigDict(json.loads(sys.stdin.read()))
        return worker_exit_code(train_run(config, workdir))
    except KeyboardInterrupt:  # Ctrl-C before the run began (or after it ended): nothing of it to record
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
