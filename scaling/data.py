"""Training data with grain: class-conditional images or pre-extracted latents, NHWC, values in [-1, 1].

Sources (random access, numpy):
- `FashionMNIST`: IDX files (Debian's `dataset-fashion-mnist` by default), 28x28 padded to 32x32x1, or those
  averaged over 2x2 blocks to 16x16x1 (data.resolution 16), 10 classes.
- `LatentShards` (scaling.latents): posterior moments of autoencoded crops and their flips, as
  `dit-scaling extract-latents` writes them; each epoch draws a fresh latent and a fresh flip.

`make_iterator` shuffles per epoch, flips, and hands each host its share of every global batch: global batch b
is a contiguous block of the shuffled stream and host h reads rows h*L .. (h+1)*L - 1 of it (L = per-host
batch). Its state (`get_state`/`set_state`) is checkpointed with the model so data order survives restarts.
"""

from __future__ import annotations

import gzip
import os

import grain
import numpy as np
from etils import epath

from scaling.latents import LatentShards, autoencoder_sha256

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as used by MNIST and Fashion-MNIST."""
    path = epath.Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number).")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path} holds {len(data) - offset} bytes of data, expected {expected} for shape {shape} "
                         "(truncated or corrupt file).")
    return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def _find(directory: epath.Path, stem: str) -> epath.Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install Debian's dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist, which `make` does) or set --config.data.path to a directory "
        "with the IDX files.")


FASHION_MNIST_RESOLUTIONS = (32, 16)


class FashionMNIST:
    """Fashion-MNIST as uint8 [N, R, R, 1] images and int32 labels: R = 32 zero-pads the 28x28 images, R = 16
    averages those over 2x2 blocks (rounded)."""

    num_classes = 10
    pixels_per_input = 1  # the model sees pixels
    classifier_resolution = 32  # what the FashionCNN of the small-data metrics takes

    def __init__(self, path: str = "", split: str = "train", resolution: int = 32):
        if resolution not in FASHION_MNIST_RESOLUTIONS:
            raise ValueError(f"Fashion-MNIST resolution {resolution}: use one of {FASHION_MNIST_RESOLUTIONS} "
                             "(data.resolution; 0 is 32).")
        directory = epath.Path(path or FASHION_MNIST_DIR)
        images_stem, labels_stem = FASHION_MNIST_FILES[split]
        images = read_idx(_find(directory, images_stem))
        labels = read_idx(_find(directory, labels_stem))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise ValueError(f"Unexpected Fashion-MNIST shapes in {directory}: images {images.shape}, "
                             f"labels {labels.shape}.")
        padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        if resolution == 16:
            padded = padded.reshape(-1, 16, 2, 16, 2).mean(axis=(2, 4)).round().astype(np.uint8)
        self.images = padded[..., None]
        self.image_shape = (resolution, resolution, 1)
        self.labels = labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": self.images[index], "label": self.labels[index]}

    @classmethod
    def at_classifier_resolution(cls, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, R, R, 1] enlarged to the FashionCNN's 32x32 by repeating pixels (the inverse of the
        2x2 average where R = 16), so that samples, reference and held-out images reach it alike."""
        factor = cls.classifier_resolution // images.shape[1]
        return images if factor == 1 else np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)

    @staticmethod
    def to_model_input(example, rng: np.random.Generator, flip: bool) -> dict:
        """The image in [-1, 1], flipped horizontally half the time with `flip`."""
        image = example["image"].astype(np.float32) / 127.5 - 1.0
        if flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "label": example["label"]}


def open_source(config, split: str = "train"):
    """The random-access training source of a study config (Fashion-MNIST's `split` where the config trains on
    Fashion-MNIST)."""
    if config.data.source == "fashion_mnist":
        return FashionMNIST(config.data.path, split=split, resolution=config.data.resolution or 32)
    if config.data.source == "latent_shards":
        if split != "train":
            raise ValueError(f"Latent runs read their {split!r} images through open_held_out (data.validation_path).")
        autoencoder = config.data.autoencoder
        return LatentShards(config.data.path, resolution=config.data.resolution,
                            autoencoder_sha256=autoencoder_sha256(autoencoder) if autoencoder else "")
    raise ValueError(f"Unknown data.source {config.data.source!r}: use fashion_mnist or latent_shards.")


def open_held_out(config, source):
    """The held-out images of the run training on `source`: Fashion-MNIST's test split, or a latent run's
    data.validation_path (latents of the validation split, from the same resolution, autoencoder and classes)."""
    if config.data.source != "latent_shards":
        return open_source(config, split="test")
    held_out = LatentShards(config.data.validation_path, resolution=source.manifest["resolution"],
                            autoencoder_sha256=source.manifest["autoencoder"].get("sha256", ""), split="validation",
                            config_field="data.validation_path")
    if held_out.manifest["classes"] != source.manifest["classes"]:
        raise ValueError(f"The validation latents in {config.data.validation_path} have other classes than the "
                         f"training latents in {config.data.path} ({held_out.num_classes} vs {source.num_classes}, "
                         "or another order): extract both from folders of the same class names.")
    return held_out


def held_out_indices(source, n: int) -> np.ndarray:
    """Which `n` examples of a held-out source the held-out loss uses: Fashion-MNIST's first n (its test split is
    in no order), n evenly spaced latents (extract-latents writes them class by class, so the first n would be the
    first classes' alone)."""
    if n > len(source):
        raise ValueError(f"eval.validation_examples={n} exceeds the {len(source)} held-out images: lower it, or "
                         "give more held-out images.")
    if isinstance(source, LatentShards):
        return np.linspace(0, len(source), n, endpoint=False).astype(np.int64)
    return np.arange(n)


def held_out_inputs(source, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The `held_out_indices` examples of a held-out source as fixed model inputs (unflipped; a latent's
    posterior drawn with `seed`), and their labels: the same at every evaluation."""
    rng = np.random.default_rng(seed)
    examples = [source[int(i)] for i in held_out_indices(source, n)]
    inputs = np.stack([source.to_model_input(example, rng, flip=False)["image"] for example in examples])
    return inputs, np.asarray([example["label"] for example in examples], np.int32)


def make_dataset(source, *, global_batch: int, seed: int, flip: bool, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """Batches for one host: element b is this host's share of global batch b (see the module docstring)."""
    if global_batch % process_count:
        raise ValueError(f"Global batch {global_batch} does not split evenly over {process_count} hosts.")
    local_batch = global_batch // process_count
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(lambda example, rng: source.to_model_input(example, rng, flip), seed=seed + 1)
    return ds.batch(local_batch)[process_index::process_count]


def make_iterator(dataset: grain.MapDataset, num_threads: int = 2):
    """Batches read ahead by `num_threads` threads, a batch each, into a buffer of as many batches (at least 4)."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(4, num_threads))
    return iter(dataset.to_iter_dataset(options))
