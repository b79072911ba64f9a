"""A worker of the grid: one run in a process of its own, started by `scaling.grid` for `workers` > 1 as

    python -m scaling.worker WORKDIR < CONFIG.json

It gets the run's resolved config as data (the ConfigDict as JSON on standard input) and answers with its exit code
and the manifest the run writes: 0 finished; scaling.preemption.EXIT_CODE preempted, checkpointed;
scaling.lease.HELD_EXIT_CODE when another command holds the workdir (its lease.json names which); anything else
failed, with the reason in the manifest's `error` where the run has a manifest. Standard output carries the run's
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
    from scaling.grid import train_run  # JAX comes with it, after the process is set up
    from scaling.lease import HELD_EXIT_CODE
    from scaling.preemption import EXIT_CODE

    (workdir,) = sys.argv[1:] if argv is None else argv
    config = ml_collections.ConfigDict(json.loads(sys.stdin.read()))
    outcome = train_run(config, epath.Path(workdir))
    if outcome == "finished":
        return 0
    if outcome == "preempted":
        return EXIT_CODE
    return HELD_EXIT_CODE if outcome.startswith("skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
