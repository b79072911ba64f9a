"""The parametric law L(N, D) = E + A / N^alpha + B / D^beta (analysis.law): recovered from surfaces of known
parameters, its closed-form compute-optimal split against a brute-force search, its gradient against finite
differences, bad input refused, and `dit-scaling law` on the committed study."""

import json

import numpy as np
import pytest
import scipy.optimize
from run_helpers import REPO

from analysis import records
from analysis.law import _objective, fit_law, law, optimal_allocation
from analysis.schema import RecordsError
from scaling.cli import main

TRUE = {"E": 10.0, "A": 2.0, "alpha": 0.4, "B": 5000.0, "beta": 0.7}  # FD-like: sizes in Gflops, images seen


def surface(sizes, images, p=TRUE):
    return p["E"] + p["A"] / np.asarray(sizes) ** p["alpha"] + p["B"] / np.asarray(images) ** p["beta"]


def grid_points(sizes, images):
    runs, n, d = zip(*((f"run{i}", s, m) for i, s in enumerate(sizes) for m in images), strict=True)
    return np.array(runs), np.array(n), np.array(d)


def test_a_noise_free_surface_is_recovered_exactly():
    runs, n, d = grid_points(np.geomspace(3e-4, 0.13, 6), np.geomspace(1e3, 1e5, 8))
    fit = fit_law(runs, n, d, surface(n, d), n_bootstrap=0)
    assert fit.converged and fit.at_bounds == []
    for name, value in TRUE.items():
        assert fit.values[name] == pytest.approx(value, rel=1e-4), name
    assert fit.values["a"] == pytest.approx(0.7 / 1.1, rel=1e-4)
    assert fit.values["b"] == pytest.approx(0.4 / 1.1, rel=1e-4)
    assert fit.held_out_error == pytest.approx(0.0, abs=1e-6) and fit.held_out_runs == ["run4", "run5"]


def test_a_surface_without_a_floor_is_flagged():
    runs, n, d = grid_points(np.geomspace(3e-4, 0.13, 5), np.geomspace(1e3, 1e5, 6))
    fit = fit_law(runs, n, d, surface(n, d, {**TRUE, "E": 0.0}), n_bootstrap=0, held_out=False)
    assert fit.at_bounds == ["E"] and "E stopped at its lower bound: the points show no floor" in fit.flags()
    assert fit.values["alpha"] == pytest.approx(0.4, rel=1e-3) and fit.values["beta"] == pytest.approx(0.7, rel=1e-3)


def test_noisy_few_off_centre_runs_keep_the_truth_inside_the_intervals():
    # Four runs, all larger than most of the range above, trained longer: 2% noise per point.
    runs, n, d = grid_points(np.geomspace(1e-2, 0.13, 4), np.geomspace(2e4, 2e5, 5))
    values = surface(n, d) * np.exp(np.random.default_rng(1).normal(0, 0.01, len(n)))
    fit = fit_law(runs, n, d, values, n_bootstrap=100, seed=0)
    assert fit.converged and fit.n_runs == 4 and fit.n_points == 20
    for name, value in TRUE.items():
        lo, hi = fit.intervals[name]
        assert lo <= value <= hi, (name, value, lo, hi)
    assert fit.intervals["a"][0] <= 0.7 / 1.1 <= fit.intervals["a"][1]


def test_the_compute_optimal_split_matches_a_brute_force_search():
    for compute in (10.0, 1e3, 1e6):
        optimum = optimal_allocation(TRUE, compute)
        sizes = np.geomspace(1e-6, 1e4, 400_001)
        values = surface(sizes, compute / 3 / sizes)
        assert optimum["size"] == pytest.approx(sizes[values.argmin()], rel=1e-4)
        assert optimum["value"] == pytest.approx(values.min(), rel=1e-9)
        assert optimum["size"] * optimum["images"] * 3 == pytest.approx(compute)


def test_the_objective_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    log_n, log_d = rng.normal(0, 2, 30), rng.normal(0, 1, 30)
    log_value = np.log(surface(np.exp(log_n), np.exp(log_d) * 1e4)) + rng.normal(0, 0.05, 30)
    for theta in ([1.0, 0.5, 2.0, 0.3, 0.6], [2.5, -1.0, 0.0, 1.2, 0.2]):
        error = scipy.optimize.check_grad(lambda t: _objective(t, log_n, log_d, log_value)[0],
                                          lambda t: _objective(t, log_n, log_d, log_value)[1], theta)
        assert error < 1e-6 * max(1.0, np.abs(_objective(theta, log_n, log_d, log_value)[1]).max())


def test_bad_points_are_refused_with_the_reason():
    runs, n, d = grid_points([1e-3, 1e-2], [1e3, 1e4])
    with pytest.raises(RecordsError, match="at least 3 runs of at least 2 sizes"):
        fit_law(runs, n, d, surface(n, d), n_bootstrap=0)
    runs, n, d = grid_points([1e-3, 1e-2, 1e-1], [1e3, 1e4])
    values = surface(n, d)
    values[3] = np.nan
    with pytest.raises(RecordsError, match="1 point\\(s\\) with a size, images seen or value that is not a positive "
                                           "number \\(first: run 'run1'\\)"):
        fit_law(runs, n, d, values, n_bootstrap=0)


def test_law_on_the_committed_study_and_its_command(capsys):
    study = records.load(REPO / "runs" / "fmnist-default")
    fit = law(study, n_bootstrap=10)
    assert fit.metric == "FD-FashionCNN-250" and fit.n_runs == 12 and fit.n_points == 72  # 6 evaluations each
    assert fit.values["alpha"] > 0 and fit.values["a"] + fit.values["b"] == pytest.approx(1.0)
    assert fit.held_out_runs == ["DiT-B-2", "DiT-L-2", "DiT-XL-2"]  # the three largest by Gflops
    assert main(["law", str(REPO / "runs" / "fmnist-default"), "--bootstrap", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert out[name] == pytest.approx(fit.values[name]) and len(out[f"{name}_interval"]) == 2
    assert out["isoflop_a"] is None  # the study's profiles have 1 interior minimum of 12: no approach-2 law
    assert main(["law", str(REPO / "runs" / "fmnist-default"), "--bootstrap", "10", "--size", "params"]) == 0
    text = capsys.readouterr().out
    assert "N: parameters" in text and "held out   median error" in text


def test_the_report_states_the_law_and_which_size_extrapolates_better():
    from analysis.analyze import analyze
    from analysis.report import SECTIONS

    analysis = analyze(records.load(REPO / "runs" / "fmnist-default"))
    text = "\n".join(SECTIONS["law"](analysis))
    fit, by_params = analysis.law.get(), analysis.law_params.get()
    assert "over 72 (run, step) points of 12 runs" in text and f"alpha = {fit.values['alpha']:.3g}" in text
    better = min((fit, by_params), key=lambda f: f.held_out_error)
    assert (f"N in parameters {by_params.held_out_error:.0%} (DiT-XL-2, DiT-XL-4, DiT-XL-8)" in text
            and f"The law over {'forward Gflops per image' if better is fit else 'parameters'} extrapolates" in text)
