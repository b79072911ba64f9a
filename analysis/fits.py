"""Scaling fits with honest uncertainty.

- `fit_loglog`: log10 y = intercept + slope log10 x (FID vs model Gflops, the paper's Fig. 8), with Pearson and
  Spearman correlation.
- `compute_frontier`: the compute-efficient frontier of many training curves (best y reachable with at most x
  compute; which run is optimal where).
- `fit_frontier`: y = floor + scale (x / x_ref)^-exponent fitted to the frontier's points (robust loss in log
  space, several starts, bounds; convergence reported).

Uncertainty comes from a bootstrap over configs (runs), never over the checkpoints of one run: resampling the
checkpoints of a run treats its correlated points as independent evidence. Every fit also reports how well it
extrapolates: refitted without its largest config, how far off is its prediction of that config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.stats

from analysis.schema import RecordsError

DEFAULT_CONFIDENCE = 0.95


def _as_array(x) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:  # NaN fails too
        raise RecordsError(f"confidence must be a fraction in (0, 1), e.g. 0.95; got {confidence!r}.")


def _check_bootstrap(n_bootstrap: int) -> None:
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int | np.integer) or n_bootstrap < 1:
        raise RecordsError(f"n_bootstrap must be an integer >= 1, got {n_bootstrap!r}.")


def _check_xy(x: np.ndarray, y: np.ndarray, what: str, minimum: int) -> None:
    if len(x) < minimum:
        raise RecordsError(f"{what} needs at least {minimum} points, got {len(x)}; add configs or relax the "
                           "filters.")
    for name, values in (("x", x), ("y", y)):
        if not np.all(np.isfinite(values)):
            raise RecordsError(f"{what}: {name} has NaN or infinite values; remove those points first.")
        if np.any(values <= 0):
            raise RecordsError(f"{what}: {name} has non-positive values ({values[values <= 0][:3].tolist()}); a "
                               "log-scale fit needs positive compute and metric values.")


@dataclass(frozen=True)
class Extrapolation:
    """A fit refitted without its largest config, scored on that config: the error to expect when extrapolating."""

    held_out: str  # the run left out
    x: np.ndarray  # its points
    actual: np.ndarray
    predicted: np.ndarray

    @property
    def log10_error(self) -> float:
        """Mean of log10(predicted / actual) over the held-out points: > 0 means the fit was pessimistic."""
        return float(np.mean(np.log10(self.predicted / self.actual)))

    @property
    def relative_error(self) -> float:
        return float(10 ** self.log10_error - 1)

    def summary(self) -> dict:
        return {"held_out": self.held_out, "n": int(len(self.x)), "log10_error": self.log10_error,
                "relative_error": self.relative_error}


def describe_extrapolation(extrapolation: Extrapolation | None) -> str:
    """The leave-largest-out check in one sentence (None: too few configs to leave one out)."""
    if extrapolation is None:
        return "not possible (too few configs without the largest)"
    n = len(extrapolation.x)
    return (f"refitted without {extrapolation.held_out}, the fit predicts its {n} point{'s' if n > 1 else ''} "
            f"{extrapolation.relative_error:+.1%} off (log10 error {extrapolation.log10_error:+.3f}; > 0: "
            "pessimistic)")


def _interval_scale(confidence: float, n_configs: int, n_params: int) -> float:
    """Multiplier of a bootstrap standard error giving a `confidence` interval: Student-t with n_configs - n_params
    degrees of freedom, times sqrt(n_configs / (n_configs - n_params)) because a bootstrap over few configs
    underestimates the spread (without it 90% intervals covered 67-80% in tests with 8 configs)."""
    dof = max(n_configs - n_params, 1)
    return float(scipy.stats.t.ppf(0.5 + confidence / 2, dof) * math.sqrt(n_configs / dof))


def _group_indices(groups: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(groups, return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]


# ---------------------------------------------------------------------------------------------------------------
# Log-log linear fit (model compute)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogLogFit:
    """log10 y = intercept + slope log10 x. Intervals: standard errors from the bootstrap over configs, scaled by
    `_interval_scale`; prediction intervals add the residual scatter of configs about the line."""

    x_name: str
    y_name: str
    slope: float
    intercept: float
    pearson_r: float
    pearson_p: float
    spearman_r: float
    spearman_p: float
    n: int
    n_configs: int
    residual_std: float  # of log10 y about the line
    confidence: float
    slope_se: float
    intercept_se: float
    bootstrap: np.ndarray = field(repr=False)  # [n_bootstrap, 2]: slope, intercept
    leave_largest_out: Extrapolation | None
    data: pd.DataFrame = field(repr=False)
    metadata: dict = field(default_factory=dict)

    @property
    def _t(self) -> float:
        return _interval_scale(self.confidence, self.n_configs, 2)

    @property
    def slope_ci(self) -> tuple[float, float]:
        return self.slope - self._t * self.slope_se, self.slope + self._t * self.slope_se

    @property
    def intercept_ci(self) -> tuple[float, float]:
        return self.intercept - self._t * self.intercept_se, self.intercept + self._t * self.intercept_se

    def predict(self, x) -> np.ndarray:
        return 10 ** (self.intercept + self.slope * np.log10(_as_array(x)))

    def _spread(self, x) -> np.ndarray:
        log_x = np.log10(_as_array(x))[..., None]
        replicates = self.bootstrap[:, 1] + self.bootstrap[:, 0] * log_x
        return replicates.std(axis=-1, ddof=1)

    def confidence_band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Interval for the fitted line (the mean y) at x."""
        centre, half = np.log10(self.predict(x)), self._t * self._spread(x)
        return 10 ** (centre - half), 10 ** (centre + half)

    def prediction_interval(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Interval for a new config's y at x: the line's uncertainty plus the scatter of configs about it."""
        centre = np.log10(self.predict(x))
        half = self._t * np.sqrt(self._spread(x) ** 2 + self.residual_std ** 2)
        return 10 ** (centre - half), 10 ** (centre + half)

    def summary(self) -> dict:
        lo, hi = self.slope_ci
        return {
            "x": self.x_name, "y": self.y_name, "slope": self.slope, "intercept": self.intercept,
            "slope_ci": [lo, hi], "intercept_ci": list(self.intercept_ci), "confidence": self.confidence,
            "pearson_r": self.pearson_r, "pearson_p": self.pearson_p, "spearman_r": self.spearman_r,
            "spearman_p": self.spearman_p, "n": self.n, "n_configs": self.n_configs,
            "residual_std_log10": self.residual_std,
            "leave_largest_out": self.leave_largest_out.summary() if self.leave_largest_out else None,
            **self.metadata,
        }


def _ols(log_x: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(log_x, log_y, 1)
    return float(slope), float(intercept)


def _bootstrap_ols(log_x: np.ndarray, log_y: np.ndarray, groups: list[np.ndarray], n_bootstrap: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Slope and intercept of each resample of the configs. Drawing configs with replacement weights each point
    by how often its config was drawn, so all replicates are weighted least squares solved at once."""
    draws = rng.multinomial(len(groups), np.full(len(groups), 1 / len(groups)), size=n_bootstrap)
    weights = np.zeros((n_bootstrap, len(log_x)))
    for g, rows in enumerate(groups):
        weights[:, rows] = draws[:, [g]]
    total = weights.sum(axis=1)
    mean_x, mean_y = weights @ log_x / total, weights @ log_y / total
    dx, dy = log_x - mean_x[:, None], log_y - mean_y[:, None]
    sxx, sxy = (weights * dx * dx).sum(axis=1), (weights * dx * dy).sum(axis=1)
    usable = sxx > 1e-12 * max(np.ptp(log_x) ** 2, 1e-300)  # every draw the same config: no slope
    slope = sxy[usable] / sxx[usable]
    return np.stack([slope, mean_y[usable] - slope * mean_x[usable]], axis=1)


def fit_loglog(x, y, *, groups=None, x_name: str = "x", y_name: str = "y", confidence: float = DEFAULT_CONFIDENCE,
               n_bootstrap: int = 2000, seed: int = 0, metadata: dict | None = None) -> LogLogFit:
    """Fit log10 y = intercept + slope log10 x. `groups` names each point's config (run); the bootstrap resamples
    configs and the extrapolation check leaves out the config with the largest x. Without groups every point is
    its own config."""
    x, y = _as_array(x), _as_array(y)
    _check_confidence(confidence)
    _check_bootstrap(n_bootstrap)
    _check_xy(x, y, "a log-log fit", 3)
    groups = np.asarray(groups if groups is not None else np.arange(len(x)).astype(str), dtype=object)
    indices = _group_indices(groups)
    if len(indices) < 3:
        raise RecordsError(f"a log-log fit needs at least 3 configs, got {len(indices)}.")
    if np.ptp(np.log10(x)) == 0:
        raise RecordsError("a log-log fit needs at least two distinct x values.")
    log_x, log_y = np.log10(x), np.log10(y)
    slope, intercept = _ols(log_x, log_y)
    residuals = log_y - (intercept + slope * log_x)
    residual_std = float(np.sqrt(np.sum(residuals ** 2) / max(len(x) - 2, 1)))
    rng = np.random.default_rng(seed)
    bootstrap = _bootstrap_ols(log_x, log_y, indices, n_bootstrap, rng)
    pearson = scipy.stats.pearsonr(log_x, log_y)
    spearman = scipy.stats.spearmanr(x, y)

    largest = groups[np.argmax(x)]
    keep = groups != largest
    extrapolation = None
    if len(np.unique(groups[keep])) >= 3 and np.ptp(log_x[keep]) > 0:
        s, i = _ols(log_x[keep], log_y[keep])
        extrapolation = Extrapolation(str(largest), x[~keep], y[~keep], 10 ** (i + s * log_x[~keep]))
    data = pd.DataFrame({"run": groups, x_name: x, y_name: y, "fitted": 10 ** (intercept + slope * log_x)})
    return LogLogFit(
        x_name=x_name, y_name=y_name, slope=slope, intercept=intercept,
        pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
        spearman_r=float(spearman.statistic), spearman_p=float(spearman.pvalue),
        n=len(x), n_configs=len(indices), residual_std=residual_std, confidence=confidence,
        slope_se=float(bootstrap[:, 0].std(ddof=1)), intercept_se=float(bootstrap[:, 1].std(ddof=1)),
        bootstrap=bootstrap, leave_largest_out=extrapolation, data=data,
        metadata={"n_bootstrap": len(bootstrap), "seed": seed, **(metadata or {})})


# ---------------------------------------------------------------------------------------------------------------
# The compute-efficient frontier
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frontier:
    """The lower envelope of training curves: at each compute x, the best y any run reached with at most x.

    `grid`: the envelope on a shared log grid (plus every observed x) with the run that attains it; between a
    run's evaluations its curve is interpolated linearly in log-log space, never extrapolated past its last one.
    `points`: the observed points on the frontier (each better than every point with less compute).
    """

    curves: pd.DataFrame  # run, x, y
    grid: pd.DataFrame  # x, y, run
    points: pd.DataFrame  # run, x, y

    def best_at(self, x: float) -> tuple[str, float]:
        """(run, y) of the frontier at compute x, exactly: the best of every run's points up to x and of its
        interpolated curve at x. Beyond the data this is the last point (nothing is extrapolated)."""
        if x < self.curves["x"].min():
            raise RecordsError(f"compute {x:.3g} is below the first evaluated point ({self.curves['x'].min():.3g}).")
        best = ("", np.inf)
        for run, curve in self.curves.groupby("run", sort=False):
            cx, cy = curve["x"].to_numpy(), curve["y"].to_numpy()
            candidates = list(cy[cx <= x])
            if cx[0] <= x <= cx[-1]:
                candidates.append(10 ** np.interp(np.log10(x), np.log10(cx), np.log10(cy)))
            if candidates and min(candidates) < best[1]:
                best = (str(run), float(min(candidates)))
        return best

    def optimal_ranges(self) -> pd.DataFrame:
        """Contiguous compute ranges over which each run is the optimal one (the grid's run column)."""
        runs = self.grid["run"].to_numpy()
        starts = np.flatnonzero(np.r_[True, runs[1:] != runs[:-1]])
        ends = np.r_[starts[1:], len(runs)] - 1
        x = self.grid["x"].to_numpy()
        return pd.DataFrame({"run": runs[starts], "x_start": x[starts],
                             "x_end": np.r_[x[starts[1:]], x[-1]], "points": ends - starts + 1})


def compute_frontier(runs, x, y, *, grid_points: int = 200) -> Frontier:
    """The frontier of curves given as three aligned arrays: run name, compute, metric (lower is better)."""
    curves = pd.DataFrame({"run": np.asarray(runs, dtype=object), "x": _as_array(x), "y": _as_array(y)})
    _check_xy(curves["x"].to_numpy(), curves["y"].to_numpy(), "a compute frontier", 1)
    curves = curves.sort_values(["run", "x"]).reset_index(drop=True)
    log_grid = np.log10(np.geomspace(curves["x"].min(), curves["x"].max(), grid_points))
    log_grid = np.unique(np.r_[log_grid, np.log10(curves["x"].to_numpy())])
    names = curves["run"].unique()
    values = np.full((len(names), len(log_grid)), np.inf)
    for i, name in enumerate(names):
        curve = curves[curves["run"] == name].groupby("x", as_index=False)["y"].min()
        log_x, log_y = np.log10(curve["x"].to_numpy()), np.log10(curve["y"].to_numpy())
        inside = (log_grid >= log_x[0] - 1e-12) & (log_grid <= log_x[-1] + 1e-12)
        values[i, inside] = np.interp(log_grid[inside], log_x, log_y)
    # The best y with at most x compute: a run may stop early, so the envelope never rises.
    best_run = np.argmin(values, axis=0)
    best = values[best_run, np.arange(len(log_grid))]
    running = np.minimum.accumulate(best)
    carried = np.maximum.accumulate(np.where(best <= running, np.arange(len(log_grid)), 0))
    grid = pd.DataFrame({"x": 10 ** log_grid, "y": 10 ** running, "run": names[best_run[carried]]})

    return Frontier(curves=curves, grid=grid, points=_pareto_points(curves))


def _pareto_points(curves: pd.DataFrame) -> pd.DataFrame:
    """The points (run, x, y) better than every point with less compute: the frontier's observed points."""
    order = curves.sort_values(["x", "y"]).reset_index(drop=True)
    previous_best = np.r_[np.inf, np.minimum.accumulate(order["y"].to_numpy())[:-1]]
    return order[order["y"].to_numpy() < previous_best].reset_index(drop=True)[["run", "x", "y"]]


# ---------------------------------------------------------------------------------------------------------------
# Offset power law on the frontier (training compute)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OffsetPowerLaw:
    """y = floor + scale (x / x_ref)^-exponent."""

    floor: float
    scale: float
    exponent: float
    x_ref: float

    def __call__(self, x) -> np.ndarray:
        return self.floor + self.scale * (_as_array(x) / self.x_ref) ** -self.exponent

    def inverse(self, y) -> np.ndarray:
        """The x at which the law reaches y (inf where y is at or below the floor)."""
        y = _as_array(y)
        gap = np.where(y > self.floor, y - self.floor, np.nan)
        return np.where(y > self.floor, self.x_ref * (gap / self.scale) ** (-1 / self.exponent), np.inf)


EXPONENT_BOUNDS = (1e-3, 5.0)
# A bootstrap replicate's refit stops after this many evaluations. Replicates of a frontier that scales converge in
# a few dozen; on a flat one (no scaling to fit) the solver crawls along a valley of near-equal cost for hundreds
# without moving the replicates' percentiles (measured in docs/benchmarks.md, "Frontier fits").
BOOTSTRAP_MAX_EVALUATIONS = 100


def _log_residuals(params, log_x, log_y):
    floor, log_scale, exponent = params
    return np.log(floor + np.exp(log_scale - exponent * log_x)) - log_y


def _log_residuals_jacobian(params, log_x):
    """d residual / d (floor, log_scale, exponent), in closed form (finite differences cost a third of a fit)."""
    floor, log_scale, exponent = params
    power = np.exp(log_scale - exponent * log_x)
    share = power / (floor + power)
    return np.stack([1 / (floor + power), share, -log_x * share], axis=1)


def _fit_offset_power_law(x: np.ndarray, y: np.ndarray, x_ref: float, f_scale: float,
                          starts: list[tuple[float, float]] | None = None,
                          weights: np.ndarray | None = None,
                          max_evaluations: int = 2000) -> tuple[OffsetPowerLaw, dict]:
    """Robust (soft-L1) least squares on log y from several (floor fraction, exponent) starts; the best is kept.
    `weights` count each point's copies (a config drawn twice by the bootstrap). Reports how many starts
    converged and how many reached the best solution."""
    log_x, log_y = np.log(x / x_ref), np.log(y)
    root_weights = np.sqrt(weights) if weights is not None else 1.0
    floor_max = 0.999 * float(y.min())
    starts = starts or [(f, e) for f in (0.0, 0.3, 0.6, 0.9) for e in (0.1, 0.4, 1.0)]
    results = []
    for floor_fraction, exponent in starts:
        floor = floor_fraction * floor_max
        log_scale = float(np.mean(np.log(np.maximum(y - floor, 1e-12 * y)) + exponent * log_x))
        try:
            result = scipy.optimize.least_squares(
                lambda p: root_weights * _log_residuals(p, log_x, log_y), x0=[floor, log_scale, exponent],
                jac=lambda p: np.reshape(root_weights, (-1, 1)) * _log_residuals_jacobian(p, log_x), loss="soft_l1",
                f_scale=f_scale, bounds=([0.0, -np.inf, EXPONENT_BOUNDS[0]], [floor_max, np.inf, EXPONENT_BOUNDS[1]]),
                x_scale="jac", max_nfev=max_evaluations)
        except ValueError:
            continue
        results.append(result)
    if not results:
        raise RecordsError("the offset power law could not be fitted from any starting point.")
    best = min(results, key=lambda r: r.cost)
    # Starts "reach the best fit" when their cost is within 1% of it; the parameters themselves may differ along
    # directions the data barely constrain (a floor far below every point).
    agree = sum(1 for r in results if r.success and r.cost <= best.cost * 1.01 + 1e-9)
    floor, log_scale, exponent = best.x
    at_bound = []
    if floor <= 1e-3 * floor_max:  # below 0.1% of every y: the data show no floor
        at_bound.append("floor=0")
    if floor >= floor_max * (1 - 1e-6):
        at_bound.append("floor=min(y)")
    if exponent <= EXPONENT_BOUNDS[0] * 1.001 or exponent >= EXPONENT_BOUNDS[1] * 0.999:
        at_bound.append(f"exponent={exponent:.3g}")
    diagnostics = {"converged": bool(best.success), "message": best.message, "starts": len(starts),
                   "starts_converged": sum(r.success for r in results), "starts_at_best": agree,
                   "at_bound": at_bound, "cost": float(best.cost)}
    return OffsetPowerLaw(float(floor), float(math.exp(log_scale)), float(exponent), x_ref), diagnostics


@dataclass(frozen=True)
class FrontierFit:
    """The offset power law fitted to a compute frontier's points, with a bootstrap over configs (each replicate:
    resample configs, recompute the frontier, refit).

    Bands are in log space: the replicates' standard error scaled by `_interval_scale`; prediction intervals add
    the residual scatter about the law. Parameter intervals in `summary()` are the replicates' percentiles."""

    x_name: str
    y_name: str
    law: OffsetPowerLaw
    frontier: Frontier
    convergence: dict
    n_configs: int
    residual_std: float  # of log y about the law (natural log)
    confidence: float
    bootstrap: np.ndarray = field(repr=False)  # [n, 3]: floor, scale, exponent
    leave_largest_out: Extrapolation | None
    data: pd.DataFrame = field(repr=False)  # the frontier points used
    metadata: dict = field(default_factory=dict)

    def predict(self, x) -> np.ndarray:
        return self.law(x)

    def _replicates(self, x) -> np.ndarray:
        x = _as_array(x)[..., None]
        floor, scale, exponent = self.bootstrap.T
        return floor + scale * (x / self.law.x_ref) ** -exponent

    def _log_half_width(self, x, prediction: bool) -> np.ndarray:
        spread = np.log(self._replicates(x)).std(axis=-1, ddof=1)
        scale = _interval_scale(self.confidence, self.n_configs, 3)
        return scale * np.sqrt(spread ** 2 + (self.residual_std ** 2 if prediction else 0.0))

    def confidence_band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Interval for the frontier itself at x (in log space: multiplicative, never below zero)."""
        centre, half = self.predict(x), self._log_half_width(x, prediction=False)
        return centre * np.exp(-half), centre * np.exp(half)

    def prediction_interval(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Interval for a new frontier point at x: the frontier's uncertainty plus the scatter about the law."""
        centre, half = self.predict(x), self._log_half_width(x, prediction=True)
        return centre * np.exp(-half), centre * np.exp(half)

    def inverse(self, y) -> np.ndarray:
        """Compute needed to reach y on the frontier (inf where the law's floor is at or above y)."""
        return self.law.inverse(y)

    def inverse_interval(self, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For each y: the compute range over which the confidence band contains y (lo is 0 when the band's lower
        edge is below y even at 1/1000 of the least evaluated compute; hi is inf when its upper edge never comes
        down to y), and the fraction of bootstrap fits whose floor is at or above y."""
        y = np.atleast_1d(_as_array(y))
        x_min, x_max = self.frontier.curves["x"].min(), self.frontier.curves["x"].max()
        grid = np.geomspace(x_min / 1e3, x_max * 1e6, 2000)
        lo_band, hi_band = self.confidence_band(grid)
        # Both edges fall with compute: the first x where the lower edge reaches y, the first where the upper does.
        def first(edge, target):
            if edge[0] <= target:
                return 0.0
            return grid[np.argmax(edge <= target)] if np.any(edge <= target) else np.inf

        lo = np.array([first(lo_band, v) for v in y])
        hi = np.array([first(hi_band, v) for v in y])
        unreachable = np.mean(self.bootstrap[:, 0][None, :] >= y[:, None], axis=1)
        return lo, hi, unreachable

    def summary(self) -> dict:
        band = {name: np.quantile(self.bootstrap[:, i], [(1 - self.confidence) / 2, (1 + self.confidence) / 2])
                for i, name in enumerate(("floor", "scale", "exponent"))}
        return {
            "x": self.x_name, "y": self.y_name, "law": "y = floor + scale * (x / x_ref) ** -exponent",
            "floor": self.law.floor, "scale": self.law.scale, "exponent": self.law.exponent, "x_ref": self.law.x_ref,
            **{f"{name}_ci": [float(lo), float(hi)] for name, (lo, hi) in band.items()},
            "confidence": self.confidence, "n": int(len(self.data)), "n_configs": self.n_configs,
            "residual_std_log": self.residual_std, "convergence": self.convergence,
            "optimal_ranges": self.frontier.optimal_ranges().to_dict("records"),
            "leave_largest_out": self.leave_largest_out.summary() if self.leave_largest_out else None,
            **self.metadata,
        }


def fit_frontier(runs, x, y, *, largest: str | None = None, x_name: str = "x", y_name: str = "y",
                 confidence: float = DEFAULT_CONFIDENCE, n_bootstrap: int = 300, seed: int = 0,
                 f_scale: float = 0.1, metadata: dict | None = None) -> FrontierFit:
    """Fit the offset power law to the frontier of the curves (run, x, y). `largest` names the config left out by
    the extrapolation check (default: the run that reaches the most compute)."""
    _check_confidence(confidence)
    _check_bootstrap(n_bootstrap)
    frontier = compute_frontier(runs, x, y)
    if frontier.curves["run"].nunique() < 4:
        raise RecordsError(f"a frontier fit needs at least 4 configs for its bootstrap over configs, got "
                           f"{frontier.curves['run'].nunique()}.")
    points = frontier.points
    if len(points) < 4:
        raise RecordsError(f"the frontier has {len(points)} points; fitting floor, scale and exponent needs at "
                           "least 4 (evaluate more checkpoints or more configs).")
    x_ref = float(np.exp(np.mean(np.log(points["x"]))))
    law, convergence = _fit_offset_power_law(points["x"].to_numpy(), points["y"].to_numpy(), x_ref, f_scale)
    residuals = np.log(points["y"].to_numpy()) - np.log(law(points["x"].to_numpy()))
    residual_std = float(np.sqrt(np.sum(residuals ** 2) / max(len(points) - 3, 1)))

    curves = frontier.curves
    indices = _group_indices(curves["run"].to_numpy())
    rng = np.random.default_rng(seed)
    replicates, skipped = [], 0
    # Each replicate is refitted from the full fit's solution alone: further starts cost three times as much and
    # move no interval (docs/benchmarks.md, "Frontier fits").
    start = [(min(law.floor / (0.999 * points["y"].min()), 0.999), law.exponent)]
    names = np.array([curves["run"].iloc[rows[0]] for rows in indices], dtype=object)
    for _ in range(n_bootstrap):
        # A config drawn k times enters the frontier once, with weight k (a frontier has no duplicate points).
        draws = np.bincount(rng.integers(len(indices), size=len(indices)), minlength=len(indices))
        drawn = draws > 0
        sample = curves.iloc[np.concatenate([indices[i] for i in np.flatnonzero(drawn)])]
        sample_points = _pareto_points(sample)
        if len(sample_points) < 4:
            skipped += 1
            continue
        weight_of = dict(zip(names[drawn], draws[drawn], strict=True))
        fitted, _ = _fit_offset_power_law(sample_points["x"].to_numpy(), sample_points["y"].to_numpy(), x_ref,
                                          f_scale, starts=start,
                                          weights=sample_points["run"].map(weight_of).to_numpy(dtype=float),
                                          max_evaluations=BOOTSTRAP_MAX_EVALUATIONS)
        replicates.append((fitted.floor, fitted.scale, fitted.exponent))
    if len(replicates) < max(20, n_bootstrap // 4):
        raise RecordsError(f"only {len(replicates)} of {n_bootstrap} bootstrap resamples had a frontier with 4 "
                           "points; the data hold too few configs for an interval.")

    largest = largest or str(curves.loc[curves["x"].idxmax(), "run"])
    extrapolation = None
    rest = curves[curves["run"] != largest]
    rest_points = _pareto_points(rest)
    if len(rest_points) >= 4:
        held = points[points["run"] == largest]
        if held.empty:
            held = curves[curves["run"] == largest].nlargest(1, "x")
        partial, _ = _fit_offset_power_law(rest_points["x"].to_numpy(), rest_points["y"].to_numpy(), x_ref, f_scale)
        extrapolation = Extrapolation(largest, held["x"].to_numpy(), held["y"].to_numpy(),
                                      partial(held["x"].to_numpy()))
    return FrontierFit(
        x_name=x_name, y_name=y_name, law=law, frontier=frontier, convergence=convergence,
        n_configs=len(indices), residual_std=residual_std, confidence=confidence, bootstrap=np.array(replicates),
        leave_largest_out=extrapolation, data=points,
        metadata={"n_bootstrap": len(replicates), "bootstrap_skipped": skipped, "seed": seed, **(metadata or {})})
