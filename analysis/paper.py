"""The DiT paper's published numbers (runs/paper/), as DataFrames."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PAPER_RUNS_DIR = Path(__file__).resolve().parent.parent / "runs" / "paper"


def table4() -> pd.DataFrame:
    """Paper Table 4: one row per published (model, resolution, block, steps) result, FID-50K without guidance.

    Gflops are forward multiply-accumulates per image; params_m is in millions. Blank cells are NaN.
    """
    path = PAPER_RUNS_DIR / "table4.csv"
    if not path.is_file():
        raise FileNotFoundError(f"The paper's Table 4 is missing at {path}; restore runs/paper/ from the repository.")
    return pd.read_csv(path)


def table4_compute() -> pd.DataFrame:
    """The Gflops and params the paper reports for each (model, resolution, block), one row each."""
    rows = table4().dropna(subset=["gflops", "params_m"])
    columns = ["model", "resolution", "block", "gflops", "params_m"]
    return rows.drop_duplicates(["model", "resolution", "block"])[columns]
