"""Writes runs/paper/evaluations.csv: the paper's published FIDs as evaluation records.

The transcribed tables (runs/paper/table4.csv, sampling_compute_points.csv) leave Gflops and params blank for
some variants (other conditioning blocks, 512px); those come from our counter (`gflops_source` = "counter"),
never from typed-in numbers. Run `python -m scaling.paper_records` after changing a transcribed table.
"""

from __future__ import annotations

import argparse

import pandas as pd
from etils import epath

from analysis import paper
from analysis.schema import FID_FEATURE_NETWORK
from models.dit import LATENT_DOWNSAMPLE, dit_config
from models.flops import dit_compute


def paper_run_name(model: str, resolution: int, block: str) -> str:
    """The name a run of the paper has in records (their `run`; ours are named by scaling.config.run_name):
    "paper:DiT-XL/2" for the 256px adaLN-Zero runs; other resolutions and blocks are suffixed."""
    suffix = ("" if resolution == 256 else f"-{resolution}px") + ("" if block == "adaLN-Zero" else f"-{block}")
    return f"paper:{model}{suffix}"


def paper_evaluations() -> pd.DataFrame:
    table4 = paper.table4()
    compute_cache: dict[tuple, object] = {}

    def counted(model: str, resolution: int, block: str):
        key = (model, resolution, block)
        if key not in compute_cache:
            compute_cache[key] = dit_compute(dit_config(model, input_size=resolution // LATENT_DOWNSAMPLE,
                                                        block=block))
        return compute_cache[key]

    rows = []
    for r in table4.itertuples():
        count = counted(r.model, r.resolution, r.block)
        from_paper = pd.notna(r.gflops)
        rows.append({
            "run": paper_run_name(r.model, r.resolution, r.block), "model": r.model, "size": r.size, "patch": r.patch,
            "block": r.block,
            "resolution": r.resolution,
            "gflops": float(r.gflops) if from_paper else round(count.gflops, 2),
            "gflops_source": "paper" if from_paper else "counter",
            "params_m": float(r.params_m) if pd.notna(r.params_m) else round(count.params / 1e6, 1),
            "batch_size": r.batch_size, "step": r.train_steps, "metric": "FID-50K", "value": r.fid50k_noguidance,
            "sampler": "ddpm", "sampling_steps": 250, "guidance_scale": 1.0, "num_samples": 50_000,
            "reference": f"VIRTUAL_imagenet{r.resolution}_labeled", "feature_network": FID_FEATURE_NETWORK,
            "decoder": "ft-MSE", "source": "DiT paper, Table 4",
        })
    by_model = {row["model"]: row for row in rows if row["run"] == f"paper:{row['model']}"}
    for r in pd.read_csv(paper.PAPER_RUNS_DIR / "sampling_compute_points.csv").itertuples():
        run = by_model[r.model]
        rows.append({
            **{k: run[k] for k in ("run", "model", "size", "patch", "block", "resolution", "gflops", "gflops_source",
                                   "params_m", "batch_size")},
            "step": 400_000, "metric": "FID-10K", "value": r.fid10k, "sampler": "ddpm",
            "sampling_steps": r.sampling_steps, "guidance_scale": 1.0, "num_samples": 10_000,
            "reference": "VIRTUAL_imagenet256_labeled", "feature_network": FID_FEATURE_NETWORK, "decoder": None,
            "source": "DiT paper, Section 5.2",
        })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=epath.Path, default=paper.EVALUATIONS_CSV)
    args = parser.parse_args(argv)
    paper_evaluations().to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
