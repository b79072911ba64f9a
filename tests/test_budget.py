"""`plan --budget`: a budget in chip-hours planned with the parametric law. The split with the evaluation's cost
against a brute-force search over sizes, the plan on records of a known surface (sizes, steps and predictions from
the surface itself), a DiT between the paper's sizes against the model's own Gflops count, the memory against the
grid's dry run, and bad input refused."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from run_helpers import REPO

from analysis import records
from analysis.chips import CHIPS
from analysis.law import law, optimal_allocation
from analysis.planning import ModelSize, evaluation_cost, plan_with_law, to_paper_units
from analysis.schema import RecordsError
from models.dit import dit_config
from models.flops import dit_compute
from scaling import config as config_lib
from scaling.budget import plan_budget_with_law, size_at, trained_shapes
from scaling.cli import main
from scaling.cost import run_cost

TRUE = {"E": 10.0, "A": 2.0, "alpha": 0.4, "B": 5000.0, "beta": 0.7}
SURFACE_GFLOPS = (0.36, 1.41, 5.56, 6.06, 23.0, 29.1, 80.7, 118.6)  # the paper's S/8, S/4, B/8, S/2, ... XL/2


def surface(sizes, images):
    return TRUE["E"] + TRUE["A"] / np.asarray(sizes) ** TRUE["alpha"] + TRUE["B"] / np.asarray(images) ** TRUE["beta"]


@pytest.fixture(scope="module")
def surface_records(tmp_path_factory):
    """Records of 8 runs on the surface, each evaluated at 6 steps (batch 256) under FID-10K with 250 steps."""
    rows = [{"run": f"run{i}", "gflops": g, "batch_size": 256, "step": step, "metric": "FID-10K",
             "value": float(surface(g, 256 * step)), "sampling_steps": 250, "num_samples": 10_000}
            for i, g in enumerate(SURFACE_GFLOPS) for step in (2_000, 4_000, 8_000, 16_000, 32_000, 64_000)]
    path = tmp_path_factory.mktemp("surface") / "runs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return records.load(path)


def test_the_split_with_evaluation_is_the_brute_force_optimum():
    budget, per_size = 1e9, 2.5e6  # a 10K-sample, 250-step evaluation per Gflops/image
    optimum = optimal_allocation(TRUE, budget, per_size)
    sizes = np.geomspace(1e-2, budget / per_size * (1 - 1e-9), 400_001)
    metric = surface(sizes, (budget - per_size * sizes) / (3 * sizes))
    assert optimum["size"] == pytest.approx(sizes[np.argmin(metric)], rel=1e-3)
    assert optimum["value"] == pytest.approx(metric.min(), rel=1e-9)
    assert optimum["training"] + per_size * optimum["size"] == pytest.approx(budget)
    # Paying for the evaluation moves the optimum to a smaller model than the closed form's.
    assert optimum["size"] < optimal_allocation(TRUE, budget)["size"]
    assert optimal_allocation(TRUE, budget, 0.0)["training"] == budget


def test_the_plan_on_a_known_surface(surface_records):
    fit = law(surface_records, n_bootstrap=20)
    points = surface_records.evaluations
    per_size, note = evaluation_cost(points, evaluations=2)
    assert per_size == 2 * 10_000 * 250 and "10,000 samples x 250" in note
    budget = 3 * 118.6 * 256 * 64_000 * 4  # four times the largest run's training compute
    sizes = [ModelSize("XL/2", 118.6, trained=True), ModelSize("between", 50.0, trained=False)]
    plan = plan_with_law(fit, points, budget, lambda optimum: sizes, batch_size=256, evaluations=2)
    truth = optimal_allocation(TRUE, budget, per_size)
    assert plan.optimal_gflops == pytest.approx(truth["size"], rel=1e-3)
    assert plan.optimal_value == pytest.approx(truth["value"], rel=1e-4)
    for choice in plan.choices:
        n = choice.size.gflops
        assert choice.evaluation_compute == pytest.approx(per_size * n)
        assert choice.training_compute + choice.evaluation_compute == pytest.approx(budget)
        assert choice.steps == int(choice.training_compute / (3 * n) // 256)
        assert choice.predicted == pytest.approx(float(surface(n, choice.images)), rel=1e-4)
        assert choice.compute_beyond_trained == pytest.approx(choice.training_compute / (3 * 118.6 * 256 * 64_000))
    assert any("XL/2 extrapolates" in flag for flag in plan.flags)


def test_a_size_between_the_papers_configs_has_the_gflops_asked_for():
    family = [dit_config(f"{size}/2") for size in ("S", "B", "L", "XL")]
    assert size_at(family, dit_compute(family[3]).gflops) == family[3]  # a trained size is itself
    for target in (40.0, 300.0):
        between = size_at(family, target)
        assert dit_compute(between).gflops == pytest.approx(target, rel=0.08), between  # the model's own count
        assert between.hidden_size // between.num_heads in (64, 72)  # the nearest paper size's head dimension
        assert between.hidden_size % between.num_heads == 0
    bigger = size_at(family, 300.0)
    assert bigger.depth > 28 and bigger.hidden_size > 1152  # past XL/2, depth and width grow as from L to XL


def test_the_paper_records_name_their_architectures():
    shapes = trained_shapes(records.load(REPO / "runs" / "paper"))
    assert shapes["paper:DiT-XL/2"] == dit_config("XL/2", input_size=32)
    assert dit_compute(shapes["paper:DiT-XL/2"]).gflops == pytest.approx(118.6, rel=0.01)


def test_the_budget_plan_uses_the_dry_runs_memory_and_chip_table(surface_records, tmp_path):
    result = plan_budget_with_law(records.load(REPO / "runs" / "paper"), 300, chip="H100", chips=8,
                                  n_bootstrap=5)
    assert result.plan.budget == pytest.approx(300 * 3600 * CHIPS["H100"].peak_flops * 0.4 / 2 / 1e9)
    assert result.plan.budget == to_paper_units(300, "accelerator-hours", chip="H100")
    xl2 = next(i for i, c in enumerate(result.plan.choices) if c.size.name.startswith("DiT-XL/2"))
    config = config_lib.load_config("imagenet256:XL/2")
    dry_run = run_cost(config, chip="H100", chips=8, utilization=0.4)
    memory = result.memory[xl2]
    for key in ("state_replicated", "state_fsdp", "activations", "fits"):
        assert memory[key] == dry_run[key], key
    assert memory["params"] == pytest.approx(675e6, rel=0.01)  # the paper's 675M


def test_the_budget_command(capsys):
    study = str(REPO / "runs" / "fmnist-default")
    assert main(["plan", "--budget", "1e4", "--records", study, "--bootstrap", "5", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["metric"] == "FD-FashionCNN-250" and plan["batch_size"] == 16
    assert all(math.isclose(c["training_compute"] + c["evaluation_compute"], 1e4) for c in plan["choices"])
    assert plan["choices"][0]["size"]["trained"] and "DiT" in plan["choices"][0]["size"]["name"]
    # A budget whose optimum lies far past the trained sizes is refused, saying how far and what to do.
    assert main(["plan", "--budget", "1e12", "--records", study, "--bootstrap", "0"]) == 2
    assert "the law is not extrapolated past 100x" in capsys.readouterr().err
    assert main(["plan", "--budget", "10", "--unit", "flops", "--records", study]) == 2
    assert "--unit and --chip-peak-tflops are --compute's" in capsys.readouterr().err


def test_a_law_without_a_data_term_has_no_split():
    with pytest.raises(RecordsError, match=r"data \(beta\) term does not fall"):
        optimal_allocation({**TRUE, "beta": 0.0}, 1e9)
