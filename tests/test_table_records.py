"""Anyone's records as a table (docs/records.md): the committed miniature study written as two CSVs of step curves
and training-loss rows analyses as its run directories do (the law, isoFLOP, the loss proxy, the frontier); `fit`
and `figures` take several sources (the figures: all but those of sample images); `compare CSV --figures` draws;
a bad cell is named by its line and column."""

import json

import pandas as pd
import pytest
from run_helpers import REPO

from analysis import records
from analysis.isoflop import isoflop_analysis
from analysis.law import law
from analysis.proxy import loss_proxy
from analysis.records import PROTOCOL_COLUMNS, TRAINING_LOSS_METRIC
from analysis.schema import RecordsError
from analysis.study import training_compute_fit
from scaling.cli import main

STUDY = REPO / "runs" / "fmnist-default"
RUN_COLUMNS = ["run", "model", "size", "patch", "gflops", "params_m", "batch_size"]


def as_table(study: records.Records) -> pd.DataFrame:
    """A study's records in the table format: its evaluations, and its logged steps as train-loss rows."""
    evaluations = study.evaluations[RUN_COLUMNS + ["step", "value"] + PROTOCOL_COLUMNS]
    steps = study.steps[["run", "step", "loss"]].merge(study.runs[RUN_COLUMNS], on="run")
    steps = steps.rename(columns={"loss": "value"}).assign(metric=TRAINING_LOSS_METRIC)
    return pd.concat([evaluations, steps], ignore_index=True)


@pytest.fixture(scope="module")
def study():
    return records.load(STUDY)


@pytest.fixture(scope="module")
def tables(study, tmp_path_factory):
    """The study as two CSVs of six runs each."""
    directory = tmp_path_factory.mktemp("tables")
    table = as_table(study)
    runs = sorted(table["run"].unique())
    for name, part in (("first.csv", runs[:6]), ("second.csv", runs[6:])):
        table[table["run"].isin(part)].to_csv(directory / name, index=False)
    return directory


def test_a_table_analyses_as_the_run_directories(study, tables):
    table = records.load(tables / "first.csv", tables / "second.csv")  # two sources, combined
    assert len(table.steps) == len(study.steps) and len(table.evaluations) == len(study.evaluations)
    assert law(table, n_bootstrap=0).values == pytest.approx(law(study, n_bootstrap=0).values, rel=1e-9)
    loss = {"metric": "val-loss-200"}
    assert isoflop_analysis(table, **loss).table().equals(isoflop_analysis(study, **loss).table())
    assert loss_proxy(table).table().equals(loss_proxy(study).table())
    assert training_compute_fit(table).predict(1e3) == pytest.approx(training_compute_fit(study).predict(1e3))


def test_fit_and_figures_take_several_tables(tables, tmp_path, capsys):
    both = [str(tables / "first.csv"), str(tables / "second.csv")]
    fit = ["--x", "gflops", "--y", "fd_fashioncnn", "--json", "--where", "sampling_steps=8", "--where", "seed=0",
           "--where", "guidance_scale=1"]  # fit takes one protocol
    assert main(["fit", *both, *fit]) == 0
    from_tables = json.loads(capsys.readouterr().out)
    assert main(["fit", str(STUDY), *fit]) == 0
    assert from_tables["slope"] == pytest.approx(json.loads(capsys.readouterr().out)["slope"])
    assert main(["figures", *both]) == 2
    assert "need --out" in capsys.readouterr().err
    # Every figure the run directories give but those made of sample images, Fig. 13 from the train-loss rows.
    assert main(["figures", *both, "--out", str(tmp_path / "figures")]) == 0
    names = {p.name for p in (tmp_path / "figures").iterdir()}
    committed = {p.name for p in (STUDY / "figures").iterdir()}
    sample_images = {name for name in committed if name.startswith(("fig7_samples", "class_grids"))}
    of_the_study = {"fig9_validation_loss.png", "fig9_validation_loss.pdf"}  # `dit-scaling study` draws it
    assert sample_images and names == committed - sample_images - of_the_study, names ^ committed
    assert "fig13_loss.png" in names


def test_compare_draws_a_table_of_points(tmp_path, capsys):
    points = tmp_path / "unets.csv"
    points.write_text("name,gflops,fid,steps,batch_size\nU-Net A,100,12.0,400000,256\nU-Net B,50,15,800000,256\n")
    assert main(["compare", str(points), "--figures", str(tmp_path / "compare"), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 2
    assert (tmp_path / "compare" / "compare_fig9_training_compute.png").is_file()
    # U-Net B was not trained for the 400K steps of Fig. 8's fit: on Fig. 8 only U-Net A is drawn.
    assert (tmp_path / "compare" / "compare_fig8_gflops.png").is_file()


@pytest.mark.parametrize("line, cell, message", [
    (3, ("step", "abc"), "line 3, column 'step': is not a number"),
    (4, ("value", ""), "line 4, column 'value': an evaluation value that is missing"),
    (2, ("gflops", "-1"), "line 2, column 'gflops': non-positive or missing"),
    (5, ("metric", ""), "line 5, column 'metric': no metric name"),
    (6, ("value", "nan"), "line 6, column 'value': a training loss that is missing"),
])
def test_a_bad_cell_is_named_by_line_and_column(tmp_path, line, cell, message):
    rows = [{"run": "net", "gflops": 1.0, "batch_size": 64, "step": 1000 * (i + 1), "metric": "FID-10K",
             "value": 50.0 - i} for i in range(3)]
    rows += [{"run": "net", "gflops": 1.0, "batch_size": 64, "step": 500 * (i + 1), "metric": TRAINING_LOSS_METRIC,
              "value": 0.2 - 0.01 * i} for i in range(3)]
    table = pd.DataFrame(rows).astype(object)
    column, value = cell
    table.loc[line - 2, column] = value
    path = tmp_path / "bad.csv"
    table.to_csv(path, index=False)
    with pytest.raises(RecordsError, match=message):
        records.load(path)
