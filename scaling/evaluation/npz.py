"""Sample batches, reference batches and image folders, in ADM's .npz layout so they open in its evaluator
unchanged:
- a sample batch holds `arr_0` (uint8 [N, H, W, 3], NHWC RGB) and optionally `arr_1` (int labels), plus
  `uint8_convention`, how decoder outputs in [-1, 1] became bytes (see `to_uint8`);
- a reference batch holds `arr_0` (reference images, used for precision and recall) and optionally the
  statistics `mu`, `sigma` (pool_3, FID) and `mu_s`, `sigma_s` (spatial, sFID); without them they are computed
  from `arr_0`. `inception.write_reference` makes one from an image folder or an array file.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from etils import epath

from analysis import storage

# Decoder output x in [-1, 1] -> uint8. DiT's sample_ddp.py: floor(clip(127.5 x + 128)); ADM's sampler:
# floor(clip(127.5 (x + 1))). FIDs differ slightly between the two; compare numbers within one convention.
UINT8_CONVENTIONS = {"dit": (127.5, 128.0), "adm": (127.5, 127.5)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(x: np.ndarray, convention: str = "dit") -> np.ndarray:
    """Images in [-1, 1] -> uint8 with one of UINT8_CONVENTIONS."""
    if convention not in UINT8_CONVENTIONS:
        raise ValueError(f"unknown uint8 convention {convention!r}; choose one of {sorted(UINT8_CONVENTIONS)}.")
    scale, offset = UINT8_CONVENTIONS[convention]
    return np.floor(np.clip(scale * np.asarray(x, np.float64) + offset, 0, 255)).astype(np.uint8)


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 NHWC RGB [N, H, W, 3], got {images.dtype} {images.shape}.")
    return images


def write_sample_batch(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None,
                       convention: str = "dit") -> None:
    """Write uint8 NHWC images (and labels) as an ADM sample batch, atomically."""
    images = check_images(images, "samples")
    if convention not in UINT8_CONVENTIONS:
        raise ValueError(f"unknown uint8 convention {convention!r}; choose one of {sorted(UINT8_CONVENTIONS)}.")
    arrays = {"arr_0": images, "uint8_convention": np.array(convention)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, np.int64)
    atomic_savez(epath.Path(path), arrays)


def atomic_savez(path: epath.Path, arrays: dict) -> None:
    with storage.atomic_writer(path) as f:
        np.savez(f, **arrays)


def _load_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No batch file at {path}.")
    try:
        return np.load(storage.loadable(path), allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable .npz batch ({e}).") from e


@dataclasses.dataclass
class SampleBatch:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray | None
    convention: str | None  # None: not recorded in the file


def read_sample_batch(path: str | os.PathLike) -> SampleBatch:
    with _load_npz(path) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path} has no arr_0: not an ADM sample batch.")
        images = check_images(data["arr_0"], f"{path}: arr_0")
        labels = data["arr_1"] if "arr_1" in data else None
        convention = str(data["uint8_convention"]) if "uint8_convention" in data else None
    return SampleBatch(images, labels, convention)


@dataclasses.dataclass
class ReferenceBatch:
    images: np.ndarray | None  # uint8 [N, H, W, 3]; needed for precision and recall
    pool: tuple[np.ndarray, np.ndarray] | None  # (mu, sigma) of pool_3
    spatial: tuple[np.ndarray, np.ndarray] | None  # (mu_s, sigma_s)


def read_reference(path: str | os.PathLike) -> ReferenceBatch:
    with _load_npz(path) as data:
        images = check_images(data["arr_0"], f"{path}: arr_0") if "arr_0" in data else None
        pool = (data["mu"], data["sigma"]) if "mu" in data else None
        spatial = (data["mu_s"], data["sigma_s"]) if "mu_s" in data else None
    if images is None and (pool is None or spatial is None):
        raise ValueError(f"{path} needs reference images (arr_0) or both statistics (mu, sigma and mu_s, sigma_s).")
    return ReferenceBatch(images, pool, spatial)


def read_images(source: str | os.PathLike) -> np.ndarray:
    """uint8 NHWC RGB images from a folder of image files (sorted by name; all of one size) or an array file
    (.npz with arr_0, or .npy)."""
    source = epath.Path(source)
    if source.is_dir():
        from PIL import Image

        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) in {source}.")
        images = [np.asarray(Image.open(storage.loadable(f)).convert("RGB")) for f in files]
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise ValueError(f"images in {source} have different sizes {sorted(sizes)[:3]}; resize them first.")
        return np.stack(images)
    if source.suffix == ".npy":
        return check_images(np.load(storage.loadable(source), allow_pickle=False), str(source))
    with _load_npz(source) as data:
        if "arr_0" not in data:
            raise ValueError(f"{source} has no arr_0 image array.")
        return check_images(data["arr_0"], f"{source}: arr_0")
