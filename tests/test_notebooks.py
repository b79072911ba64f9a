"""The notebooks run headless from notebooks/ and show what the analysis API computes for the same inputs."""

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from analysis.isoflop import isoflop_analysis
from analysis.planning import plan_budget, plan_target, to_paper_units
from analysis.records import load
from analysis.study import model_compute_fit, training_compute_fit

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["plan_compute_budget.ipynb", "compare_new_architecture.ipynb", "regenerate_paper_figures.ipynb"]
NUMBER = r"[-+]?[0-9][0-9,]*(?:\.[0-9]*)?(?:e[-+]?[0-9]+)?"


def execute(name: str) -> nbformat.NotebookNode:
    """Run every cell with the working directory notebooks/, as Jupyter does; a failing cell fails the test."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(o["text"] for o in outputs(notebook) if o["output_type"] == "stream" and o["name"] == "stdout")


def displayed(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    return [o["data"][mime] for o in outputs(notebook) if mime in o.get("data", {})]


def number(text: str) -> float:
    return float(text.replace(",", ""))


def line(pattern: str, text: str) -> re.Match:
    match = re.search(pattern, text, flags=re.MULTILINE)
    assert match, f"no line matches {pattern!r} in:\n{text}"
    return match


@pytest.fixture(scope="module")
def paper():
    return load(ROOT / "runs" / "paper")


@pytest.fixture(scope="module")
def frontier_fit(paper):
    return training_compute_fit(paper, metric="FID-50K", resolution=256)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_saved_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before saving"


def test_plan_compute_budget_prints_what_the_planning_api_computes(paper, frontier_fit):
    notebook = execute("plan_compute_budget.ipynb")
    text = printed(notebook)

    budget = line(rf"^budget ({NUMBER}) Gflops \(paper units\) = {NUMBER} true FLOPs = ({NUMBER}) chip-hours at "
                  rf"({NUMBER})% of ({NUMBER}) TFLOP/s$", text)
    chip_hours, utilization, peak = (number(budget.group(i)) for i in (2, 3, 4))
    compute = to_paper_units(chip_hours, "accelerator-hours", utilization=utilization / 100, chip_peak_tflops=peak)
    assert number(budget.group(1)) == pytest.approx(compute, rel=1e-6)
    assert number(budget.group(1)) == pytest.approx(chip_hours * 3600 * peak * 1e12 * utilization / 100 / 2e9,
                                                    rel=1e-6)  # paper units: true FLOPs / 2, in units of 1e9

    plan = plan_budget(frontier_fit, paper.runs, compute)
    after = text[budget.end():]
    config = line(rf"^  train (\S+) \(({NUMBER}) Gflops/image\) for ({NUMBER}) steps at batch ({NUMBER})$", after)
    assert config.group(1) == plan.model
    assert number(config.group(3)) == plan.steps and number(config.group(4)) == plan.batch_size
    predicted = line(rf"^  predicted FID-50K ({NUMBER})   95% confidence \[({NUMBER}), ({NUMBER})\], "
                     rf"prediction \[({NUMBER}), ({NUMBER})\]$", after)
    expected = [plan.predicted, *plan.confidence_interval, *plan.prediction_interval]
    assert [number(predicted.group(i)) for i in range(1, 6)] == pytest.approx(expected, abs=0.006)
    assert 5 < plan.predicted < 50  # a budget of this size lands between the paper's XL/2 checkpoints

    target = line(rf"^target FID-50K ({NUMBER})\n  least compute ({NUMBER}) Gflops", text)
    target_plan = plan_target(frontier_fit, paper.runs, number(target.group(1)))
    assert number(target.group(2)) == pytest.approx(target_plan.compute, rel=1e-3)

    # The committed miniature study (12 configs) supports the same planning.
    assert re.search(r"^metric FD-FashionCNN-\d+; protocol: ", text, re.MULTILINE)
    mini = load(ROOT / "runs" / "fmnist-default")
    # The parametric law's plans, on the miniature (1e4 Gflops) and on the paper's numbers (2,000 H100-hours), as
    # plan_budget_with_law makes them.
    from scaling.budget import plan_budget_with_law

    printed_optima = re.findall(rf"^optimal size ({NUMBER}) Gflops/image \[({NUMBER}), ({NUMBER})\]", text,
                                flags=re.MULTILINE)
    law_plans = [plan_budget_with_law(mini, 1e4, n_bootstrap=20).plan,
                 plan_budget_with_law(paper, 2000, chip="H100", chips=8, n_bootstrap=20).plan]
    assert len(printed_optima) == 2
    for optimum, law_plan in zip(printed_optima, law_plans, strict=True):
        assert [number(x) for x in optimum] == pytest.approx(
            [law_plan.optimal_gflops, *law_plan.optimal_gflops_interval], rel=5e-3)  # printed to 3 digits
    assert "fits fsdp" in text and "DiT of depth" in text  # the paper's plan: a size between, its memory
    # The held-out loss gives the isoFLOP law, with the plan it chooses.
    iso = isoflop_analysis(mini, metric="val-loss-200")
    if iso.size_law is None:  # too few budgets with an interior minimum: the notebook says why
        assert f"no law of the optimum: {iso.note}" in text
        assert len(displayed(notebook, "image/png")) >= 1
        return
    law = line(rf"^N_opt = ({NUMBER}) C\^({NUMBER}); 95% interval of the exponent \[({NUMBER}), ({NUMBER})\]", text)
    assert [number(law.group(i)) for i in (2, 3, 4)] == pytest.approx(
        [iso.size_law.exponent, *iso.size_law.exponent_ci], abs=6e-4)
    low, high = iso.fitted_range
    iso_plan = plan_budget(training_compute_fit(mini, metric="val-loss-200"), mini.runs, (low * high) ** 0.5, iso)
    chosen = line(r"^budget .* Gflops: optimal size .*; train (\S+) .* for ([0-9,]+) steps \((\S+)\)$", text)
    assert (chosen.group(1), number(chosen.group(2)), chosen.group(3)) == (iso_plan.model, iso_plan.steps, "isoFLOP")
    assert len(displayed(notebook, "image/png")) >= 2


def test_compare_new_architecture_prints_what_the_fits_give(paper, frontier_fit):
    from analysis.planning import compare_runs

    notebook = execute("compare_new_architecture.ipynb")
    text = printed(notebook)
    comparison = compare_runs(load(ROOT / "runs" / "fmnist-modern-dit"), load(ROOT / "runs" / "fmnist-default"))
    last = comparison.table[comparison.table["steps"] == comparison.table["steps"].max()].set_index("name")
    value = rf"{NUMBER}|inf"
    points = re.findall(rf"^(\S+) at (\d+) steps: FD ({NUMBER}); multiplier ({value}) \[({value}), ({value})\]",
                        text, flags=re.MULTILINE)
    assert sorted(name for name, *_ in points) == sorted(last.index) and len(points) == 4
    for name, _, fd, multiplier, lo, hi in points:
        row = last.loc[name]
        assert float(fd) == pytest.approx(row["value"], abs=0.05), name
        assert [float(multiplier), float(lo), float(hi)] == pytest.approx(
            [row["compute_multiplier"], row["compute_multiplier_lo"], row["compute_multiplier_hi"]], abs=0.006), name

    gflops_fit = model_compute_fit(paper, metric="FID-50K", step=400_000, resolution=256)
    unets = pd.read_csv(ROOT / "runs" / "paper" / "unet_gflops.csv").query("resolution == 256")
    fids = pd.read_csv(ROOT / "runs" / "paper" / "benchmarks_256.csv").set_index("model")["fid"]
    for model, gflops in zip(unets["model"], unets["total_gflops"], strict=True):
        placed = line(rf"^{re.escape(model)}: {gflops:g} Gflops, FID {fids[model]:.2f}; DiT at 400K steps with the "
                      rf"same Gflops: ({NUMBER}) \[({NUMBER}), ({NUMBER})\]", text)
        lo, hi = gflops_fit.prediction_interval([gflops])
        expected = [float(gflops_fit.predict([gflops])[0]), float(lo[0]), float(hi[0])]
        assert [number(placed.group(i)) for i in (1, 2, 3)] == pytest.approx(expected, abs=0.006), model
    assert len(displayed(notebook, "image/png")) == 3  # Fig. 8 and Fig. 9 with ModernDiT, the U-Nets


@pytest.mark.slow
def test_regenerate_paper_figures_writes_only_to_the_chosen_directory(tmp_path, monkeypatch):
    figures = pytest.importorskip("analysis.figures")
    monkeypatch.setenv("DIT_SCALING_FIGURES_DIR", str(tmp_path))
    notebooks_before = sorted(NOTEBOOKS.iterdir())
    runs_before = _files_under(ROOT / "runs")
    notebook = execute("regenerate_paper_figures.ipynb")
    text = printed(notebook)

    paper_dir = tmp_path / "paper"
    for name in figures.FIGURES:  # each figure is written, or skipped with its reason printed
        assert (paper_dir / f"{name}.png").is_file() or line(rf"^  {name}: \S", text)
    for name in ("fig2_bubble", "fig8_gflops_fit", "fig9_training_compute"):
        assert (paper_dir / f"{name}.png").is_file() and (paper_dir / f"{name}.pdf").is_file()
    line(r"^  fig13_loss: \S", text)  # the paper's records hold no training-loss logs

    table = (paper_dir / "table4.md").read_text()
    assert "### Table 4\n\n" + table in displayed(notebook, "text/markdown")
    rows = table.splitlines()
    for row in pd.read_csv(ROOT / "runs" / "paper" / "table4.csv").itertuples():
        steps = f"{row.train_steps // 1000}K"
        assert any(r.startswith(f"| {row.model} | {row.resolution} | {row.block} |") and f"| {steps} |" in r
                   and r.endswith(f"| {row.fid50k_noguidance:.2f} |") for r in rows), row
    assert len(displayed(notebook, "image/png")) >= 3

    assert (tmp_path / "fmnist-default" / "report.md").is_file()
    assert (tmp_path / "fmnist-default" / "fig9_training_compute.png").is_file()
    assert sorted(NOTEBOOKS.iterdir()) == notebooks_before
    assert _files_under(ROOT / "runs") == runs_before  # nothing written beside the records (`make run` may have)


def _files_under(directory: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()}
