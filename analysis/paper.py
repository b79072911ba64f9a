"""The DiT paper's published numbers (runs/paper/), as DataFrames."""

from __future__ import annotations

import pandas as pd
from etils import epath

PAPER_RUNS_DIR = epath.Path(__file__).resolve().parent.parent / "runs" / "paper"
EVALUATIONS_CSV = PAPER_RUNS_DIR / "evaluations.csv"  # the paper's published numbers as evaluation records

# The scaling study's grid (Table 1, Table 4): model sizes from small to large, patch sizes in the paper's order
# (decreasing patch size, increasing compute), and the conditioning blocks in Fig. 5's order, worst to best.
# models.dit describes the same family for the model code; a test checks that the two agree.
SIZES = ("S", "B", "L", "XL")
PATCHES = (8, 4, 2)
BLOCKS = ("in-context", "cross-attention", "adaLN", "adaLN-Zero")


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
