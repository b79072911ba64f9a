"""The evaluation's own noise: how far a sample metric moves when only the sampling noise changes.

A study evaluates its final checkpoints under the chosen protocol and again with other noise seeds
(eval.final_seeds), the model and everything else unchanged. The spread of log metric between the seeds, pooled over
the runs, is the noise of one evaluation (`EvaluationNoise.sd_log`, on the log scale because the metric's noise grows
with its value). Two configs' values, each one evaluation, differ beyond that noise (`resolved`) when their log
ratio exceeds z * sqrt(2) * sd_log, z = RESOLVED_Z (two-sided 95% for the difference of two independent values).

Seeds rather than a bootstrap over one set of samples: resampling 250 samples with replacement repeats some of them,
which a Frechet distance of few samples reads as a narrower distribution, and the bootstrap's spread came out 2.5 to
3 times the spread between seeds (docs/benchmarks.md, "The evaluation's noise: seeds or a bootstrap").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.records import Records
from analysis.schema import RecordsError
from analysis.study import at_last_step_but_for

RESOLVED_Z = 1.96


@dataclass(frozen=True)
class EvaluationNoise:
    """The noise of one evaluation of `metric` at `step`, from `runs` runs evaluated with several seeds (`dof`
    degrees of freedom in all)."""

    metric: str
    step: int
    sd_log: float  # standard deviation of the natural log of the metric between noise seeds
    runs: int
    dof: int

    @property
    def relative(self) -> float:
        """The noise as a fraction of the value (exp(sd_log) - 1)."""
        return math.expm1(self.sd_log)

    @property
    def threshold_log(self) -> float:
        """The least |log a - log b| that two values, one evaluation each, must differ by to be resolved."""
        return RESOLVED_Z * math.sqrt(2.0) * self.sd_log

    def resolved(self, a, b):
        """Whether values `a` and `b` (scalars or arrays) differ beyond the noise."""
        return np.abs(np.log(np.asarray(a, float)) - np.log(np.asarray(b, float))) > self.threshold_log

    def text(self) -> str:
        return (f"±{self.relative:.1%} (one standard deviation between noise seeds, pooled over {self.runs} runs "
                f"at step {self.step}); two configs differ beyond it when their values differ by more than "
                f"{math.expm1(self.threshold_log):.1%}")


def pooled_sd_log(values: pd.DataFrame) -> tuple[float, int]:
    """(sd of log value, degrees of freedom) pooled over groups: `values` has columns group and value, two or more
    values per group for a group to count."""
    logs = values.assign(log=np.log(values["value"].astype(float)))
    grouped = logs.groupby("group")["log"]
    counts = grouped.count()
    dof = int((counts[counts > 1] - 1).sum())
    if dof == 0:
        raise RecordsError("no run was evaluated with several noise seeds at one step under one protocol; set "
                           "eval.final_seeds (e.g. (1,)) so that the final step is sampled again with other noise.")
    squares = grouped.apply(lambda x: float(np.sum((x - x.mean()) ** 2)))
    return math.sqrt(float(squares[counts > 1].sum()) / dof), dof


def evaluation_noise(records: Records | pd.DataFrame, points: pd.DataFrame) -> EvaluationNoise:
    """The noise of the evaluations `points` (one metric and protocol, as `study.select` chooses them), from the
    records' evaluations at the last step of `points` under the same protocol but for the seed."""
    same = at_last_step_but_for(records, points, ignore=("seed",))
    sd_log, dof = pooled_sd_log(same.assign(group=same["run"])[["group", "value"]])
    runs = int((same.groupby("run")["value"].count() > 1).sum())
    return EvaluationNoise(metric=str(points["metric"].iloc[0]), step=int(points["step"].max()), sd_log=sd_log,
                           runs=runs, dof=dof)
