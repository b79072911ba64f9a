"""The DiT paper's scaling figures, rendered from records (`analysis.records.load`).

Each `fig*` function takes Records (or an evaluation / step DataFrame), the metric and column filters (`where`)
that `analysis.study` takes, and returns a matplotlib Figure; when the records cannot support a figure it raises
RecordsError saying why. The points are study's: `study.select` chooses configs of one block and resolution, one
metric and one protocol. The figures that draw a fit compute it (`analysis.analyze`) and hand it to their
`draw_*` function, which draws a fit it is given: Fig. 8 `analyze.model_compute`, Fig. 9
`analyze.training_compute`, Fig. 10 `analyze.sampling_compute`, the isoFLOP profiles `isoflop.isoflop_analysis`
and the loss -> metric figure `proxy.loss_proxy`. Table 4 is in `analysis.tables`; `analysis.report.render_all`
draws every figure from one `analyze` pass.

Figures are built on `matplotlib.figure.Figure` without pyplot, so rendering uses the Agg (PNG) and PDF canvases
and never touches the interactive backend or pyplot's global figure list.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from analysis import analyze, isoflop, proxy, study
from analysis.paper import BLOCKS, SIZES
from analysis.records import Records
from analysis.schema import RecordsError
from analysis.style import (
    OTHER_COLORS,
    PATCH_COLORS,
    SIZE_COLORS,
    dit_size_and_patch,
    format_gflops,
    format_steps,
    label_points,
    log_axis,
    ordered_runs,
    padded,
    plot_curves,
    run_styles,
    save_figure,
    sci,
    size_label,
    size_legend,
    styled,
    with_dit_columns,
)

FIGURES = ("fig2_bubble", "fig5_conditioning", "fig6_curves", "fig7_samples", "class_grids", "fig8_gflops_fit",
           "fig9_training_compute", "fig10_sampling_compute", "fig13_loss", "isoflop_profiles",
           "isoflop_profiles_loss", "loss_to_metric")


def draw_floor(ax, points: pd.DataFrame) -> list[float]:
    """The metric's floor, where the records hold one (what as many real held-out images score against the same
    reference), as a dotted line. Returns it, for the y axis to show, or nothing."""
    if "floor" not in points.columns or points["floor"].isna().all():
        return []
    floor = float(points["floor"].median())
    ax.axhline(floor, color="0.35", linestyle=":", linewidth=1.4, zorder=1,
               label=f"floor: real held-out images ({floor:.3g})")
    return [floor]


def _per_run(points: pd.DataFrame) -> pd.DataFrame:
    """One row per run (by name), its value the mean of the run's points (repeated evaluations)."""
    rows = points.groupby("run", as_index=False).first()
    rows["value"] = points.groupby("run")["value"].mean().to_numpy()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Fig. 2: FID vs model Gflops, bubbles
# ---------------------------------------------------------------------------------------------------------------

BUBBLE_MAX_AREA = 2400  # points^2 of the largest model's bubble


@styled
def fig2_bubble(records: Records | pd.DataFrame, *, metric: str | None = None, step: int | None = None,
                **where) -> Figure:
    """Fig. 2 (left): the metric vs forward Gflops per image (log x) at one training step (default: the step most
    configs share), one bubble per config with area proportional to its Gflops, coloured by model size: the
    points of `study.model_compute_fit` for the same arguments."""
    points = study.model_compute_points(records, step=step, metric=metric, **where)
    metric, step = points["metric"].iloc[0], points["step"].iloc[0]
    at_step = _per_run(points)
    if len(at_step) < 2:
        raise RecordsError(f"Fig. 2 compares configs, but only {len(at_step)} run was evaluated at step {step}.")
    # Big bubbles first, so the small ones stay visible on top of them.
    at_step = at_step.sort_values("gflops", ascending=False).reset_index(drop=True)
    styles = run_styles(at_step)
    area = BUBBLE_MAX_AREA * at_step["gflops"] / at_step["gflops"].max()

    fig = Figure(figsize=(6.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(at_step["gflops"], at_step["value"], s=area, c=[styles[r].color for r in at_step["run"]],
               alpha=0.75, edgecolors="white", linewidths=0.8, zorder=3)
    log_axis(ax, "x", at_step["gflops"], pad=1.8)
    ax.set_ylim(*padded(at_step["value"], 0.12))
    ax.set_xlabel("Transformer Gflops (forward, per image)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at {format_steps(step)} training steps; bubble area ∝ Gflops")
    size_legend(ax, at_step)
    label_points(ax, at_step["gflops"].to_numpy(), at_step["value"].to_numpy(),
                  [styles[r].label for r in at_step["run"]], np.sqrt(area.to_numpy() / np.pi))
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fig. 5: conditioning blocks
# ---------------------------------------------------------------------------------------------------------------

BLOCK_COLORS = dict(zip(BLOCKS, [sns.color_palette("colorblind")[i] for i in (5, 4, 1, 0)], strict=True))


@styled
def fig5_conditioning(records: Records | pd.DataFrame, *, metric: str | None = None, **where) -> Figure:
    """Fig. 5: the metric over training for each conditioning block of one model (the model evaluated with the most
    blocks), on `study.select`'s points of every block and resolution. Blocks measured at one shared step only are
    drawn as bars."""
    figure_name = "Fig. 5"
    points = study.select_protocol(records, metric=metric, vary=("block", "resolution"), **where)
    metric = points["metric"].iloc[0]
    if points["block"].isna().all():
        raise RecordsError(f"{figure_name} compares conditioning blocks of one model, but the records name no run's "
                           "block (no block column); give each run's block (e.g. a block column in the CSV) and "
                           "train one config with several blocks.")
    blocks_per_model = points.groupby(["model", "resolution"], dropna=False)["block"].nunique()
    if blocks_per_model.max() < 2:
        raise RecordsError(f"{figure_name} compares conditioning blocks of one model, but every model was "
                           f"evaluated with one block only ({sorted(points['block'].dropna().unique().tolist())}); "
                           "train the same config with another block (e.g. --block in-context).")
    points_per_model = points.groupby(["model", "resolution"], dropna=False).size()
    ranked = pd.DataFrame({"blocks": blocks_per_model, "points": points_per_model}).sort_values(
        ["blocks", "points"], ascending=False)
    model, resolution = ranked.index[0]
    chosen = points[(points["model"] == model) & (points["resolution"].eq(resolution) | pd.isna(resolution))]
    # Blocks compare only at the same training step: steps evaluated for a single block are left out.
    blocks_per_step = chosen.groupby("step")["block"].nunique()
    chosen = chosen[chosen["step"].isin(blocks_per_step[blocks_per_step >= 2].index)]
    if chosen.empty:
        raise RecordsError(f"{figure_name}: the conditioning blocks of {model} were never evaluated at the same "
                           "training step, so they do not compare.")
    blocks = sorted(chosen["block"].unique(), key=lambda b: (BLOCKS.index(b) if b in BLOCKS else -1, b))
    colors = {b: BLOCK_COLORS.get(b, OTHER_COLORS[i % len(OTHER_COLORS)]) for i, b in enumerate(blocks)}
    gflops = chosen.groupby("block")["gflops"].first()
    title = f"{model}{'' if pd.isna(resolution) else f' at {int(resolution)}px'}: conditioning blocks"

    one_shared_step = chosen["step"].nunique() == 1
    fig = Figure(figsize=(6.0, 3.2 if one_shared_step else 4.2), layout="constrained")
    ax = fig.add_subplot()
    if one_shared_step:
        values = chosen.groupby("block")["value"].mean().reindex(blocks)
        bars = ax.barh(range(len(blocks)), values, color=[colors[b] for b in blocks], height=0.6)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=4, fontsize=9)
        ax.set_yticks(range(len(blocks)), [f"{b}\n({format_gflops(gflops[b])} Gflops)" for b in blocks])
        ax.set_xlim(0, values.max() * 1.15)
        ax.set_xlabel(metric)
        ax.grid(axis="y", visible=False)
        ax.set_title(f"{title}, {format_steps(chosen['step'].iloc[0])} steps")
    else:
        for block in blocks:
            curve = chosen[chosen["block"] == block].groupby("step")["value"].mean()
            ax.plot(curve.index, curve.to_numpy(), marker="o", color=colors[block], linewidth=1.8,
                    label=f"{block} ({format_gflops(gflops[block])} Gflops)")
        ax.xaxis.set_major_formatter(FuncFormatter(format_steps))
        ax.set_xlabel("Training steps")
        ax.set_ylabel(metric)
        ax.legend(title="Conditioning block")
        ax.set_title(title)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fig. 6: curves over training
# ---------------------------------------------------------------------------------------------------------------

@styled
def fig6_curves(records: Records | pd.DataFrame, *, metric: str | None = None, **where) -> Figure:
    """Fig. 6: the metric over training steps, on `study.select`'s points. Top row: one panel per patch size,
    model sizes compared; bottom row: one panel per model size, patch sizes compared. These panels group DiT
    configs (runs with a DiT size and patch); when fewer than two of those have curves, every run's curve is drawn
    in a single panel instead (e.g. a user's models with other names)."""
    figure_name = "Fig. 6"
    points = study.select_protocol(records, metric=metric, **where)
    metric = points["metric"].iloc[0]
    points = with_dit_columns(points)
    parsed = [dit_size_and_patch(size, patch) for size, patch in zip(points["size"], points["patch"], strict=True)]
    points = points.assign(size=[p[0] for p in parsed], patch=[p[1] for p in parsed])
    steps_per_run = points.groupby("run")["step"].nunique()
    with_curves = steps_per_run[steps_per_run >= 2].index.tolist()
    if len(with_curves) < 2:
        raise RecordsError(f"{figure_name} compares training curves, but only {len(with_curves)} run(s) "
                           f"{with_curves} have {metric} at two or more steps; evaluate checkpoints during training "
                           "(--config.eval.every=N).")
    dit = points.dropna(subset=["size"]).astype({"patch": int})  # int again once the other runs are left out
    if dit.loc[dit["run"].isin(with_curves), "run"].nunique() < 2:
        return _curves_in_one_panel(points, metric)
    not_dit = sorted(points.loc[points["size"].isna(), "run"].unique())
    points = dit
    curves = {run: group.groupby("step")["value"].mean() for run, group in points.groupby("run")}
    runs = points.drop_duplicates("run").set_index("run")
    patches = sorted(set(runs["patch"]), reverse=True)  # the paper's order: 8, 4, 2
    sizes = [s for s in SIZES if s in set(runs["size"])]

    columns = max(len(patches), len(sizes))
    fig = Figure(figsize=(3.1 * columns + 1.2, 6.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, hspace=0.04)
    rows = [
        (top, patches, "patch", "size", "Holding patch size constant, increasing model size",
         lambda p: f"Patch size {p}", lambda s: (SIZE_COLORS[s], size_label(s))),
        (bottom, sizes, "size", "patch", "Holding model size constant, decreasing patch size",
         size_label, lambda p: (PATCH_COLORS.get(p, "gray"), f"patch {p}")),
    ]
    # Every panel on the same axes, so curves compare across panels too.
    floor = [float(points["floor"].median())] if "floor" in points.columns and points["floor"].notna().any() else []
    y_values = pd.concat([*curves.values(), pd.Series(floor, dtype=float)])
    y_limits, x_limits = padded(y_values, 0.08), padded(points["step"], 0.04)
    for subfigure, panels, fixed, varied, title, panel_title, style in rows:
        axes = subfigure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
        legend = {}
        for ax, panel in zip(axes, panels, strict=True):
            draw_floor(ax, points)
            members = runs[runs[fixed] == panel]
            for run in ordered_runs(members.reset_index()):
                color, label = style(members.loc[run, varied])
                curve = curves[run]
                (line,) = ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3.5, linewidth=1.6,
                                  color=color)
                legend[members.loc[run, varied]] = (label, line)
            ax.set_title(panel_title(panel))
            ax.set_xlabel("Training steps")
            ax.xaxis.set_major_formatter(FuncFormatter(format_steps))
            ax.set_xlim(*x_limits)
            ax.set_ylim(*y_limits)
        axes[0].set_ylabel(metric)
        subfigure.suptitle(title, fontsize=10.5)
        entries = [legend[v] for v in sorted(legend, key=lambda v: SIZES.index(v) if varied == "size" else -v)]
        entries += [(line.get_label(), line) for line in axes[0].get_lines() if line.get_label().startswith("floor")]
        subfigure.legend([line for _, line in entries], [label for label, _ in entries], loc="outside right center")
    if not_dit:
        fig.suptitle(f"Not shown (not DiT configs, so not grouped by patch and size): {', '.join(not_dit)}",
                     fontsize=8.5, color="0.3")
    return fig


def _curves_in_one_panel(points: pd.DataFrame, metric: str) -> Figure:
    """Fig. 6 for runs that are not DiT configs (no size and patch): every run's curve in one panel, by model Gflops."""
    runs = points.drop_duplicates("run")
    styles = run_styles(runs)
    fig = Figure(figsize=(7.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for run in ordered_runs(runs):
        curve = points[points["run"] == run].groupby("step")["value"].mean()
        style = styles[run]
        gflops = runs.loc[runs["run"] == run, "gflops"].iloc[0]
        ax.plot(curve.index, curve.to_numpy(), marker=style.marker, markersize=4, linewidth=1.6, color=style.color,
                linestyle=style.linestyle, label=f"{style.label} ({format_gflops(gflops)} Gflops)")
    ax.xaxis.set_major_formatter(FuncFormatter(format_steps))
    ax.set_xlabel("Training steps")
    ax.set_ylabel(metric)
    reason = ("no run is a DiT config with a size and patch" if points["size"].isna().all() else
              "fewer than two DiT configs have curves")
    fig.suptitle(f"{metric} over training\n(one panel, not grouped by patch and size: {reason})", fontsize=10.5)
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fig. 8: metric vs model Gflops, log-log fit
# ---------------------------------------------------------------------------------------------------------------

def fig8_gflops_fit(records: Records | pd.DataFrame, *, metric: str | None = None, step: int | None = None,
                    overlay: pd.DataFrame | None = None, **where) -> Figure:
    """Fig. 8: `study.model_compute_fit` for the same arguments: the metric vs forward Gflops per image (log-log)
    at one training step, with the fitted line, its confidence band, the prediction interval for a new config, and
    the slope and correlations. `overlay`: another architecture's evaluation points (records columns: run, model,
    gflops, step, value), drawn at the fit's step over DiT's and not fitted."""
    return draw_fig8_gflops_fit(analyze.model_compute(records, metric=metric, step=step, **where), overlay=overlay)


OVERLAY_COLOR = "black"


def _overlay_label(overlay: pd.DataFrame) -> str:
    """The compared family: the overlay's `family` column where it has one, else its models' names less the size
    ("ModernDiT-B" -> "ModernDiT")."""
    families = sorted({str(m) for m in overlay["family"]} if "family" in overlay.columns else
                      {str(m).rpartition("-")[0] or str(m) for m in overlay["model"]})
    return f"{', '.join(families)} (compared, not fitted)"


@styled
def draw_fig8_gflops_fit(model_compute: analyze.ModelCompute, *, overlay: pd.DataFrame | None = None) -> Figure:
    """Fig. 8 of a model-compute fit (`analyze.model_compute`); `overlay` as in `fig8_gflops_fit`."""
    points, fit = model_compute.points, model_compute.fit
    metric, step = fit.metadata["metric"], fit.metadata["step"]
    runs = _per_run(points)
    styles = run_styles(runs)
    if overlay is not None:
        overlay = overlay[overlay["step"] == step]
        if overlay.empty:
            raise RecordsError(f"the compared runs have no points at step {step}, the step of DiT's Fig. 8 fit.")
    shown = points if overlay is None else pd.concat([points[["gflops", "value"]], overlay[["gflops", "value"]]])

    fig = Figure(figsize=(6.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.geomspace(shown["gflops"].min() / 1.6, shown["gflops"].max() * 1.6, 200)
    ax.fill_between(x, *fit.prediction_interval(x), color="0.5", alpha=0.12, linewidth=0,
                    label=f"{fit.confidence:.0%} prediction interval")
    ax.fill_between(x, *fit.confidence_band(x), color="0.3", alpha=0.25, linewidth=0,
                    label=f"{fit.confidence:.0%} confidence band")
    ax.plot(x, fit.predict(x), color="0.15", linewidth=1.5, label="log-log fit")
    for row in points.sort_values("run", kind="stable").itertuples():  # every fitted point
        style = styles[row.run]
        ax.plot(row.gflops, row.value, marker=style.marker, color=style.color, markersize=7, linestyle="",
                markeredgecolor="white", zorder=3)
    if overlay is not None:
        ax.plot(overlay["gflops"], overlay["value"], marker="D", color=OVERLAY_COLOR, markersize=6.5, linestyle="",
                markerfacecolor="white", markeredgewidth=1.6, zorder=4, label=_overlay_label(overlay))
    log_axis(ax, "x", x, pad=1.0)
    log_axis(ax, "y", [*shown["value"], *draw_floor(ax, points)], pad=1.25)
    ax.set_xlabel("Transformer Gflops (forward, per image)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at {format_steps(step)} training steps vs model compute")
    # The fit's numbers head the legend, which goes where it hides the fewest points.
    lo, hi = fit.slope_ci
    ax.legend(title=f"slope = {fit.slope:.3f} ({fit.confidence:.0%} CI {lo:.3f} to {hi:.3f})\n"
                    f"Pearson r = {fit.pearson_r:.3f}, Spearman r = {fit.spearman_r:.3f}\n"
                    f"{fit.n_configs} configs",
              loc="best", alignment="left", frameon=True, facecolor="white", edgecolor="0.8", framealpha=0.95,
              fontsize=8.5, title_fontsize=8.5)
    labels = [styles[r].label for r in runs["run"]]
    x_points, y_points = runs["gflops"].to_numpy(), runs["value"].to_numpy()
    if overlay is not None:
        labels += [str(m) for m in overlay["model"]]
        x_points = np.concatenate([x_points, overlay["gflops"].to_numpy()])
        y_points = np.concatenate([y_points, overlay["value"].to_numpy()])
    label_points(ax, x_points, y_points, labels, np.full(len(labels), 4.0))
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fig. 9: metric vs training compute, frontier and offset power law
# ---------------------------------------------------------------------------------------------------------------

def fig9_training_compute(records: Records | pd.DataFrame, *, metric: str | None = None,
                          n_bootstrap: int = study.FRONTIER_N_BOOTSTRAP, overlay: pd.DataFrame | None = None,
                          **where) -> Figure:
    """Fig. 9: `study.training_compute_fit` for the same arguments: the metric vs training compute (3 x Gflops x
    batch x steps; log-log) for every run, with the compute-efficient frontier and the offset power law fitted to
    it (with its confidence band). When the law cannot be fitted, the figure says why and shows the curves and
    frontier only. `overlay`: another architecture's evaluation points (records columns), each run's
    curve drawn over DiT's, not fitted."""
    return draw_fig9_training_compute(
        analyze.training_compute(records, metric=metric, n_bootstrap=n_bootstrap, **where), overlay=overlay)


@styled
def draw_fig9_training_compute(training_compute: analyze.TrainingCompute, *,
                               overlay: pd.DataFrame | None = None) -> Figure:
    """Fig. 9 of a training-compute fit (`analyze.training_compute`); `overlay` as in `fig9_training_compute`."""
    points, frontier, fit = training_compute.points, training_compute.frontier, training_compute.fit
    metric = points["metric"].iloc[0]
    styles = run_styles(points)

    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    plot_curves(ax, points, "train_gflops_cumulative", styles)
    ax.plot(frontier.grid["x"], frontier.grid["y"], color="0.35", linewidth=3.5, alpha=0.35,
            solid_capstyle="butt", label="compute frontier", zorder=2)
    if fit is not None:
        x = np.geomspace(frontier.grid["x"].iloc[0], frontier.grid["x"].iloc[-1], 200)
        ax.fill_between(x, *fit.confidence_band(x), color="0.2", alpha=0.15, linewidth=0, zorder=1,
                        label=f"{fit.confidence:.0%} confidence band")
        law = fit.law
        floor = "0" if law.floor < 1e-3 * points["value"].min() else sci(law.floor)
        ax.plot(x, fit.predict(x), color="black", linestyle="--", linewidth=1.4, zorder=4,
                label=f"fit: ${floor} + {sci(law.scale)}\\,(C / {sci(law.x_ref)})^{{-{law.exponent:.3f}}}$")
    else:
        ax.text(0.02, 0.03, f"power law not fitted: {training_compute.unfitted}", transform=ax.transAxes,
                fontsize=8, color="0.3", wrap=True)
    shown = points
    if overlay is not None:
        by_run = overlay.sort_values("gflops", kind="stable").groupby("run", sort=False)
        for number, (_, curve) in enumerate(by_run):
            curve = curve.sort_values("train_gflops_cumulative")
            ax.plot(curve["train_gflops_cumulative"], curve["value"], color=OVERLAY_COLOR, linestyle=":",
                    marker="D", markersize=5, markerfacecolor="white", linewidth=1.4, zorder=5,
                    label=_overlay_label(overlay) if number == 0 else None)
            ax.annotate(str(curve["model"].iloc[-1]), (curve["train_gflops_cumulative"].iloc[-1],
                                                       curve["value"].iloc[-1]),
                        xytext=(5, -3), textcoords="offset points", fontsize=7.5, color=OVERLAY_COLOR)
        shown = pd.concat([points, overlay])
    log_axis(ax, "x", shown["train_gflops_cumulative"])
    log_axis(ax, "y", [*shown["value"], *draw_floor(ax, points)])
    ax.set_xlabel("Training compute C (Gflops: 3 × forward Gflops × batch × steps)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs training compute")
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fig. 10: metric vs sampling compute
# ---------------------------------------------------------------------------------------------------------------

def fig10_sampling_compute(records: Records | pd.DataFrame, *, metric: str | None = None,
                           step: int | None = None, **where) -> Figure:
    """Fig. 10: `study.sampling_tradeoff` for the same arguments: the metric vs sampling compute per image (Gflops
    x sampling steps, x2 with guidance; log x) at one training step (default: the latest step most runs share),
    one line per model across sampling-step counts, with the frontier over every (model, steps) pair."""
    return draw_fig10_sampling_compute(analyze.sampling_compute(records, metric=metric, step=step, **where))


@styled
def draw_fig10_sampling_compute(tradeoff: study.SamplingTradeoff) -> Figure:
    """Fig. 10 of a sampling-compute trade-off (`analyze.sampling_compute`)."""
    points, metric, step = tradeoff.points, tradeoff.metadata["metric"], tradeoff.metadata["step"]
    styles = run_styles(points)

    fig = Figure(figsize=(8.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(tradeoff.frontier.grid["x"], tradeoff.frontier.grid["y"], color="0.35", linewidth=3.5, alpha=0.35,
            solid_capstyle="butt", label="frontier", zorder=1)
    plot_curves(ax, points, "sampling_gflops_per_image", styles)
    # Step counts beside the points: all of them when few, else along the largest model's line only, above and
    # below in turn (a saturated line's points lie level, closer than their labels are wide).
    annotated = points if len(points) <= 8 else points[points["gflops"] == points["gflops"].max()]
    annotated = annotated.sort_values("sampling_gflops_per_image")
    for i, row in enumerate(annotated.itertuples()):
        ax.annotate(f"{int(row.sampling_steps)} steps", (row.sampling_gflops_per_image, row.value),
                    xytext=(5, 5 if i % 2 == 0 else -12), textcoords="offset points", fontsize=7.5, color="0.3")
    log_axis(ax, "x", points["sampling_gflops_per_image"], pad=1.5)
    shown = [*points["value"], *draw_floor(ax, points)]
    if max(shown) / min(shown) > 3:
        log_axis(ax, "y", shown)
    else:
        ax.margins(y=0.15)
    guided = points["guidance_scale"].fillna(1.0).iloc[0] != 1.0
    ax.set_xlabel("Sampling compute, Gflops per image\n(forward Gflops × sampling steps"
                  + (" × 2 for guidance)" if guided else ")"))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs sampling compute, {format_steps(step)} training steps")
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fig. 13: training loss
# ---------------------------------------------------------------------------------------------------------------

@styled
def fig13_loss(records: Records | pd.DataFrame) -> Figure:
    """Fig. 13: training loss over steps per run, coloured by model size and styled by patch size; a light rolling
    mean over the raw loss, which is drawn faintly behind it."""
    figure_name = "Fig. 13"
    if isinstance(records, Records):
        steps = records.steps
        run_columns = with_dit_columns(records.runs).set_index("run")[["model", "size", "patch"]]
    else:
        steps = records
        run_columns = with_dit_columns(steps).groupby("run")[["model", "size", "patch"]].first() \
            if "model" in steps.columns else None
    if steps.empty or "loss" not in steps.columns or steps["loss"].isna().all():
        raise RecordsError(f"{figure_name} needs training-step records (records.jsonl: step and loss per logged "
                           "step); the records hold evaluations only.")
    steps = steps.dropna(subset=["loss"])
    runs = pd.DataFrame({"run": steps["run"].unique()})
    runs = runs.join(run_columns, on="run") if run_columns is not None else runs.assign(model=runs["run"])
    runs["model"] = runs["model"].fillna(runs["run"])
    styles = run_styles(runs)

    fig = Figure(figsize=(7.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    smoothed_values = []
    for run in ordered_runs(runs):
        curve = steps[steps["run"] == run].sort_values("step")
        window = max(3, len(curve) // 25)
        smoothed = curve["loss"].rolling(window, center=True, min_periods=1).mean()
        smoothed_values.append(smoothed.to_numpy())
        style = styles[run]
        ax.plot(curve["step"], curve["loss"], color=style.color, linewidth=0.6, alpha=0.2)
        ax.plot(curve["step"], smoothed, color=style.color, linestyle=style.linestyle, linewidth=1.8,
                label=style.label)
    # The first steps' loss is far above the rest; the limits follow the smoothed curves after their start.
    settled = np.concatenate([v[len(v) // 10:] if len(v) >= 10 else v for v in smoothed_values])
    ax.set_ylim(*padded(settled, 0.2))
    ax.xaxis.set_major_formatter(FuncFormatter(format_steps))
    ax.set_xlabel("Training steps")
    ax.set_ylabel("Training loss (MSE + VB)" if "vb" in steps.columns else "Training loss")
    ax.set_title("Training loss (faint: raw; solid: rolling mean)")
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Beyond the paper: isoFLOP profiles (Chinchilla's Fig. 3) and the held-out loss as a predictor
# ---------------------------------------------------------------------------------------------------------------

def isoflop_profiles(records: Records | pd.DataFrame, *, metric: str | None = None, size: str = "gflops",
                     **where) -> Figure:
    """`isoflop.isoflop_analysis` for the same arguments, drawn as Chinchilla's Fig. 3: the profile of each
    budget (metric vs size, its parabola and minimum; flagged budgets faint, without a parabola), then the optimal
    size and the optimal images seen against compute, with the power laws and their bootstrap bands."""
    return draw_isoflop_profiles(isoflop.isoflop_analysis(records, metric=metric, size=size, **where))


@styled
def draw_isoflop_profiles(analysis: isoflop.IsoFlopAnalysis) -> Figure:
    """The isoFLOP profiles figure of `isoflop.isoflop_analysis`'s result; RecordsError when no budget has enough
    configs for a profile."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    reached = [p for p in analysis.profiles if len(p.points)]
    if not any(len(p.points) >= isoflop.MIN_PROFILE_CONFIGS for p in analysis.profiles):
        raise RecordsError(f"isoFLOP profiles: {analysis.note}")
    budgets = [p.budget for p in analysis.profiles]
    norm = LogNorm(min(budgets), max(budgets))
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(13.5, 4.4), layout="constrained")
    fig.get_layout_engine().set(wspace=0.06)  # room between the colorbar's label and the next panel's
    profiles_ax, size_ax, images_ax = fig.subplots(1, 3)
    for profile in reached:
        color = cmap(norm(profile.budget))
        points = profile.points.sort_values("size")
        alpha = 1.0 if profile.fitted else 0.3
        profiles_ax.plot(points["size"], points["value"], "o", color=color, alpha=alpha, markersize=4.5)
        if profile.fitted:
            u = np.geomspace(points["size"].min(), points["size"].max(), 100)
            profiles_ax.plot(u, profile.parabola(u), color=color, linewidth=1.5)
            profiles_ax.plot(profile.optimal_size, profile.optimal_value, "*", color=color, markersize=13,
                             markeredgecolor="black", markeredgewidth=0.6, zorder=5)
    shown = pd.concat([p.points for p in reached])
    log_axis(profiles_ax, "x", shown["size"])
    log_axis(profiles_ax, "y", shown["value"], pad=1.05)
    size_label_text = study.MODEL_SIZES[analysis.size]
    profiles_ax.set_xlabel(f"Model size ({size_label_text})")
    profiles_ax.set_ylabel(analysis.metric)
    profiles_ax.set_title(f"isoFLOP profiles ({len(analysis.fitted)} of {len(budgets)} budgets fitted; "
                          "faint: flagged)", fontsize=10)
    colorbar = fig.colorbar(_scalar_mappable(cmap, norm), ax=profiles_ax, pad=0.01)
    colorbar.set_label("Training compute C (Gflops)")

    for ax, law, attribute, label in ((size_ax, analysis.size_law, "optimal_size", f"Optimal size ({size_label_text})"),
                                      (images_ax, analysis.images_law, "optimal_images", "Optimal images seen")):
        fitted = analysis.fitted
        ax.set_xlabel("Training compute C (Gflops)")
        ax.set_ylabel(label)
        if not fitted:
            flags = pd.Series([p.flag for p in reached if len(p.points) >= isoflop.MIN_PROFILE_CONFIGS])
            ax.text(0.5, 0.5, "no budget has an interior minimum; most often:\n"
                    + textwrap.fill(flags.value_counts().index[0], 50), transform=ax.transAxes, ha="center",
                    va="center", fontsize=8.5, color="0.3")
            log_axis(ax, "x", budgets, pad=1.1)
            ax.set_yticks([])
            continue
        x = np.array([p.budget for p in fitted])
        y = np.array([getattr(p, attribute) for p in fitted])
        ax.scatter(x, y, c=[cmap(norm(b)) for b in x], edgecolors="black", linewidths=0.6, s=50, zorder=5)
        span = x
        if law is not None:
            grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
            ax.fill_between(grid, *law.confidence_band(grid), color="0.2", alpha=0.15, linewidth=0,
                            label=f"{law.confidence:.0%} bootstrap band")
            lo, hi = law.exponent_ci
            ax.plot(grid, law.predict(grid), "--", color="black", linewidth=1.3,
                    label=f"$\\propto C^{{{law.exponent:.2f}}}$ ({lo:.2f} to {hi:.2f})")
            ax.legend(fontsize=8.5, loc="upper left")
            span = grid
        else:
            ax.text(0.5, 0.04, textwrap.fill(f"no power law: {analysis.note}", 60), transform=ax.transAxes,
                    ha="center", va="bottom", fontsize=7.5, color="0.3")
        log_axis(ax, "x", span, pad=1.1 if law is not None else 3.0)
        log_axis(ax, "y", y, pad=2.0 if law is not None else 4.0)
    size_ax.set_title("Compute-optimal size", fontsize=10)
    images_ax.set_title("Compute-optimal images seen", fontsize=10)
    return fig


def _scalar_mappable(cmap, norm):
    from matplotlib.cm import ScalarMappable

    mappable = ScalarMappable(norm=norm, cmap=cmap)
    mappable.set_array([])
    return mappable


def loss_to_metric(records: Records | pd.DataFrame, *, metric: str | None = None, loss_metric: str | None = None,
                   **where) -> Figure:
    """`proxy.loss_proxy` for the same arguments: the sample metric against the held-out loss at the same run
    and step, one marker per config, with the best form's curve and its prediction interval (from the
    leave-one-config-out errors) and the other forms faint."""
    return draw_loss_to_metric(proxy.loss_proxy(records, metric=metric, loss_metric=loss_metric, **where),
                               records)


@styled
def draw_loss_to_metric(analysis: proxy.ProxyAnalysis, records: Records | pd.DataFrame) -> Figure:
    """The loss -> metric figure of `proxy.loss_proxy`'s result; `records` (or their evaluation points) name and
    style each paired run."""
    pairs = analysis.pairs
    runs = _run_table(records, pairs)
    styles = run_styles(runs)
    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for run in ordered_runs(runs):
        points = pairs[pairs["run"] == run].sort_values("step")
        style = styles[run]
        ax.plot(points["loss"], points["value"], marker="o", markersize=4.5, linestyle=style.linestyle,
                linewidth=0.8, color=style.color, label=style.label)
    grid = np.geomspace(*analysis.loss_range, 200)
    best = analysis.best
    for fit in analysis.fits.values():
        if fit is not best:
            ax.plot(grid, fit.predict(grid), color="0.5", linewidth=0.9, linestyle=":", zorder=1)
    ax.fill_between(grid, *best.prediction_interval(grid), color="0.2", alpha=0.12, linewidth=0,
                    label=f"{best.confidence:.0%} prediction interval (×/÷ {best.interval_factor:.2f})")
    ax.plot(grid, best.predict(grid), color="black", linewidth=1.6, linestyle="--",
            label=f"{best.form.name}: held-out error {best.typical_error:.0%}")
    ax.plot([], [], color="0.5", linewidth=0.9, linestyle=":", label="other forms")
    log_axis(ax, "x", pairs["loss"])
    log_axis(ax, "y", pairs["value"], pad=1.1)
    ax.set_xlabel(f"Held-out loss ({analysis.loss_metric})")
    ax.set_ylabel(analysis.metric)
    ax.set_title(f"{analysis.metric} vs held-out loss at {len(pairs)} (config, step) pairs\nSpearman "
                 f"ρ = {analysis.rank_correlation:.2f} across configs at step {format_steps(analysis.rank_step)}",
                 fontsize=10)
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig


def _run_table(records, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per paired run with the columns run_styles reads (model, size, patch, gflops)."""
    table = records.evaluations if isinstance(records, Records) else records
    runs = table.groupby("run", as_index=False).first()
    return runs[runs["run"].isin(pairs["run"])]


# ---------------------------------------------------------------------------------------------------------------
# A new architecture over DiT's Fig. 8 and Fig. 9
# ---------------------------------------------------------------------------------------------------------------

COMPARISON_FIGURES = ("compare_fig8_gflops", "compare_fig9_training_compute")


def comparison_figures(overlay: pd.DataFrame, dit: Records, out_dir, *, metric: str, step: int,
                       **where) -> tuple[list, dict[str, str]]:
    """A new architecture's points (`overlay`: records columns run, model, step, gflops, train_gflops_cumulative,
    value) drawn over DiT's Fig. 8 (its fit at `step`) and Fig. 9, as PNG and PDF in `out_dir`; returns the paths
    written and, for a figure the points cannot be drawn on, why (e.g. none at Fig. 8's step)."""
    from etils import epath

    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw = {
        "compare_fig8_gflops": lambda: fig8_gflops_fit(dit, metric=metric, step=step, overlay=overlay, **where),
        "compare_fig9_training_compute": lambda: fig9_training_compute(dit, metric=metric, overlay=overlay, **where),
    }
    written, skipped = [], {}
    for name, figure in draw.items():
        try:
            written += save_figure(figure(), out_dir, name)
        except RecordsError as e:
            skipped[name] = str(e)
    return written, skipped
