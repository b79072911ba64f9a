"""A worker of the grid: one run in a process of its own, started by `scaling.grid` for `workers` > 1 as

    python -m scaling.worker WORKDIR < CONFIG.json

It gets the run's resolved config as data (the ConfigDict as JSON on standard input) and answers with its exit code
and the manifest the run writes (`scaling.grid.worker_exit_code`): 0 finished; scaling.preemption.EXIT_CODE
preempted, checkpointed; scaling.preemption.INTERRUPTED_EXIT_CODE interrupted by Ctrl-C;
scaling.lease.HELD_EXIT_CODE when another command holds the workdir (its lease.json names which);
analysis.storage.DISK_FULL_EXIT_CODE when no space was left; anything else failed. A failure's reason is in the
manifest's `error` where the run has a manifest it could write. Standard output carries the run's
progress lines alone (scaling.train prints them there), which the grid shows; the details (logging, warnings, a
failure's traceback) go to standard error. The grid keeps both in the run's train.log.
"""

from __future__ import annotations

import json
import sys

import ml_collections
from etils import epath

from scaling.host import confine_worker, set_up_process


def main(argv: list[str] | None = None) -> int:
    confine_worker()
    set_up_process(compiles=True)
    try:
        from scaling.grid import train_run, worker_exit_code  # JAX comes with it, after the process is set up

        (workdir,) = sys.argv[1:] if argv is None else argv
        config = ml_collections.ConfigDict(json.loads(sys.stdin.read()))
        return worker_exit_code(train_run(config, epath.Path(workdir)))
    except KeyboardInterrupt:  # Ctrl-C before the run began (or after it ended): nothing of it to record
        from scaling.preemption import INTERRUPTED_EXIT_CODE

        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
