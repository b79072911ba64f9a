"""Figures of the samples themselves, from the samples runs keep of their final evaluations (the `samples` column
of an evaluation: a path in the run's directory, `source`, to an .npz of uint8 images arr_0 and labels arr_1).

- `fig7_samples`: the paper's Fig. 7: the same noise and class labels through every DiT config, model size growing
  to the right and patch size shrinking downwards, with classifier-free guidance as the paper samples it.
- `class_grids`: each config's samples by class (one row per class), as the study's metric sees them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from etils import epath
from matplotlib.figure import Figure

from analysis.paper import PATCHES, SIZES
from analysis.schema import RecordsError
from analysis.style import dit_size_and_patch, with_dit_columns

FIG7_SAMPLES = 10  # per config: the first samples, one of each class with class-balanced labels
TILE_GAP = 1  # pixels between tiles


def read_kept_samples(row) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W, C], labels [N]) of the evaluation `row` (with columns source and samples)."""
    path = epath.Path(row["source"]) / row["samples"]
    if not path.is_file():
        raise RecordsError(f"{row['run']}: its samples {path} are missing; evaluate the run's last step again "
                           "(`dit-scaling train` with the same workdir) to write them.")
    with np.load(path) as batch:
        return batch["arr_0"], batch["arr_1"]


def tile(images: np.ndarray, columns: int) -> np.ndarray:
    """Images [N, H, W, C] as one grayscale or RGB array, `columns` to a row, with light gaps between them."""
    n, height, width, channels = images.shape
    rows = -(-n // columns)
    sheet = np.full((rows * (height + TILE_GAP) - TILE_GAP, columns * (width + TILE_GAP) - TILE_GAP, channels), 255,
                    np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        sheet[r * (height + TILE_GAP):r * (height + TILE_GAP) + height,
              c * (width + TILE_GAP):c * (width + TILE_GAP) + width] = image
    return sheet[..., 0] if channels == 1 else sheet


def _with_samples(points: pd.DataFrame, what: str) -> pd.DataFrame:
    if "samples" not in points.columns or points["samples"].isna().all():
        raise RecordsError(f"{what}: the records keep no samples (runs keep their last step's samples since "
                           "eval.final_guidance_scales and kept samples exist; train or re-evaluate the runs).")
    points = with_dit_columns(points[points["samples"].notna()])
    parsed = [dit_size_and_patch(s, p) for s, p in zip(points["size"], points["patch"], strict=True)]
    points = points.assign(size=[s for s, _ in parsed], patch=[p for _, p in parsed])
    points = points[points["size"].notna()]
    if points.empty:
        raise RecordsError(f"{what}: no run with kept samples is a DiT config (size and patch).")
    return points.drop_duplicates("run")


def _draw(ax, image: np.ndarray) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _config_grid(points: pd.DataFrame, panel_size: tuple[float, float], draw_panel) -> Figure:
    """A patch x size grid of panels, one per DiT config in `points` (model size grows to the right, patch size
    shrinks downwards); `draw_panel(ax, row)` fills a config's panel."""
    sizes = [s for s in SIZES if s in set(points["size"])]
    patches = [p for p in PATCHES if p in set(points["patch"])]
    width, height = panel_size
    fig = Figure(figsize=(width * len(sizes) + 0.6, height * len(patches) + 0.9), layout="constrained")
    axes = fig.subplots(len(patches), len(sizes), squeeze=False)
    by_config = {(row.size, row.patch): row for row in points.itertuples()}
    for i, patch in enumerate(patches):
        for j, size in enumerate(sizes):
            row = by_config.get((size, patch))
            if row is None:
                axes[i, j].set_axis_off()
            else:
                draw_panel(axes[i, j], row)
        axes[i, 0].set_ylabel(f"patch {patch}", fontsize=9)
    return fig


def fig7_samples(guided: pd.DataFrame) -> Figure:
    """Fig. 7 from the guided final evaluations (`analyze.guided_points`): the first FIG7_SAMPLES samples of each
    config (the same noise and labels for all) in a patch x size grid."""
    points = _with_samples(guided, "Fig. 7")

    def panel(ax, row):
        images, _ = read_kept_samples(row._asdict())
        _draw(ax, tile(images[:FIG7_SAMPLES], FIG7_SAMPLES // 2))
        ax.set_title(f"{row.size}/{row.patch}  ({row.gflops:.2g} Gflops)", fontsize=8.5)

    fig = _config_grid(points, (2.6, 1.25), panel)
    scale = float(points["guidance_scale"].iloc[0])
    fig.suptitle(f"The same noise and class labels through every config (guidance {scale:g}, step "
                 f"{int(points['step'].iloc[0])}): model size grows to the right, patch size shrinks downwards",
                 fontsize=10)
    return fig


def class_grids(final: pd.DataFrame) -> Figure:
    """Each config's kept samples of its final evaluation, one row per class, in the patch x size grid."""
    points = _with_samples(final, "The class grids")

    def panel(ax, row):
        images, labels = read_kept_samples(row._asdict())
        classes = np.unique(labels)
        per_class = min(int(np.sum(labels == c)) for c in classes)
        _draw(ax, tile(np.concatenate([images[labels == c][:per_class] for c in classes]), per_class))
        accuracy = getattr(row, "class_accuracy", np.nan)
        ax.set_title(f"{row.size}/{row.patch}: {row.value:.3g}"
                     + ("" if pd.isna(accuracy) else f", class acc. {accuracy:.2f}"), fontsize=8)

    fig = _config_grid(points, (2.3, 2.45), panel)
    scale = float(points["guidance_scale"].iloc[0])
    guidance = "no guidance" if scale == 1.0 else f"guidance {scale:g}"
    fig.suptitle(f"Samples by class (one row per class; {guidance}, step {int(points['step'].iloc[0])}), with "
                 f"{points['metric'].iloc[0]}", fontsize=10)
    return fig
