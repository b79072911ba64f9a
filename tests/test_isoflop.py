"""isoFLOP profiles and the laws of the compute-optimal size, against a direct numpy computation and synthetic
studies whose optimum is known."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import fits, isoflop, planning, records
from analysis.paper import PAPER_RUNS_DIR
from analysis.schema import RecordsError
from scaling.cli import main

GFLOPS = np.geomspace(3e-4, 0.13, 12)  # the miniature grid's span of model Gflops
STEPS = np.arange(100, 1501, 100)
BATCH = 16
TRUE_EXPONENT = 0.5  # N_opt = OPT_COEFFICIENT * C^0.5 in the synthetic world
OPT_COEFFICIENT = 3.73e-4


def _world(rng, *, curvature=0.5, config_sigma=0.01, point_sigma=0.005, optimum=OPT_COEFFICIENT):
    """Curves of 12 configs: log10 metric = 2.3 - 0.1 log10 C + curvature (log10 g - log10 N_opt(C))^2, each
    config off by its own factor, each point by a smaller one."""
    runs, sizes, compute, values = [], [], [], []
    for i, g in enumerate(GFLOPS):
        c = 3 * g * BATCH * STEPS
        log_v = (2.3 - 0.1 * np.log10(c) + curvature * (np.log10(g) - np.log10(optimum * c ** TRUE_EXPONENT)) ** 2
                 + rng.normal(0, config_sigma) + rng.normal(0, point_sigma, c.size))
        runs += [f"run{i}"] * c.size
        sizes += [g] * c.size
        compute += list(c)
        values += list(10 ** log_v)
    return runs, np.array(sizes), np.array(compute), np.array(values)


def _fit(world, **kwargs):
    runs, sizes, compute, values = world
    return isoflop.fit_isoflop(runs, sizes, sizes, compute, values, **kwargs)


def test_one_profile_matches_a_direct_numpy_computation():
    runs, sizes, compute, values = _world(np.random.default_rng(0))
    budget = 20.0
    analysis = _fit((runs, sizes, compute, values), budgets=[budget], n_bootstrap=0)
    profile = analysis.profiles[0]
    # By hand: every curve that spans the budget, interpolated linearly in log-log, then np.polyfit's parabola.
    frame = pd.DataFrame({"run": runs, "g": sizes, "c": compute, "v": values})
    expected = {}
    for run, curve in frame.groupby("run"):
        if curve["c"].min() <= budget <= curve["c"].max():
            expected[run] = (curve["g"].iloc[0], 10 ** np.interp(np.log10(budget), np.log10(curve["c"]),
                                                                  np.log10(curve["v"])))
    assert sorted(profile.points["run"]) == sorted(expected) and len(expected) >= 5
    got = profile.points.set_index("run")
    for run, (g, v) in expected.items():
        assert got.loc[run, "value"] == pytest.approx(v, rel=1e-12)
        assert got.loc[run, "images"] == pytest.approx(budget / (3 * g), rel=1e-12)
    u = np.log10([g for g, _ in expected.values()])
    a, b, c = np.polyfit(u, np.log10([v for _, v in expected.values()]), 2)
    assert profile.fitted and profile.coefficients == pytest.approx((a, b, c), rel=1e-9)
    assert profile.optimal_size == pytest.approx(10 ** (-b / (2 * a)), rel=1e-9)
    assert profile.optimal_value == pytest.approx(10 ** (c - b * b / (4 * a)), rel=1e-9)
    # With size = Gflops, the images-seen parabola's minimum is the same optimum seen from the data side.
    assert profile.optimal_images == pytest.approx(budget / (3 * profile.optimal_size), rel=1e-9)


def test_noise_free_profiles_recover_the_optimum_law():
    analysis = _fit(_world(np.random.default_rng(1), config_sigma=0, point_sigma=0), n_bootstrap=50)
    law = analysis.size_law
    assert law.exponent == pytest.approx(TRUE_EXPONENT, abs=0.01)
    assert analysis.images_law.exponent == pytest.approx(1 - TRUE_EXPONENT, abs=0.01)  # D_opt = C / (3 N_opt)
    low, high = analysis.fitted_range
    assert law.predict(math.sqrt(low * high)) == pytest.approx(OPT_COEFFICIENT * math.sqrt(low * high) ** 0.5,
                                                               rel=0.05)
    assert len(analysis.fitted) >= 6 and analysis.note == ""


def test_the_exponent_interval_covers_the_truth_at_about_the_stated_rate():
    # Configs off the law by their own factors: the bootstrap over configs has to carry that into the interval.
    rng = np.random.default_rng(7)
    trials, hits, widths = 60, 0, []
    for trial in range(trials):
        law = _fit(_world(rng), n_bootstrap=200, confidence=0.9, seed=trial).size_law
        low, high = law.exponent_ci
        hits += low <= TRUE_EXPONENT <= high
        widths.append(high - low)
    assert 0.8 <= hits / trials <= 1.0  # measured: 0.93
    assert np.median(widths) < 0.3  # an interval that covers because it is huge would say nothing


def test_budgets_whose_optimum_lies_beyond_the_grid_are_flagged_not_fitted():
    # The optimum is 100x larger than the largest config: every profile's best config is the largest one.
    analysis = _fit(_world(np.random.default_rng(2), optimum=OPT_COEFFICIENT * 1e4), n_bootstrap=20)
    assert analysis.size_law is None and not analysis.fitted and "budgets have an interior minimum" in analysis.note
    reached = [p for p in analysis.profiles if len(p.points) >= 3]
    assert reached and all("is the largest" in p.flag for p in reached)
    assert analysis.table()["optimal_gflops"].isna().all()


def test_too_few_configs_at_a_budget_is_flagged():
    runs, sizes, compute, values = _world(np.random.default_rng(3))
    profile = isoflop.fit_profile(isoflop.profile_points(isoflop._curves(runs, sizes, sizes, compute, values),
                                                         compute.max()), compute.max())
    assert not profile.fitted and "1 config size(s) reach this budget" in profile.flag


def test_the_paper_records_hold_no_profile_and_say_why():
    analysis = isoflop.isoflop_analysis(records.load(PAPER_RUNS_DIR), resolution=256)
    assert analysis.size_law is None
    assert "11 of 12 configs have a single evaluation" in analysis.note and "no isoFLOP profile" in analysis.note


@pytest.mark.parametrize(("change", "message"), [
    (lambda v: np.where(np.arange(v.size) == 3, np.nan, v), "must be finite"),
    (lambda v: -v, "must be positive"),
])
def test_bad_values_are_named(change, message):
    runs, sizes, compute, values = _world(np.random.default_rng(4))
    with pytest.raises(RecordsError, match=message):
        isoflop.fit_isoflop(runs, sizes, sizes, compute, change(values))


def test_bad_budgets_and_sizes_are_named():
    with pytest.raises(RecordsError, match="budgets must be positive"):
        _fit(_world(np.random.default_rng(5)), budgets=[-1.0])
    with pytest.raises(RecordsError, match="model size 'tokens': use one of \\['gflops', 'params'\\]"):
        isoflop.isoflop_analysis(records.load(PAPER_RUNS_DIR), size="tokens")


def _plan_inputs():
    world = _world(np.random.default_rng(6))
    runs, sizes, compute, values = world
    analysis = _fit(world, n_bootstrap=100)
    frontier = fits.fit_frontier(runs, compute, values, n_bootstrap=20)
    table = pd.DataFrame({"run": runs, "gflops": sizes}).drop_duplicates("run").assign(
        model=lambda t: t["run"], batch_size=BATCH)
    return analysis, frontier, table


def test_plan_takes_the_isoflop_optimum_inside_its_fitted_range_and_the_frontier_outside():
    analysis, frontier, table = _plan_inputs()
    low, high = analysis.fitted_range
    budget = math.sqrt(low * high)
    plan = planning.plan_budget(frontier, table, budget, analysis)
    optimum = analysis.size_law.predict(budget)
    nearest = table.loc[(np.log10(table["gflops"]) - np.log10(optimum)).abs().idxmin()]
    assert plan.basis == "isoFLOP" and plan.config == nearest["run"] and "fitted range" in plan.reason
    assert plan.optimal_gflops == pytest.approx(optimum)
    assert plan.optimal_gflops_interval[0] <= optimum <= plan.optimal_gflops_interval[1]
    assert plan.steps == int(budget / (3 * nearest["gflops"] * BATCH))
    beyond = planning.plan_budget(frontier, table, high * 3, analysis)
    assert beyond.basis == "frontier" and beyond.config == frontier.frontier.best_at(high * 3)[0]
    assert "outside the isoFLOP profiles' fitted range" in beyond.reason and beyond.optimal_gflops is None


def test_plan_on_the_paper_uses_the_frontier_and_says_why(capsys):
    assert main(["plan", "--compute", "1e11", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["basis"] == "frontier" and plan["model"] == "DiT-XL/2"
    assert "these records hold no isoFLOP profile" in plan["reason"]


def test_the_isoflop_command_prints_the_budgets_and_the_laws(tmp_path, capsys):
    runs, sizes, compute, values = _world(np.random.default_rng(8))
    steps = compute / (3 * sizes * BATCH)
    path = tmp_path / "curves.csv"
    pd.DataFrame({"run": runs, "gflops": sizes, "batch_size": BATCH, "step": steps.round().astype(int),
                  "metric": "FID-10K", "value": values}).to_csv(path, index=False)
    assert main(["isoflop", "--records", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    direct = _fit((runs, sizes, compute, values))
    assert summary["size_law"]["exponent"] == pytest.approx(direct.size_law.exponent, rel=1e-6)
    assert len(summary["budgets"]) == isoflop.DEFAULT_BUDGETS
    assert main(["isoflop", "--records", str(path), "--budgets", "7", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["budgets"]) == 7
    assert main(["isoflop", "--records", str(path)]) == 0
    out = capsys.readouterr().out
    assert "N_opt = " in out and "D_opt = " in out and "interval of the exponent" in out


def test_profiles_over_parameters_take_each_runs_parameter_count():
    study = records.load("runs/fmnist-default")
    analysis = isoflop.isoflop_analysis(study, metric="val-loss-200", size="params", n_bootstrap=50)
    params = study.runs.set_index("run")["params_m"] * 1e6
    points = pd.concat([p.points for p in analysis.profiles])
    assert (points["size"].to_numpy() == params.loc[points["run"]].to_numpy()).all()
    assert analysis.table().columns[3] == "optimal_params" and len(analysis.profiles) == isoflop.DEFAULT_BUDGETS
