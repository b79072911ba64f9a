"""A parametric scaling law fitted to every (run, step) point at once (Chinchilla's approach 3: Hoffmann et al. 2022;
refitted by Besiroglu et al. 2024):

    L(N, D) = E + A / N^alpha + B / D^beta

N is the model's size, forward Gflops per image (the paper's unit: compute, not parameters, predicts FID) or its
parameters; D the images seen, C / (3 N) for a point at training compute C in paper units. Where isoFLOP profiles
(approach 2) need a grid that brackets every budget, the law uses every point and extrapolates to sizes nobody
trained, with the risk that brings.

The fit, as Besiroglu et al. do it: the Huber loss (delta HUBER_DELTA) of log L_predicted - log L over the points,
with log L_predicted = logsumexp(e, a - alpha log N, b - beta log D) (E = exp e, A = exp a, B = exp b), minimised by
L-BFGS-B from the best few of a grid of starting points; they found the original fit had stopped short of its
optimum, so every fit here says whether it converged and whether a parameter stopped at a bound. N and D are
divided by their geometric means while fitting (the reported A and B are in the units of N and D). Intervals come
from a bootstrap over runs: a run's points share its noise, so runs, not points, are the independent draws.

The compute-optimal split of a budget C = 3 N D follows in closed form: N_opt = G (C / 3)^a and D_opt = (C / 3) / N_opt
with a = beta / (alpha + beta), b = alpha / (alpha + beta) and G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.special

from analysis.fits import DEFAULT_CONFIDENCE, _check_confidence
from analysis.records import Records
from analysis.schema import TRAINING_MULTIPLIER, RecordsError

HUBER_DELTA = 1e-3
PARAMETERS = ("E", "A", "B", "alpha", "beta")
DERIVED = ("a", "b")  # N_opt ~ C^a, D_opt ~ C^b
EXPONENT_BOUNDS = (0.0, 4.0)
STARTS_REFINED = 8  # the best grid points, each refined by L-BFGS-B
MIN_RUNS = 3  # fewer runs cannot separate the size term from the data term
HELD_OUT_FRACTION = 0.25  # of the runs, the largest, left out to judge how the law extrapolates


@dataclass(frozen=True)
class LawFit:
    """L(N, D) = E + A / N^alpha + B / D^beta fitted to `n_points` points of `n_runs` runs, with bootstrap
    intervals over runs. `converged`: L-BFGS-B's own verdict on the best start; `at_bounds`: the parameters that
    stopped at a bound of the search (E at its lower bound: no floor the points can see)."""

    values: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    size: str
    metric: str
    n_points: int
    n_runs: int
    converged: bool
    at_bounds: list[str]
    confidence: float
    n_bootstrap: int
    held_out_error: float | None  # median |predicted / observed - 1| on the largest runs, fitted without them
    held_out_runs: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    replicates: tuple[dict[str, float], ...] = field(default=(), repr=False)  # the bootstrap fits' values

    def interval_of(self, quantity) -> tuple[float, float]:
        """The bootstrap interval of `quantity(values)`, a number computed from a fit's values (a prediction, an
        optimal size): its quantiles over the bootstrap fits at the fit's confidence; NaN without replicates."""
        return _interval([quantity(r) for r in self.replicates], self.confidence)

    def predict(self, size, images):
        return predict(self.values, size, images)

    def optimal(self, compute: float, evaluation_per_size: float = 0.0) -> dict[str, float]:
        """The compute-optimal size, images and predicted metric for `compute` (paper units), evaluation included
        (`optimal_allocation`)."""
        return optimal_allocation(self.values, compute, evaluation_per_size)

    def flags(self) -> list[str]:
        out = [] if self.converged else ["the best start did not converge (L-BFGS-B stopped early)"]
        out += ["E stopped at its lower bound: the points show no floor" if name == "E" else
                f"{name} stopped at a bound of the search ({', '.join(map(str, EXPONENT_BOUNDS))})"
                for name in self.at_bounds]
        return out

    def summary(self) -> dict:
        return {**{name: self.values[name] for name in (*PARAMETERS, *DERIVED)},
                **{f"{name}_interval": list(self.intervals[name]) for name in (*PARAMETERS, *DERIVED)},
                "size": self.size, "metric": self.metric, "points": self.n_points, "runs": self.n_runs,
                "converged": self.converged, "at_bounds": self.at_bounds, "confidence": self.confidence,
                "bootstrap": self.n_bootstrap, "held_out_error": self.held_out_error,
                "held_out_runs": self.held_out_runs}


def predict(values: dict[str, float], size, images):
    """L(N, D) under the law's `values`."""
    return (values["E"] + values["A"] / np.asarray(size, float) ** values["alpha"]
            + values["B"] / np.asarray(images, float) ** values["beta"])


def optimal_allocation(values: dict[str, float], compute: float, evaluation_per_size: float = 0.0) -> dict[str, float]:
    """The size N, images D and L(N, D) that minimise the law's metric for a budget `compute` (paper units) spent on
    training, 3 N D, and on evaluating the model, `evaluation_per_size` x N (its sampling compute: samples x
    forward passes per sample x N). Without evaluation the closed form of the module docstring; with it, the
    minimum over N of L(N, (compute - evaluation_per_size N) / (3 N)), found in log N. `training` is what is left
    for training."""
    alpha, beta, A, B = values["alpha"], values["beta"], values["A"], values["B"]
    if alpha <= 0 or beta <= 0:
        flat = " and ".join(term for term, exponent in (("size (alpha)", alpha), ("data (beta)", beta))
                            if exponent <= 0)
        raise RecordsError(f"the law has no compute-optimal split: its {flat} term does not fall (alpha "
                           f"{alpha:.3g}, beta {beta:.3g}), so the points do not tell how the metric trades size "
                           "for training; fit records with several sizes and several steps per run (a study's "
                           "runs, not one final point per config).")
    products = compute / TRAINING_MULTIPLIER
    size = (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * products ** (beta / (alpha + beta))
    if evaluation_per_size > 0:
        largest = compute / evaluation_per_size  # a model this large spends the whole budget on its evaluation

        def metric(log_size: float) -> float:
            n = math.exp(log_size)
            return float(predict(values, n, (compute - evaluation_per_size * n) / (TRAINING_MULTIPLIER * n)))

        result = scipy.optimize.minimize_scalar(metric, bounds=(math.log(largest) - 60, math.log(largest) - 1e-9),
                                                method="bounded", options={"xatol": 1e-10})
        size = math.exp(result.x)
    training = compute - evaluation_per_size * size
    images = training / (TRAINING_MULTIPLIER * size)
    return {"size": size, "images": images, "training": training, "value": float(predict(values, size, images))}


def _log_terms(theta, log_n, log_d):
    e, a, b, alpha, beta = theta
    return np.stack([np.full_like(log_n, e), a - alpha * log_n, b - beta * log_d])


def _objective(theta, log_n, log_d, log_value):
    """The summed Huber loss of the log residuals, and its gradient in theta = (e, a, b, alpha, beta)."""
    terms = _log_terms(theta, log_n, log_d)
    top = terms.max(axis=0)
    exp_terms = np.exp(terms - top)
    total = exp_terms.sum(axis=0)
    residual = top + np.log(total) - log_value  # log of the predicted value (a log-sum-exp) minus the observed
    magnitude = np.abs(residual)
    small = magnitude <= HUBER_DELTA
    loss = np.where(small, 0.5 * residual ** 2, HUBER_DELTA * (magnitude - 0.5 * HUBER_DELTA)).sum()
    slope = np.where(small, residual, HUBER_DELTA * np.sign(residual))
    weighted = exp_terms * (slope / total)  # slope x d predicted / d each log term
    grad = weighted.sum(axis=1)
    return loss, np.array([grad[0], grad[1], grad[2], -weighted[1] @ log_n, -weighted[2] @ log_d])


def _grid(log_value) -> np.ndarray:
    """Starting points: e from well below the smallest value to it, a and b from far below the largest value to
    it, exponents over the usual range."""
    low, high = log_value.min(), log_value.max()
    es = low + np.array([-6.0, -3.0, -1.0, -0.3, 0.0])
    abs_ = high + np.array([-4.0, -2.0, -1.0, 0.0])
    exponents = np.array([0.1, 0.3, 0.6, 1.0, 2.0])
    return np.array(list(itertools.product(es, abs_, abs_, exponents, exponents)))


def _bounds(log_value):
    low, high = log_value.min(), log_value.max()
    logs = (low - 30.0, high + 10.0)
    return [logs, logs, logs, EXPONENT_BOUNDS, EXPONENT_BOUNDS]


def _grid_losses(grid, log_n, log_d, log_value, chunk: int = 2000) -> np.ndarray:
    out = []
    for start in range(0, len(grid), chunk):
        g = grid[start:start + chunk]
        terms = np.stack([np.broadcast_to(g[:, :1], (len(g), len(log_n))),
                          g[:, 1:2] - g[:, 3:4] * log_n, g[:, 2:3] - g[:, 4:5] * log_d])
        residual = np.abs(scipy.special.logsumexp(terms, axis=0) - log_value)
        out.append(np.where(residual <= HUBER_DELTA, 0.5 * residual ** 2,
                            HUBER_DELTA * (residual - 0.5 * HUBER_DELTA)).sum(axis=1))
    return np.concatenate(out)


def _minimise(log_n, log_d, log_value, starts):
    """The best L-BFGS-B result over `starts`."""
    bounds = _bounds(log_value)
    best = None
    for start in starts:
        result = scipy.optimize.minimize(_objective, start, args=(log_n, log_d, log_value), jac=True,
                                         method="L-BFGS-B", bounds=bounds,
                                         options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or result.fun < best.fun:
            best = result
    return best


def _fit_theta(log_n, log_d, log_value, extra_starts=()):
    grid = _grid(log_value)
    losses = _grid_losses(grid, log_n, log_d, log_value)
    starts = [*grid[np.argsort(losses)[:STARTS_REFINED]], *extra_starts]
    return _minimise(log_n, log_d, log_value, starts)


def _values(theta, n_ref: float, d_ref: float) -> dict[str, float]:
    e, a, b, alpha, beta = (float(x) for x in theta)
    total = alpha + beta
    return {"E": math.exp(e), "A": math.exp(a) * n_ref ** alpha, "B": math.exp(b) * d_ref ** beta,
            "alpha": alpha, "beta": beta,
            "a": beta / total if total > 0 else math.nan, "b": alpha / total if total > 0 else math.nan}


NO_FLOOR = 1e-6  # E below this fraction of the smallest value: the search drove the floor to its lower bound


def _at_bounds(theta, log_value) -> list[str]:
    """The parameters at a bound of the search. E counts as at its lower bound once negligible against every value:
    its gradient vanishes on the way there, so L-BFGS-B stops short of the bound itself."""
    bounds = _bounds(log_value)
    names = ["E"] if theta[0] < log_value.min() + math.log(NO_FLOOR) else []
    for name, value, (low, high) in zip(("A", "B", "alpha", "beta"), theta[1:], bounds[1:], strict=True):
        if min(abs(value - low), abs(value - high)) < 1e-6 * max(1.0, abs(low), abs(high)):
            names.append(name)
    return names


def fit_law(runs, sizes, images, values, *, metric: str = "value", size: str = "gflops",
            n_bootstrap: int = 200, confidence: float = DEFAULT_CONFIDENCE, seed: int = 0,
            held_out: bool = True, metadata: dict | None = None) -> LawFit:
    """L(N, D) = E + A / N^alpha + B / D^beta over points (run, N, D, L)."""
    _check_confidence(confidence)
    runs = np.asarray(runs).astype(str)
    sizes, images, values = (np.asarray(x, float) for x in (sizes, images, values))
    if not (len(runs) == len(sizes) == len(images) == len(values)):
        raise RecordsError("the law's runs, sizes, images and values must be of one length.")
    finite = np.isfinite(sizes) & np.isfinite(images) & np.isfinite(values)
    bad = ~finite | (sizes <= 0) | (images <= 0) | (values <= 0)
    if bad.any():
        raise RecordsError(f"{int(bad.sum())} point(s) with a size, images seen or {metric} that is not a positive "
                           f"number (first: run {str(runs[bad][0])!r}); the law takes logs of all three.")
    unique_runs = np.unique(runs)
    if len(unique_runs) < MIN_RUNS or np.unique(sizes).size < 2:
        raise RecordsError(f"the law needs at least {MIN_RUNS} runs of at least 2 sizes (got {len(unique_runs)} "
                           f"runs, {np.unique(sizes).size} sizes): the size term and the data term cannot be told "
                           "apart with fewer.")
    n_ref, d_ref = math.exp(np.log(sizes).mean()), math.exp(np.log(images).mean())
    log_n, log_d, log_value = np.log(sizes / n_ref), np.log(images / d_ref), np.log(values)
    best = _fit_theta(log_n, log_d, log_value)
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(n_bootstrap):
        chosen = rng.choice(unique_runs, size=len(unique_runs), replace=True)
        index = np.concatenate([np.flatnonzero(runs == r) for r in chosen])
        if np.unique(sizes[index]).size < 2:
            continue
        result = _minimise(log_n[index], log_d[index], log_value[index], [best.x])
        replicates.append(_values(result.x, n_ref, d_ref))
    intervals = {name: _interval([r[name] for r in replicates], confidence) for name in (*PARAMETERS, *DERIVED)}
    error, left_out = _held_out_error(runs, sizes, images, values) if held_out else (None, [])
    return LawFit(values=_values(best.x, n_ref, d_ref), intervals=intervals, size=size, metric=metric,
                  n_points=len(values), n_runs=len(unique_runs), converged=bool(best.success),
                  at_bounds=_at_bounds(best.x, log_value), confidence=confidence, n_bootstrap=len(replicates),
                  held_out_error=error, held_out_runs=left_out, metadata=metadata or {},
                  replicates=tuple(replicates))


def _interval(draws, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap draws (NaN draws left out; NaN when there are none)."""
    draws = np.asarray(draws, dtype=float)
    if not np.isfinite(draws).any():
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    return float(np.nanquantile(draws, tail)), float(np.nanquantile(draws, 1 - tail))


def _held_out_error(runs, sizes, images, values) -> tuple[float | None, list[str]]:
    """The law fitted without the largest runs (HELD_OUT_FRACTION of them, at least one), judged on their points:
    the median |predicted / observed - 1|. None when too few runs would be left."""
    size_of = pd.Series(sizes, index=runs).groupby(level=0).max().sort_values()
    count = max(1, round(HELD_OUT_FRACTION * len(size_of)))
    kept, left_out = size_of.index[:-count], list(size_of.index[-count:])
    keep = np.isin(runs, kept)
    if len(kept) < MIN_RUNS or np.unique(sizes[keep]).size < 2:
        return None, []
    fit = fit_law(runs[keep], sizes[keep], images[keep], values[keep], n_bootstrap=0, held_out=False)
    predicted = fit.predict(sizes[~keep], images[~keep])
    return float(np.median(np.abs(predicted / values[~keep] - 1))), left_out


def law_points(records: Records | pd.DataFrame, *, metric: str | None = None, size: str = "gflops",
               **where) -> tuple[pd.DataFrame, object]:
    """The (run, step) points of one metric and protocol that the law fits, with columns size and images (D =
    training compute / (3 x Gflops)), and the selection they came from."""
    from analysis import study

    points, selection = study.sized_training_points(records, metric=metric, size=size, **where)
    points = points.assign(images=points["train_gflops_cumulative"].astype(float)
                           / (TRAINING_MULTIPLIER * points["gflops"].astype(float)))
    return points, selection


def law(records: Records | pd.DataFrame, *, metric: str | None = None, size: str = "gflops",
        n_bootstrap: int = 200, confidence: float = DEFAULT_CONFIDENCE, seed: int = 0, **where) -> LawFit:
    """The law of one metric and protocol's (run, step) points of a set of records (see `law_points`)."""
    points, selection = law_points(records, metric=metric, size=size, **where)
    return law_of_points(points, selection, size=size, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)


def law_of_points(points: pd.DataFrame, selection, *, size: str = "gflops", n_bootstrap: int = 200,
                  confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> LawFit:
    """The law of `law_points`' points and selection, for a caller that uses the points too."""
    return fit_law(points["run"], points["size"], points["images"], points["value"],
                   metric=points["metric"].iloc[0], size=size, n_bootstrap=n_bootstrap, confidence=confidence,
                   seed=seed, metadata={"protocol": points["protocol"].iloc[0], "family": selection.family,
                                        "notes": selection.notes})
