"""The DiT paper's scaling figures and Table 4, rendered from records (`analysis.records.load`).

Each `fig*` function takes Records (or an evaluation / step DataFrame), the metric and column filters (`where`)
that `analysis.study` takes, and returns a matplotlib Figure; when the records cannot support a figure it raises
RecordsError saying why. The points and fits are study's: `study.select` chooses configs of one block and
resolution, one metric and one protocol; Fig. 8 draws `study.model_compute_fit`, Fig. 9
`study.training_compute_fit` and Fig. 10 `study.sampling_tradeoff` for the same arguments. `render_all` writes
every figure the records support (PNG and PDF), Table 4 and a one-page Markdown report saying what the selection
left out.

Figures are built on `matplotlib.figure.Figure` without pyplot, so rendering uses the Agg (PNG) and PDF canvases
and never touches the interactive backend or pyplot's global figure list.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

from analysis import study
from analysis.fits import FrontierFit, LogLogFit
from analysis.records import Records, RecordsError

SIZES = ("S", "B", "L", "XL")
PATCHES = (8, 4, 2)  # the paper's order: decreasing patch size, increasing compute
BLOCKS = ("in-context", "cross-attention", "adaLN", "adaLN-Zero")  # the paper's Fig. 5 order, worst to best

SIZE_COLORS = dict(zip(SIZES, sns.color_palette("colorblind", 4), strict=True))
PATCH_COLORS = dict(zip(PATCHES, sns.color_palette("viridis", 3), strict=True))
PATCH_MARKERS = {8: "s", 4: "^", 2: "o"}
PATCH_LINESTYLES = {8: ":", 4: "--", 2: "-"}
OTHER_COLORS = sns.color_palette("dark", 10)  # models whose names do not parse as DiT-<size>/<patch>

PNG_DPI = 150
STYLE = {
    **sns.axes_style("whitegrid"),
    **sns.plotting_context("paper", font_scale=1.15),
    "axes.edgecolor": ".4",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.bottom": True,
    "ytick.left": True,
    "grid.color": ".9",
    "legend.frameon": False,
    "savefig.dpi": PNG_DPI,
    "pdf.fonttype": 42,  # TrueType in PDFs, so the text stays editable and searchable
    "axes.formatter.use_mathtext": True,
}

FIGURES = ("fig2_bubble", "fig5_conditioning", "fig6_curves", "fig8_gflops_fit", "fig9_training_compute",
           "fig10_sampling_compute", "fig13_loss")
REPORT_TABLE_ROWS = 24  # a longer Table 4 is linked from the report, not copied into it


def _styled(render: Callable) -> Callable:
    @functools.wraps(render)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return render(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# Names, colours and axis formats
# ---------------------------------------------------------------------------------------------------------------

_DIT_NAME = re.compile(r"^(?:DiT-)?(S|B|L|XL)/(\d+)$")


def size_and_patch(model: str) -> tuple[str | None, int | None]:
    """"DiT-XL/2" -> ("XL", 2); names that are not DiT configs -> (None, None)."""
    match = _DIT_NAME.match(str(model))
    return (match.group(1), int(match.group(2))) if match else (None, None)


def _short_name(model: str) -> str:
    """"DiT-XL/2" -> "XL/2", as the paper labels its points; other names are kept."""
    size, patch = size_and_patch(model)
    return f"{size}/{patch}" if size else str(model)


def _config_order(model: str, gflops: float | None = None) -> tuple:
    """Sort key: S before XL, then patch 8 before 2 (the paper's order); other models after, by Gflops where
    given (smallest first), then by name."""
    size, patch = size_and_patch(model)
    if size in SIZES:
        return 0, SIZES.index(size), PATCHES.index(patch) if patch in PATCHES else -patch, ""
    return 1, 0.0 if gflops is None or pd.isna(gflops) else float(gflops), 0, str(model)


@dataclass(frozen=True)
class _RunStyle:
    label: str
    color: tuple
    marker: str
    linestyle: str


def _run_styles(runs: pd.DataFrame) -> dict[str, _RunStyle]:
    """Colour by model size, marker and line style by patch size; labels are "S/8" unless two runs share a
    model (then the run names). Models that are not DiT configs take colours in `_ordered_runs` order (by Gflops),
    so a run keeps its colour from figure to figure."""
    runs = runs.drop_duplicates("run").set_index("run").loc[_ordered_runs(runs)].reset_index()
    shared_model = runs["model"].duplicated(keep=False)
    styles, others = {}, 0
    for row, shared in zip(runs.itertuples(), shared_model, strict=True):
        size, patch = size_and_patch(row.model)
        if size is None:
            color, others = OTHER_COLORS[others % len(OTHER_COLORS)], others + 1
        else:
            color = SIZE_COLORS.get(size)
        styles[row.run] = _RunStyle(label=str(row.run) if shared else _short_name(row.model), color=color,
                                    marker=PATCH_MARKERS.get(patch, "D"), linestyle=PATCH_LINESTYLES.get(patch, "-"))
    return styles


def _plot_curves(ax, points: pd.DataFrame, x: str, styles: dict[str, _RunStyle]) -> None:
    """Each run's metric against column `x`, in its style."""
    for run in _ordered_runs(points):
        curve = points[points["run"] == run].sort_values(x)
        style = styles[run]
        ax.plot(curve[x], curve["value"], color=style.color, linestyle=style.linestyle, marker=style.marker,
                markersize=5, linewidth=1.5, label=style.label, zorder=3)


def _ordered_runs(table: pd.DataFrame) -> list[str]:
    runs = table.drop_duplicates("run").set_index("run")
    gflops = runs["gflops"] if "gflops" in runs.columns else pd.Series(np.nan, index=runs.index)
    return sorted(runs.index, key=lambda run: (_config_order(runs.at[run, "model"], gflops[run]), run))


def _format_steps(value: float, _position=None) -> str:
    """400000 -> "400K", 7000000 -> "7M": the paper's step labels."""
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e4:
        return f"{value / 1e3:g}K"
    return f"{value:g}"


def _format_table_steps(step: float) -> str:
    """Table 4 counts steps in thousands: 2352000 -> "2352K"."""
    if pd.isna(step):
        return ""
    return f"{step / 1e3:g}K" if step >= 1e4 and step % 1000 == 0 else f"{step:g}"


def _format_gflops(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def _format_params(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def _sci(value: float, digits: int = 2) -> str:
    """Mathtext scientific notation: 9.1e9 -> 9.1\\times10^{9}."""
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.{digits + 1}g}"
    exponent = math.floor(math.log10(abs(value)))
    return f"{value / 10 ** exponent:.{digits}g}\\times10^{{{exponent}}}"


def _per_run(points: pd.DataFrame) -> pd.DataFrame:
    """One row per run (by name), its value the mean of the run's points (repeated evaluations)."""
    rows = points.groupby("run", as_index=False).first()
    rows["value"] = points.groupby("run")["value"].mean().to_numpy()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Labels beside points, without overlaps
# ---------------------------------------------------------------------------------------------------------------

def _label_points(ax, x, y, labels, radii_pt, fontsize: float = 8.5) -> None:
    """Write each label next to its marker (radius in points): to the right if free, else left, above, below or
    further up and down, skipping places that overlap earlier labels, other markers, the legend or text boxes.
    Call it last, once titles and legends are in place."""
    figure = ax.figure
    figure.draw_without_rendering()  # settles the layout, so data -> display positions are final
    scale = 72 / figure.dpi

    def in_points(box):
        return box.x0 * scale, box.y0 * scale, box.x1 * scale, box.y1 * scale

    centres = ax.transData.transform(np.column_stack([x, y])) * scale
    left, bottom, right, top = in_points(ax.get_window_extent())
    markers = [(cx - r, cy - r, cx + r, cy + r) for (cx, cy), r in zip(centres, radii_pt, strict=True)]
    boxes = [in_points(artist.get_window_extent()) for artist in [*ax.texts, ax.get_legend()] if artist]
    placed: list[tuple[float, float, float, float]] = []

    def overlaps(box, others):
        return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)

    for i in np.argsort(-np.asarray(radii_pt)):  # big markers first: they have the fewest free places
        (cx, cy), r, text = centres[i], radii_pt[i], labels[i]
        width, height, gap = 0.6 * fontsize * len(text), 1.2 * fontsize, r + 2
        candidates = [(gap, -height / 2), (-gap - width, -height / 2), (-width / 2, gap), (-width / 2, -gap - height)]
        candidates += [(dx, dy + k * height) for k in (1, -1, 2, -2, 3, -3) for dx, dy in candidates[:2]]
        obstacles = placed + boxes + [m for j, m in enumerate(markers) if j != i]
        best = candidates[0]
        for dx, dy in candidates:
            box = (cx + dx, cy + dy, cx + dx + width, cy + dy + height)
            inside = box[0] >= left and box[2] <= right and box[1] >= bottom and box[3] <= top
            if inside and not overlaps(box, obstacles):
                best = (dx, dy)
                break
        dx, dy = best
        placed.append((cx + dx, cy + dy, cx + dx + width, cy + dy + height))
        annotation = ax.annotate(text, (x[i], y[i]), xytext=(dx, dy + height / 2), textcoords="offset points",
                                 ha="left", va="center", fontsize=fontsize, color=".15")
        annotation.set_in_layout(False)


# ---------------------------------------------------------------------------------------------------------------
# Fig. 2: FID vs model Gflops, bubbles
# ---------------------------------------------------------------------------------------------------------------

BUBBLE_MAX_AREA = 2400  # points^2 of the largest model's bubble


@_styled
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
    styles = _run_styles(at_step)
    area = BUBBLE_MAX_AREA * at_step["gflops"] / at_step["gflops"].max()

    fig = Figure(figsize=(6.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(at_step["gflops"], at_step["value"], s=area, c=[styles[r].color for r in at_step["run"]],
               alpha=0.75, edgecolors="white", linewidths=0.8, zorder=3)
    _log_axis(ax, "x", at_step["gflops"], pad=1.8)
    ax.set_ylim(*_padded(at_step["value"], 0.12))
    ax.set_xlabel("Transformer Gflops (forward, per image)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at {_format_steps(step)} training steps; bubble area ∝ Gflops")
    _size_legend(ax, at_step["model"])
    _label_points(ax, at_step["gflops"].to_numpy(), at_step["value"].to_numpy(),
                  [styles[r].label for r in at_step["run"]], np.sqrt(area.to_numpy() / np.pi))
    return fig


def _padded(values, fraction: float) -> tuple[float, float]:
    """Linear axis limits around the values, with a margin of `fraction` of their range on each side."""
    low, high = float(np.min(values)), float(np.max(values))
    margin = fraction * (high - low) or 0.05 * abs(high) or 1.0
    return low - margin, high + margin


def _tick_label(value: float) -> str:
    """Plain numbers where they are short ("0.05", "200"), powers of ten elsewhere."""
    if value <= 0:  # a linear locator on a log axis may propose ticks that the axis cannot show
        return ""
    if 1e-4 <= value < 1e6:
        return f"{value:g}"
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = f"{value / 10 ** exponent:.3g}"
    return f"$10^{{{exponent}}}$" if mantissa == "1" else f"${mantissa}\\times10^{{{exponent}}}$"


def _log_axis(ax, axis: str, values, pad: float = 1.3) -> None:
    """Log scale over the values (padded by a factor), with enough labelled ticks: an axis spanning less than a
    decade gets evenly spaced round numbers, one spanning less than 2.5 also labels 2 and 5 x 10^k."""
    low, high = float(np.min(values)) / pad, float(np.max(values)) * pad
    getattr(ax, f"set_{axis}scale")("log")
    getattr(ax, f"set_{axis}lim")(low, high)
    target = getattr(ax, f"{axis}axis")
    target.set_major_formatter(FuncFormatter(lambda v, _: _tick_label(v)))
    decades = math.log10(high / low)
    if decades < 1:
        target.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        target.set_minor_locator(NullLocator())
    elif decades < 2.5:
        def minor(v, _):
            return _tick_label(v) if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""
        target.set_minor_formatter(FuncFormatter(minor))
    else:
        target.set_minor_formatter(NullFormatter())


def _size_legend(ax, models, **kwargs) -> None:
    sizes = [s for s in SIZES if s in {size_and_patch(m)[0] for m in models}]
    if sizes:
        handles = [Line2D([], [], marker="o", linestyle="", color=SIZE_COLORS[s], markersize=7) for s in sizes]
        ax.legend(handles, [f"DiT-{s}" for s in sizes], **{"loc": "upper right", **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Fig. 5: conditioning blocks
# ---------------------------------------------------------------------------------------------------------------

BLOCK_COLORS = dict(zip(BLOCKS, [sns.color_palette("colorblind")[i] for i in (5, 4, 1, 0)], strict=True))


@_styled
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
        ax.set_yticks(range(len(blocks)), [f"{b}\n({_format_gflops(gflops[b])} Gflops)" for b in blocks])
        ax.set_xlim(0, values.max() * 1.15)
        ax.set_xlabel(metric)
        ax.grid(axis="y", visible=False)
        ax.set_title(f"{title}, {_format_steps(chosen['step'].iloc[0])} steps")
    else:
        for block in blocks:
            curve = chosen[chosen["block"] == block].groupby("step")["value"].mean()
            ax.plot(curve.index, curve.to_numpy(), marker="o", color=colors[block], linewidth=1.8,
                    label=f"{block} ({_format_gflops(gflops[block])} Gflops)")
        ax.xaxis.set_major_formatter(FuncFormatter(_format_steps))
        ax.set_xlabel("Training steps")
        ax.set_ylabel(metric)
        ax.legend(title="Conditioning block")
        ax.set_title(title)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fig. 6: curves over training
# ---------------------------------------------------------------------------------------------------------------

@_styled
def fig6_curves(records: Records | pd.DataFrame, *, metric: str | None = None, **where) -> Figure:
    """Fig. 6: the metric over training steps, on `study.select`'s points. Top row: one panel per patch size,
    model sizes compared; bottom row: one panel per model size, patch sizes compared. These panels group DiT
    configs (models named DiT-SIZE/PATCH); when fewer than two of those have curves, every run's curve is drawn
    in a single panel instead (e.g. a user's models with other names)."""
    figure_name = "Fig. 6"
    points = study.select_protocol(records, metric=metric, **where)
    metric = points["metric"].iloc[0]
    parsed = points["model"].map(size_and_patch)
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
         lambda p: f"Patch size {p}", lambda s: (SIZE_COLORS[s], f"DiT-{s}")),
        (bottom, sizes, "size", "patch", "Holding model size constant, decreasing patch size",
         lambda s: f"DiT-{s}", lambda p: (PATCH_COLORS.get(p, "gray"), f"patch {p}")),
    ]
    # Every panel on the same axes, so curves compare across panels too.
    y_values = pd.concat(curves.values())
    y_limits, x_limits = _padded(y_values, 0.08), _padded(points["step"], 0.04)
    for subfigure, panels, fixed, varied, title, panel_title, style in rows:
        axes = subfigure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
        legend = {}
        for ax, panel in zip(axes, panels, strict=True):
            members = runs[runs[fixed] == panel]
            for run in _ordered_runs(members.reset_index()):
                color, label = style(members.loc[run, varied])
                curve = curves[run]
                (line,) = ax.plot(curve.index, curve.to_numpy(), marker="o", markersize=3.5, linewidth=1.6,
                                  color=color)
                legend[members.loc[run, varied]] = (label, line)
            ax.set_title(panel_title(panel))
            ax.set_xlabel("Training steps")
            ax.xaxis.set_major_formatter(FuncFormatter(_format_steps))
            ax.set_xlim(*x_limits)
            ax.set_ylim(*y_limits)
        axes[0].set_ylabel(metric)
        subfigure.suptitle(title, fontsize=10.5)
        entries = [legend[v] for v in sorted(legend, key=lambda v: SIZES.index(v) if varied == "size" else -v)]
        subfigure.legend([line for _, line in entries], [label for label, _ in entries], loc="outside right center")
    if not_dit:
        fig.suptitle(f"Not shown (not named DiT-SIZE/PATCH, so not grouped by patch and size): {', '.join(not_dit)}",
                     fontsize=8.5, color="0.3")
    return fig


def _curves_in_one_panel(points: pd.DataFrame, metric: str) -> Figure:
    """Fig. 6 for runs that do not parse as DiT-SIZE/PATCH: every run's curve in one panel, by model Gflops."""
    runs = points.drop_duplicates("run")
    styles = _run_styles(runs)
    fig = Figure(figsize=(7.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for run in _ordered_runs(runs):
        curve = points[points["run"] == run].groupby("step")["value"].mean()
        style = styles[run]
        gflops = runs.loc[runs["run"] == run, "gflops"].iloc[0]
        ax.plot(curve.index, curve.to_numpy(), marker=style.marker, markersize=4, linewidth=1.6, color=style.color,
                linestyle=style.linestyle, label=f"{style.label} ({_format_gflops(gflops)} Gflops)")
    ax.xaxis.set_major_formatter(FuncFormatter(_format_steps))
    ax.set_xlabel("Training steps")
    ax.set_ylabel(metric)
    reason = ("no run is named DiT-SIZE/PATCH" if points["size"].isna().all() else
              "fewer than two DiT-SIZE/PATCH runs have curves")
    fig.suptitle(f"{metric} over training\n(one panel, not grouped by patch and size: {reason})", fontsize=10.5)
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fig. 8: metric vs model Gflops, log-log fit
# ---------------------------------------------------------------------------------------------------------------

def fig8_gflops_fit(records: Records | pd.DataFrame, *, metric: str | None = None, step: int | None = None,
                    **where) -> Figure:
    """Fig. 8: `study.model_compute_fit` for the same arguments: the metric vs forward Gflops per image (log-log)
    at one training step, with the fitted line, its confidence band, the prediction interval for a new config, and
    the slope and correlations."""
    return _fig8(records, metric=metric, step=step, **where)[0]


@_styled
def _fig8(records, **selection) -> tuple[Figure, LogLogFit]:
    points = study.model_compute_points(records, **selection)
    fit = study.model_compute_fit(points)
    metric, step = fit.metadata["metric"], fit.metadata["step"]
    runs = _per_run(points)
    styles = _run_styles(runs)

    fig = Figure(figsize=(6.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    x = np.geomspace(points["gflops"].min() / 1.6, points["gflops"].max() * 1.6, 200)
    ax.fill_between(x, *fit.prediction_interval(x), color="0.5", alpha=0.12, linewidth=0,
                    label=f"{fit.confidence:.0%} prediction interval")
    ax.fill_between(x, *fit.confidence_band(x), color="0.3", alpha=0.25, linewidth=0,
                    label=f"{fit.confidence:.0%} confidence band")
    ax.plot(x, fit.predict(x), color="0.15", linewidth=1.5, label="log-log fit")
    for row in points.sort_values("run", kind="stable").itertuples():  # every fitted point
        style = styles[row.run]
        ax.plot(row.gflops, row.value, marker=style.marker, color=style.color, markersize=7, linestyle="",
                markeredgecolor="white", zorder=3)
    _log_axis(ax, "x", x, pad=1.0)
    _log_axis(ax, "y", points["value"], pad=1.25)
    ax.set_xlabel("Transformer Gflops (forward, per image)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at {_format_steps(step)} training steps vs model compute")
    # The fit's numbers head the legend, which goes where it hides the fewest points.
    lo, hi = fit.slope_ci
    ax.legend(title=f"slope = {fit.slope:.3f} ({fit.confidence:.0%} CI {lo:.3f} to {hi:.3f})\n"
                    f"Pearson r = {fit.pearson_r:.3f}, Spearman r = {fit.spearman_r:.3f}\n"
                    f"{fit.n_configs} configs",
              loc="best", alignment="left", frameon=True, facecolor="white", edgecolor="0.8", framealpha=0.95,
              fontsize=8.5, title_fontsize=8.5)
    _label_points(ax, runs["gflops"].to_numpy(), runs["value"].to_numpy(), [styles[r].label for r in runs["run"]],
                  np.full(len(runs), 4.0))
    return fig, fit


# ---------------------------------------------------------------------------------------------------------------
# Fig. 9: metric vs training compute, frontier and offset power law
# ---------------------------------------------------------------------------------------------------------------

def fig9_training_compute(records: Records | pd.DataFrame, *, metric: str | None = None,
                          n_bootstrap: int = study.FRONTIER_N_BOOTSTRAP, **where) -> Figure:
    """Fig. 9: `study.training_compute_fit` for the same arguments: the metric vs training compute (3 x Gflops x
    batch x steps; log-log) for every run, with the compute-efficient frontier and the offset power law fitted to
    it (with its confidence band). When the law cannot be fitted, the figure says why and shows the curves and
    frontier only."""
    return _fig9(records, metric=metric, n_bootstrap=n_bootstrap, **where)[0]


@_styled
def _fig9(records, *, n_bootstrap: int, **selection) -> tuple[Figure, FrontierFit | None, str | None]:
    points = study.training_compute_points(records, **selection)
    if points["run"].nunique() < 2:
        raise RecordsError(f"Fig. 9 compares runs by training compute, but {points['run'].nunique()} run(s) have "
                           "both a step and a batch size (train_gflops_cumulative).")
    metric = points["metric"].iloc[0]
    fit, unfitted = None, None
    try:
        fit = study.training_compute_fit(points, n_bootstrap=n_bootstrap)
        frontier = fit.frontier
    except RecordsError as e:
        unfitted = str(e)
        frontier = study.training_compute_frontier(points)
    styles = _run_styles(points)

    fig = Figure(figsize=(7.6, 4.8), layout="constrained")
    ax = fig.add_subplot()
    _plot_curves(ax, points, "train_gflops_cumulative", styles)
    ax.plot(frontier.grid["x"], frontier.grid["y"], color="0.35", linewidth=3.5, alpha=0.35,
            solid_capstyle="butt", label="compute frontier", zorder=2)
    if fit is not None:
        x = np.geomspace(frontier.grid["x"].iloc[0], frontier.grid["x"].iloc[-1], 200)
        ax.fill_between(x, *fit.confidence_band(x), color="0.2", alpha=0.15, linewidth=0, zorder=1,
                        label=f"{fit.confidence:.0%} confidence band")
        law = fit.law
        floor = "0" if law.floor < 1e-3 * points["value"].min() else _sci(law.floor)
        ax.plot(x, fit.predict(x), color="black", linestyle="--", linewidth=1.4, zorder=4,
                label=f"fit: ${floor} + {_sci(law.scale)}\\,(C / {_sci(law.x_ref)})^{{-{law.exponent:.3f}}}$")
    else:
        ax.text(0.02, 0.03, f"power law not fitted: {unfitted}", transform=ax.transAxes, fontsize=8, color="0.3",
                wrap=True)
    _log_axis(ax, "x", points["train_gflops_cumulative"])
    _log_axis(ax, "y", points["value"])
    ax.set_xlabel("Training compute C (Gflops: 3 × forward Gflops × batch × steps)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs training compute")
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig, fit, unfitted


# ---------------------------------------------------------------------------------------------------------------
# Fig. 10: metric vs sampling compute
# ---------------------------------------------------------------------------------------------------------------

def fig10_sampling_compute(records: Records | pd.DataFrame, *, metric: str | None = None,
                           step: int | None = None, **where) -> Figure:
    """Fig. 10: `study.sampling_tradeoff` for the same arguments: the metric vs sampling compute per image (Gflops
    x sampling steps, x2 with guidance; log x) at one training step (default: the latest step most runs share),
    one line per model across sampling-step counts, with the frontier over every (model, steps) pair."""
    return _fig10(records, metric=metric, step=step, **where)[0]


@_styled
def _fig10(records, **selection) -> tuple[Figure, study.SamplingTradeoff]:
    evaluations = records.evaluations if isinstance(records, Records) else records
    if "sampling_steps" not in evaluations.columns or evaluations["sampling_steps"].isna().all():
        raise RecordsError("Fig. 10 compares sampling-step counts, but the records give no sampling_steps (e.g. a "
                           "CSV without a sampling_steps column); evaluate the same checkpoints with several step "
                           "counts and record them.")
    # Metrics evaluated with several step counts, to point at when the chosen one was not.
    varying = [m for m in study.metrics_by_count(evaluations)
               if evaluations.loc[evaluations["metric"] == m, "sampling_steps"].nunique() >= 2]
    try:
        tradeoff = study.sampling_tradeoff(records, **selection)
    except RecordsError as e:
        # A metric given explicitly that study refuses (e.g. one sampling-step count): point at those that vary.
        others = [m for m in varying if m != selection.get("metric")]
        if selection.get("metric") and others and "metric=" not in str(e):
            raise RecordsError(f"{e} {others} vary sampling_steps: pass metric={others[0]!r}.") from e
        raise
    points, metric, step = tradeoff.points, tradeoff.metadata["metric"], tradeoff.metadata["step"]
    if points["sampling_steps"].nunique() < 2:
        hint = f"; {varying} vary it: pass metric={varying[0]!r}" if varying else ""
        raise RecordsError(f"Fig. 10 compares sampling-step counts, but every {metric} point at step {step} uses "
                           f"sampling_steps={points['sampling_steps'].iloc[0]:g}{hint}. Evaluate the same "
                           "checkpoints with several step counts (--config.eval.sampling_steps).")
    styles = _run_styles(points)

    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(tradeoff.frontier.grid["x"], tradeoff.frontier.grid["y"], color="0.35", linewidth=3.5, alpha=0.35,
            solid_capstyle="butt", label="frontier", zorder=1)
    _plot_curves(ax, points, "sampling_gflops_per_image", styles)
    # Step counts beside the points: all of them when few, else along the largest model's line only.
    annotated = points if len(points) <= 8 else points[points["gflops"] == points["gflops"].max()]
    for row in annotated.itertuples():
        ax.annotate(f"{int(row.sampling_steps)} steps", (row.sampling_gflops_per_image, row.value), xytext=(5, 5),
                    textcoords="offset points", fontsize=7.5, color="0.3")
    _log_axis(ax, "x", points["sampling_gflops_per_image"], pad=1.5)
    if points["value"].max() / points["value"].min() > 3:
        _log_axis(ax, "y", points["value"])
    else:
        ax.margins(y=0.15)
    guided = points["guidance_scale"].fillna(1.0).iloc[0] != 1.0
    ax.set_xlabel("Sampling compute (Gflops per image: forward Gflops × sampling steps"
                  + (" × 2 for guidance)" if guided else ")"))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs sampling compute, {_format_steps(step)} training steps")
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig, tradeoff


# ---------------------------------------------------------------------------------------------------------------
# Fig. 13: training loss
# ---------------------------------------------------------------------------------------------------------------

@_styled
def fig13_loss(records: Records | pd.DataFrame) -> Figure:
    """Fig. 13: training loss over steps per run, coloured by model size and styled by patch size; a light rolling
    mean over the raw loss, which is drawn faintly behind it."""
    figure_name = "Fig. 13"
    if isinstance(records, Records):
        steps = records.steps
        models = records.runs.set_index("run")["model"]
    else:
        steps = records
        models = steps.groupby("run")["model"].first() if "model" in steps.columns else None
    if steps.empty or "loss" not in steps.columns or steps["loss"].isna().all():
        raise RecordsError(f"{figure_name} needs training-step records (records.jsonl: step and loss per logged "
                           "step); the records hold evaluations only.")
    steps = steps.dropna(subset=["loss"])
    runs = pd.DataFrame({"run": steps["run"].unique()})
    runs["model"] = runs["run"].map(models) if models is not None else runs["run"]
    runs["model"] = runs["model"].fillna(runs["run"])
    styles = _run_styles(runs)

    fig = Figure(figsize=(7.2, 4.6), layout="constrained")
    ax = fig.add_subplot()
    smoothed_values = []
    for run in _ordered_runs(runs):
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
    ax.set_ylim(*_padded(settled, 0.2))
    ax.xaxis.set_major_formatter(FuncFormatter(_format_steps))
    ax.set_xlabel("Training steps")
    ax.set_ylabel("Training loss (MSE + VB)" if "vb" in steps.columns else "Training loss")
    ax.set_title("Training loss (faint: raw; solid: rolling mean)")
    fig.legend(loc="outside right center", fontsize=8.5)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Table 4
# ---------------------------------------------------------------------------------------------------------------

def _table4(records: Records | pd.DataFrame, metric: str | None, where: dict) -> tuple[str, pd.DataFrame]:
    """Rows: model, resolution, block, Gflops, params, steps, metric; in the paper's order."""
    # Every block and resolution; the table shows each row's resolution, so points whose protocols differ only in
    # the reference set combine.
    points = study.select_protocol(records, metric=metric, vary=("reference", "block", "resolution"), **where)
    metric = points["metric"].iloc[0]
    rows = points.groupby(["run", "step"], as_index=False).agg(
        model=("model", "first"), resolution=("resolution", "first"), block=("block", "first"),
        gflops=("gflops", "first"), params_m=("params_m", "first"), value=("value", "mean"))
    # The block of the most runs first; runs that name no block (a CSV without a block column) count as one block.
    block_counts = rows.drop_duplicates("run")["block"].value_counts(dropna=False)
    common_block = block_counts.index[0]

    def is_common(block) -> bool:
        return bool(pd.isna(block)) if pd.isna(common_block) else block == common_block

    rows["order"] = [
        (not is_common(block), BLOCKS.index(block) if block in BLOCKS else len(BLOCKS),
         -1 if pd.isna(resolution) else resolution, _config_order(model, gflops), step)
        for block, resolution, model, gflops, step in zip(rows["block"], rows["resolution"], rows["model"],
                                                          rows["gflops"], rows["step"], strict=True)]
    rows = rows.sort_values("order").drop(columns="order").reset_index(drop=True)
    table = pd.DataFrame({
        "Model": rows["model"].astype(str),
        "Res.": rows["resolution"].map(lambda r: "" if pd.isna(r) else f"{int(r)}"),
        "Block": rows["block"].map(lambda b: "" if pd.isna(b) else str(b)),
        "Gflops": rows["gflops"].map(_format_gflops),
        "Params (M)": rows["params_m"].map(lambda p: "" if pd.isna(p) else _format_params(p)),
        "Steps": rows["step"].map(_format_table_steps),
        metric: rows["value"].map(lambda v: f"{v:.2f}"),
    })
    # Records that never give a resolution, block or parameter count (e.g. a user's CSV) leave those columns out.
    empty = [column for column in ("Res.", "Block", "Params (M)") if (table[column] == "").all()]
    return metric, table.drop(columns=empty)


def table4_markdown(records: Records | pd.DataFrame, *, metric: str | None = None, **where) -> str:
    """Table 4 as a Markdown table: model, resolution, block, Gflops, params, training steps, metric."""
    _, table = _table4(records, metric, where)
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" if c in ("Model", "Block") else "---:" for c in table.columns) + "|"
    body = ["| " + " | ".join(row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def table4_latex(records: Records | pd.DataFrame, *, metric: str | None = None, **where) -> str:
    """Table 4 as a LaTeX tabular (booktabs rules)."""
    metric, table = _table4(records, metric, where)
    align = "".join("l" if c in ("Model", "Block") else "r" for c in table.columns)
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule",
             " & ".join(_latex_escape(c) for c in table.columns) + r" \\", "\\midrule"]
    lines += [" & ".join(_latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------------------------

# Loggers that chatter at INFO while a figure is saved: fontTools logs every table it prunes when matplotlib
# subsets the fonts embedded in a PDF (hundreds of lines per figure).
QUIET_LOGGERS = ("fontTools",)


@contextlib.contextmanager
def quiet_font_logging() -> Iterator[None]:
    """Raise the font loggers to WARNING for the duration (where they are below it), then restore them."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    with matplotlib.rc_context(STYLE), quiet_font_logging():
        fig.savefig(paths[0], dpi=PNG_DPI)
        fig.savefig(paths[1])
    return paths


CAPTIONS = {
    "fig2_bubble": "Fig. 2: the metric vs model Gflops; bubble area is proportional to Gflops.",
    "fig5_conditioning": "Fig. 5: conditioning blocks of one model.",
    "fig6_curves": "Fig. 6: the metric over training, by patch size (top) and by model size (bottom).",
    "fig6_curves_one_panel": "Fig. 6: the metric over training, one curve per run (not grouped by patch and size: "
                             "fewer than two runs with curves are named DiT-SIZE/PATCH).",
    "fig8_gflops_fit": "Fig. 8: the metric vs model Gflops, log-log fit with confidence band and prediction interval.",
    "fig9_training_compute": "Fig. 9: the metric vs training compute, with the compute frontier and its power law.",
    "fig10_sampling_compute": "Fig. 10: the metric vs sampling compute per image.",
    "fig13_loss": "Fig. 13: training loss.",
}


def render_all(records: Records, out_dir: str | Path, *, metric: str | None = None
               ) -> tuple[list[Path], dict[str, str]]:
    """Write every figure the records support (NAME.png and NAME.pdf), table4.md, table4.tex and report.md into
    out_dir. Returns the written paths and {figure name: why it was skipped}. The points are `study.select`'s
    (configs of one block and resolution, one metric, default: the one with the most points, and its most common
    protocol), the fits study's; the report lists what was left out."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_evaluations = not records.evaluations.empty
    notes: list[str] = []
    protocol, candidates = None, []
    if has_evaluations:
        selection = study.select(records, metric=metric)
        family, protocol, notes = selection.family, selection.protocol, [*selection.notes]
        if family:
            notes.append("Fig. 5 and Table 4 show every conditioning block and resolution.")
        candidates = [metric] if metric else [selection.metric] + [
            m for m in study.metrics_by_count(records) if m != selection.metric]
        metric = selection.metric
    else:
        family = study.scaling_family(records.runs, notes=notes)
        notes.append("The records hold no evaluations: only the training loss can be drawn.")
    written: list[Path] = []
    skipped: dict[str, str] = {}
    fits: dict[str, object] = {}
    captions = dict(CAPTIONS)

    def fig6():
        fig = fig6_curves(records, metric=metric)
        if len(fig.axes) == 1:  # the single panel of runs not named DiT-SIZE/PATCH
            captions["fig6_curves"] = CAPTIONS["fig6_curves_one_panel"]
        return fig

    def fig8():
        fig, fits["fig8"] = _fig8(records, metric=metric)
        return fig

    def fig9():
        fig, fit, unfitted = _fig9(records, metric=metric, n_bootstrap=study.FRONTIER_N_BOOTSTRAP)
        fits["fig9"] = (fit, unfitted)
        return fig

    def fig10():
        # The chosen metric's points if they vary the sampling steps, else the first metric's that do.
        for candidate in candidates:
            try:
                fig, fits["fig10"] = _fig10(records, metric=candidate)
                return fig
            except RecordsError as e:
                reason = e
        if len(candidates) == 1:
            raise reason
        raise RecordsError(f"no metric ({', '.join(candidates)}) was evaluated with several sampling-step counts "
                           "under one protocol; evaluate the same checkpoints with several step counts "
                           "(--config.eval.sampling_steps).")

    renderers = {
        "fig2_bubble": lambda: fig2_bubble(records, metric=metric),
        "fig5_conditioning": lambda: fig5_conditioning(records, metric=metric, protocol=protocol),
        "fig6_curves": fig6,
        "fig8_gflops_fit": fig8,
        "fig9_training_compute": fig9,
        "fig10_sampling_compute": fig10,
        "fig13_loss": lambda: fig13_loss(records.where(**family)),
    }
    for name in FIGURES:
        render = renderers[name]
        if not has_evaluations and name != "fig13_loss":
            skipped[name] = "the records hold no evaluations (metric values per run and step)"
            continue
        try:
            written += _save(render(), out_dir, name)
        except RecordsError as e:
            skipped[name] = str(e)

    table_markdown = None
    if has_evaluations:
        try:
            table_markdown = table4_markdown(records, metric=metric)
            (out_dir / "table4.md").write_text(table_markdown)
            (out_dir / "table4.tex").write_text(table4_latex(records, metric=metric))
            written += [out_dir / "table4.md", out_dir / "table4.tex"]
        except RecordsError as e:
            skipped["table4"] = str(e)
    else:
        skipped["table4"] = "the records hold no evaluations"

    report = out_dir / "report.md"
    report.write_text(_report(records, notes, fits, table_markdown, written, skipped, captions))
    written.append(report)
    return written, skipped


def _report(records, notes: list[str], fits: dict, table_markdown, written, skipped, captions: dict) -> str:
    lines = ["# Scaling report", "",
             f"{records.runs['run'].nunique()} runs, {len(records.evaluations)} evaluation points, "
             f"{len(records.steps)} training-step records.", ""]
    lines += [f"- {note}" for note in notes]
    if "fig10" in fits:
        points = fits["fig10"].points
        lines.append(f"- Fig. 10 uses {points['metric'].iloc[0]} at sampling steps "
                     f"{sorted(int(s) for s in points['sampling_steps'].unique())}.")
    lines.append("")

    if "fig8" in fits:
        fit = fits["fig8"]
        lo, hi = fit.slope_ci
        lines += ["## Model compute (Fig. 8)", "",
                  f"log10 {fit.metadata['metric']} = {fit.intercept:.3f} {'-' if fit.slope < 0 else '+'} "
                  f"{abs(fit.slope):.3f} log10 Gflops at {_format_steps(fit.metadata['step'])} steps: slope "
                  f"{fit.slope:.3f} ({fit.confidence:.0%} CI {lo:.3f} to {hi:.3f}, bootstrap over {fit.n_configs} "
                  f"configs), Pearson r = {fit.pearson_r:.3f} "
                  f"(p = {fit.pearson_p:.2g}), Spearman r = {fit.spearman_r:.3f} (p = {fit.spearman_p:.2g}), "
                  f"residual scatter {fit.residual_std:.3f} in log10.", ""]
        lines += [_extrapolation_line(fit.leave_largest_out), ""]
    if "fig9" in fits:
        fit, unfitted = fits["fig9"]
        lines += ["## Training compute (Fig. 9)", ""]
        if fit is None:
            lines += [f"The offset power law was not fitted: {unfitted}", ""]
        else:
            summary = fit.summary()
            law, convergence = fit.law, fit.convergence

            def interval(name):
                lo, hi = summary[f"{name}_ci"]
                return f"{lo:.3g} to {hi:.3g}"

            lines += [f"{fit.metadata['metric']} = floor + scale (C / {law.x_ref:.3g})^-exponent on the "
                      f"frontier's {len(fit.data)} points ({summary['n_configs']} runs): floor "
                      f"{'≈0' if 'floor=0' in convergence['at_bound'] else f'{law.floor:.3g}'} "
                      f"({interval('floor')}), scale {law.scale:.3g} ({interval('scale')}), exponent "
                      f"{law.exponent:.3f} ({interval('exponent')}); {fit.confidence:.0%} bootstrap intervals over "
                      f"runs ({summary['n_bootstrap']} replicates).", "",
                      f"Convergence: {'converged' if convergence['converged'] else 'NOT converged'}, "
                      f"{convergence['starts_at_best']} of {convergence['starts']} starts reached the best fit"
                      + (f"; parameters at their bounds: {', '.join(convergence['at_bound'])}"
                         if convergence["at_bound"] else "") + ".", "",
                      _extrapolation_line(fit.leave_largest_out), "",
                      "Compute-optimal run by range of training compute: "
                      + "; ".join(f"{r.run} ({r.x_start:.2g} to {r.x_end:.2g})"
                                  for r in fit.frontier.optimal_ranges().itertuples()) + ".", ""]
    if "fig10" in fits:
        lines += _sampling_lines(fits["fig10"])
    if table_markdown:
        rows = table_markdown.count("\n") - 2
        lines += ["## Table 4", ""] + ([table_markdown] if rows <= REPORT_TABLE_ROWS else
                                       [f"{rows} rows: see [table4.md](table4.md).", ""])
    figures = [p.stem for p in written if p.suffix == ".png"]
    if figures:
        lines += ["## Figures", ""]
        for name in figures:
            lines += [f"![{captions[name]}]({name}.png)", "", f"*{captions[name]}*", ""]
    if skipped:
        lines += ["## Not drawn", ""]
        lines += [f"- {name}: {reason}".replace("\n", " ") for name, reason in skipped.items()]
        lines.append("")
    return "\n".join(lines)


SAMPLING_EXAMPLES = 3  # cases of a smaller model beating a larger one that the report spells out


def _sampling_lines(tradeoff) -> list[str]:
    """The report's answer to the paper's sampling question from `study.sampling_tradeoff`: the best (model,
    sampling steps) pair in each range of sampling compute, and whether a smaller model sampled with more steps
    beats a larger one sampled with fewer (at no more sampling compute). Reads only the `pair`, `winners` and
    `smaller_beats_larger` columns, whatever names the pairs carry (models or runs)."""
    metadata = tradeoff.metadata
    n_pairs = tradeoff.points.groupby(["run", "sampling_steps"]).ngroups
    lines = ["## Sampling compute (Fig. 10)", "",
             f"{metadata['metric']} at {_format_steps(metadata['step'])} training steps, {n_pairs} (model, sampling "
             "steps) pairs. Best pair by sampling compute per image (Gflops: forward Gflops × sampling steps, × 2 "
             "with guidance):", ""]
    lines += [f"- {row.pair}: " + (f"{row.budget_from:.3g} to {row.budget_to:.3g}" if row.budget_to > row.budget_from
                                   else f"at {row.budget_from:.3g} (the largest budget evaluated)")
              for row in tradeoff.winners.itertuples()]
    lines.append("")
    beats = tradeoff.smaller_beats_larger
    if beats.empty:
        lines += ["Can sampling compute make up for model compute? No: no smaller model sampled with more steps "
                  f"scores better ({metadata['metric']}, lower is better) than a larger model sampled with fewer.",
                  ""]
        return lines
    cheap = beats[beats["at_most_the_compute"].astype(bool)]
    if len(cheap):
        answer = (f"Yes: in {len(beats)} case(s) a smaller model sampled with more steps beats a larger model "
                  f"sampled with fewer, {len(cheap)} of them at no more sampling compute per image")
    else:
        answer = (f"Only with more sampling compute: in {len(beats)} case(s) a smaller model sampled with more steps "
                  "beats a larger model sampled with fewer, but never at no more sampling compute per image")
    examples = cheap if len(cheap) else beats
    examples = examples.assign(margin=examples["value_larger"] - examples["value_smaller"]).sort_values(
        "margin", ascending=False).head(SAMPLING_EXAMPLES)
    lines += [f"Can sampling compute make up for model compute? {answer}. "
              f"{'The clearest' if len(examples) > 1 else 'The'} ({metadata['metric']}, lower is better):", ""]
    for row in examples.itertuples():
        lines.append(f"- {row.model_smaller} with {row.sampling_steps_smaller:g} steps ({row.value_smaller:.2f}) "
                     f"beats {row.model_larger} with {row.sampling_steps_larger:g} steps ({row.value_larger:.2f})"
                     + ("" if row.at_most_the_compute else ", with more sampling compute") + ".")
    lines.append("")
    return lines


def _extrapolation_line(extrapolation) -> str:
    if extrapolation is None:
        return "Leave-largest-out check: not possible (too few configs without the largest)."
    return (f"Leave-largest-out check: refitted without {extrapolation.held_out}, the fit predicts its "
            f"{len(extrapolation.x)} point(s) {extrapolation.relative_error:+.1%} off "
            f"(log10 error {extrapolation.log10_error:+.3f}; > 0: pessimistic).")
