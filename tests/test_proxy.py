"""The held-out loss -> sample metric mapping: recovered forms, leave-one-config-out errors computed by hand, and
prediction intervals that hold for configs the fit never saw."""

import json

import numpy as np
import pytest

from analysis import proxy, records
from analysis.paper import PAPER_RUNS_DIR
from analysis.schema import RecordsError, metric_family
from scaling.cli import main

STUDY = "runs/fmnist-default"
STEPS = np.arange(250, 1501, 250)


def _configs(rng, n, *, law=lambda loss: 400 * loss ** 0.4, config_sigma=0.03, point_sigma=0.01, first=0):
    """n configs, each a loss curve falling over training, its metric on `law` off by its own factor."""
    runs, steps, losses, values = [], [], [], []
    for i in range(first, first + n):
        loss = rng.uniform(0.03, 0.3) * (STEPS / STEPS[0]) ** -0.2
        runs += [f"run{i}"] * loss.size
        steps += list(STEPS)
        losses += list(loss)
        values += list(law(loss) * 10 ** (rng.normal(0, config_sigma) + rng.normal(0, point_sigma, loss.size)))
    return runs, np.array(steps), np.array(losses), np.array(values)


def test_held_out_errors_match_a_fit_without_each_config():
    runs, steps, losses, values = _configs(np.random.default_rng(0), 8)
    analysis = proxy.fit_proxy(runs, steps, losses, values)
    power = analysis.fits["power law"]
    slope, intercept = np.polyfit(np.log10(losses), np.log10(values), 1)
    assert power.parameters == pytest.approx([intercept, slope], rel=1e-9) and slope == pytest.approx(0.4, abs=0.1)
    runs = np.array(runs)
    for run in ("run0", "run5"):
        rest = runs != run
        s, i = np.polyfit(np.log10(losses[rest]), np.log10(values[rest]), 1)
        expected = i + s * np.log10(losses[~rest]) - np.log10(values[~rest])
        got = power.held_out[power.held_out["run"] == run]["log_error"]
        assert got.to_numpy() == pytest.approx(expected, abs=1e-12)
    assert power.held_out_rmse > power.in_sample_rmse  # a config is harder to predict once it is left out


def test_prediction_intervals_cover_new_configs_at_about_the_stated_rate():
    rng = np.random.default_rng(1)
    analysis = proxy.fit_proxy(*_configs(rng, 12), confidence=0.9)
    runs, _, losses, values = _configs(rng, 200, first=100)
    predicted = analysis.predict(losses)
    inside = (predicted["low"] <= values) & (values <= predicted["high"])
    assert 0.8 <= inside.mean() <= 0.98
    assert not predicted["extrapolated"].all()


def test_a_curved_mapping_prefers_a_curved_form_over_the_line():
    law = lambda loss: 60 + 2000 * loss ** 1.5  # noqa: E731 - a floor the metric cannot go below
    analysis = proxy.fit_proxy(*_configs(np.random.default_rng(2), 10, law=law, config_sigma=0.01))
    table = analysis.table().set_index("form")
    assert analysis.best.form.name in ("offset power law", "log-log quadratic")
    assert table.loc["linear", "held_out_rmse_log10"] > 1.5 * analysis.best.held_out_rmse
    offset = analysis.fits["offset power law"].parameters
    assert offset[0] == pytest.approx(60, rel=0.3) and offset[2] == pytest.approx(1.5, rel=0.2)


def test_the_miniature_study_pairs_each_loss_with_the_sample_metric_of_its_step():
    study = records.load(STUDY)
    analysis = proxy.loss_proxy(study)
    evaluations = study.evaluations
    assert metric_family(analysis.loss_metric) == "val-loss" and analysis.metric.startswith("FD-")
    # The sample metric's main protocol (the 8-step sampler of every evaluation, unguided, noise seed 0; not the
    # last step's other step counts, seed or guidance).
    samples = evaluations[(evaluations["metric"] == analysis.metric) & (evaluations["sampling_steps"] == 8)
                          & (evaluations["seed"] == 0) & (evaluations["guidance_scale"] == 1.0)]
    losses = evaluations[evaluations["metric"] == analysis.loss_metric]
    expected = samples.merge(losses, on=["run", "step"], suffixes=("", "_loss"))
    assert len(analysis.pairs) == len(expected) and analysis.pairs["run"].nunique() == 12
    pairs = analysis.pairs.set_index(["run", "step"]).sort_index()
    expected = expected.set_index(["run", "step"]).sort_index()
    assert pairs["loss"].to_numpy() == pytest.approx(expected["value_loss"].to_numpy())
    assert pairs["value"].to_numpy() == pytest.approx(expected["value"].to_numpy())
    assert analysis.rank_correlation > 0.5  # a lower held-out loss goes with a lower FD across configs


def test_missing_loss_too_few_configs_and_bad_values_are_named():
    with pytest.raises(RecordsError, match="no held-out loss"):
        proxy.loss_proxy(records.load(PAPER_RUNS_DIR))
    runs, steps, losses, values = _configs(np.random.default_rng(3), 2)
    with pytest.raises(RecordsError, match="at least 3 configs"):
        proxy.fit_proxy(runs, steps, losses, values)
    runs, steps, losses, values = _configs(np.random.default_rng(3), 4)
    with pytest.raises(RecordsError, match="positive and finite"):
        proxy.fit_proxy(runs, steps, -losses, values)
    with pytest.raises(RecordsError, match="unknown loss -> metric form"):
        proxy.fit_proxy(runs, steps, losses, values, forms=["cubic"])


def test_the_loss_proxy_command_predicts_with_intervals(capsys):
    assert main(["loss-proxy", "--records", STUDY, "--loss", "0.04", "--loss", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    direct = proxy.loss_proxy(records.load(STUDY))
    assert summary["best"]["form"] == direct.best.form.name
    low, high = summary["predictions"][0]["low"], summary["predictions"][0]["high"]
    assert low < float(direct.best.predict(0.04)) < high
    assert [p["extrapolated"] for p in summary["predictions"]] == [False, True]
    assert main(["loss-proxy"]) == 2  # the paper's records: no held-out loss
    assert "no held-out loss" in capsys.readouterr().err
