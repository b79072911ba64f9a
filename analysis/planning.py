"""Planning a training budget and comparing a new architecture against the DiT frontier.

Compute is in paper units (training Gflops: 3 x forward GMACs per image x images) unless a unit says otherwise:
`to_paper_units` converts true FLOPs (2 per multiply-add) and accelerator-hours at a stated utilisation and
chip peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from etils import epath

from analysis import schema
from analysis.chips import CHIPS, DEFAULT_UTILIZATION
from analysis.fits import FrontierFit, LogLogFit
from analysis.isoflop import IsoFlopAnalysis
from analysis.law import optimal_allocation, predict
from analysis.records import COMPUTE_UNITS, Records, convert_compute
from analysis.schema import RecordsError, training_compute

UNITS = ("gflops", "flops", "accelerator-hours")


def _require_positive(name: str, value: float) -> None:
    """A budget, target or rate: a finite number above 0 (NaN and inf would plan nothing or overflow)."""
    if not (isinstance(value, int | float | np.number) and np.isfinite(value) and value > 0):
        raise RecordsError(f"{name} must be a finite number > 0, got {value!r}.")


def to_paper_units(amount: float, unit: str = "gflops", *, utilization: float | None = None,
                   chip_peak_tflops: float | None = None, chips: int = 1, chip: str | None = None) -> float:
    """Training compute in paper units (GMACs). `flops` are true FLOPs (2 per multiply-add); `accelerator-hours`
    need the chip's peak (dense TFLOP/s, true FLOPs: `chip_peak_tflops`, or `chip` names one of analysis.chips'
    table) and the utilisation reached, in (0, 1] (with a named chip, DEFAULT_UTILIZATION unless stated)."""
    _require_positive("compute", amount)
    if unit == "gflops":
        return float(amount)
    if unit == "flops":
        return float(amount) * COMPUTE_UNITS["flops"]
    if unit == "accelerator-hours":
        if chip is not None:
            if chip not in CHIPS:
                raise RecordsError(f"unknown chip {chip!r}; use one of {', '.join(CHIPS)} (or --chip-peak-tflops).")
            chip_peak_tflops = chip_peak_tflops or CHIPS[chip].peak_flops / 1e12
            utilization = utilization or DEFAULT_UTILIZATION
        if utilization is None or chip_peak_tflops is None:
            raise RecordsError("accelerator-hours need --chip (one of " + ", ".join(CHIPS) + ") or --chip-peak-tflops "
                               "(e.g. 989 for an H100's dense bf16) with --utilization (in (0, 1], e.g. 0.4).")
        _require_positive("utilization", utilization)
        if utilization > 1:
            raise RecordsError(f"utilization is a fraction of the chips' peak, in (0, 1]; got {utilization!r}.")
        _require_positive("chip_peak_tflops", chip_peak_tflops)
        if not (isinstance(chips, int | np.integer) and chips >= 1):
            raise RecordsError(f"chips must be an integer >= 1, got {chips!r}.")
        flops = amount * chips * 3600 * chip_peak_tflops * 1e12 * utilization
        return flops * COMPUTE_UNITS["flops"]
    raise RecordsError(f"unknown compute unit {unit!r}; use one of {UNITS}.")


@dataclass(frozen=True)
class BudgetPlan:
    """What a training budget buys, according to a frontier fit."""

    compute: float  # paper units
    config: str  # the run on the frontier at this compute
    model: str
    gflops_per_image: float
    batch_size: int | None
    steps: int | None  # training steps of that config the budget pays for (None: its batch size is unknown)
    metric: str
    predicted: float
    confidence_interval: tuple[float, float]
    prediction_interval: tuple[float, float]
    extrapolated: bool  # the budget lies beyond the evaluated compute
    beyond_config_evaluations: bool  # the config would train past its own last evaluation
    basis: str = "frontier"  # what chose the config: "frontier" or "isoFLOP"
    reason: str = ""  # why that basis
    optimal_gflops: float | None = None  # the isoFLOP law's optimal size at this compute, where it has one
    optimal_gflops_interval: tuple[float, float] | None = None

    def summary(self) -> dict:
        return asdict(self)


def _run_row(runs: pd.DataFrame, run: str) -> pd.Series:
    rows = runs[runs["run"] == run]
    if rows.empty:
        raise RecordsError(f"run {run!r} of the frontier is missing from the runs table.")
    return rows.iloc[0]


def isoflop_support(analysis: IsoFlopAnalysis | None, compute: float) -> str:
    """Why the isoFLOP law cannot choose the config at `compute` ("" when it can): it needs a law of the optimal
    Gflops and the budget inside the compute its fitted profiles span (the law is not extrapolated)."""
    if analysis is None:
        return "no isoFLOP analysis was given"
    if analysis.size != "gflops":
        return "the isoFLOP profiles are over parameters, and the plan chooses configs by Gflops"
    if analysis.size_law is None:
        return analysis.note
    low, high = analysis.fitted_range
    if not low <= compute <= high:
        return (f"the budget lies outside the isoFLOP profiles' fitted range ({low:.3g} to {high:.3g} Gflops), "
                "and their law is not extrapolated")
    return ""


def plan_budget(fit: FrontierFit, runs: pd.DataFrame, compute: float,
                isoflop: IsoFlopAnalysis | None = None) -> BudgetPlan:
    """The config to train with `compute` (paper units), for how many steps, and the metric it should reach.

    The config: where `isoflop` (an `isoflop.isoflop_analysis` over Gflops of the same records) has a law of the
    optimal size and the budget lies inside its fitted profiles, the config nearest (in log Gflops) to that
    optimum, which pools every config's curve at equal compute; else the frontier's, the one best point measured
    at that compute (`basis` and `reason` say which and why). Beyond the evaluated range the frontier's is the
    config at its end (flagged `extrapolated`). The metric comes from the frontier's fitted law with its
    intervals. A config can be asked to train longer than it was ever evaluated (its metric beyond its last
    evaluation is the law's guess): `beyond_config_evaluations` says so."""
    _require_positive("compute", compute)
    grid = fit.frontier.grid
    if compute < grid["x"].iloc[0]:
        raise RecordsError(f"compute {compute:.3g} is below the smallest evaluated point ({grid['x'].iloc[0]:.3g}); "
                           "the fit says nothing about it.")
    unsupported = isoflop_support(isoflop, compute)
    optimal = optimal_interval = None
    if unsupported:
        run, _ = fit.frontier.best_at(compute)
        basis, reason = "frontier", f"the best config measured at this compute; isoFLOP not used: {unsupported}"
    else:
        optimal = float(isoflop.size_law.predict(compute))
        low, high = isoflop.size_law.confidence_band(compute)
        optimal_interval = (float(low), float(high))
        candidates = fit.frontier.curves.drop_duplicates("run")["run"]
        gflops = runs.set_index("run").loc[candidates, "gflops"].astype(float)
        run = str((np.log10(gflops) - np.log10(optimal)).abs().idxmin())
        lo_range, hi_range = isoflop.fitted_range
        basis, reason = "isoFLOP", (
            f"inside the isoFLOP profiles' fitted range ({lo_range:.3g} to {hi_range:.3g} Gflops, "
            f"{isoflop.size_law.n_budgets} budgets): their optimum pools every config's curve at equal compute; "
            "the config is the one nearest to it")
    row = _run_row(runs, run)
    curve_end = fit.frontier.curves.loc[fit.frontier.curves["run"] == run, "x"].max()
    batch = row["batch_size"]
    steps = int(compute / training_compute(row["gflops"], batch, 1)) if pd.notna(batch) else None
    lo, hi = fit.confidence_band(compute)
    plo, phi = fit.prediction_interval(compute)
    return BudgetPlan(compute=float(compute), config=run, model=str(row["model"]),
                      gflops_per_image=float(row["gflops"]), batch_size=int(batch) if pd.notna(batch) else None,
                      steps=steps,
                      metric=fit.metadata.get("metric", fit.y_name), predicted=float(fit.predict(compute)),
                      confidence_interval=(float(lo), float(hi)), prediction_interval=(float(plo), float(phi)),
                      extrapolated=bool(compute > grid["x"].iloc[-1]),
                      beyond_config_evaluations=bool(compute > curve_end), basis=basis, reason=reason,
                      optimal_gflops=optimal, optimal_gflops_interval=optimal_interval)


@dataclass(frozen=True)
class TargetPlan:
    """The least training compute that reaches a target metric, according to a frontier fit."""

    target: float
    metric: str
    compute: float  # paper units; inf when the fitted floor is at or above the target
    compute_interval: tuple[float, float]
    unreachable_fraction: float  # bootstrap fits whose floor is at or above the target
    plan: BudgetPlan | None  # the budget plan at that compute
    note: str  # why there is no plan, when there is none

    def summary(self) -> dict:
        out = asdict(self)
        out["plan"] = self.plan.summary() if self.plan else None
        return out


def plan_target(fit: FrontierFit, runs: pd.DataFrame, target: float,
                isoflop: IsoFlopAnalysis | None = None) -> TargetPlan:
    _require_positive("target", target)
    compute = float(fit.inverse(target))
    lo, hi, unreachable = fit.inverse_interval(target)
    unreachable = float(unreachable[0])
    first = fit.frontier.grid["x"].iloc[0]
    note = ("the fitted law never reaches the target (its floor is above it)" if not np.isfinite(compute) else
            f"the law reaches the target below the least evaluated compute ({first:.3g}): the first evaluated "
            "point already does better" if compute < first else "")
    plan = None if note else plan_budget(fit, runs, compute, isoflop)
    return TargetPlan(target=float(target), metric=fit.metadata.get("metric", fit.y_name), compute=compute,
                      compute_interval=(float(lo[0]), float(hi[0])), unreachable_fraction=unreachable, plan=plan,
                      note=note)


def compare_architecture(points: pd.DataFrame, frontier_fit: FrontierFit, gflops_fit: LogLogFit | None = None,
                         *, batch_size: int | None = None) -> pd.DataFrame:
    """Place a new architecture's points against the DiT curves.

    `points` has per row: name (optional), a compute column (gflops, gmacs, macs or flops, per image), the metric
    (a column named like the fit's y, e.g. fid, or value) and steps (training steps; batch_size column or the
    argument), or train_gflops_cumulative. Returns one row per point with its training compute, the compute DiT
    needs for the same metric (with the fit's interval; lo 0 means any compute, hi inf that the band never comes
    down to it) and the compute multiplier (DiT compute / its compute: above 1, the new architecture is more
    compute-efficient). With `gflops_fit`, also the metric DiT reaches at the same model Gflops (Fig. 8 fit) and
    its prediction interval, for points trained as many steps as that fit's (NaN for the others)."""
    table = convert_compute(points.copy(), "the points")
    y_name = frontier_fit.y_name
    y_column = y_name if y_name in table.columns else "value" if "value" in table.columns else None
    if y_column is None:
        raise RecordsError(f"the points need the metric as a column named {y_name!r} (or 'value').")
    if "steps" not in table.columns and "train_gflops_cumulative" not in table.columns:
        raise RecordsError("the points need training 'steps' (with batch_size) or 'train_gflops_cumulative'.")
    if "train_gflops_cumulative" not in table.columns:
        batch = table["batch_size"] if "batch_size" in table.columns else batch_size
        if batch is None:
            raise RecordsError("the points give steps but no batch size: add a batch_size column (or pass "
                               "batch_size=, --batch-size) so their training compute is known.")
        table["train_gflops_cumulative"] = training_compute(table["gflops"], batch, table["steps"])
    compute = table["train_gflops_cumulative"].to_numpy(dtype=float)
    if not np.all(compute > 0):
        raise RecordsError("every point needs a positive training compute: check its steps and batch_size (or "
                           "train_gflops_cumulative).")
    y = table[y_column].astype(float).to_numpy()
    if not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise RecordsError("the points' metric values must be positive and finite.")
    needed = frontier_fit.inverse(y)
    lo, hi, unreachable = frontier_fit.inverse_interval(y)
    table["dit_compute"] = needed
    table["dit_compute_lo"] = lo
    table["dit_compute_hi"] = hi
    table["dit_unreachable_fraction"] = unreachable
    table["compute_multiplier"] = needed / compute
    table["compute_multiplier_lo"] = table["dit_compute_lo"] / compute
    table["compute_multiplier_hi"] = table["dit_compute_hi"] / compute
    table["dit_at_same_compute"] = frontier_fit.predict(compute)
    # Outside the compute DiT was evaluated at, the numbers are the law's extrapolation.
    x = frontier_fit.frontier.curves["x"]
    inside = lambda c: (c >= x.min()) & (c <= x.max())  # noqa: E731
    table["extrapolated"] = ~(inside(compute) & inside(needed))
    if gflops_fit is not None:
        same_step = (table["steps"] == gflops_fit.metadata.get("step")).to_numpy() if "steps" in table.columns \
            else np.zeros(len(table), dtype=bool)
        plo, phi = gflops_fit.prediction_interval(table["gflops"])
        table["dit_at_same_gflops"] = np.where(same_step, gflops_fit.predict(table["gflops"]), np.nan)
        table["dit_at_same_gflops_lo"] = np.where(same_step, plo, np.nan)
        table["dit_at_same_gflops_hi"] = np.where(same_step, phi, np.nan)
    return table



# What makes two runs' training alike: the config fields (section, field) a comparison of architectures holds
# fixed. Evaluation is checked through the protocol; steps may differ (the curves cover them).
RECIPE_FIELDS = (("train", "batch_size"), ("train", "learning_rate"), ("train", "weight_decay"), ("train", "b1"),
                 ("train", "b2"), ("train", "eps"), ("train", "ema_decay"), ("diffusion", "num_timesteps"),
                 ("data", "source"), ("data", "resolution"), ("data", "flip"), ("model", "learn_sigma"),
                 ("model", "class_dropout_prob"))


def run_recipes(records: Records) -> dict[str, dict]:
    """{run: {"section.field": value}} of `RECIPE_FIELDS` from the manifests of the records' run directories
    (runs loaded from a CSV or JSONL have none and are left out)."""
    recipes = {}
    for row in records.runs.itertuples():
        source = getattr(row, "source", None)
        manifest = schema.read_manifest(source) if isinstance(source, str) and epath.Path(source).is_dir() \
            else None
        if manifest is not None:
            recipes[row.run] = {f"{section}.{field}": manifest.config[section][field]
                                for section, field in RECIPE_FIELDS
                                if field in manifest.config.get(section, {})}  # older runs lack newer fields
    return recipes


def recipe_differences(new: Records, dit: Records) -> list[str]:
    """The recipe fields in which the new runs differ from the DiT runs (or vary among either set), each as
    "field: new ... vs DiT ..."; empty when the recipes match or either set has no run directories. A field that
    some run's config lacks (written before the field existed) is not compared."""
    new_recipes, dit_recipes = run_recipes(new), run_recipes(dit)
    if not new_recipes or not dit_recipes:
        return []
    differences = []
    for key in (f"{section}.{field}" for section, field in RECIPE_FIELDS):
        if not all(key in r for r in (*new_recipes.values(), *dit_recipes.values())):
            continue  # a field some run's config predates: not compared
        new_values = sorted({str(r[key]) for r in new_recipes.values()})
        dit_values = sorted({str(r[key]) for r in dit_recipes.values()})
        if new_values != dit_values or len(new_values) > 1:
            differences.append(f"{key}: new {', '.join(new_values)} vs DiT {', '.join(dit_values)}")
    return differences


@dataclass(frozen=True)
class Comparison:
    """A new architecture's runs against DiT's fits: `table` is `compare_architecture`'s, one row per evaluation
    point of the new runs (named by run)."""

    table: pd.DataFrame
    points: pd.DataFrame  # the new runs' evaluation points compared (records columns)
    frontier_fit: FrontierFit
    gflops_fit: LogLogFit
    metric: str
    protocol: str
    notes: list[str]


def compare_runs(new: Records, dit: Records, *, metric: str | None = None, **where) -> Comparison:
    """The new runs' records against the DiT runs' (or the paper's) records: DiT's training-compute frontier fit
    and model-compute fit (`where` filters the DiT records), then every evaluation point of the new runs under
    the same metric and protocol placed against them (`compare_architecture`). A RecordsError says which metric,
    protocol fields or recipe fields differ: points measured or trained otherwise do not compare."""
    from analysis.study import model_compute_fit, select, training_compute_fit

    frontier = training_compute_fit(dit, metric=metric, **where)
    gflops_fit = model_compute_fit(dit, metric=frontier.metadata["metric"], **where)
    metric = frontier.metadata["metric"]
    try:
        selection = select(new, metric=metric)
    except RecordsError as e:
        raise RecordsError(f"the new runs have no {metric} points to compare with DiT's: {e}") from e
    if selection.protocol != frontier.metadata["protocol"]:
        raise RecordsError(f"the new runs were evaluated under another protocol than the DiT records:\n  new: "
                           f"{selection.protocol}\n  DiT: {frontier.metadata['protocol']}")
    differences = recipe_differences(new, dit)
    if differences:
        raise RecordsError("the new runs were trained with another recipe than the DiT runs (train them with the "
                           "DiT runs' config):\n  " + "\n  ".join(differences))
    points = selection.points
    table = compare_architecture(
        points.rename(columns={"step": "steps", "run": "name"})[
            ["name", "gflops", "steps", "batch_size", "train_gflops_cumulative", "value"]],
        frontier, gflops_fit)
    notes = [*selection.notes]
    if not run_recipes(new) or not run_recipes(dit):
        notes.append("Recipes not checked: the new or the DiT records are not run directories.")
    return Comparison(table=table, points=points, frontier_fit=frontier, gflops_fit=gflops_fit, metric=metric,
                      protocol=selection.protocol, notes=notes)


# ----------------------------------------------------------------------------------------------------------------
# A budget planned with the parametric law (analysis.law): sizes nobody trained, evaluation included
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """A model the plan could train: a trained config, or a size between (named by its shape)."""

    name: str
    gflops: float  # forward GMACs per image
    trained: bool
    params: float | None = None
    shape: dict | None = None  # depth, width, heads, patch of a DiT; None where the records do not say


@dataclass(frozen=True)
class LawChoice:
    """One model trained with the budget: its steps and the metric the law predicts, with the bootstrap interval."""

    size: ModelSize
    training_compute: float  # paper units, after its own evaluation cost
    evaluation_compute: float
    images: float
    steps: int
    predicted: float
    interval: tuple[float, float]
    size_beyond_trained: float  # its Gflops / the largest trained run's (> 1: the law extrapolates in size)
    compute_beyond_trained: float  # its training compute / the largest trained run's


@dataclass(frozen=True)
class LawPlan:
    """What a budget buys according to the law: the compute-optimal split and the models nearest to it."""

    budget: float  # paper units, training and evaluation together
    metric: str
    optimal_gflops: float
    optimal_gflops_interval: tuple[float, float]
    optimal_images: float
    optimal_images_interval: tuple[float, float]
    optimal_value: float
    optimal_value_interval: tuple[float, float]
    evaluation_per_gflop: float  # paper units of evaluation per Gflops/image of the model (0: not known)
    evaluation_note: str
    choices: list[LawChoice]
    batch_size: int
    law: dict  # the law's summary (parameters, intervals, flags)
    flags: list[str]

    def summary(self) -> dict:
        return asdict(self)


EXTRAPOLATION_FLAG = 1.0  # a choice beyond the largest trained run (in size or compute) is flagged
MAX_SIZE_EXTRAPOLATION = 100.0  # an optimum this many times the largest trained size is refused


def require_reach(optimal_gflops: float, largest_gflops: float) -> None:
    """A RecordsError when the law's optimum lies more than MAX_SIZE_EXTRAPOLATION times beyond the largest
    trained size: a power law fitted that far below says nothing there."""
    if optimal_gflops > MAX_SIZE_EXTRAPOLATION * largest_gflops:
        raise RecordsError(
            f"the budget's optimal size, {optimal_gflops:.3g} Gflops/image, is {optimal_gflops / largest_gflops:.3g}x "
            f"the largest trained one ({largest_gflops:.3g}); the law is not extrapolated past "
            f"{MAX_SIZE_EXTRAPOLATION:g}x: plan a smaller budget, or fit records of larger runs (e.g. runs/paper).")


def evaluation_cost(points: pd.DataFrame, evaluations: int) -> tuple[float, str]:
    """Paper units of evaluating a model of 1 Gflops/image `evaluations` times under the points' protocol (samples
    x sampling steps, x2 with guidance), and a sentence saying what that is; 0 and why where the protocol does
    not give its sample count or sampling compute."""
    if evaluations == 0:
        return 0.0, "no evaluation counted (--evaluations 0)"
    per_image = (points["sampling_gflops_per_image"].astype(float) / points["gflops"].astype(float)).median()
    samples = points["num_samples"].astype(float).median()
    if not (np.isfinite(per_image) and np.isfinite(samples)):
        return 0.0, "not counted: the records' protocol gives no sample count or sampling steps"
    protocol = points["protocol"].iloc[0]
    return (evaluations * samples * per_image,
            f"{evaluations} x {protocol}: {samples:,.0f} samples x {per_image:g} forward passes each")


def plan_with_law(fit, points: pd.DataFrame, budget: float, offer_sizes: Callable[[float], list[ModelSize]], *,
                  batch_size: int, evaluations: int = 1) -> LawPlan:
    """The budget (paper units) split by the law `fit` (an analysis.law.LawFit over Gflops) into a compute-optimal
    size and images, after the evaluation's cost under the points' protocol; then each of `offer_sizes(optimal
    Gflops)` (the trained configs nearest to the optimum and a size at it) trained with what the budget leaves
    after its own evaluation, at `batch_size`: its steps and predicted metric with the law's bootstrap interval,
    and how far beyond the largest trained run it lies."""
    _require_positive("budget", budget)
    if fit.size != "gflops":
        raise RecordsError("the budget plan needs the law over Gflops (size gflops): configs are chosen by Gflops.")
    per_gflop, evaluation_note = evaluation_cost(points, evaluations)
    optimum = optimal_allocation(fit.values, budget, per_gflop)
    largest_size = points["gflops"].astype(float).max()
    require_reach(optimum["size"], largest_size)
    sizes = offer_sizes(optimum["size"])
    if not sizes:
        raise RecordsError("the budget plan has no model sizes to choose from.")

    def optimal_of(key: str) -> tuple[float, float]:
        # A bootstrap fit whose exponent fell to 0 has no optimum: it counts as unknown (NaN), not as an error.
        return fit.interval_of(lambda v: optimal_allocation(v, budget, per_gflop)[key]
                               if min(v["alpha"], v["beta"]) > 0 else math.nan)

    largest_compute = points["train_gflops_cumulative"].astype(float).max()
    choices = []
    for size in sizes:
        evaluation = per_gflop * size.gflops
        compute = budget - evaluation
        if compute <= 0:
            continue
        images = compute / (schema.TRAINING_MULTIPLIER * size.gflops)
        choices.append(LawChoice(
            size=size, training_compute=compute, evaluation_compute=evaluation, images=images,
            steps=int(images // batch_size), predicted=float(fit.predict(size.gflops, images)),
            interval=fit.interval_of(lambda v, n=size.gflops, d=images: float(predict(v, n, d))),
            size_beyond_trained=size.gflops / largest_size, compute_beyond_trained=compute / largest_compute))
    if not choices:
        raise RecordsError("the budget does not pay for one evaluation of any of the sizes.")
    flags = list(fit.flags())
    for choice in choices:
        beyond = [f"{ratio:.3g}x the largest trained {what}" for ratio, what in
                  ((choice.size_beyond_trained, "size"), (choice.compute_beyond_trained, "run's training compute"))
                  if ratio > EXTRAPOLATION_FLAG]
        if beyond:
            flags.append(f"{choice.size.name} extrapolates: {' and '.join(beyond)}; its interval is the bootstrap's "
                         "over the trained runs and widens with the distance")
    return LawPlan(budget=float(budget), metric=fit.metric, optimal_gflops=optimum["size"],
                   optimal_gflops_interval=optimal_of("size"), optimal_images=optimum["images"],
                   optimal_images_interval=optimal_of("images"), optimal_value=optimum["value"],
                   optimal_value_interval=optimal_of("value"), evaluation_per_gflop=per_gflop,
                   evaluation_note=evaluation_note, choices=choices, batch_size=batch_size,
                   law={**fit.summary(), "notes": fit.metadata.get("notes", [])},
                   flags=flags)
