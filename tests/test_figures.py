"""Paper figures, Table 4 and the report, from the paper's records and from a small synthetic study."""

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from records_factory import a_manifest

from analysis import figures, proxy, report, schema, study, style, tables
from analysis.records import load
from analysis.schema import RecordsError

REPO = Path(__file__).resolve().parent.parent
PAPER_DIR = REPO / "runs" / "paper"

# Synthetic study: (model, block) -> forward Gflops per image, params. Small DiTs on 32x32 Fashion-MNIST.
STUDY_RUNS = {
    ("DiT-S/8", "adaLN-Zero"): (0.00055, 55_872),
    ("DiT-S/4", "adaLN-Zero"): (0.0022, 51_168),
    ("DiT-S/2", "adaLN-Zero"): (0.0148, 49_992),
    ("DiT-B/8", "adaLN-Zero"): (0.0019, 191_488),
    ("DiT-B/4", "adaLN-Zero"): (0.0076, 182_176),
    ("DiT-B/2", "adaLN-Zero"): (0.0304, 180_000),
    ("DiT-S/2", "in-context"): (0.0150, 45_000),
}
STUDY_BATCH = 32
STUDY_EVAL_STEPS = (400, 800, 1200)
STUDY_VALIDATION_STEPS = tuple(range(100, 1201, 100))
STUDY_SAMPLING_STEPS = (10, 25, 50)
STUDY_FLOOR = 8.0  # what real images score: the sample metric's floor


def write_study_run(runs_dir: Path, model: str, block: str, *, evaluations: bool = True) -> Path:
    """One run directory written through the schema, as `dit-scaling train` writes it."""
    gflops, params = STUDY_RUNS[(model, block)]
    name = model.replace("/", "-") + ("" if block == "adaLN-Zero" else f"-{block}")
    size, patch = model.removeprefix("DiT-").split("/")
    workdir = runs_dir / name
    schema.write_manifest(workdir, a_manifest(model_name=model, size=size, patch=int(patch), block=block,
                                              gflops_per_image=gflops, macs_per_image=int(gflops * 1e9),
                                              params=params, global_batch=STUDY_BATCH))
    rng = np.random.default_rng(len(name))
    schema.write_jsonl(workdir / schema.STEPS_FILE, [schema.StepRecord.of(
        step=step, global_batch=STUDY_BATCH, gflops_per_image=gflops,
        loss=0.05 + 0.2 * (step / 50) ** -0.5 / (1 + 50 * gflops) + 0.01 * rng.random(), mse=0.1, vb=0.002,
        grad_norm=1.0, wall_time=step / 10, time=0.0, step_time=0.1, flops_per_step=1e9, peak_flops=1e12).to_json()
        for step in range(50, 1201, 50)])
    if evaluations:
        # Bigger models reach lower FD in fewer steps; fewer sampling steps and other blocks cost a little.
        penalty = 1.3 if block != "adaLN-Zero" else 1.0
        samples = [schema.EvaluationRecord.of(
            step=step, metric="FD-FashionCNN-400",
            value=penalty * (15 + 150 * (step / 400) ** -0.5 * (gflops / 5e-4) ** -0.3) * (1 + 1 / sampling_steps),
            protocol=schema.EvaluationProtocol(
                sampler="ddim", sampling_steps=sampling_steps, guidance_scale=1.0, guidance_channels=None,
                num_samples=400, seed=0, uint8_convention="dit", reference="fashion_mnist:train[:10000]",
                feature_network="FashionCNN(epochs=2)"),
            gflops_per_image=gflops, global_batch=STUDY_BATCH, details={"floor": STUDY_FLOOR}).to_json()
            for step in STUDY_EVAL_STEPS for sampling_steps in STUDY_SAMPLING_STEPS]
        # The held-out loss, evaluated more densely: E + A / N^0.5 + B / D^0.5, an optimum that moves with compute.
        held_out = schema.EvaluationProtocol(
            sampler=None, sampling_steps=None, guidance_scale=None, guidance_channels=None, num_samples=64, seed=0,
            uint8_convention=None, reference="fashion_mnist:test[:64]",
            feature_network="none: noise-prediction MSE at timesteps [250, 750]")
        losses = [schema.EvaluationRecord.of(
            step=step, metric=schema.metric_name(schema.VALIDATION_FAMILY, 64),
            value=penalty * (0.03 + 4e-4 * gflops ** -0.5 + 2.0 * (step * STUDY_BATCH) ** -0.5), protocol=held_out,
            gflops_per_image=gflops, global_batch=STUDY_BATCH).to_json() for step in STUDY_VALIDATION_STEPS]
        schema.write_jsonl(workdir / schema.EVALUATIONS_FILE, samples + losses)
    return workdir


@pytest.fixture(scope="module")
def paper():
    return load(PAPER_DIR)


@pytest.fixture(scope="module")
def paper_scaling(paper):
    """The 12 configs at 256px with adaLN-Zero, FID-50K: the points of Figs. 2 and 8."""
    return paper.where(block="adaLN-Zero", resolution=256, metric="FID-50K")


@pytest.fixture(scope="module")
def paper_frontier_fit(paper):
    return study.training_compute_fit(paper, resolution=256)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("study")
    for model, block in STUDY_RUNS:
        write_study_run(runs_dir, model, block)
    return runs_dir


@pytest.fixture(scope="module")
def paper_rendered(paper, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("paper_figures")
    return out_dir, *report.render_all(paper, out_dir)


@pytest.fixture(scope="module")
def study_rendered(study_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("study_figures")
    return out_dir, *report.render_all(load(study_dir), out_dir)


def _assert_valid_outputs(paths):
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 or path.suffix in (".md", ".tex"), path
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
        elif path.suffix == ".pdf":
            assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF"), path


def test_a_runs_size_and_patch_come_from_its_columns():
    assert style.dit_size_and_patch("XL", 2.0) == ("XL", 2)
    assert style.dit_size_and_patch(np.nan, np.nan) == (None, None)
    assert style.dit_size_and_patch("M", 2) == (None, None)  # not one of the paper's sizes
    assert style.config_label("DiT-XL/2", "XL", 2) == "XL/2" and style.config_label("ADM", None, None) == "ADM"


def test_render_all_on_the_paper_records(paper_rendered):
    out_dir, written, skipped = paper_rendered
    drawn = ["fig2_bubble", "fig5_conditioning", "fig8_gflops_fit", "fig9_training_compute", "fig10_sampling_compute"]
    expected = {f"{name}.{ext}" for name in drawn for ext in ("png", "pdf")} | {"table4.md", "table4.tex",
                                                                               "report.md"}
    assert {p.name for p in written} == expected
    assert all(p.parent == out_dir for p in written)
    _assert_valid_outputs(written)
    # One run (XL/2) has a curve: Fig. 6 compares curves and isoFLOP profiles need them; the paper records hold
    # no training losses and no held-out loss.
    assert set(skipped) == {"fig6_curves", "fig7_samples", "class_grids", "fig13_loss", "isoflop_profiles",
                            "isoflop_profiles_loss", "loss_to_metric"}
    assert "11 of 12 configs have a single evaluation" in skipped["isoflop_profiles"]
    assert "no held-out loss" in skipped["isoflop_profiles_loss"] and "no held-out loss" in skipped["loss_to_metric"]
    assert "two or more steps" in skipped["fig6_curves"]
    assert "training-step records" in skipped["fig13_loss"]

    text = (out_dir / "report.md").read_text()
    # The 512px run and the other blocks are left out of the scaling figures, and the report says so.
    assert "left out: paper:DiT-XL/2-512px, paper:DiT-XL/2-in-context" in text
    assert "Fig. 10 uses FID-10K" in text
    assert "Leave-largest-out check" in text and "Convergence: converged" in text
    for name in drawn:
        assert f"]({name}.png)" in text
    for name in skipped:
        assert f"- {name}: " in text


def test_the_report_states_the_study_fits(paper, paper_rendered, paper_frontier_fit):
    out_dir, _, _ = paper_rendered
    text = (out_dir / "report.md").read_text()
    fit = study.model_compute_fit(paper)
    lo, hi = fit.slope_ci
    assert (f"log10 FID-50K = {fit.intercept:.3f} - {abs(fit.slope):.3f} log10 Gflops at 400K steps: slope "
            f"{fit.slope:.3f} (95% CI {lo:.3f} to {hi:.3f}, bootstrap over 12 configs)") in text
    law = paper_frontier_fit.law
    assert (f"scale {law.scale:.3g} " in text and f"exponent {law.exponent:.3f} " in text
            and f"(C / {law.x_ref:.3g})^-exponent" in text)


def test_render_all_on_a_study_writes_every_figure(study_dir, study_rendered):
    out_dir, written, skipped = study_rendered
    # The samples' curves span 3x in compute each, too little for three of them to meet at one budget; the
    # held-out loss, evaluated from step 100, spans 12x.
    assert set(skipped) == {"isoflop_profiles", "fig7_samples", "class_grids"}
    assert "too little compute" in skipped["isoflop_profiles"]
    # Written records keep no samples: the sample figures say how to get them (the tiny study draws them).
    assert "no guided evaluations" in skipped["fig7_samples"] and "keep no samples" in skipped["class_grids"]
    expected = {f"{name}.{ext}" for name in figures.FIGURES if name not in skipped for ext in ("png", "pdf")}
    assert expected | {"table4.md", "table4.tex", "report.md"} == {p.name for p in written}
    _assert_valid_outputs(written)
    text = (out_dir / "report.md").read_text()
    # Three equally common protocols (one per sampling-step count): the most faithful sampler is kept.
    assert "Protocol: FD-FashionCNN-400 sampler=ddim sampling_steps=50" in text
    assert "sampling_steps=10 (" in text and "sampling_steps=25 (" in text
    assert "left out: DiT-S-2-in-context" in text
    mapping = proxy.loss_proxy(load(study_dir))
    assert (f"FD-FashionCNN-400 from val-loss-64 over {len(mapping.pairs)} (config, step) pairs of 6 configs: best "
            f"form {mapping.best.form.formula}") in text
    assert "## Compute-optimal size (isoFLOP profiles)" in text and "val-loss-64 (6 configs): " in text


def test_table4_lists_the_papers_fids(paper):
    markdown = tables.table4_markdown(paper)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()[2:]]
    header = [cell.strip() for cell in markdown.splitlines()[0].strip("|").split("|")]
    assert header == ["Model", "Res.", "Block", "Gflops", "Params (M)", "Steps", "FID-50K"]
    table4 = pd.read_csv(PAPER_DIR / "table4.csv")
    assert len(rows) == len(table4)
    published = table4[(table4["train_steps"] == 400_000) & (table4["block"] == "adaLN-Zero")]
    assert len(published) == 12
    # The 12 configs come first, in the paper's order, with their FIDs and Gflops.
    for row, expected in zip(rows[:12], published.itertuples(), strict=True):
        assert row[0] == expected.model and row[5] == "400K" and row[2] == "adaLN-Zero"
        assert float(row[6]) == pytest.approx(expected.fid50k_noguidance)
        assert float(row[3]) == pytest.approx(expected.gflops)
    assert ["DiT-XL/2", "256", "adaLN-Zero", "118.64", "675", "7000K", "9.62"] in rows
    assert ["DiT-XL/2", "512", "adaLN-Zero", "524.54", "675", "3000K", "11.93"] in rows

    latex = tables.table4_latex(paper)
    assert latex.startswith("\\begin{tabular}{lrlrrrr}") and "\\toprule" in latex and "\\bottomrule" in latex
    assert "DiT-XL/2 & 256 & adaLN-Zero & 118.64 & 675 & 400K & 19.47 \\\\" in latex
    assert latex.count("\\\\") == len(table4) + 1  # the rows and the header


def _line(ax, label_start: str):
    (line,) = [line for line in ax.get_lines() if line.get_label().startswith(label_start)]
    return line


@pytest.mark.parametrize("subset", [{}, {"block": "adaLN-Zero"}, {"resolution": 256, "metric": "FID-50K"}])
def test_fig8_draws_the_study_fit(paper, subset):
    # The same points as study: the 12 configs at 256px with adaLN-Zero, FID-50K at 400K steps, whatever else
    # the records hold (other blocks, 512px, FID-10K).
    records = paper.where(**subset)
    (ax,) = figures.fig8_gflops_fit(records).axes
    fit = study.model_compute_fit(records)
    assert fit.n_configs == 12 and fit.metadata["step"] == 400_000
    annotation = ax.get_legend().get_title().get_text()
    numbers = dict(re.findall(r"(slope|Pearson r|Spearman r) = (-?\d+\.\d+)", annotation))
    assert numbers == {"slope": f"{fit.slope:.3f}", "Pearson r": f"{fit.pearson_r:.3f}",
                       "Spearman r": f"{fit.spearman_r:.3f}"}
    assert fit.slope < -0.3 and fit.pearson_r < -0.9  # the paper's strong negative correlation
    assert "12 configs" in annotation and "400K" in ax.get_title()
    line = _line(ax, "log-log fit")
    np.testing.assert_allclose(line.get_ydata(), fit.predict(line.get_xdata()))
    # Every config is labelled once, the way the paper names them.
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (8, 4, 2))


def test_fig9_draws_the_study_fit(paper, paper_frontier_fit):
    (ax,) = figures.fig9_training_compute(paper, resolution=256).axes
    fit = paper_frontier_fit
    law_line = _line(ax, "fit:")
    np.testing.assert_allclose(law_line.get_ydata(), fit.predict(law_line.get_xdata()))
    assert f"^{{-{fit.law.exponent:.3f}}}$" in law_line.get_label()
    frontier = _line(ax, "compute frontier")
    np.testing.assert_allclose(frontier.get_xdata(), fit.frontier.grid["x"])
    np.testing.assert_allclose(frontier.get_ydata(), fit.frontier.grid["y"])
    assert len(ax.get_lines()) == 12 + 2  # a curve per config, the frontier and the law


def test_fig10_draws_the_study_tradeoff(study_dir):
    records = load(study_dir)
    (ax,) = figures.fig10_sampling_compute(records).axes
    tradeoff = study.sampling_tradeoff(records)
    frontier = _line(ax, "frontier")
    np.testing.assert_allclose(frontier.get_xdata(), tradeoff.frontier.grid["x"])
    np.testing.assert_allclose(frontier.get_ydata(), tradeoff.frontier.grid["y"])
    assert f"{tradeoff.metadata['step']} training steps" in ax.get_title()


def test_fig2_uses_the_step_most_configs_share(paper_scaling):
    fig = figures.fig2_bubble(paper_scaling)
    (ax,) = fig.axes
    assert "400K" in ax.get_title() and ax.get_xscale() == "log"
    (bubbles,) = ax.collections
    areas = bubbles.get_sizes()
    assert len(areas) == 12
    gflops = bubbles.get_offsets()[:, 0]
    np.testing.assert_allclose(areas / areas.max(), gflops / gflops.max())  # area proportional to Gflops


def test_fig5_draws_bars_for_single_step_blocks_and_lines_for_curves(paper, study_dir):
    fig = figures.fig5_conditioning(paper.where(resolution=256, metric="FID-50K"))
    (ax,) = fig.axes
    assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == [
        "in-context", "cross-attention", "adaLN", "adaLN-Zero"]
    assert [p.get_width() for p in ax.patches] == pytest.approx([35.24, 26.14, 25.21, 19.47])

    study = load(study_dir).where(sampling_steps=50)
    (ax,) = figures.fig5_conditioning(study).axes
    assert len(ax.get_lines()) == 2 and all(len(line.get_xdata()) == 3 for line in ax.get_lines())


def test_figures_the_records_cannot_support_say_why(paper, paper_scaling, study_dir):
    with pytest.raises(RecordsError, match="two or more steps"):
        figures.fig6_curves(paper_scaling)
    with pytest.raises(RecordsError, match="training-step records"):
        figures.fig13_loss(paper)
    with pytest.raises(RecordsError, match=r"no evaluations at step 1000; evaluated steps: \[400000, "):
        figures.fig8_gflops_fit(paper, step=1000)
    with pytest.raises(RecordsError, match="metric='FID-10K'"):  # FID-50K was sampled with 250 steps only
        figures.fig10_sampling_compute(paper, metric="FID-50K")
    with pytest.raises(RecordsError, match="one block only"):
        figures.fig5_conditioning(load(study_dir).where(block="adaLN-Zero", sampling_steps=50))
    with pytest.raises(RecordsError, match="no 'FID-50K' points"):
        figures.fig2_bubble(load(study_dir), metric="FID-50K")


def test_fig10_plots_every_model_across_sampling_steps(study_dir):
    study = load(study_dir).where(block="adaLN-Zero")
    fig = figures.fig10_sampling_compute(study)
    (ax,) = fig.axes
    assert "1200 training steps" in ax.get_title()
    model_lines = [line for line in ax.get_lines() if line.get_label() != "frontier"
                   and not line.get_label().startswith("floor")]
    assert len(model_lines) == 6 and all(len(line.get_xdata()) == 3 for line in model_lines)


def test_sample_metric_figures_draw_the_floor_where_the_records_hold_it(study_dir, paper_scaling):
    records = load(study_dir).where(block="adaLN-Zero")
    for figure in (figures.fig8_gflops_fit(records), figures.fig9_training_compute(records),
                   figures.fig10_sampling_compute(records)):
        (ax,) = figure.axes
        floor = _line(ax, "floor: real held-out images")
        assert set(floor.get_ydata()) == {STUDY_FLOOR} and ax.get_ylim()[0] < STUDY_FLOOR
        assert ax.get_yscale() == "log"
    (ax,) = figures.fig8_gflops_fit(paper_scaling).axes  # the paper's records state no floor
    assert not [line for line in ax.get_lines() if line.get_label().startswith("floor")]


def test_fig9_without_enough_frontier_points_draws_the_curves_and_says_why(paper_scaling):
    points = paper_scaling.evaluations
    (ax,) = figures.fig9_training_compute(points[points["model"].isin(["DiT-S/8", "DiT-S/4"])]).axes
    assert any(t.get_text().startswith("power law not fitted: a frontier fit needs at least 4 configs")
               for t in ax.texts)
    assert {line.get_label() for line in ax.get_lines()} == {"S/8", "S/4", "compute frontier"}


def test_render_all_without_evaluations_draws_the_loss_only(tmp_path):
    for model in ("DiT-S/8", "DiT-S/2"):
        write_study_run(tmp_path / "runs", model, "adaLN-Zero", evaluations=False)
    written, skipped = report.render_all(load(tmp_path / "runs"), tmp_path / "out")
    assert {p.name for p in written} == {"fig13_loss.png", "fig13_loss.pdf", "report.md"}
    assert set(skipped) == {*figures.FIGURES, "table4"} - {"fig13_loss"}
    assert all("no evaluations" in reason for reason in skipped.values())


def test_where_keeps_the_steps_and_evaluations_of_the_runs_it_keeps(study_dir):
    records = load(study_dir)
    assert "block" not in records.steps.columns
    in_context = records.where(block="in-context")
    assert in_context.runs["run"].tolist() == ["DiT-S-2-in-context"]
    assert set(in_context.steps["run"]) == set(in_context.evaluations["run"]) == {"DiT-S-2-in-context"}
    assert len(in_context.steps) == (records.steps["run"] == "DiT-S-2-in-context").sum() == 24
    # A condition on a column the runs table lacks keeps every run, and filters the tables that have it.
    late = records.where(step=1200)
    assert len(late.runs) == 7 and set(late.steps["step"]) == set(late.evaluations["step"]) == {1200}
    # So the loss figure of one block draws that block's runs only: a raw and a smoothed line each.
    (ax,) = figures.fig13_loss(records.where(block="adaLN-Zero")).axes
    assert len(ax.get_lines()) == 2 * 6


# A user's own runs as a CSV: no block, resolution or sampling columns, no DiT size and patch.
USER_RUNS = {"mynet-tiny": 0.5, "mynet-small": 1.0, "mynet-base": 2.0, "mynet-large": 4.0, "mynet-huge": 8.0}
USER_STEPS = (1000, 2000, 4000)


@pytest.fixture(scope="module")
def user_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "user.csv"
    pd.DataFrame([{"run": run, "gflops": gflops, "batch_size": 64, "step": step, "metric": "FID-10K",
                   "value": 10 + 80 * (step / 1000) ** -0.5 * gflops ** -0.3}
                  for run, gflops in USER_RUNS.items() for step in USER_STEPS]).to_csv(path, index=False)
    return path


def _font_log_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.split(".")[0] in ("fontTools", "matplotlib")]


def test_render_all_on_a_users_csv_draws_what_it_supports(user_csv, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # as `dit-scaling` sets it: font subsetting must not flood the console
    records = load(user_csv)
    assert records.runs["block"].isna().all() and records.evaluations["sampling_steps"].isna().all()
    written, skipped = report.render_all(records, tmp_path)
    drawn = ["fig2_bubble", "fig6_curves", "fig8_gflops_fit", "fig9_training_compute"]
    assert {p.name for p in written} == ({f"{name}.{ext}" for name in drawn for ext in ("png", "pdf")}
                                         | {"table4.md", "table4.tex", "report.md"})
    _assert_valid_outputs(written)
    assert _font_log_records(caplog) == []
    assert set(skipped) == {"fig5_conditioning", "fig7_samples", "class_grids", "fig10_sampling_compute",
                            "fig13_loss", "isoflop_profiles", "isoflop_profiles_loss", "loss_to_metric"}
    assert "name no run's block" in skipped["fig5_conditioning"]
    assert "no sampling_steps" in skipped["fig10_sampling_compute"]
    assert "training-step records" in skipped["fig13_loss"]

    # Table 4: every run and step, smallest model first; the columns the CSV does not give are left out.
    markdown = (tmp_path / "table4.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == "| Model | Gflops | Steps | FID-10K |"
    models = [line.strip("|").split("|")[0].strip() for line in lines[2:]]
    assert models == [run for run in USER_RUNS for _ in USER_STEPS]
    text = (tmp_path / "report.md").read_text()
    assert markdown in text and "bootstrap over 5 configs" in text
    assert "one curve per run (not grouped by patch and size" in text
    for name in skipped:
        assert f"- {name}: " in text


def test_fig6_draws_runs_not_named_dit_in_one_panel(user_csv):
    records = load(user_csv)
    fig = figures.fig6_curves(records)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label().split(" (")[0] for line in lines] == list(USER_RUNS)
    assert all(list(line.get_xdata()) == list(USER_STEPS) for line in lines)
    assert "no run is a DiT config with a size and patch" in fig._suptitle.get_text()
    # With one curve left, the reason counts every run, not only DiT-named ones.
    one_curve = records.evaluations
    one_curve = one_curve[(one_curve["run"] == "mynet-huge") | (one_curve["step"] == 4000)]
    with pytest.raises(RecordsError, match=r"only 1 run\(s\) \['mynet-huge'\] have FID-10K at two or more steps"):
        figures.fig6_curves(one_curve)


def test_fig6_names_the_runs_it_leaves_out_of_the_dit_panels(study_dir):
    points = load(study_dir).where(sampling_steps=50, block="adaLN-Zero").evaluations
    other = points[points["run"] == "DiT-S-8"].assign(run="mynet", model="mynet", size=None, patch=None)
    fig = figures.fig6_curves(pd.concat([points, other]))
    assert [ax.get_title() for ax in fig.axes] == ["Patch size 8", "Patch size 4", "Patch size 2", "DiT-S", "DiT-B"]
    assert fig._suptitle.get_text().endswith("not grouped by patch and size): mynet")


def test_saving_figures_keeps_font_subsetting_quiet(paper_scaling, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    font_logger = logging.getLogger("fontTools")
    level = font_logger.level
    fig = figures.fig2_bubble(paper_scaling)
    style.save_figure(fig, tmp_path, "fig2_bubble")
    assert (tmp_path / "fig2_bubble.pdf").stat().st_size > 1000
    assert _font_log_records(caplog) == []
    assert font_logger.level == level  # restored after the save


def test_the_report_answers_the_sampling_question(study_dir, study_rendered):
    out_dir, _, _ = study_rendered
    text = (out_dir / "report.md").read_text()
    section = text.split("## Sampling compute (Fig. 10)\n")[1].split("\n## ")[0]
    tradeoff = study.sampling_tradeoff(load(study_dir), metric="FD-FashionCNN-400")
    assert f"at {tradeoff.metadata['step']} training steps" in section
    *ranges, last = tradeoff.winners.itertuples()
    for row in ranges:
        assert f"- {row.pair}: {row.budget_from:.3g} to {row.budget_to:.3g}\n" in section
    assert f"- {last.pair}: at {last.budget_from:.3g} (the largest budget evaluated)" in section  # its own point
    assert not tradeoff.smaller_beats_larger.empty  # DiT-B/8 (fewer Gflops) with 25 or 50 steps beats S/4 with 10
    assert ("Yes:" if tradeoff.sampling_compensates else "Only with more sampling compute:") in section
    row = tradeoff.smaller_beats_larger.iloc[0]
    assert f"in {len(tradeoff.smaller_beats_larger)} case(s) a smaller model sampled with more steps" in section
    assert " beats " in section and f"{row.model_smaller} with " in text


def _tradeoff(winners: list[tuple], beats: list[tuple]) -> SimpleNamespace:
    """A stand-in for study.SamplingTradeoff with pairs named by run, as a later study may name them."""
    columns = ["model_smaller", "sampling_steps_smaller", "value_smaller", "model_larger", "sampling_steps_larger",
               "value_larger", "at_most_the_compute"]
    points = pd.DataFrame({"run": ["a", "a", "b", "b"], "sampling_steps": [10, 50, 10, 50]})
    tradeoff = SimpleNamespace(points=points, metadata={"metric": "FID-10K", "step": 400_000},
                               winners=pd.DataFrame(winners, columns=["pair", "budget_from", "budget_to"]),
                               smaller_beats_larger=pd.DataFrame(beats, columns=columns))
    tradeoff.below_saturation = lambda saturated: study.SamplingTradeoff.below_saturation(tradeoff, saturated)
    return tradeoff


def test_the_sampling_section_reads_pairs_of_any_name():
    text = "\n".join(report._sampling_lines(_tradeoff([("run-a @ 10", 1.0, 5.0), ("run-b @ 50", 5.0, 40.0)], []), []))
    assert "4 (model, sampling steps) pairs" in text and "at 400K training steps" in text
    assert "- run-a @ 10: 1 to 5\n- run-b @ 50: 5 to 40" in text
    assert "No: no smaller model sampled with more steps" in text

    costly = [("DiT-S/2", 50, 20.0, "DiT-B/2", 10, 21.0, False)]
    text = "\n".join(report._sampling_lines(_tradeoff([("run-b @ 50", 1.0, 40.0)], costly), []))
    assert "Only with more sampling compute: in 1 case(s)" in text
    assert "- DiT-S/2 with 50 steps (20.00) beats DiT-B/2 with 10 steps (21.00), with more sampling compute." in text

    cheap = [*costly, ("DiT-S/4", 25, 18.0, "DiT-B/2", 10, 21.0, True)]
    text = "\n".join(report._sampling_lines(_tradeoff([("run-b @ 50", 1.0, 40.0)], cheap), []))
    assert "Yes: in 2 case(s)" in text and "1 of them at no more sampling compute" in text
    assert "- DiT-S/4 with 25 steps (18.00) beats DiT-B/2 with 10 steps (21.00)." in text
    assert "DiT-S/2 with 50" not in text  # the examples are those at no more compute

    # Sampling saturated from 25 steps on: DiT-B/2 with 10 steps was sampled below it.
    text = "\n".join(report._sampling_lines(_tradeoff([("run-b @ 50", 1.0, 40.0)], cheap), [25.0, 50.0]))
    assert ("Not where sampling has saturated: no smaller model sampled with more steps beats a larger one sampled "
            "with 25 or 50 steps at no more sampling compute per image; 1 case(s) do") in text
    assert "- DiT-S/4 with 25 steps (18.00) beats DiT-B/2 with 10 steps (21.00), below saturation." in text
    saturated_case = [*cheap, ("DiT-S/8", 50, 17.0, "DiT-B/4", 25, 19.0, True)]
    text = "\n".join(report._sampling_lines(_tradeoff([("run-b @ 50", 1.0, 40.0)], saturated_case), [25.0, 50.0]))
    assert ("Yes: in 3 case(s) a smaller model sampled with more steps beats a larger model sampled with fewer, 1 of "
            "them at no more sampling compute per image with the larger one sampled with 25 or 50 steps") in text
    noise = SimpleNamespace(resolved=lambda a, b: np.abs(np.log(a) - np.log(b)) > 0.1)  # 17 vs 19: log 0.11
    text = "\n".join(report._sampling_lines(_tradeoff([("run-b @ 50", 1.0, 40.0)], saturated_case), [25.0, 50.0],
                                             noise))
    assert "where sampling has saturated (1 of those beyond the evaluation's noise)" in text


def test_fig10_points_at_a_metric_that_varies_sampling_steps_when_study_refuses(paper, monkeypatch):
    def refuses(records, **selection):
        raise RecordsError("every point uses one sampling_steps value.")

    monkeypatch.setattr(study, "sampling_tradeoff", refuses)
    with pytest.raises(RecordsError, match=r"\['FID-10K'\] vary sampling_steps: pass metric='FID-10K'"):
        figures.fig10_sampling_compute(paper, metric="FID-50K")
