"""The held-out diffusion loss as the cheap predictor of a sample metric (FID, FD-FashionCNN).

The loss costs one forward pass per held-out image and timestep; a sample metric costs a full sampling chain per
sample and a feature network. Where records carry both at the same (run, step), the mapping loss -> metric is
fitted across configs and steps in several functional forms, each judged by leave-one-config-out error: the
form is fitted without one config's points and predicts them, for every config in turn. That error, not the
in-sample one, is what a user predicting the metric of a new config can expect, and the prediction interval is
built from it (the empirical quantile of the held-out errors, in log space: multiplicative, as the metrics'
errors are).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats

from analysis.fits import DEFAULT_CONFIDENCE, _check_confidence
from analysis.records import Records
from analysis.schema import RecordsError

MIN_CONFIGS = 3  # leave-one-config-out needs configs left to fit


def _solve_linear(design: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(design, target, rcond=None)[0]


def _fit_offset_power(loss: np.ndarray, value: np.ndarray) -> np.ndarray:
    """value = floor + k loss^b with floor >= 0, least squares in log10 value; started from the power law."""
    slope, intercept = np.polyfit(np.log10(loss), np.log10(value), 1)

    def residuals(theta):
        floor, log_k, b = theta
        return np.log10(floor + 10 ** log_k * loss ** b) - np.log10(value)

    best = optimize.least_squares(residuals, [0.0, intercept, slope],
                                  bounds=([0.0, -np.inf, -np.inf], [value.min(), np.inf, np.inf]))
    return best.x


@dataclass(frozen=True)
class Form:
    """A functional form of metric vs loss: how to fit it to points and predict from it."""

    name: str
    formula: str
    n_parameters: int
    fit: Callable[[np.ndarray, np.ndarray], np.ndarray]
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray]


FORMS = {form.name: form for form in (
    Form("linear", "metric = a + b * loss", 2,
         lambda x, y: _solve_linear(np.column_stack([np.ones_like(x), x]), y),
         lambda p, x: p[0] + p[1] * x),
    Form("power law", "metric = k * loss^b", 2,
         lambda x, y: _solve_linear(np.column_stack([np.ones_like(x), np.log10(x)]), np.log10(y)),
         lambda p, x: 10 ** (p[0] + p[1] * np.log10(x))),
    Form("offset power law", "metric = floor + k * loss^b (floor >= 0)", 3, _fit_offset_power,
         lambda p, x: p[0] + 10 ** p[1] * x ** p[2]),
    Form("log-log quadratic", "log10 metric = a + b * log10 loss + c * (log10 loss)^2", 3,
         lambda x, y: _solve_linear(np.column_stack([np.ones_like(x), np.log10(x), np.log10(x) ** 2]),
                                    np.log10(y)),
         lambda p, x: 10 ** (p[0] + p[1] * np.log10(x) + p[2] * np.log10(x) ** 2)),
)}


def _log_error(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """log10(predicted / observed); infinite where the form predicts a non-positive metric."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(predicted > 0, np.log10(np.where(predicted > 0, predicted, 1.0) / observed), np.inf)


@dataclass(frozen=True)
class ProxyFit:
    """One form fitted to every point, with its leave-one-config-out errors."""

    form: Form
    parameters: np.ndarray
    in_sample_rmse: float  # log10 units
    held_out: pd.DataFrame  # run, step, loss, value, predicted, log_error: each config predicted without itself
    confidence: float

    @property
    def held_out_rmse(self) -> float:
        """Root mean square of log10(predicted / observed) over the held-out predictions (infinite when the form
        predicted a non-positive metric for some config)."""
        return float(np.sqrt(np.mean(self.held_out["log_error"] ** 2)))

    @property
    def typical_error(self) -> float:
        """The held-out RMSE as a relative error: 0.05 means predictions off by about 5%."""
        return float(10 ** self.held_out_rmse - 1)

    @property
    def interval_factor(self) -> float:
        """Predictions are within this factor of the truth for `confidence` of the held-out points (the
        conformal quantile of their absolute log errors)."""
        errors = np.sort(np.abs(self.held_out["log_error"].to_numpy()))
        rank = min(len(errors), math.ceil((len(errors) + 1) * self.confidence))
        return float(10 ** errors[rank - 1])

    def predict(self, loss) -> np.ndarray:
        return np.asarray(self.form.predict(self.parameters, np.asarray(loss, dtype=float)), dtype=float)

    def prediction_interval(self, loss) -> tuple[np.ndarray, np.ndarray]:
        centre = self.predict(loss)
        return centre / self.interval_factor, centre * self.interval_factor

    def summary(self) -> dict:
        return {"form": self.form.name, "formula": self.form.formula, "parameters": self.parameters.tolist(),
                "in_sample_rmse_log10": self.in_sample_rmse, "held_out_rmse_log10": self.held_out_rmse,
                "typical_error": self.typical_error, "interval_factor": self.interval_factor,
                "confidence": self.confidence}


def _fit_form(form: Form, pairs: pd.DataFrame, confidence: float) -> ProxyFit:
    x, y = pairs["loss"].to_numpy(), pairs["value"].to_numpy()
    parameters = np.asarray(form.fit(x, y), dtype=float)
    in_sample = _log_error(form.predict(parameters, x), y)
    held_out = []
    for run, points in pairs.groupby("run", sort=True):
        rest = pairs[pairs["run"] != run]
        kept = np.asarray(form.fit(rest["loss"].to_numpy(), rest["value"].to_numpy()), dtype=float)
        predicted = form.predict(kept, points["loss"].to_numpy())
        held_out.append(points.assign(predicted=predicted, log_error=_log_error(predicted, points["value"])))
    return ProxyFit(form=form, parameters=parameters, in_sample_rmse=float(np.sqrt(np.mean(in_sample ** 2))),
                    held_out=pd.concat(held_out, ignore_index=True), confidence=confidence)


@dataclass(frozen=True)
class ProxyAnalysis:
    """Every form's fit of metric vs loss; `best` has the least held-out error (ties: fewer parameters)."""

    loss_metric: str
    metric: str
    pairs: pd.DataFrame  # run, step, gflops, loss, value
    fits: dict[str, ProxyFit]
    rank_correlation: float  # Spearman's rho between loss and metric across configs at their last common step
    rank_step: int
    metadata: dict = field(default_factory=dict)

    @property
    def best(self) -> ProxyFit:
        return min(self.fits.values(), key=lambda fit: (fit.held_out_rmse, fit.form.n_parameters))

    @property
    def loss_range(self) -> tuple[float, float]:
        return float(self.pairs["loss"].min()), float(self.pairs["loss"].max())

    def predict(self, loss) -> pd.DataFrame:
        """The best form's prediction for each loss, its interval, and whether the loss lies outside the fitted
        range (an extrapolation of the mapping)."""
        loss = np.atleast_1d(np.asarray(loss, dtype=float))
        if not np.all(np.isfinite(loss) & (loss > 0)):
            raise RecordsError("losses to predict from must be positive and finite.")
        low, high = self.best.prediction_interval(loss)
        lo_range, hi_range = self.loss_range
        return pd.DataFrame({"loss": loss, "predicted": self.best.predict(loss), "low": low, "high": high,
                             "extrapolated": (loss < lo_range) | (loss > hi_range)})

    def table(self) -> pd.DataFrame:
        """One row per form, best first."""
        rows = [{"form": fit.form.name, "formula": fit.form.formula, "parameters": fit.form.n_parameters,
                 "in_sample_rmse_log10": fit.in_sample_rmse, "held_out_rmse_log10": fit.held_out_rmse,
                 "typical_error": fit.typical_error, "interval_factor": fit.interval_factor}
                for fit in self.fits.values()]
        return pd.DataFrame(rows).sort_values(["held_out_rmse_log10", "parameters"]).reset_index(drop=True)

    def summary(self) -> dict:
        return {"loss_metric": self.loss_metric, "metric": self.metric, "n_points": len(self.pairs),
                "n_configs": int(self.pairs["run"].nunique()), "loss_range": list(self.loss_range),
                "best": self.best.summary(), "forms": self.table().to_dict("records"),
                "rank_correlation": self.rank_correlation, "rank_step": self.rank_step, **self.metadata}


def fit_proxy(runs, steps, losses, values, *, gflops=None, loss_metric: str = "loss", metric: str = "metric",
              forms: list[str] | None = None, confidence: float = DEFAULT_CONFIDENCE,
              metadata: dict | None = None) -> ProxyAnalysis:
    """Fit metric vs loss over aligned arrays (one pair per run and step) in each of `forms` (default: all)."""
    _check_confidence(confidence)
    pairs = pd.DataFrame({"run": np.asarray(runs, dtype=object), "step": np.asarray(steps),
                          "gflops": np.full(len(runs), np.nan) if gflops is None else np.asarray(gflops, float),
                          "loss": np.asarray(losses, dtype=float), "value": np.asarray(values, dtype=float)})
    numbers = pairs[["loss", "value"]].to_numpy()
    if not np.all(np.isfinite(numbers)) or np.any(numbers <= 0):
        raise RecordsError("loss -> metric: losses and metric values must be positive and finite; remove the NaN "
                           "or non-positive points first.")
    n_configs = pairs["run"].nunique()
    chosen = list(FORMS) if forms is None else forms
    unknown = [name for name in chosen if name not in FORMS]
    if unknown:
        raise RecordsError(f"unknown loss -> metric form(s) {unknown}; use some of {list(FORMS)}.")
    most = max(FORMS[name].n_parameters for name in chosen)
    if n_configs < MIN_CONFIGS or len(pairs) < most + 2:
        raise RecordsError(f"loss -> metric needs points of at least {MIN_CONFIGS} configs and {most + 2} pairs "
                           f"(a form of {most} parameters, fitted without one config); got {len(pairs)} pair(s) "
                           f"of {n_configs} config(s). Evaluate the held-out loss at the sample-metric steps "
                           "(eval.validation_examples > 0) of more configs.")
    fits = {name: _fit_form(FORMS[name], pairs, confidence) for name in chosen}
    per_run_steps = pairs.groupby("run")["step"].apply(set)
    common = set.intersection(*per_run_steps)
    rank_step = int(max(common)) if common else int(pairs["step"].max())
    at_step = pairs[pairs["step"] == rank_step]
    rho = float(stats.spearmanr(at_step["loss"], at_step["value"]).statistic) if len(at_step) >= 3 else math.nan
    return ProxyAnalysis(loss_metric=loss_metric, metric=metric, pairs=pairs, fits=fits, rank_correlation=rho,
                         rank_step=rank_step, metadata=metadata or {})


def loss_proxy(records: Records | pd.DataFrame, *, loss_metric: str | None = None, metric: str | None = None,
               forms: list[str] | None = None, confidence: float = DEFAULT_CONFIDENCE, **where) -> ProxyAnalysis:
    """The mapping from the held-out loss to a sample metric on a set of records: `study.select`'s points of
    each (the metric defaults to the sample metric with the most points, the loss to the held-out loss with the
    most), paired by run and step."""
    from analysis import study

    table = records.evaluations if isinstance(records, Records) else records
    losses = study.held_out_losses(table)
    samples = [m for m in study.metrics_by_count(table) if m not in losses]
    if loss_metric is None:
        if not losses:
            raise RecordsError("the records hold no held-out loss (val-loss) points: train with "
                               "eval.validation_examples > 0 to record them.")
        loss_metric = losses[0]
    if metric is None:
        if not samples:
            raise RecordsError("the records hold no sample metric (FID, FD) points to map the loss to.")
        metric = samples[0]
    loss_selection = study.select(records, metric=loss_metric, **where)
    selection = study.select(records, metric=metric, **where)
    keys = ["run", "step"]
    pairs = selection.points[[*keys, "gflops", "value"]].merge(
        loss_selection.points[[*keys, "value"]].rename(columns={"value": "loss"}), on=keys)
    if pairs.empty:
        raise RecordsError(f"no run and step has both {loss_metric} and {metric}: evaluate the held-out loss at "
                           "the sample-metric steps.")
    return fit_proxy(pairs["run"], pairs["step"], pairs["loss"], pairs["value"], gflops=pairs["gflops"],
                     loss_metric=loss_metric, metric=metric, forms=forms, confidence=confidence,
                     metadata={"protocol": selection.protocol, "loss_protocol": loss_selection.protocol,
                               "family": selection.family, "notes": selection.notes + loss_selection.notes})
