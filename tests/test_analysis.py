"""Scaling analysis: records, fits, frontier, planning and comparison against closed forms and direct numpy."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import fits, planning, records, study
from scaling.cli import main

PAPER = Path(__file__).resolve().parent.parent / "runs" / "paper"
TRUE_LAW = fits.OffsetPowerLaw(floor=5.0, scale=40.0, exponent=0.4, x_ref=1e9)


def _tangent_curves(rng, sigma=0.0):
    """Eight training curves, each touching TRUE_LAW once and above it elsewhere (as real runs are: best at one
    budget); their lower envelope is the law at the touching points."""
    runs, xs, ys = [], [], []
    for i, touch in enumerate(np.geomspace(1e7, 1e11, 8)):
        x = touch * np.array([0.5, 0.7, 1.0, 1.4, 2.0])
        y = TRUE_LAW(x) * (1 + 0.5 * np.log10(x / touch) ** 2) * np.exp(rng.normal(0, sigma, x.size))
        runs += [f"run{i}"] * x.size
        xs += list(x)
        ys += list(y)
    return np.array(runs), np.array(xs), np.array(ys)


# ---------------------------------------------------------------------------------------------------------------
# Log-log fit (model compute)
# ---------------------------------------------------------------------------------------------------------------

def test_loglog_fit_recovers_the_slope_and_its_intervals_cover_at_the_stated_rate():
    rng = np.random.default_rng(0)
    gflops = np.geomspace(0.36, 118.6, 12)
    slope, intercept, sigma, trials = -0.36, 2.1, 0.1, 300
    slopes, slope_hits, prediction_hits = [], 0, 0
    for trial in range(trials):
        fid = 10 ** (intercept + slope * np.log10(gflops) + rng.normal(0, sigma, gflops.size))
        fit = fits.fit_loglog(gflops, fid, confidence=0.9, n_bootstrap=500, seed=trial)
        slopes.append(fit.slope)
        lo, hi = fit.slope_ci
        slope_hits += lo <= slope <= hi
        new_fid = 10 ** (intercept + slope * np.log10(30.0) + rng.normal(0, sigma))
        lo, hi = fit.prediction_interval(30.0)
        prediction_hits += lo <= new_fid <= hi
    assert np.mean(slopes) == pytest.approx(slope, abs=0.01)
    assert 0.83 <= slope_hits / trials <= 0.96
    assert 0.84 <= prediction_hits / trials <= 0.97


def test_the_bootstrap_resamples_configs_not_checkpoints():
    # Ten checkpoints of each of 4 configs: points within a config share its offset, so they are one piece of
    # evidence. Treating them as 40 independent points would shrink the interval about threefold.
    rng = np.random.default_rng(1)
    gflops = np.repeat(np.geomspace(1, 100, 4), 10)
    offsets = np.repeat(rng.normal(0, 0.1, 4), 10)
    fid = 10 ** (2 - 0.4 * np.log10(gflops) + offsets + rng.normal(0, 0.01, 40))
    by_config = fits.fit_loglog(gflops, fid, groups=np.repeat(list("abcd"), 10))
    by_point = fits.fit_loglog(gflops, fid)
    assert by_config.n_configs == 4 and by_point.n_configs == 40
    assert by_config.slope == pytest.approx(by_point.slope)
    assert by_config.slope_se > 2.5 * by_point.slope_se


def test_table4_slope_and_correlation_match_a_direct_numpy_computation():
    with open(PAPER / "table4.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train_steps"] == "400000" and r["resolution"] == "256"
                and r["block"] == "adaLN-Zero"]
    log_gflops = np.log10([float(r["gflops"]) for r in rows])
    log_fid = np.log10([float(r["fid50k_noguidance"]) for r in rows])
    slope, intercept = np.polyfit(log_gflops, log_fid, 1)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (no ties in Table 4)
    spearman = np.corrcoef(ranks(log_gflops), ranks(log_fid))[0, 1]

    fit = study.model_compute_fit(records.load(PAPER))
    assert fit.n == len(rows) == 12 and fit.metadata["step"] == 400_000 and fit.metadata["metric"] == "FID-50K"
    assert fit.slope == pytest.approx(slope, rel=1e-12) and fit.intercept == pytest.approx(intercept, rel=1e-12)
    assert fit.pearson_r == pytest.approx(np.corrcoef(log_gflops, log_fid)[0, 1], rel=1e-12)
    assert fit.spearman_r == pytest.approx(spearman, rel=1e-12)
    assert fit.pearson_r < -0.9  # the paper's "strong negative correlation" (Fig. 8)
    assert fit.slope_ci[0] < fit.slope < fit.slope_ci[1] < 0
    held = fit.leave_largest_out
    assert held.held_out == "paper:DiT-XL/2"
    s, i = np.polyfit(log_gflops[:-1], log_fid[:-1], 1)
    assert held.predicted[0] == pytest.approx(10 ** (i + s * log_gflops[-1]))


# ---------------------------------------------------------------------------------------------------------------
# Frontier and offset power law (training compute)
# ---------------------------------------------------------------------------------------------------------------

def test_frontier_of_hand_made_curves():
    frontier = fits.compute_frontier(["A"] * 3 + ["B"] * 3 + ["C"] * 2, [1, 2, 4, 2, 4, 8, 8, 16],
                                     [10, 8, 7, 12, 6, 4, 5, 3])
    assert frontier.points.values.tolist() == [["A", 1, 10], ["A", 2, 8], ["B", 4, 6], ["B", 8, 4], ["C", 16, 3]]
    # Between evaluations curves are straight in log-log space: A(3) = 8 (7/8)^f, B(3) = 12 (1/2)^f.
    f = math.log(1.5) / math.log(2)
    assert frontier.best_at(3.0) == ("A", pytest.approx(8 * (7 / 8) ** f))
    # After C starts at 8 (FID 5) the envelope stays at B's 4 until C drops below it: never rises with compute.
    assert frontier.best_at(9.0) == ("B", pytest.approx(4.0))
    ranges = frontier.optimal_ranges()
    assert ranges["run"].tolist() == ["A", "B", "C"]
    a_to_b = 2 * 2 ** (math.log(1.5) / math.log(1.75))  # where A's and B's segments cross
    b_to_c = 8 * 2 ** (math.log(0.8) / math.log(0.6))  # where C's segment falls below 4
    assert ranges["x_start"].tolist()[1:] == pytest.approx([a_to_b, b_to_c], rel=0.02)
    assert frontier.best_at(100.0) == ("C", pytest.approx(3.0))


def test_frontier_fit_recovers_a_known_law_and_reports_convergence():
    runs, x, y = _tangent_curves(np.random.default_rng(0), sigma=0.01)
    fit = fits.fit_frontier(runs, x, y, n_bootstrap=100)
    assert fit.law.floor == pytest.approx(TRUE_LAW.floor, rel=0.15)
    assert fit.law.exponent == pytest.approx(TRUE_LAW.exponent, rel=0.1)
    assert fit.convergence["converged"] and fit.convergence["starts_at_best"] >= fit.convergence["starts"] // 2
    assert fit.convergence["at_bound"] == []
    assert set(fit.data["run"]) == {f"run{i}" for i in range(8)}  # each run is optimal near its touching point
    assert fit.predict(3e9) == pytest.approx(TRUE_LAW(3e9), rel=0.03)
    assert fit.leave_largest_out.held_out == "run7" and abs(fit.leave_largest_out.relative_error) < 0.1
    lo, hi = fit.confidence_band(3e9)
    plo, phi = fit.prediction_interval(3e9)
    assert plo <= lo < fit.predict(3e9) < hi <= phi


def test_frontier_fit_flags_a_floor_at_its_bound():
    # A pure power law: the fitted floor goes to its bound 0, and the fit says so.
    x = np.geomspace(1e8, 1e11, 6)
    fit = fits.fit_frontier([f"r{i}" for i in range(6)], x, 100 * (x / 1e8) ** -0.3, n_bootstrap=30)
    assert "floor=0" in fit.convergence["at_bound"] and fit.law.exponent == pytest.approx(0.3, rel=1e-3)


@pytest.mark.slow
def test_frontier_band_covers_the_true_law_at_about_the_stated_rate():
    # Eight configs, each covering its own stretch of compute and off the law by its own factor (configs differ
    # more than evaluations repeat): the bootstrap over configs has to carry that spread into the band.
    rng = np.random.default_rng(3)
    trials, hits = 30, 0
    for trial in range(trials):
        runs, xs, ys = [], [], []
        for i, start in enumerate(np.geomspace(1e7, 1e11, 8)):
            x = start * np.geomspace(1, 3, 4)
            ys += list(TRUE_LAW(x) * np.exp(rng.normal(0, 0.05) + rng.normal(0, 0.005, x.size)))
            runs += [f"run{i}"] * x.size
            xs += list(x)
        fit = fits.fit_frontier(runs, xs, ys, n_bootstrap=60, confidence=0.9, seed=trial)
        lo, hi = fit.confidence_band(3e9)
        hits += lo <= TRUE_LAW(3e9) <= hi
    assert 0.75 <= hits / trials <= 1.0


def test_paper_frontier_names_the_optimal_configs_and_extrapolates_to_xl2():
    fit = study.training_compute_fit(records.load(PAPER), resolution=256)
    ranges = fit.frontier.optimal_ranges()
    assert ranges["run"].iloc[-1] == "paper:DiT-XL/2" and ranges["run"].iloc[0] == "paper:DiT-S/8"
    # Fig. 9: XL/2 overtakes XL/4 as compute grows; XL/4 is on the frontier before it.
    assert ranges["run"].tolist().index("paper:DiT-XL/4") < ranges["run"].tolist().index("paper:DiT-XL/2")
    xl2 = fit.frontier.points[fit.frontier.points["run"] == "paper:DiT-XL/2"]
    assert xl2["y"].tolist() == [19.47, 10.67, 9.62]
    assert xl2["x"].iloc[0] == pytest.approx(118.64 * 256 * 4e5 * 3)  # 3.64e10, the paper's unit
    assert fit.leave_largest_out.held_out == "paper:DiT-XL/2" and fit.convergence["converged"]


# ---------------------------------------------------------------------------------------------------------------
# Sampling compute
# ---------------------------------------------------------------------------------------------------------------

def _sampling_points(values: dict) -> pd.DataFrame:
    gflops = {"DiT-S/2": 6.0, "DiT-XL/2": 118.6}
    return pd.DataFrame([{"run": m, "model": m, "gflops": gflops[m], "batch_size": 256, "step": 400_000,
                          "metric": "FID-10K", "value": v, "sampler": "ddpm", "sampling_steps": s,
                          "num_samples": 10_000} for (m, s), v in values.items()])


def test_sampling_tradeoff_finds_when_a_smaller_model_with_more_steps_wins():
    table = _sampling_points({("DiT-S/2", 1000): 20.0, ("DiT-S/2", 16): 80.0, ("DiT-XL/2", 16): 30.0,
                              ("DiT-XL/2", 64): 15.0})
    result = study.sampling_tradeoff(records.load(table))
    pairs = result.smaller_beats_larger
    assert pairs[["model_smaller", "sampling_steps_smaller", "sampling_steps_larger"]].values.tolist() == [
        ["DiT-S/2", 1000, 16]]
    assert not result.sampling_compensates  # S/2 x 1000 spends 6000 Gflops; XL/2 x 16 spends 1898
    assert result.frontier.points["run"].tolist() == ["DiT-S/2 @ 16", "DiT-XL/2 @ 16", "DiT-S/2 @ 1000",
                                                      "DiT-XL/2 @ 64"]  # 96, 1898, 6000, 7590 Gflops
    cheaper = _sampling_points({("DiT-S/2", 250): 20.0, ("DiT-XL/2", 16): 30.0})
    assert study.sampling_tradeoff(records.load(cheaper)).sampling_compensates  # 1500 <= 1898 Gflops


def test_paper_sampling_points_answer_the_papers_question():
    result = study.sampling_tradeoff(records.load(PAPER))  # FID-10K: FID-50K was sampled with 250 steps only
    assert result.metadata["metric"] == "FID-10K"
    with pytest.raises(records.RecordsError, match="all sampled with 250 steps"):
        study.sampling_tradeoff(records.load(PAPER), metric="FID-50K")
    assert result.points["sampling_gflops_per_image"].tolist() == pytest.approx([80_710, 15_185.92])  # 80.7, 15.2 T
    assert result.smaller_beats_larger.empty and not result.sampling_compensates
    assert result.winners["pair"].tolist() == ["DiT-XL/2 @ 128"]


# ---------------------------------------------------------------------------------------------------------------
# Planning and comparison
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paper_fit():
    loaded = records.load(PAPER)
    return loaded, study.training_compute_fit(loaded, resolution=256, n_bootstrap=200)


def test_compute_units_convert_to_paper_units():
    assert planning.to_paper_units(3e10) == 3e10
    assert planning.to_paper_units(2e9, "flops") == pytest.approx(1.0)  # 2 FLOPs per multiply-add, in units of 1e9
    hours = planning.to_paper_units(1, "accelerator-hours", utilization=0.5, chip_peak_tflops=1.0, chips=2)
    assert hours == pytest.approx(2 * 3600 * 1e12 * 0.5 / 2e9)
    with pytest.raises(records.RecordsError, match="utilization"):
        planning.to_paper_units(1, "accelerator-hours")
    with pytest.raises(records.RecordsError, match="unknown compute unit"):
        planning.to_paper_units(1, "joules")


def test_budget_and_target_plans_round_trip(paper_fit):
    loaded, fit = paper_fit
    plan = planning.plan_budget(fit, loaded.runs, 2e10)
    assert plan.config == "paper:DiT-XL/4" and not plan.extrapolated
    assert plan.beyond_config_evaluations  # XL/4 was evaluated at 8.9e9 only; 2e10 trains it past that
    assert not planning.plan_budget(fit, loaded.runs, 3e11).beyond_config_evaluations  # XL/2 reached 6.4e11
    assert plan.steps == int(2e10 / (3 * 29.05 * 256))
    assert plan.predicted == pytest.approx(float(fit.predict(2e10)))
    assert plan.prediction_interval[0] <= plan.confidence_interval[0] < plan.predicted < plan.confidence_interval[1]
    back = planning.plan_target(fit, loaded.runs, plan.predicted)
    assert back.compute == pytest.approx(2e10, rel=1e-9) and back.plan.config == plan.config
    assert back.compute_interval[0] < 2e10 < back.compute_interval[1]
    beyond = planning.plan_budget(fit, loaded.runs, 1e13)
    assert beyond.extrapolated and beyond.config == "paper:DiT-XL/2"
    unreachable = planning.plan_target(fit, loaded.runs, fit.law.floor * 0.5 if fit.law.floor > 0 else 1e-9)
    assert unreachable.compute == math.inf and unreachable.plan is None


def test_a_point_on_the_dit_frontier_has_multiplier_one(paper_fit):
    loaded, fit = paper_fit
    compute = 5e10
    points = pd.DataFrame({"name": ["on the frontier", "twice as efficient"], "gflops": [50.0, 50.0],
                           "fid": [float(fit.predict(compute))] * 2,
                           "train_gflops_cumulative": [compute, compute / 2]})
    table = planning.compare_architecture(points, fit, study.model_compute_fit(loaded))
    assert table["compute_multiplier"].tolist() == pytest.approx([1.0, 2.0])
    assert (table["compute_multiplier_lo"] < table["compute_multiplier"]).all()
    assert (table["compute_multiplier"] < table["compute_multiplier_hi"]).all()
    flops = planning.compare_architecture(points.rename(columns={"gflops": "flops"}).assign(flops=1e11), fit)
    assert flops["gflops"].tolist() == [50.0, 50.0]  # 1e11 true FLOPs = 50 GMACs


# ---------------------------------------------------------------------------------------------------------------
# Records: sources, schema, errors
# ---------------------------------------------------------------------------------------------------------------

def test_paper_records_carry_gflops_from_the_counter_where_the_tables_are_blank(tmp_path):
    from scaling.paper_records import main as write_paper_records

    out = tmp_path / "evaluations.csv"
    write_paper_records(["--out", str(out)])
    assert out.read_text() == (PAPER / "evaluations.csv").read_text()  # the committed file is up to date
    table = pd.read_csv(out)
    counted = table[table["gflops_source"] == "counter"]
    assert set(counted["block"]) == {"in-context", "cross-attention", "adaLN"} | {"adaLN-Zero"}
    assert counted.loc[counted["resolution"] == 512, "gflops"].iloc[0] == pytest.approx(524.6, abs=0.1)


def _csv(tmp_path, rows: list[dict]) -> Path:
    path = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


ROW = {"run": "mine-S", "gflops": 1.0, "batch_size": 256, "step": 1000, "metric": "FID-50K", "value": 50.0}


def test_user_csv_records_are_converted_and_validated(tmp_path):
    loaded = records.load(_csv(tmp_path, [{**{k: v for k, v in ROW.items() if k != "gflops"}, "flops": 4e9}]))
    row = loaded.evaluations.iloc[0]
    assert row["gflops"] == 2.0 and row["train_gflops_cumulative"] == 3 * 2.0 * 256 * 1000 and row["fid"] == 50.0
    for bad, message in [
        ({k: v for k, v in ROW.items() if k != "gflops"}, "missing column 'gflops'"),
        ({**ROW, "gflops": 0.0}, "line 2, column .gflops.: non-positive or missing"),
        ({**ROW, "gflops": 5e9}, "look like raw counts"),
        ({**ROW, "value": float("nan")}, "column .value.: an evaluation value that is missing, NaN or infinite"),
        ({k: v for k, v in ROW.items() if k != "metric"}, "missing column 'metric'"),
        ({k: v for k, v in ROW.items() if k != "run"}, "missing column 'run'"),
        ({**ROW, "metric": None}, "no metric name"),
        ({**ROW, "step": None}, "column .step.: an evaluation without its training step"),
    ]:
        with pytest.raises(records.RecordsError, match=message):
            records.load(_csv(tmp_path, [bad]))


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(records.RecordsError, match="does not exist"):
        records.load(tmp_path / "missing")
    with pytest.raises(records.RecordsError, match="holds no runs"):
        records.load(tmp_path)
    bad = tmp_path / "evaluations.jsonl"
    bad.write_text(json.dumps(ROW) + "\n{not json\n")
    with pytest.raises(records.RecordsError, match=r"evaluations.jsonl:2 is not valid JSON"):
        records.load(bad)
    with pytest.raises(records.RecordsError, match="more than one source"):
        records.load(PAPER, PAPER)


def test_filters_compare_by_type_and_name_what_there_is(tmp_path):
    table = pd.DataFrame({"run": list("abc"), "code": ["1", "1", "x"], "step": [1000, 1000, 2000]})
    assert len(records.filter_rows(table, {"code": 1})) == 2  # a text column compares as text
    assert len(records.filter_rows(table, {"step": "1e3"})) == 2  # a numeric one numerically
    with pytest.raises(records.RecordsError, match="no rows of t have step == '3000'.*values: 1000, 2000"):
        records.filter_rows(table, {"step": "3000"}, "t")
    with pytest.raises(records.RecordsError, match="'x' is not one"):
        records.filter_rows(table, {"step": "x"})
    with pytest.raises(records.RecordsError, match="no column 'stpe'"):
        records.filter_rows(table, {"stpe": 1})
    with pytest.raises(records.RecordsError, match=r"no column \['blok'\]"):
        records.load(PAPER).where(blok="adaLN")


def test_compare_refuses_points_of_another_metric(tmp_path, capsys):
    points = _csv(tmp_path, [{**ROW, "metric": "FD-FashionCNN-400", "run": f"mine-{i}"} for i in range(2)])
    assert main(["compare", str(points)]) == 2
    assert "no 'FID-50K' points" in capsys.readouterr().err
    points = _csv(tmp_path, [{**ROW, "num_samples": 10_000}])
    assert main(["compare", str(points)]) == 2
    assert "another protocol" in capsys.readouterr().err


def test_fits_refuse_mixed_protocols_and_too_few_points():
    loaded = records.load(PAPER)
    with pytest.raises(records.RecordsError, match="mix 4 evaluation protocols"):
        records.require_one_protocol(loaded.evaluations)
    with pytest.raises(records.RecordsError, match="at least 3 points"):
        fits.fit_loglog([1.0, 2.0], [3.0, 2.0])
    with pytest.raises(records.RecordsError, match="non-positive"):
        fits.fit_loglog([1.0, 2.0, 0.0], [3.0, 2.0, 1.0])
    with pytest.raises(records.RecordsError, match="at least 4 configs"):
        fits.fit_frontier(["a", "b", "c"], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    with pytest.raises(records.RecordsError, match="frontier has 3 points"):  # d and e never improve on c
        fits.fit_frontier(list("abcde"), [1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 1.5, 1.2])
    with pytest.raises(records.RecordsError, match="no 'FD-FashionCNN-1K' points"):
        study.model_compute_fit(loaded, metric="FD-FashionCNN-1K")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def test_fit_command_on_a_plain_csv_prints_the_documented_fields(capsys):
    assert main(["fit", str(PAPER / "table4.csv"), "--x", "gflops", "--y", "fid50k_noguidance", "--where",
                 "train_steps=400000", "--where", "resolution=256", "--where", "block=adaLN-Zero", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    fit = study.model_compute_fit(records.load(PAPER))
    assert out["n"] == 12 and out["slope"] == pytest.approx(fit.slope) and out["intercept"] == pytest.approx(
        fit.intercept)
    assert out["pearson_r"] == pytest.approx(fit.pearson_r) and out["spearman_r"] == pytest.approx(fit.spearman_r)
    assert out["slope_ci"][0] < out["slope"] < out["slope_ci"][1]


def test_fit_plan_and_compare_commands(tmp_path, capsys):
    assert main(["fit", str(PAPER), "--x", "gflops", "--y", "fid"]) == 0  # FID-50K, adaLN-Zero at 256px, 400K
    out = capsys.readouterr().out
    assert "note: Metric: FID-50K" in out and "note: Step 400000" in out and "12 points, 12 configs" in out
    mixed = _csv(tmp_path, [{**ROW, "run": f"r{i}", "gflops": 2.0 ** i, "value": 50 / (i + 1), "sampling_steps": s}
                            for i in range(4) for s in (25, 50)])
    assert main(["fit", str(mixed), "--x", "gflops", "--y", "fid"]) == 2
    assert "mix 2 evaluation protocols" in capsys.readouterr().err
    assert main(["fit", str(mixed), "--x", "gflops", "--y", "fid", "--where", "sampling_steps=50"]) == 0
    assert main(["fit", str(PAPER), "--x", "train_gflops_cumulative", "--y", "fid", "--frontier", "--where",
                 "metric=FID-50K", "--where", "resolution=256", "--where", "block=adaLN-Zero"]) == 0
    assert "paper:DiT-XL/2" in capsys.readouterr().out
    assert main(["plan", "--compute", "2e10", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "DiT-XL/4"
    assert main(["plan", "--target", "10"]) == 0
    assert "least compute" in capsys.readouterr().out
    points = tmp_path / "new.csv"
    points.write_text("name,gflops,fid,steps\nmine,10,30,400000\n")
    assert main(["compare", str(points)]) == 2
    assert "no batch size" in capsys.readouterr().err
    assert main(["compare", str(points), "--batch-size", "256", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["train_gflops_cumulative"] == 3 * 10 * 256 * 400_000 and row["compute_multiplier"] > 1
    assert row["dit_at_same_gflops"] == pytest.approx(float(study.model_compute_fit(records.load(PAPER)).predict(10)))
