"""The look shared by the figures: colours by model size, markers by patch size, axis formats, labels beside
points without overlaps, and saving (PNG and PDF, font subsetting kept quiet).

A run's DiT size and patch come from its `size` and `patch` columns, which the writer records; runs without them
(other architectures) take colours of their own, in order of Gflops, so a run keeps its colour from figure to
figure.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from etils import epath
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

from analysis import storage
from analysis.paper import PATCHES, SIZES

SIZE_COLORS = dict(zip(SIZES, sns.color_palette("colorblind", 4), strict=True))
PATCH_COLORS = dict(zip(PATCHES, sns.color_palette("viridis", 3), strict=True))
PATCH_MARKERS = {8: "s", 4: "^", 2: "o"}
PATCH_LINESTYLES = {8: ":", 4: "--", 2: "-"}
OTHER_COLORS = sns.color_palette("dark", 10)  # runs of other architectures (no size and patch)

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


def styled(render: Callable) -> Callable:
    @functools.wraps(render)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return render(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# Names, colours and axis formats
# ---------------------------------------------------------------------------------------------------------------

def dit_size_and_patch(size, patch) -> tuple[str | None, int | None]:
    """A run's DiT size and patch from its `size` and `patch` columns (written by the writer); (None, None) for
    other architectures (missing or NaN)."""
    if not isinstance(size, str) or size not in SIZES or patch is None or pd.isna(patch):
        return None, None
    return size, int(patch)


def with_dit_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table with `size` and `patch` columns (NaN where a source gives none, e.g. a CSV of other models)."""
    missing = {column: np.nan for column in ("size", "patch") if column not in table.columns}
    return table.assign(**missing) if missing else table


def config_label(model: str, size, patch) -> str:
    """A run's label in figures from its records' columns: "XL/2" for a DiT config, as the paper labels its points;
    other models keep their names."""
    size, patch = dit_size_and_patch(size, patch)
    return f"{size}/{patch}" if size else str(model)


def size_label(size: str) -> str:
    """The paper's name for a model size: "XL" -> "DiT-XL"."""
    return f"DiT-{size}"


def config_order(model: str, size, patch, gflops: float | None = None) -> tuple:
    """Sort key: S before XL, then patch 8 before 2 (the paper's order); other models after, by Gflops where
    given (smallest first), then by name."""
    size, patch = dit_size_and_patch(size, patch)
    if size is not None:
        return 0, SIZES.index(size), PATCHES.index(patch) if patch in PATCHES else -patch, ""
    return 1, 0.0 if gflops is None or pd.isna(gflops) else float(gflops), 0, str(model)


@dataclass(frozen=True)
class RunStyle:
    label: str
    color: tuple
    marker: str
    linestyle: str


def run_styles(runs: pd.DataFrame) -> dict[str, RunStyle]:
    """Colour by model size, marker and line style by patch size; labels are "S/8" unless two runs share a
    model (then the run names). Models that are not DiT configs take colours in `_ordered_runs` order (by Gflops),
    so a run keeps its colour from figure to figure."""
    runs = with_dit_columns(runs.drop_duplicates("run")).set_index("run").loc[ordered_runs(runs)].reset_index()
    shared_model = runs["model"].duplicated(keep=False)
    styles, others = {}, 0
    for row, shared in zip(runs.itertuples(), shared_model, strict=True):
        size, patch = dit_size_and_patch(row.size, row.patch)
        if size is None:
            color, others = OTHER_COLORS[others % len(OTHER_COLORS)], others + 1
        else:
            color = SIZE_COLORS.get(size)
        styles[row.run] = RunStyle(label=str(row.run) if shared else config_label(row.model, size, patch), color=color,
                                    marker=PATCH_MARKERS.get(patch, "D"), linestyle=PATCH_LINESTYLES.get(patch, "-"))
    return styles


def plot_curves(ax, points: pd.DataFrame, x: str, styles: dict[str, RunStyle]) -> None:
    """Each run's metric against column `x`, in its style."""
    for run in ordered_runs(points):
        curve = points[points["run"] == run].sort_values(x)
        style = styles[run]
        ax.plot(curve[x], curve["value"], color=style.color, linestyle=style.linestyle, marker=style.marker,
                markersize=5, linewidth=1.5, label=style.label, zorder=3)


def ordered_runs(table: pd.DataFrame) -> list[str]:
    """The table's runs in the paper's order (see `config_order`)."""
    runs = with_dit_columns(table.drop_duplicates("run")).set_index("run")
    gflops = runs["gflops"] if "gflops" in runs.columns else pd.Series(np.nan, index=runs.index)
    return sorted(runs.index, key=lambda run: (config_order(runs.at[run, "model"], runs.at[run, "size"],
                                                            runs.at[run, "patch"], gflops[run]), run))


def format_steps(value: float, _position=None) -> str:
    """400000 -> "400K", 7000000 -> "7M": the paper's step labels."""
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e4:
        return f"{value / 1e3:g}K"
    return f"{value:g}"


def format_table_steps(step: float) -> str:
    """Table 4 counts steps in thousands: 2352000 -> "2352K"."""
    if pd.isna(step):
        return ""
    return f"{step / 1e3:g}K" if step >= 1e4 and step % 1000 == 0 else f"{step:g}"


def format_gflops(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def format_params(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def sci(value: float, digits: int = 2) -> str:
    """Mathtext scientific notation: 9.1e9 -> 9.1\\times10^{9}."""
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.{digits + 1}g}"
    exponent = math.floor(math.log10(abs(value)))
    return f"{value / 10 ** exponent:.{digits}g}\\times10^{{{exponent}}}"


# ---------------------------------------------------------------------------------------------------------------
# Labels beside points, without overlaps
# ---------------------------------------------------------------------------------------------------------------

def label_points(ax, x, y, labels, radii_pt, fontsize: float = 8.5) -> None:
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
# Axes
# ---------------------------------------------------------------------------------------------------------------

def padded(values, fraction: float) -> tuple[float, float]:
    """Linear axis limits around the values, with a margin of `fraction` of their range on each side."""
    low, high = float(np.min(values)), float(np.max(values))
    margin = fraction * (high - low) or 0.05 * abs(high) or 1.0
    return low - margin, high + margin


def tick_label(value: float) -> str:
    """Plain numbers where they are short ("0.05", "200"), powers of ten elsewhere."""
    if value <= 0:  # a linear locator on a log axis may propose ticks that the axis cannot show
        return ""
    if 1e-4 <= value < 1e6:
        return f"{value:g}"
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = f"{value / 10 ** exponent:.3g}"
    return f"$10^{{{exponent}}}$" if mantissa == "1" else f"${mantissa}\\times10^{{{exponent}}}$"


def log_axis(ax, axis: str, values, pad: float = 1.3) -> None:
    """Log scale over the values (padded by a factor), with enough labelled ticks: an axis spanning less than a
    decade gets evenly spaced round numbers, one spanning less than 2.5 also labels 2 and 5 x 10^k."""
    low, high = float(np.min(values)) / pad, float(np.max(values)) * pad
    getattr(ax, f"set_{axis}scale")("log")
    getattr(ax, f"set_{axis}lim")(low, high)
    target = getattr(ax, f"{axis}axis")
    target.set_major_formatter(FuncFormatter(lambda v, _: tick_label(v)))
    decades = math.log10(high / low)
    if decades < 1:
        target.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        target.set_minor_locator(NullLocator())
    elif decades < 2.5:
        def minor(v, _):
            return tick_label(v) if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""
        target.set_minor_formatter(FuncFormatter(minor))
    else:
        target.set_minor_formatter(NullFormatter())


def size_legend(ax, runs: pd.DataFrame, **kwargs) -> None:
    runs = with_dit_columns(runs)
    present = {dit_size_and_patch(size, patch)[0] for size, patch in zip(runs["size"], runs["patch"], strict=True)}
    sizes = [s for s in SIZES if s in present]
    if sizes:
        handles = [Line2D([], [], marker="o", linestyle="", color=SIZE_COLORS[s], markersize=7) for s in sizes]
        ax.legend(handles, [size_label(s) for s in sizes], **{"loc": "upper right", **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Saving
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


# No creation date in the files: the same records render to the same bytes, so a re-rendered study that did not
# change leaves nothing to commit.
REPRODUCIBLE_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}}


def save_figure(fig: Figure, out_dir: epath.Path, name: str) -> list[epath.Path]:
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    with matplotlib.rc_context(STYLE), quiet_font_logging():
        for path in paths:  # through epath: the figures directory may be a gs:// URL
            kind = path.suffix[1:]
            with storage.atomic_writer(path) as f:
                fig.savefig(f, format=kind, dpi=PNG_DPI, metadata=REPRODUCIBLE_METADATA[kind])
    return paths
