"""The evaluation's noise (analysis.noise): its estimate from a second noise seed against the spread of the Frechet
distance over many draws of features whose distance is known."""

import math

import numpy as np
import pandas as pd
import pytest

from analysis.noise import RESOLVED_Z, EvaluationNoise, pooled_sd_log
from analysis.schema import RecordsError
from scaling.evaluation.metrics import frechet_distance_of_features, gaussian_statistics

DIMENSIONS, SAMPLES = 8, 250


def test_two_seeds_estimate_the_spread_of_the_frechet_distance_over_draws():
    rng = np.random.default_rng(0)
    reference = gaussian_statistics(rng.normal(size=(20_000, DIMENSIONS)))

    def distance(shift):  # samples of N(shift e_0, I) against N(0, I): the true distance is shift^2
        samples = rng.normal(size=(SAMPLES, DIMENSIONS))
        samples[:, 0] += shift
        return frechet_distance_of_features(samples, *reference)

    shifts = np.linspace(1.0, 3.0, 30)  # thirty "configs"
    two_seeds = pd.DataFrame([{"group": k, "value": distance(s)} for k, s in enumerate(shifts) for _ in range(2)])
    estimate, dof = pooled_sd_log(two_seeds)
    assert dof == 30
    # Brute force: each config's spread of log distance over 60 draws, pooled.
    spreads = [np.var(np.log([distance(s) for _ in range(60)]), ddof=1) for s in shifts]
    truth = math.sqrt(np.mean(spreads))
    assert estimate == pytest.approx(truth, rel=0.3)
    # The mean over draws is near the known distance (plus the small-sample bias, a fraction of one unit).
    assert np.mean([distance(2.0) for _ in range(60)]) == pytest.approx(4.0, abs=0.6)


def test_resolved_is_a_two_sided_95_percent_test_of_two_single_values():
    noise = EvaluationNoise(metric="FD", step=1, sd_log=0.1, runs=12, dof=12)
    threshold = RESOLVED_Z * math.sqrt(2) * 0.1
    assert noise.threshold_log == pytest.approx(threshold)
    below, above = 100 * math.exp(threshold * 0.99), 100 * math.exp(threshold * 1.01)
    assert not noise.resolved(100, below) and noise.resolved(100, above) and noise.resolved(above, 100)
    assert list(noise.resolved([100, 100], [below, above])) == [False, True]
    assert noise.relative == pytest.approx(math.expm1(0.1))


def test_no_second_seed_is_an_error_that_names_the_setting():
    with pytest.raises(RecordsError, match="eval.final_seeds"):
        pooled_sd_log(pd.DataFrame({"group": [0, 1], "value": [10.0, 12.0]}))
