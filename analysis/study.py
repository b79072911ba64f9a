"""The three scaling questions asked of a set of records, each on points of one protocol.

- `model_compute_fit`: metric vs model Gflops at one training step (the paper's Fig. 8).
- `training_compute_fit`: metric vs cumulative training compute, its frontier and offset power law (Fig. 9).
- `sampling_tradeoff`: metric vs sampling compute over (model, sampling steps) pairs (Fig. 10).

`select_protocol` makes the choice of points explicit: one metric and one evaluation protocol; the choice is
recorded in every fit's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.fits import Frontier, FrontierFit, LogLogFit, compute_frontier, fit_frontier, fit_loglog
from analysis.records import PROTOCOL_COLUMNS, Records, RecordsError, protocol_string, require_one_protocol

SCALING_BLOCK = "adaLN-Zero"


def _evaluations(records: Records | pd.DataFrame) -> pd.DataFrame:
    return records.evaluations if isinstance(records, Records) else records


def select_protocol(records: Records | pd.DataFrame, *, metric: str | None = None,
                    vary: tuple[str, ...] = (), **where) -> pd.DataFrame:
    """The evaluation points of one metric and one protocol (ignoring the columns in `vary`).

    `metric` defaults to the metric with the most points; `where` filters columns first (e.g. resolution=256).
    Runs of several conditioning blocks are narrowed to adaLN-Zero, the paper's scaling block, unless `where`
    names a block. If several protocols remain, the one with the most points is kept (ties: the most sampling
    steps); pass the protocol's columns in `where` to choose another."""
    table = _evaluations(records)
    if "block" not in where and table["block"].nunique() > 1 and (table["block"] == SCALING_BLOCK).any():
        where = {**where, "block": SCALING_BLOCK}
    for column, value in where.items():
        if column not in table.columns:
            raise RecordsError(f"no column {column!r} to filter on; columns: {sorted(table.columns)}.")
        table = table[table[column] == value]
    if table.empty:
        raise RecordsError(f"no evaluation points match {where or 'the records'}.")
    if metric is None:
        metric = table["metric"].value_counts().index[0]
    elif metric not in set(table["metric"]):
        raise RecordsError(f"no {metric!r} points; the records hold {sorted(set(table['metric']))}.")
    table = table[table["metric"] == metric]
    keys = pd.Series([protocol_string(row, ignore=vary) for row in table[PROTOCOL_COLUMNS].to_dict("records")],
                     index=table.index)
    counts = keys.value_counts()
    top = counts[counts == counts.max()].index
    if len(top) > 1:
        most_steps = {key: table.loc[keys == key, "sampling_steps"].max() for key in top}
        chosen = max(top, key=lambda key: (np.nan_to_num(most_steps[key], nan=-1), key))
    else:
        chosen = top[0]
    return table[keys == chosen].reset_index(drop=True)


def _metric_column(points: pd.DataFrame) -> str:
    from analysis.records import metric_column

    return metric_column(points["metric"].iloc[0])


def default_step(points: pd.DataFrame) -> int:
    """The training step evaluated for the most runs (ties: the latest)."""
    counts = points.groupby("step")["run"].nunique()
    return int(counts[counts == counts.max()].index.max())


def model_compute_fit(records: Records | pd.DataFrame, *, step: int | None = None, metric: str | None = None,
                      **where) -> LogLogFit:
    """Log-log fit of the metric against model Gflops at one training step (default: the step most runs have)."""
    points = select_protocol(records, metric=metric, **where)
    step = default_step(points) if step is None else step
    points = points[points["step"] == step]
    require_one_protocol(points)
    column = _metric_column(points)
    return fit_loglog(points["gflops"], points["value"], groups=points["run"], x_name="gflops", y_name=column,
                      metadata={"metric": points["metric"].iloc[0], "step": step,
                                "protocol": points["protocol"].iloc[0]})


def training_compute_fit(records: Records | pd.DataFrame, *, metric: str | None = None, n_bootstrap: int = 300,
                         **where) -> FrontierFit:
    """The frontier of metric vs cumulative training compute over all runs, with its offset power law."""
    points = select_protocol(records, metric=metric, **where)
    points = points[points["step"] > 0]
    largest = str(points.loc[points["gflops"].idxmax(), "run"])
    return fit_frontier(points["run"], points["train_gflops_cumulative"], points["value"], largest=largest,
                        x_name="train_gflops_cumulative", y_name=_metric_column(points), n_bootstrap=n_bootstrap,
                        metadata={"metric": points["metric"].iloc[0], "protocol": points["protocol"].iloc[0]})


@dataclass(frozen=True)
class SamplingTradeoff:
    """Metric vs sampling compute (Gflops x sampling steps, x2 with guidance) over (model, steps) pairs.

    `frontier`: the best metric reachable with at most a given sampling compute per image; its runs are named
    "MODEL @ STEPS". `winners`: for each budget range, the pair that is best. `smaller_beats_larger`: every pair
    in which a model with fewer Gflops, sampled with more steps, scores better than a larger model sampled with
    fewer steps (the paper's question: can sampling compute make up for model compute?)."""

    points: pd.DataFrame
    frontier: Frontier
    winners: pd.DataFrame
    smaller_beats_larger: pd.DataFrame
    metadata: dict

    @property
    def sampling_compensates(self) -> bool:
        """Whether some smaller model with more steps beats a larger one with fewer, at no more sampling compute."""
        return bool(self.smaller_beats_larger["at_most_the_compute"].any()) if len(self.smaller_beats_larger) else False


def sampling_tradeoff(records: Records | pd.DataFrame, *, step: int | None = None, metric: str | None = None,
                      **where) -> SamplingTradeoff:
    points = select_protocol(records, metric=metric, vary=("sampling_steps",), **where)
    step = default_step(points) if step is None else step
    points = points[points["step"] == step].copy()
    require_one_protocol(points, vary=("sampling_steps",))
    if points["sampling_steps"].isna().any():
        raise RecordsError("sampling-compute points need sampling_steps on every row.")
    points["pair"] = points["model"] + " @ " + points["sampling_steps"].astype(int).astype(str)
    frontier = compute_frontier(points["pair"], points["sampling_gflops_per_image"], points["value"])
    winners = frontier.optimal_ranges().rename(columns={"run": "pair", "x_start": "budget_from",
                                                         "x_end": "budget_to"})[["pair", "budget_from", "budget_to"]]
    a = points[["model", "gflops", "sampling_steps", "sampling_gflops_per_image", "value"]].reset_index(drop=True)
    pairs = a.merge(a, how="cross", suffixes=("_smaller", "_larger"))
    pairs = pairs[(pairs["gflops_smaller"] < pairs["gflops_larger"])
                  & (pairs["sampling_steps_smaller"] > pairs["sampling_steps_larger"])
                  & (pairs["value_smaller"] < pairs["value_larger"])].copy()
    pairs["at_most_the_compute"] = (pairs["sampling_gflops_per_image_smaller"]
                                    <= pairs["sampling_gflops_per_image_larger"])
    return SamplingTradeoff(points=points.reset_index(drop=True), frontier=frontier, winners=winners,
                            smaller_beats_larger=pairs.reset_index(drop=True),
                            metadata={"metric": points["metric"].iloc[0], "step": step,
                                      "protocol": protocol_string(points.iloc[0].to_dict(),
                                                                  ignore=("sampling_steps",))})
