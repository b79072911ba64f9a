"""Every fit of a set of records, computed once: `analyze` returns an `Analysis` that the figures draw, the report
writes and the findings read.

Each entry of an Analysis is `Fitted`: the fit, or the reason (a RecordsError's message) the records could not
support it, so nothing is silently missing. The record-taking functions here (`model_compute`,
`training_compute`, `sampling_compute`) are the fits one figure draws, for users who want a single one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import pandas as pd

from analysis import isoflop, law, noise, proxy, study
from analysis.findings import Findings, paper_findings
from analysis.fits import Frontier, FrontierFit, LogLogFit
from analysis.isoflop import IsoFlopAnalysis
from analysis.law import LawFit
from analysis.proxy import ProxyAnalysis
from analysis.records import Records
from analysis.schema import RecordsError

T = TypeVar("T")

NO_HELD_OUT_LOSS = "the records hold no held-out loss (train with eval.validation_examples > 0)."


@dataclass(frozen=True)
class Fitted(Generic[T]):
    """A fit, or why the records could not support it."""

    value: T | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    def get(self) -> T:
        """The fit; RecordsError with the reason when there is none."""
        if self.reason is not None:
            raise RecordsError(self.reason)
        return self.value


def attempt(compute: Callable[[], T]) -> Fitted[T]:
    try:
        return Fitted(value=compute())
    except RecordsError as e:
        return Fitted(reason=str(e))


@dataclass(frozen=True)
class ModelCompute:
    """Fig. 8: the points of one training step and the log-log fit of the metric against model Gflops."""

    points: pd.DataFrame
    fit: LogLogFit


def model_compute(records: Records | pd.DataFrame, *, metric: str | None = None, step: int | None = None,
                  **where) -> ModelCompute:
    """`study.model_compute_fit` with the points it fits (one training step, default: the step most runs have)."""
    points = study.model_compute_points(records, metric=metric, step=step, **where)
    return ModelCompute(points=points, fit=study.model_compute_fit(points))


@dataclass(frozen=True)
class TrainingCompute:
    """Fig. 9: every run's points against training compute, their frontier, and the offset power law fitted to the
    frontier (`fit` None when it could not be fitted: `unfitted` says why)."""

    points: pd.DataFrame
    frontier: Frontier
    fit: FrontierFit | None
    unfitted: str | None


def training_compute(records: Records | pd.DataFrame, *, metric: str | None = None,
                     n_bootstrap: int = study.FRONTIER_N_BOOTSTRAP, **where) -> TrainingCompute:
    """`study.training_compute_fit` with the points and frontier it fits; the frontier alone when the law
    cannot be fitted."""
    points = study.training_compute_points(records, metric=metric, **where)
    if points["run"].nunique() < 2:
        raise RecordsError(f"Fig. 9 compares runs by training compute, but {points['run'].nunique()} run(s) have "
                           "both a step and a batch size (train_gflops_cumulative).")
    try:
        fit = study.training_compute_fit(points, n_bootstrap=n_bootstrap)
    except RecordsError as e:
        return TrainingCompute(points=points, frontier=study.training_compute_frontier(points), fit=None,
                               unfitted=str(e))
    return TrainingCompute(points=points, frontier=fit.frontier, fit=fit, unfitted=None)


def sampling_compute(records: Records | pd.DataFrame, *, metric: str | None = None, step: int | None = None,
                     **where) -> study.SamplingTradeoff:
    """`study.sampling_tradeoff`, refused with a pointer to the metrics that vary the sampling steps when the
    chosen one does not."""
    evaluations = records.evaluations if isinstance(records, Records) else records
    if "sampling_steps" not in evaluations.columns or evaluations["sampling_steps"].isna().all():
        raise RecordsError("Fig. 10 compares sampling-step counts, but the records give no sampling_steps (e.g. a "
                           "CSV without a sampling_steps column); evaluate the same checkpoints with several step "
                           "counts and record them.")
    try:
        return study.sampling_tradeoff(records, metric=metric, step=step, **where)
    except RecordsError as e:
        varying = [m for m in study.metrics_by_count(evaluations) if m != metric
                   and evaluations.loc[evaluations["metric"] == m, "sampling_steps"].nunique() >= 2]
        if metric and varying and "metric=" not in str(e):
            raise RecordsError(f"{e} {varying} vary sampling_steps: pass metric={varying[0]!r}.") from e
        raise


def _sampling_compute_of_any(records: Records, candidates: list[str]) -> study.SamplingTradeoff:
    """The trade-off of the first candidate metric evaluated with several sampling-step counts."""
    for candidate in candidates:
        try:
            return sampling_compute(records, metric=candidate)
        except RecordsError as e:
            reason = e
    if len(candidates) == 1:
        raise reason
    raise RecordsError(f"no metric ({', '.join(candidates)}) was evaluated with several sampling-step counts under "
                       "one protocol; evaluate the same checkpoints with several step counts "
                       "(--config.eval.sampling_steps).")


def guided_points(records: Records, points: pd.DataFrame) -> pd.DataFrame:
    """The evaluations at the last step of `points` (one metric and protocol, unguided) under the same protocol but
    for classifier-free guidance, at the largest guidance scale evaluated: one row per run."""
    table = study.at_last_step_but_for(records, points, ignore=("guidance_scale", "guidance_channels"))
    guided = table[table["guidance_scale"].astype(float) > 1.0]
    if guided.empty:
        raise RecordsError(f"no guided evaluations of {points['metric'].iloc[0]} at step "
                           f"{int(points['step'].max())}; set eval.final_guidance_scales (the paper samples Fig. 7 at "
                           "4).")
    scale = float(guided["guidance_scale"].max())
    return guided[guided["guidance_scale"].astype(float) == scale].drop_duplicates("run").reset_index(drop=True)


LAW_BOOTSTRAP = 50  # fewer than `dit-scaling law`'s 200: the law is one part of every report, re-rendered in seconds


@dataclass(frozen=True)
class Analysis:
    """Every fit of one set of records, each `Fitted` (the fit, or why not).

    `selection`: the points of the sample metric (`study.select`: one metric, protocol and family), whose `metric`
    the fits of the sample metric use; `family` and `notes` say which runs and points were kept. The held-out loss
    (`held_out_loss`, None when the records hold none) has its own Fig. 8 and Fig. 9 fits and isoFLOP profiles,
    and `loss_proxy` maps it to the sample metric. `findings` checks the paper's findings from these fits."""

    records: Records
    selection: Fitted[study.Selection]
    family: dict
    notes: list[str]
    model_compute: Fitted[ModelCompute]  # Fig. 8
    training_compute: Fitted[TrainingCompute]  # Fig. 9
    sampling: Fitted[study.SamplingTradeoff]  # Fig. 10
    noise: Fitted[noise.EvaluationNoise]  # of one evaluation of the sample metric at its last step
    guided: Fitted[pd.DataFrame]  # the sample metric at its last step under classifier-free guidance (Fig. 7)
    isoflop: Fitted[IsoFlopAnalysis]
    law: Fitted[LawFit]  # L(N, D) over every point, N in forward Gflops per image
    law_params: Fitted[LawFit]  # N in parameters, no intervals: which size extrapolates better (held_out_error)
    held_out_loss: str | None
    loss_model_compute: Fitted[ModelCompute]
    loss_training_compute: Fitted[TrainingCompute]
    loss_isoflop: Fitted[IsoFlopAnalysis]
    loss_proxy: Fitted[ProxyAnalysis]
    findings: Fitted[Findings]

    @property
    def metric(self) -> str | None:
        """The sample metric the fits use (None when the records hold no evaluations)."""
        return self.selection.value.metric if self.selection.ok else None


def analyze(records: Records, *, metric: str | None = None) -> Analysis:
    """Compute every fit of `records` once (see `Analysis`). `metric` defaults to the sample metric with the most
    points; Fig. 10 takes the first metric (`metric` first) evaluated with several sampling-step counts."""
    if records.evaluations.empty:
        reason = "the records hold no evaluations (metric values per run and step)."
        notes: list[str] = []
        family = study.scaling_family(records.runs, notes=notes)
        notes.append("The records hold no evaluations: only the training loss can be drawn.")
        missing = Fitted(reason=reason)
        return Analysis(records=records, selection=missing, family=family, notes=notes, model_compute=missing,
                        training_compute=missing, sampling=missing, noise=missing, guided=missing,
                        isoflop=missing, law=missing, law_params=missing, held_out_loss=None,
                        loss_model_compute=missing, loss_training_compute=missing, loss_isoflop=missing,
                        loss_proxy=missing, findings=missing)
    selection = study.select(records, metric=metric)
    notes = [*selection.notes]
    if selection.family:
        notes.append("Fig. 5 and Table 4 show every conditioning block and resolution.")
    candidates = [metric] if metric else [selection.metric] + [
        m for m in study.metrics_by_count(records) if m != selection.metric]
    metric = selection.metric
    losses = study.held_out_losses(records)
    loss = losses[0] if losses else None

    def of_loss(compute: Callable[[str], T]) -> Fitted[T]:
        return attempt(lambda: compute(loss)) if loss else Fitted(reason=NO_HELD_OUT_LOSS)

    analysis = Analysis(
        records=records, selection=Fitted(value=selection), family=selection.family, notes=notes,
        model_compute=attempt(lambda: model_compute(records, metric=metric)),
        training_compute=attempt(lambda: training_compute(records, metric=metric)),
        sampling=attempt(lambda: _sampling_compute_of_any(records, candidates)),
        noise=attempt(lambda: noise.evaluation_noise(records, selection.points)),
        guided=attempt(lambda: guided_points(records, selection.points)),
        isoflop=attempt(lambda: isoflop.isoflop_analysis(records, metric=metric)),
        law=attempt(lambda: law.law(records, metric=metric, n_bootstrap=LAW_BOOTSTRAP)),
        law_params=attempt(lambda: law.law(records, metric=metric, size="params", n_bootstrap=0)),
        held_out_loss=loss,
        loss_model_compute=of_loss(lambda m: model_compute(records, metric=m)),
        loss_training_compute=of_loss(lambda m: training_compute(records, metric=m)),
        loss_isoflop=of_loss(lambda m: isoflop.isoflop_analysis(records, metric=m)),
        loss_proxy=of_loss(lambda m: proxy.loss_proxy(records, metric=metric, loss_metric=m)),
        findings=Fitted(reason="the findings are checked from the other fits"))
    return dataclasses.replace(analysis, findings=attempt(lambda: paper_findings(analysis)))
