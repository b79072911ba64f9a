"""Compute-optimal model size from isoFLOP profiles (Chinchilla's approach 2: Hoffmann et al. 2022, Fig. 3), taken
from the training curves a grid records.

For each training-compute budget C (paper units: 3 x forward Gflops x images):
- the profile: every config whose curve spans C, with its metric at C, interpolated linearly in log-log space
  between its own evaluations (never extrapolated before its first or past its last);
- a parabola of log10(metric) in log10(size) (size: forward Gflops per image, or parameters) and its minimum, the
  optimal size N_opt(C); the same parabola in log10(images seen) gives D_opt(C) (a config at C has seen
  C / (3 x its Gflops) images, so with size = Gflops, D_opt = C / (3 N_opt) exactly);
- a budget is flagged, and not fitted, when fewer than 3 configs of distinct sizes reach it, when the parabola has
  no minimum, or when the minimum lies at an edge of the profile (the best config is its smallest or largest, or
  the parabola's minimum lies beyond them): the optimum is then outside what the grid measured.
Then N_opt(C) = k C^a and D_opt(C) = k' C^b are fitted across the fitted budgets (least squares in log-log),
with intervals from a bootstrap over configs: each replicate resamples the configs, refits every profile (a budget
flagged in a replicate drops out of it) and both laws. Adjacent budgets share configs, so the budgets are not
independent evidence; the bootstrap over configs is what carries the uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.fits import DEFAULT_CONFIDENCE, _check_confidence
from analysis.records import Records
from analysis.schema import RecordsError, metric_column

MIN_PROFILE_CONFIGS = 3  # a parabola through fewer sizes has no freedom left to show a minimum
MIN_LAW_BUDGETS = 3  # fitted budgets a power law of the optimum needs
DEFAULT_BUDGETS = 12
PROFILES_NEED = ("Profiles need each config evaluated at several steps, curves that overlap in training compute, "
                 "and configs on both sides of the optimum.")


@dataclass(frozen=True)
class Profile:
    """The configs at one budget: their metric there, the parabola and its minimum (NaN when flagged)."""

    budget: float
    points: pd.DataFrame  # run, size, images, value
    coefficients: tuple[float, float, float] | None  # log10 value = a u^2 + b u + c, u = log10 size
    optimal_size: float
    optimal_images: float
    optimal_value: float  # the parabola's minimum
    flag: str  # why the budget is not fitted ("" when it is)

    @property
    def fitted(self) -> bool:
        return not self.flag

    def parabola(self, size) -> np.ndarray:
        a, b, c = self.coefficients
        u = np.log10(np.asarray(size, dtype=float))
        return 10 ** (a * u * u + b * u + c)


@dataclass(frozen=True)
class OptimumLaw:
    """optimum = coefficient x budget^exponent (N_opt or D_opt), fitted across the budgets; intervals are the
    bootstrap's percentiles. Percentiles, not a t-scaled standard error: a resample that drops the configs near
    the optimum moves it far, so the replicates have long tails that a standard error turns into intervals
    wider than the spread they describe (in simulated studies a t-scaled 90% interval was 1.4x wider and
    covered the true exponent in every study; the percentile one covers it in 93%)."""

    quantity: str  # "size" (N_opt) or "images" (D_opt)
    exponent: float
    coefficient: float
    n_budgets: int
    n_configs: int
    confidence: float
    bootstrap: np.ndarray = field(repr=False)  # [n, 2]: exponent, log10 coefficient

    @property
    def _tails(self) -> tuple[float, float]:
        return (1 - self.confidence) / 2, (1 + self.confidence) / 2

    @property
    def exponent_ci(self) -> tuple[float, float]:
        low, high = np.quantile(self.bootstrap[:, 0], self._tails)
        return float(low), float(high)

    def predict(self, budget) -> np.ndarray:
        return self.coefficient * np.asarray(budget, dtype=float) ** self.exponent

    def confidence_band(self, budget) -> tuple[np.ndarray, np.ndarray]:
        """Interval for the optimum at each budget (multiplicative: in log space)."""
        log_c = np.log10(np.asarray(budget, dtype=float))[..., None]
        low, high = np.quantile(self.bootstrap[:, 1] + self.bootstrap[:, 0] * log_c, self._tails, axis=-1)
        return 10 ** low, 10 ** high

    def summary(self) -> dict:
        return {"law": f"{self.quantity}_opt = coefficient * C ** exponent", "exponent": self.exponent,
                "exponent_ci": list(self.exponent_ci), "coefficient": self.coefficient,
                "n_budgets": self.n_budgets, "n_configs": self.n_configs, "n_bootstrap": len(self.bootstrap),
                "confidence": self.confidence}


@dataclass(frozen=True)
class IsoFlopAnalysis:
    """The isoFLOP profiles of a set of curves and the power laws of their optima (None, with `note` saying why,
    when too few budgets have an interior minimum)."""

    size: str  # "gflops" or "params"
    metric: str
    profiles: list[Profile]
    size_law: OptimumLaw | None
    images_law: OptimumLaw | None
    n_configs: int
    note: str
    metadata: dict = field(default_factory=dict)

    @property
    def fitted(self) -> list[Profile]:
        return [p for p in self.profiles if p.fitted]

    @property
    def fitted_range(self) -> tuple[float, float] | None:
        """The least and the most compute among the fitted budgets (None when none is fitted)."""
        budgets = [p.budget for p in self.fitted]
        return (min(budgets), max(budgets)) if budgets else None

    def table(self) -> pd.DataFrame:
        """One row per budget: its configs, the optimum (NaN when flagged) and the flag."""
        return pd.DataFrame([{
            "budget": p.budget, "configs": len(p.points), "runs": ", ".join(p.points["run"]),
            f"optimal_{self.size}": p.optimal_size, "optimal_images": p.optimal_images,
            f"optimal_{metric_column(self.metric) if self.metric else 'value'}": p.optimal_value, "flag": p.flag}
            for p in self.profiles])

    def summary(self) -> dict:
        return {"metric": self.metric, "size": self.size, "n_configs": self.n_configs,
                "budgets": self.table().to_dict("records"),
                "size_law": self.size_law.summary() if self.size_law else None,
                "images_law": self.images_law.summary() if self.images_law else None,
                "note": self.note, **self.metadata}


# ---------------------------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------------------------

def _curves(runs, sizes, gflops, compute, values) -> pd.DataFrame:
    curves = pd.DataFrame({"run": np.asarray(runs, dtype=object), "size": np.asarray(sizes, dtype=float),
                           "gflops": np.asarray(gflops, dtype=float), "x": np.asarray(compute, dtype=float),
                           "y": np.asarray(values, dtype=float)})
    numbers = curves[["size", "gflops", "x", "y"]].to_numpy()
    if not np.all(np.isfinite(numbers)):
        raise RecordsError("isoFLOP profiles: sizes, Gflops, compute and metric values must be finite; remove the "
                           "NaN or infinite points first.")
    if np.any(numbers <= 0):
        raise RecordsError("isoFLOP profiles: sizes, Gflops, compute and metric values must be positive (the "
                           "profiles are fitted in log space).")
    if (curves.groupby("run")[["size", "gflops"]].nunique() > 1).any(axis=None):
        raise RecordsError("isoFLOP profiles: each run needs one size and one Gflops value.")
    return curves.groupby(["run", "x"], as_index=False).agg(size=("size", "first"), gflops=("gflops", "first"),
                                                            y=("y", "mean")).sort_values(["run", "x"])


def profile_points(curves: pd.DataFrame, budget: float) -> pd.DataFrame:
    """The configs whose curve spans `budget`, each with its metric there (log-log interpolation between its own
    evaluations) and the images it has seen by then."""
    rows = []
    for run, curve in curves.groupby("run", sort=True):
        x, y = curve["x"].to_numpy(), curve["y"].to_numpy()
        if x[0] * (1 - 1e-9) <= budget <= x[-1] * (1 + 1e-9):
            value = 10 ** np.interp(math.log10(budget), np.log10(x), np.log10(y))
            gflops = float(curve["gflops"].iloc[0])
            rows.append({"run": run, "size": float(curve["size"].iloc[0]), "images": budget / (3 * gflops),
                         "value": float(value)})
    return pd.DataFrame(rows, columns=["run", "size", "images", "value"])


def _vertex(u: np.ndarray, log_v: np.ndarray, weights: np.ndarray) -> tuple[tuple[float, float, float], float]:
    a, b, c = np.polyfit(u, log_v, 2, w=np.sqrt(weights))
    return (float(a), float(b), float(c)), (-b / (2 * a) if a > 0 else math.nan)


def _interior_minimum(size: np.ndarray, value: np.ndarray, images: np.ndarray, weights: np.ndarray):
    """The weighted parabola of log10 value in log10 size and its minimum, on arrays of one profile's points (all
    of weight > 0): (coefficients, log10 optimal size, log10 optimal images, flag) where flag is None when the
    minimum is interior, else (reason, detail) for `fit_profile` to word."""
    distinct = len(np.unique(size))
    if distinct < MIN_PROFILE_CONFIGS:
        return None, math.nan, math.nan, ("few", distinct)
    u, log_v = np.log10(size), np.log10(value)
    coefficients, vertex = _vertex(u, log_v, weights)
    best = int(np.argmin(value))
    if size[best] == size.min() or size[best] == size.max():
        return coefficients, math.nan, math.nan, ("edge", best)
    if not math.isfinite(vertex):
        return coefficients, math.nan, math.nan, ("down", None)
    if not u.min() < vertex < u.max():
        return coefficients, math.nan, math.nan, ("beyond", vertex)
    return coefficients, vertex, _vertex(np.log10(images), log_v, weights)[1], None


def fit_profile(points: pd.DataFrame, budget: float, weights=None, size_name: str = "size") -> Profile:
    """The parabola of one budget's profile and its minimum, or the flag saying why there is none. `weights`
    count each config's copies (a bootstrap draw)."""
    weights = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=float)
    keep = weights > 0
    points, weights = points[keep].reset_index(drop=True), weights[keep]
    coefficients, vertex, images_vertex, flag = _interior_minimum(
        points["size"].to_numpy(), points["value"].to_numpy(), points["images"].to_numpy(), weights)
    nan = math.nan
    if flag is None:
        a, b, c = coefficients
        return Profile(budget, points, coefficients, float(10 ** vertex), float(10 ** images_vertex),
                       float(10 ** (c - b * b / (4 * a))), "")
    reason, detail = flag
    if reason == "few":
        text = f"{detail} config size(s) reach this budget (a minimum needs {MIN_PROFILE_CONFIGS})"
    elif reason == "edge":
        best = points.iloc[detail]
        edge = "smallest" if best["size"] == points["size"].min() else "largest"
        text = f"the best config here ({best['run']}) is the {edge}: the optimum may lie beyond the grid"
    elif reason == "down":
        text = "the profile curves down (no minimum)"
    else:
        text = f"the parabola's minimum ({10 ** detail:.3g} {size_name}) lies beyond the configs here"
    return Profile(budget, points, coefficients, nan, nan, nan, text)


def default_budgets(curves: pd.DataFrame, n: int = DEFAULT_BUDGETS) -> np.ndarray:
    """n budgets spread evenly in log compute over the range that at least MIN_PROFILE_CONFIGS curves span (all
    of the curves' range when none is spanned by that many: every budget is then flagged)."""
    spans = curves.groupby("run")["x"].agg(["min", "max"])
    grid = np.geomspace(curves["x"].min(), curves["x"].max(), 400)
    reached = ((spans["min"].to_numpy()[:, None] <= grid) & (grid <= spans["max"].to_numpy()[:, None])).sum(axis=0)
    covered = grid[reached >= MIN_PROFILE_CONFIGS]
    low, high = (covered.min(), covered.max()) if len(covered) else (grid[0], grid[-1])
    if low == high:
        return np.array([low])
    return np.geomspace(low, high, n)


# ---------------------------------------------------------------------------------------------------------------
# The laws of the optimum
# ---------------------------------------------------------------------------------------------------------------

def _line(budgets: list[float], optima: list[float]) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.log10(budgets), np.log10(optima), 1)
    return float(slope), float(intercept)


def fit_isoflop(runs, sizes, gflops, compute, values, *, budgets=None, n_budgets: int = DEFAULT_BUDGETS,
                size_name: str = "gflops", metric: str = "", confidence: float = DEFAULT_CONFIDENCE,
                n_bootstrap: int = 500, seed: int = 0, metadata: dict | None = None) -> IsoFlopAnalysis:
    """IsoFLOP profiles of curves given as aligned arrays: run name, the run's size (Gflops or parameters), its
    forward Gflops per image, cumulative training compute, metric (lower is better). `budgets` defaults to
    `default_budgets`."""
    _check_confidence(confidence)
    curves = _curves(runs, sizes, gflops, compute, values)
    n_configs = curves["run"].nunique()
    budgets = np.sort(np.asarray(default_budgets(curves, n_budgets) if budgets is None else budgets, dtype=float))
    if len(budgets) == 0 or np.any(budgets <= 0):
        raise RecordsError("isoFLOP budgets must be positive training compute values.")
    points = [profile_points(curves, b) for b in budgets]
    profiles = [fit_profile(p, b, size_name=size_name) for p, b in zip(points, budgets, strict=True)]
    fitted = [p for p in profiles if p.fitted]
    common = dict(size=size_name, metric=metric, profiles=profiles, n_configs=n_configs,
                  metadata={"n_bootstrap": n_bootstrap, "seed": seed, **(metadata or {})})
    if not any(len(p) >= MIN_PROFILE_CONFIGS for p in points):
        single = int((curves.groupby("run")["x"].nunique() == 1).sum())
        why = (f"{single} of {n_configs} configs have a single evaluation" if single else
               "each config's curve spans too little compute to overlap two others'")
        return IsoFlopAnalysis(size_law=None, images_law=None, note=(
            f"no budget is reached by the curves of {MIN_PROFILE_CONFIGS} configs ({why}): these records hold no "
            "isoFLOP profile"), **common)
    if len(fitted) < MIN_LAW_BUDGETS:
        return IsoFlopAnalysis(size_law=None, images_law=None, note=(
            f"{len(fitted)} of {len(profiles)} budgets have an interior minimum; the laws of the optimum need "
            f"{MIN_LAW_BUDGETS}"), **common)

    names = sorted(curves["run"].unique())
    index = {name: i for i, name in enumerate(names)}
    arrays = [(p["run"].map(index).to_numpy(), p["size"].to_numpy(), p["value"].to_numpy(), p["images"].to_numpy())
              for p in points]
    rng = np.random.default_rng(seed)
    replicates = {"size": [], "images": []}
    for _ in range(n_bootstrap):
        draws = rng.multinomial(len(names), np.full(len(names), 1 / len(names)))
        kept = []  # (log10 budget, log10 optimal size, log10 optimal images) of the budgets fitted in this draw
        for budget, (config, size, value, images) in zip(budgets, arrays, strict=True):
            weights = draws[config].astype(float)
            drawn = weights > 0
            _, vertex, images_vertex, flag = _interior_minimum(size[drawn], value[drawn], images[drawn],
                                                               weights[drawn])
            if flag is None:
                kept.append((math.log10(budget), vertex, images_vertex))
        if len(kept) >= 2:
            log_budget, log_size, log_images = np.array(kept).T
            replicates["size"].append(np.polyfit(log_budget, log_size, 1))
            replicates["images"].append(np.polyfit(log_budget, log_images, 1))
    if len(replicates["size"]) < max(20, n_bootstrap // 4):
        return IsoFlopAnalysis(size_law=None, images_law=None, note=(
            f"only {len(replicates['size'])} of {n_bootstrap} bootstrap resamples of the configs kept 2 fitted "
            "budgets: too few configs for an interval"), **common)
    laws = {}
    for quantity, attribute in (("size", "optimal_size"), ("images", "optimal_images")):
        exponent, intercept = _line([p.budget for p in fitted], [getattr(p, attribute) for p in fitted])
        laws[quantity] = OptimumLaw(quantity=quantity, exponent=exponent, coefficient=10 ** intercept,
                                    n_budgets=len(fitted), n_configs=n_configs, confidence=confidence,
                                    bootstrap=np.array(replicates[quantity]))
    skipped = n_bootstrap - len(replicates["size"])
    return IsoFlopAnalysis(size_law=laws["size"], images_law=laws["images"], note="",
                           **{**common, "metadata": {**common["metadata"], "bootstrap_skipped": skipped}})


def isoflop_analysis(records: Records | pd.DataFrame, *, metric: str | None = None, size: str = "gflops",
                     budgets=None, n_budgets: int = DEFAULT_BUDGETS, confidence: float = DEFAULT_CONFIDENCE,
                     n_bootstrap: int = 500, seed: int = 0, **where) -> IsoFlopAnalysis:
    """The isoFLOP profiles of a set of records: the points `study.training_compute_fit` fits (one metric and
    protocol, configs of one block and resolution), profiled over model Gflops or parameters."""
    from analysis import study

    points, selection = study.sized_training_points(records, metric=metric, size=size, **where)
    sizes = points["size"].to_numpy(dtype=float)
    metric = points["metric"].iloc[0]
    return fit_isoflop(points["run"], sizes, points["gflops"], points["train_gflops_cumulative"], points["value"],
                       budgets=budgets, n_budgets=n_budgets, size_name=size, metric=metric, confidence=confidence,
                       n_bootstrap=n_bootstrap, seed=seed,
                       metadata={"protocol": points["protocol"].iloc[0], "family": selection.family,
                                 "notes": selection.notes})
