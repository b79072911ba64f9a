"""Benchmark: how robust the miniature study's findings are to the training seed.

    python -m scaling.benchmarks.study_seeds --preset default --seeds 0,1,2

Runs `dit-scaling study --preset PRESET --seed N` for each seed (into studies/fmnist-PRESET[-seedN]; a finished
study is only re-rendered, an interrupted one resumes) and prints, per seed: Pearson r(log Gflops, log FD) at
the final step, the adjacent (size, patch) pairs in the right order and how many of those are resolved beyond
the evaluation's noise, the best config's metric over its floor, the owners of the training-compute frontier
and whether they grow in size, the largest configs' class accuracy (guided where the study samples with
guidance), the held-out loss's agreement with FD (rank correlation across configs, and the typical error of FD
predicted from it for a config left out of the fit), and the study's wall time (None when it was only
re-rendered).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from analysis import records as records_lib
from analysis.analyze import analyze
from analysis.cli import print_table
from scaling.study import default_workdir


def seed_row(workdir, seed: int, seconds: float | None) -> dict:
    """The printed row of one seed's finished study in `workdir`."""
    records = records_lib.load(workdir)
    found = analyze(records).findings.get()
    numbers = found.numbers
    accuracy = numbers.get("guided_class_accuracy") or numbers.get("class_accuracy") or {}
    return {"seed": seed, "pearson_r": numbers["pearson_r"],
            "pairs": f"{numbers['pairs_right']}/{numbers['pairs']}",
            "pairs_resolved": numbers.get("pairs_right_resolved"),
            "floor_ratio": numbers.get("floor_ratio"),
            "frontier": " > ".join(o.removeprefix("DiT-") for o in numbers["frontier_owners"])
            + ("" if numbers["frontier_growing"] else " (not ever larger)"),
            "class_accuracy": ", ".join(f"{m.removeprefix('DiT-')} {a:.2f}" for m, a in accuracy.items()),
            "proxy_rank_r": numbers.get("proxy_rank_r"),
            "proxy_error": numbers.get("proxy_typical_error"),
            "minutes": None if seconds is None else seconds / 60}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        command = [sys.executable, "-m", "scaling.cli", "study", "--preset", args.preset, "--seed", str(seed)]
        if subprocess.run(command).returncode != 0:
            print(f"seed {seed}: the study failed; see its output above", file=sys.stderr)
            return 1
        rows.append(seed_row(default_workdir(args.preset, seed), seed, time.perf_counter() - start))
    print()
    print_table(rows, [("seed", "seed"), ("pearson_r", "r(log Gflops, log FD)"), ("pairs", "pairs ordered"),
                       ("pairs_resolved", "of them resolved"), ("floor_ratio", "best / floor"),
                       ("frontier", "frontier owners (by compute)"), ("class_accuracy", "class accuracy"),
                       ("proxy_rank_r", "rho(val-loss, FD)"), ("proxy_error", "FD from val-loss, left-out error"),
                       ("minutes", "minutes (this time)")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
