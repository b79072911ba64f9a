"""The three scaling questions asked of a set of records, each on points of one protocol.

- `model_compute_fit`: metric vs model Gflops at one training step (the paper's Fig. 8).
- `training_compute_fit`: metric vs cumulative training compute, its frontier and offset power law (Fig. 9).
- `sampling_tradeoff`: metric vs sampling compute over (model, sampling steps) pairs (Fig. 10).

`select` makes the choice of points explicit: configs of one conditioning block and resolution, one metric and
one evaluation protocol, with notes saying what was left out; the choice is recorded in every fit's metadata.
Each question also accepts points already selected (a DataFrame of one metric and protocol), which it keeps whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.fits import Frontier, FrontierFit, LogLogFit, compute_frontier, fit_frontier, fit_loglog
from analysis.records import (
    PROTOCOL_COLUMNS,
    Records,
    filter_rows,
    protocol_string,
    require_one_protocol,
)
from analysis.schema import VALIDATION_FAMILY, RecordsError, metric_column, metric_family

SCALING_BLOCK = "adaLN-Zero"
FAMILY_COLUMNS = ("block", "resolution")
FRONTIER_N_BOOTSTRAP = 300  # bootstrap replicates of the training-compute frontier fit


def _evaluations(records: Records | pd.DataFrame) -> pd.DataFrame:
    return records.evaluations if isinstance(records, Records) else records


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float, np.number)) else str(value)


def metrics_by_count(records: Records | pd.DataFrame) -> list[str]:
    """The metrics of the evaluation points: sample metrics before the held-out loss (their cheap proxy, often
    evaluated more densely), each the one with the most points first (ties: by name)."""
    counts = _evaluations(records)["metric"].value_counts()
    return sorted(counts.index, key=lambda metric: (metric_family(metric) == VALIDATION_FAMILY, -counts[metric],
                                                     metric))


def held_out_losses(records: Records | pd.DataFrame) -> list[str]:
    """The held-out loss metrics of the records (family VALIDATION_FAMILY), the one with the most points first."""
    return [metric for metric in metrics_by_count(records) if metric_family(metric) == VALIDATION_FAMILY]


def scaling_family(table: Records | pd.DataFrame, *, vary: tuple[str, ...] = (),
                   notes: list[str] | None = None) -> dict:
    """The conditioning block and resolution whose configs compare, among the rows of `table` (evaluation points,
    or a runs table): {column: value} for each of block and resolution that takes several values there (and is
    not in `vary`). The block is adaLN-Zero, the paper's scaling block, when a run has it, else the block of the
    most runs; the resolution is that of the most runs (ties: the lowest). Says in `notes` which runs it leaves
    out."""
    runs = _evaluations(table).drop_duplicates("run")
    family = {}
    for column in FAMILY_COLUMNS:
        if column in vary or column not in runs.columns:
            continue
        counts = runs[column].value_counts()
        if len(counts) < 2:
            continue
        if column == "block" and SCALING_BLOCK in counts.index:
            family[column] = SCALING_BLOCK
        else:
            family[column] = sorted(counts.index, key=lambda value: (-counts[value], value))[0]
    if family and notes is not None:
        kept = _matching(runs, family)
        notes.append(f"Runs of {', '.join(f'{k} {_text(v)}' for k, v in family.items())} only ({kept.sum()} of "
                     f"{len(runs)} runs); left out: {', '.join(map(str, runs.loc[~kept, 'run']))}.")
    return family


def _matching(table: pd.DataFrame, conditions: dict) -> pd.Series:
    mask = pd.Series(True, index=table.index)
    for column, value in conditions.items():
        mask &= table[column] == value
    return mask


@dataclass(frozen=True)
class Selection:
    """The points of one metric and one protocol (ignoring the columns in `vary`), of configs of one `family`
    (the block and resolution `scaling_family` chose, where it had to), and `notes` saying what was left out."""

    points: pd.DataFrame
    metric: str
    protocol: str
    family: dict
    notes: list[str]


def select(records: Records | pd.DataFrame, *, metric: str | None = None, vary: tuple[str, ...] = (),
           one_protocol: bool = False, **where) -> Selection:
    """The evaluation points of one metric and one protocol, ignoring the columns in `vary` (protocol columns such
    as sampling_steps; block or resolution to keep every block or resolution).

    `where` filters columns first (e.g. resolution=256). Then configs of several conditioning blocks or
    resolutions are narrowed to one family (`scaling_family`) unless `where` or `vary` names the column.
    `metric` defaults to the first of `metrics_by_count` (the sample metric with the most points). If several
    protocols remain, the one with the most points is kept (ties: the most sampling steps); pass the protocol's
    columns in `where` to choose another, or `one_protocol=True` to make several protocols an error that lists
    them."""
    table = filter_rows(_evaluations(records), where, "the evaluation points")
    if table.empty:
        raise RecordsError("the records hold no evaluation points (metric values per run and step).")
    notes: list[str] = []
    if "status" in table.columns:
        unfinished = sorted(table.loc[table["status"].notna() & (table["status"] != "finished"), "run"].unique())
        if unfinished:
            notes.append(f"Unfinished runs (their last evaluations may be missing): {', '.join(unfinished)}.")
    family = scaling_family(table, vary=(*vary, *where), notes=notes)
    table = table[_matching(table, family)]
    metrics = metrics_by_count(table)
    if metric is None:
        metric = metrics[0]
    elif metric not in metrics:
        raise RecordsError(f"no {metric!r} points; the records hold {sorted(metrics)}.")
    if len(metrics) > 1:
        notes.append(f"Metric: {metric} ({(table['metric'] == metric).sum()} points); other metrics: "
                     + ", ".join(f"{m} ({(table['metric'] == m).sum()})" for m in metrics if m != metric) + ".")
    table = table[table["metric"] == metric]
    keys = pd.Series([protocol_string(row, ignore=vary) for row in table[PROTOCOL_COLUMNS].to_dict("records")],
                     index=table.index)
    counts = keys.value_counts()
    if one_protocol and len(counts) > 1:
        require_one_protocol(table)
    top = counts[counts == counts.max()].index
    if len(top) > 1:
        most_steps = {key: table.loc[keys == key, "sampling_steps"].max() for key in top}
        chosen = max(top, key=lambda key: (np.nan_to_num(most_steps[key], nan=-1), key))
    else:
        chosen = top[0]
    notes.append(f"Protocol: {chosen}.")
    if len(counts) > 1:
        reference = table[keys == chosen].iloc[0]
        notes.append(f"{(keys != chosen).sum()} {metric} point(s) of other protocols left out (they do not "
                     "compare): " + "; ".join(
                         f"{_protocol_difference(group.iloc[0], reference, vary)} ({len(group)} points: "
                         f"{_runs_text(group)})" for _, group in table[keys != chosen].groupby(keys)) + ".")
    return Selection(points=table[keys == chosen].reset_index(drop=True), metric=metric, protocol=chosen,
                     family=family, notes=notes)


def _protocol_difference(row: pd.Series, reference: pd.Series, vary: tuple[str, ...]) -> str:
    """The protocol fields in which a point differs from the chosen protocol, e.g. "sampling_steps=25"."""
    differing = {k: row[k] for k in PROTOCOL_COLUMNS if k not in vary and str(row[k]) != str(reference[k])}
    return protocol_string(differing)


def _runs_text(points: pd.DataFrame, most: int = 4) -> str:
    runs = sorted(points["run"].unique())
    return ", ".join(runs) if len(runs) <= most else f"{len(runs)} runs"


def select_protocol(records: Records | pd.DataFrame, *, metric: str | None = None,
                    vary: tuple[str, ...] = (), **where) -> pd.DataFrame:
    """The points `select` chooses (one metric, one protocol ignoring the columns in `vary`, one family)."""
    return select(records, metric=metric, vary=vary, **where).points


def at_last_step_but_for(records: Records | pd.DataFrame, points: pd.DataFrame,
                         ignore: tuple[str, ...]) -> pd.DataFrame:
    """The records' evaluations at the last step of `points` (one metric and protocol), of their runs, under their
    protocol but for the columns in `ignore` (e.g. the noise seed)."""
    evaluations = _evaluations(records)
    protocol = protocol_string(points.iloc[0][PROTOCOL_COLUMNS].to_dict(), ignore=ignore)
    table = evaluations[(evaluations["step"] == int(points["step"].max()))
                        & evaluations["run"].isin(points["run"].unique())]
    return table[[protocol_string(row, ignore=ignore) == protocol
                  for row in table[PROTOCOL_COLUMNS].to_dict("records")]]


def default_step(points: pd.DataFrame) -> int:
    """The training step evaluated for the most runs (ties: the latest)."""
    counts = points.groupby("step")["run"].nunique()
    return int(counts[counts == counts.max()].index.max())


def at_step(points: pd.DataFrame, step: int | None = None) -> pd.DataFrame:
    """The points of one training step (default: `default_step`)."""
    step = default_step(points) if step is None else step
    chosen = points[points["step"] == step]
    if chosen.empty:
        raise RecordsError(f"no evaluations at step {step}; evaluated steps: "
                           f"{sorted(points['step'].unique().tolist())}.")
    return chosen.reset_index(drop=True)


def _metadata(points: pd.DataFrame, selection: Selection, **extra) -> dict:
    return {"metric": points["metric"].iloc[0], **extra, "protocol": points["protocol"].iloc[0],
            "family": selection.family, "notes": selection.notes}


def model_compute_points(records: Records | pd.DataFrame, *, step: int | None = None, metric: str | None = None,
                         **where) -> pd.DataFrame:
    """The points `model_compute_fit` fits: `select`'s, at one training step (default: the step most runs have)."""
    return at_step(select_protocol(records, metric=metric, **where), step)


def model_compute_fit(records: Records | pd.DataFrame, *, step: int | None = None, metric: str | None = None,
                      **where) -> LogLogFit:
    """Log-log fit of the metric against model Gflops at one training step (default: the step most runs have)."""
    selection = select(records, metric=metric, **where)
    points = at_step(selection.points, step)
    return fit_loglog(points["gflops"], points["value"], groups=points["run"], x_name="gflops",
                      y_name=metric_column(points["metric"].iloc[0]),
                      metadata=_metadata(points, selection, step=int(points["step"].iloc[0])))


def training_compute_points(records: Records | pd.DataFrame, *, metric: str | None = None,
                            **where) -> pd.DataFrame:
    """The points `training_compute_fit` fits: `select`'s that have a training compute (step > 0 and a batch
    size, or train_gflops_cumulative given)."""
    return _with_training_compute(select_protocol(records, metric=metric, **where))


MODEL_SIZES = {"gflops": "forward Gflops per image", "params": "parameters"}  # what a law or profile takes as N


def sized_training_points(records: Records | pd.DataFrame, *, metric: str | None = None, size: str = "gflops",
                          **where) -> tuple[pd.DataFrame, Selection]:
    """`training_compute_points` with a column `size`, the model size a compute-optimal analysis takes as N (one of
    MODEL_SIZES: forward Gflops per image, or parameters), and the selection they came from."""
    if size not in MODEL_SIZES:
        raise RecordsError(f"model size {size!r}: use one of {list(MODEL_SIZES)}.")
    selection = select(records, metric=metric, **where)
    points = _with_training_compute(selection.points)
    if size == "gflops":
        return points.assign(size=points["gflops"].astype(float)), selection
    if "params_m" not in points.columns or points["params_m"].isna().any():
        raise RecordsError("sizes in parameters need every run's parameter count (params_m); use size gflops "
                           "instead.")
    return points.assign(size=points["params_m"].astype(float) * 1e6), selection


def _with_training_compute(points: pd.DataFrame) -> pd.DataFrame:
    points = points[(points["step"] > 0) & points["train_gflops_cumulative"].notna()]
    if points.empty:
        raise RecordsError("no evaluation points with a training compute (step > 0 and a batch size, or "
                           "train_gflops_cumulative).")
    return points.reset_index(drop=True)


def training_compute_frontier(records: Records | pd.DataFrame, *, metric: str | None = None,
                              **where) -> Frontier:
    """The frontier that `training_compute_fit` fits, alone (e.g. for records too few to fit the law to)."""
    points = training_compute_points(records, metric=metric, **where)
    return compute_frontier(points["run"], points["train_gflops_cumulative"], points["value"])


def training_compute_fit(records: Records | pd.DataFrame, *, metric: str | None = None,
                         n_bootstrap: int = FRONTIER_N_BOOTSTRAP, **where) -> FrontierFit:
    """The frontier of metric vs cumulative training compute over all runs, with its offset power law."""
    selection = select(records, metric=metric, **where)
    points = _with_training_compute(selection.points)
    largest = str(points.loc[points["gflops"].idxmax(), "run"])
    return fit_frontier(points["run"], points["train_gflops_cumulative"], points["value"], largest=largest,
                        x_name="train_gflops_cumulative", y_name=metric_column(points["metric"].iloc[0]),
                        n_bootstrap=n_bootstrap, metadata=_metadata(points, selection))


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

    def best_config_by_steps(self) -> pd.DataFrame:
        """The best config's (most Gflops) points, by sampling-step count."""
        return self.points[self.points["gflops"] == self.points["gflops"].max()].sort_values("sampling_steps")

    def saturated_counts(self, resolved: Callable) -> list[float]:
        """The sampling-step counts, from the largest down, at which the best config scores within the noise of
        its value at the largest count (`resolved(a, b)`: whether two values differ beyond the noise): where
        sampling has saturated, and the paper's comparison is made."""
        best = self.best_config_by_steps()
        final, counts = best["value"].iloc[-1], []
        for steps, value in zip(best["sampling_steps"][::-1], best["value"][::-1], strict=True):
            if resolved(value, final):
                break
            counts.insert(0, float(steps))
        return counts

    def below_saturation(self, saturated: list[float]) -> pd.Series:
        """For each row of `smaller_beats_larger`: whether the larger model was sampled with fewer steps than the
        `saturated` counts (`saturated_counts`); with fewer than two saturated counts none is known to be below."""
        least = min(saturated) if len(saturated) >= 2 else 0
        return self.smaller_beats_larger["sampling_steps_larger"] < least


def _sampling_points(records, step, metric, where) -> pd.DataFrame:
    points = at_step(select_protocol(records, metric=metric, vary=("sampling_steps",), **where), step)
    if points["sampling_steps"].isna().any():
        raise RecordsError("sampling-compute points need sampling_steps on every row.")
    if points["sampling_steps"].nunique() < 2:
        raise RecordsError(f"the {points['metric'].iloc[0]} points at step {int(points['step'].iloc[0])} were all "
                           f"sampled with {int(points['sampling_steps'].iloc[0])} steps; the sampling-compute "
                           "trade-off needs evaluations at several sampling-step counts.")
    return points


def sampling_tradeoff(records: Records | pd.DataFrame, *, step: int | None = None, metric: str | None = None,
                      **where) -> SamplingTradeoff:
    """Metric vs sampling compute at one training step (default: the step most runs have). `metric` defaults to
    the one with the most points among those evaluated at several sampling-step counts."""
    if metric is None:
        reasons = []
        for candidate in metrics_by_count(filter_rows(_evaluations(records), where, "the evaluation points")):
            try:
                points = _sampling_points(records, step, candidate, where)
                break
            except RecordsError as e:
                reasons.append(f"{candidate}: {e}")
        else:
            raise RecordsError("no metric supports a sampling-compute trade-off: " + " ".join(reasons))
    else:
        points = _sampling_points(records, step, metric, where)
    # A model trained in several runs (e.g. at two batch sizes) keeps its runs apart.
    name = "run" if points.groupby("model")["run"].nunique().max() > 1 else "model"
    points["pair"] = points[name] + " @ " + points["sampling_steps"].astype(int).astype(str)
    frontier = compute_frontier(points["pair"], points["sampling_gflops_per_image"], points["value"])
    winners = frontier.optimal_ranges().rename(columns={"run": "pair", "x_start": "budget_from",
                                                         "x_end": "budget_to"})[["pair", "budget_from", "budget_to"]]
    a = points[["model", "gflops", "sampling_steps", "sampling_gflops_per_image", "value"]]
    pairs = a.merge(a, how="cross", suffixes=("_smaller", "_larger"))
    pairs = pairs[(pairs["gflops_smaller"] < pairs["gflops_larger"])
                  & (pairs["sampling_steps_smaller"] > pairs["sampling_steps_larger"])
                  & (pairs["value_smaller"] < pairs["value_larger"])].copy()
    pairs["at_most_the_compute"] = (pairs["sampling_gflops_per_image_smaller"]
                                    <= pairs["sampling_gflops_per_image_larger"])
    return SamplingTradeoff(points=points, frontier=frontier, winners=winners,
                            smaller_beats_larger=pairs.reset_index(drop=True),
                            metadata={"metric": points["metric"].iloc[0], "step": int(points["step"].iloc[0]),
                                      "protocol": protocol_string(points.iloc[0].to_dict(),
                                                                  ignore=("sampling_steps",))})
