"""ImageNet as SD-autoencoder latents: the extraction (`dit-scaling extract-latents`) and the files it writes.

An ImageFolder tree (one folder per class; labels follow the sorted folder names, as torchvision's) is cropped
with ADM's recipe (`adm_center_crop`), and each crop and its horizontal flip are encoded. What is stored is the
posterior (mean and log-variance, unscaled) of both, so training draws a fresh latent and a fresh flip every
epoch, the paper's augmentation, instead of reusing one frozen sample.

Layout of OUT:
- moments-NNNNN.npy [n, 2, h, w, 2C] float32: axis 1 is (crop, flipped crop); channels are (mean, logvar);
- labels-NNNNN.npy [n] int32;
- manifest.json: the format, the split (train, or validation: the held-out images of eval.validation_*), the
  image count and shard size, the latent shape, the classes, the resolution and crop recipe, the autoencoder
  file (SHA-256), its latent scale, and status ("extracting" until every shard is written, then "complete").
Shard s holds images s*shard_size ... of the sorted image list. Each shard is written whole (to a temporary
name, then renamed), so a killed extraction resumes at the first missing shard and never writes one twice.
Host h of n extracts shards h, h + n, ...; within a host each batch is split over its local devices.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import sys
import time

import numpy as np
from etils import epath

from analysis import storage

LATENTS_FORMAT = "dit-scaling latents v1"
CROP_RECIPE = "adm-center-crop"  # guided-diffusion's center_crop_arr: box-halve, bicubic, centre crop
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
DEFAULT_SHARD_SIZE = 2500  # 164 MB of float32 moments per shard at 256px
LATENT_SPLITS = ("train", "validation")


def manifest_split(manifest: dict) -> str:
    """The split a latents manifest holds (manifests written before splits were recorded hold training images)."""
    return manifest.get("split", "train")


def adm_center_crop(image, resolution: int) -> np.ndarray:
    """ADM's centre crop of a PIL image to [resolution, resolution, 3] uint8: halve with a box filter while the
    short side is at least twice the target, resize bicubically so the short side is the target, cut the centre."""
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - resolution) // 2, (pixels.shape[1] - resolution) // 2
    return pixels[top: top + resolution, left: left + resolution]


def list_image_folder(root: str | os.PathLike) -> tuple[list[epath.Path], np.ndarray, list[str]]:
    """(image paths, int32 labels, class names) of an ImageFolder tree, in sorted class then file order."""
    root = epath.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"No image folder at {root}: give a directory with one sub-folder per class "
                                "(ImageNet's train/ layout).")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(folder / f for folder, _, names in (root / name).walk() for f in names
                       if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)  # walk: a bucket has no rglob
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"No images under {root}: expected class folders holding {', '.join(IMAGE_SUFFIXES)} "
                                "files.")
    return paths, np.asarray(labels, np.int32), classes


def file_sha256(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    return _file_sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def autoencoder_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the weights file an autoencoder path (a diffusers folder or a file) names."""
    from models.autoencoder import find_autoencoder_files

    return file_sha256(find_autoencoder_files(path)[0])


def _shard_files(directory: epath.Path, shard: int) -> tuple[epath.Path, epath.Path]:
    return directory / f"moments-{shard:05d}.npy", directory / f"labels-{shard:05d}.npy"


def _atomic_save(path: epath.Path, array: np.ndarray) -> None:
    with storage.atomic_writer(path) as f:
        np.save(f, array)


NPY_HEADER_READ = 4096  # bytes read for a .npy header (a shard's is 128): one range read, not a buffered open


def _npy_layout(path: epath.Path) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, offset of the data) from a .npy file's header, or None when the file is shorter or longer
    than that header says (read from the header and the file's size alone: a shard on gs:// is not downloaded to
    check it, and an object store's buffered open, which fetches megabytes ahead, is not used)."""
    head = storage.read_range(path, 0, NPY_HEADER_READ)
    f = io.BytesIO(head)
    version = np.lib.format.read_magic(f)
    length_bytes = 2 if version == (1, 0) else 4
    header_end = f.tell() + length_bytes + int.from_bytes(head[f.tell(): f.tell() + length_bytes], "little")
    if header_end > len(head):  # a header longer than the first read
        f = io.BytesIO(storage.read_range(path, 0, header_end))
        np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(f)
    data_start = f.tell()
    whole = path.stat().length == data_start + math.prod(shape) * dtype.itemsize
    return (shape, dtype, data_start) if whole and not fortran_order else None


def write_latent_shard(directory: str | os.PathLike, shard: int, moments: np.ndarray, labels: np.ndarray) -> None:
    """One shard: moments [n, 2, h, w, 2C] (see the module docstring) and labels [n]; labels are written last,
    so a shard counts as present only when both files are whole."""
    if moments.ndim != 5 or moments.shape[1] != 2 or labels.shape != (moments.shape[0],):
        raise ValueError(f"moments must be [n, 2, h, w, 2C] and labels [n], got {moments.shape} and "
                         f"{labels.shape}.")
    moments_path, labels_path = _shard_files(epath.Path(directory), shard)
    _atomic_save(moments_path, np.asarray(moments, np.float32))
    _atomic_save(labels_path, np.asarray(labels, np.int32))


def shard_counts(num_examples: int, shard_size: int) -> list[int]:
    return [min(shard_size, num_examples - start) for start in range(0, num_examples, shard_size)]


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    storage.write_atomic(epath.Path(directory) / "manifest.json", json.dumps(manifest, indent=2))


def latents_manifest(*, num_examples: int, shard_size: int, latent_shape, classes: list[str], resolution: int,
                     scale: float, autoencoder: dict, images_sha256: str = "", status: str = "complete",
                     split: str = "train") -> dict:
    """The manifest of a latents directory (see the module docstring)."""
    if split not in LATENT_SPLITS:
        raise ValueError(f"Unknown latents split {split!r}: use one of {', '.join(LATENT_SPLITS)}.")
    return {"format": LATENTS_FORMAT, "status": status, "split": split, "num_examples": int(num_examples),
            "shard_size": int(shard_size), "shard_counts": shard_counts(num_examples, shard_size),
            "latent_shape": [int(n) for n in latent_shape], "num_classes": len(classes), "classes": list(classes),
            "resolution": int(resolution), "crop": CROP_RECIPE, "scale": float(scale), "autoencoder": autoencoder,
            "images_sha256": images_sha256}


def _moments_offset(directory: epath.Path, shard: int, count: int, latent_shape) -> int | None:
    """Where the moments of a whole shard start in its file, or None when the shard is missing, cut short, or not
    [count] labels and [count, 2, h, w, 2C] float32 moments."""
    moments_path, labels_path = _shard_files(directory, shard)
    if not (moments_path.is_file() and labels_path.is_file()):
        return None
    try:
        moments, labels = _npy_layout(moments_path), _npy_layout(labels_path)
    except (ValueError, OSError):
        return None
    h, w, c = latent_shape
    if moments is None or labels is None or moments[1] != np.dtype("<f4") or labels[1] != np.dtype("<i4"):
        return None
    return moments[2] if moments[0] == (count, 2, h, w, 2 * c) and labels[0] == (count,) else None


def _shard_is_whole(directory: epath.Path, shard: int, count: int, latent_shape) -> bool:
    return _moments_offset(directory, shard, count, latent_shape) is not None


class LatentShards:
    """A complete latents directory of one split, streamed: example i is {"moments": [2, h, w, 2C], "label"}, read
    with one range read of its shard (a positioned read locally, a ranged GET on gs://), so a host holds only the
    examples it reads, however large the set (the labels, 4 bytes an example, are read at opening).
    `to_model_input` turns an example into a training input (a stored flip, a posterior draw, times the scale)."""

    def __init__(self, path: str | os.PathLike, *, resolution: int = 0, autoencoder_sha256: str = "",
                 split: str = "train", config_field: str = "data.path"):
        directory = epath.Path(path)
        manifest_path = directory / "manifest.json"
        if not path or not manifest_path.is_file():
            raise FileNotFoundError(
                f"No latents at {str(path)!r} (expected {manifest_path}). Run `dit-scaling extract-latents IMAGE_DIR "
                f"OUT{'' if split == 'train' else ' --split ' + split}` and set --config.{config_field}=OUT.")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != LATENTS_FORMAT:
            raise ValueError(f"{directory} holds {manifest.get('format')!r} latents, not {LATENTS_FORMAT!r}: "
                             "extract them again with `dit-scaling extract-latents`.")
        if manifest["status"] != "complete":
            raise ValueError(f"The latent extraction into {directory} has not finished (status "
                             f"{manifest['status']!r}): run the same extract-latents command again to complete it.")
        if manifest_split(manifest) != split:
            raise ValueError(f"{directory} holds the {manifest_split(manifest)!r} split, but {config_field} names the "
                             f"{split!r} split: point it at latents extracted with --split {split}.")
        if resolution and manifest["resolution"] != resolution:
            raise ValueError(f"The latents in {directory} are of {manifest['resolution']}px images; the config "
                             f"trains at data.resolution={resolution}.")
        their_sha = manifest["autoencoder"].get("sha256", "")
        if autoencoder_sha256 and their_sha != autoencoder_sha256:
            raise ValueError(f"The latents in {directory} were extracted with the autoencoder "
                             f"{manifest['autoencoder'].get('file')} (SHA-256 {their_sha[:12]}...), not the config's "
                             f"data.autoencoder (SHA-256 {autoencoder_sha256[:12]}...): decoded samples would not "
                             "match the training data.")
        self.directory = directory
        self.manifest = manifest
        self.num_classes = manifest["num_classes"]
        self.image_shape = tuple(manifest["latent_shape"])  # what the model sees: [h, w, C]
        self.scale = manifest["scale"]
        self.pixels_per_input = manifest["resolution"] // self.image_shape[0]  # image pixels per latent pixel
        h, w, c = self.image_shape
        self._row_shape = (2, h, w, 2 * c)
        self._row_bytes = math.prod(self._row_shape) * 4
        self._shards, labels = [], []
        for shard, count in enumerate(manifest["shard_counts"]):
            offset = _moments_offset(directory, shard, count, self.image_shape)
            if offset is None:
                raise ValueError(f"Shard {shard} of {directory} is missing or does not hold {count} examples of "
                                 f"latent shape {self.image_shape}: extract the latents again.")
            moments_path, labels_path = _shard_files(directory, shard)
            self._shards.append((moments_path, offset))
            labels.append(np.load(storage.loadable(labels_path)))
        self.labels = np.concatenate(labels)
        self._starts = np.cumsum([0] + manifest["shard_counts"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index):
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        row = int(index - self._starts[shard])
        path, offset = self._shards[shard]
        start = offset + row * self._row_bytes
        try:
            data = storage.read_range(path, start, self._row_bytes)
        except Exception:  # an object store refuses a range that starts past the object's end
            if path.stat().length >= start + self._row_bytes:
                raise
            data = b""
        if len(data) != self._row_bytes:
            raise ValueError(f"Shard {shard} of {self.directory} ends before its example {row} ({path} was cut "
                             "short after the run opened it): extract the latents again.")
        return {"moments": np.frombuffer(data, np.float32).reshape(self._row_shape),
                "label": np.int32(self.labels[index])}

    def to_model_input(self, example, rng: np.random.Generator, flip: bool) -> dict:
        """A scaled draw from the posterior of the crop or (with `flip`, half the time) of its flipped crop."""
        moments = example["moments"][int(flip and rng.random() < 0.5)]
        mean, logvar = np.split(moments, 2, axis=-1)
        latent = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, np.float32)
        return {"image": (self.scale * latent).astype(np.float32), "label": example["label"]}


def write_latents(directory: str | os.PathLike, moments: np.ndarray, labels: np.ndarray, *, classes: list[str],
                  resolution: int, scale: float, autoencoder: dict, shard_size: int = DEFAULT_SHARD_SIZE,
                  split: str = "train") -> None:
    """A complete latents directory from moments [N, 2, h, w, 2C] and labels [N] computed elsewhere."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, len(labels), shard_size)):
        write_latent_shard(directory, shard, moments[start: start + shard_size], labels[start: start + shard_size])
    h, w, channels = moments.shape[2], moments.shape[3], moments.shape[4] // 2
    write_manifest(directory, latents_manifest(num_examples=len(labels), shard_size=shard_size,
                                               latent_shape=(h, w, channels), classes=classes,
                                               resolution=resolution, scale=scale, autoencoder=autoencoder,
                                               split=split))


# ----------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Progress:
    total: int
    start: float = dataclasses.field(default_factory=time.perf_counter)
    done: int = 0
    last_print: float = 0.0

    def add(self, n: int, every_s: float = 10.0) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last_print >= every_s or self.done == self.total:
            self.last_print = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(f"extract-latents: {self.done}/{self.total} images, {rate:.1f} images/s, ETA {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)


def _images_sha256(paths: list[epath.Path], labels: np.ndarray, root: epath.Path) -> str:
    """A fingerprint of the image list (relative paths and labels), so a resume refuses a changed folder."""
    digest = hashlib.sha256()
    for path, label in zip(paths, labels, strict=True):
        digest.update(f"{path.relative_to(root)}\t{label}\n".encode())
    return digest.hexdigest()


def extract_latents(image_dir: str | os.PathLike, out: str | os.PathLike, *, autoencoder: str | os.PathLike,
                    resolution: int, batch_size: int = 32, shard_size: int = DEFAULT_SHARD_SIZE,
                    dtype: str = "float32", num_threads: int = 8, split: str = "train") -> dict:
    """Extract the posterior moments of every image (and its flip) of an ImageFolder tree into `out`; resumes an
    interrupted extraction of the same inputs. Returns the manifest."""
    import grain
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils
    from PIL import Image

    from models.autoencoder import load_autoencoder

    root, out = epath.Path(image_dir), epath.Path(out)
    paths, labels, classes = list_image_folder(root)
    vae = load_autoencoder(autoencoder, dtype=dtype)
    if resolution % vae.config.downsample:
        raise ValueError(f"--resolution {resolution} is not a multiple of the autoencoder's downsampling "
                         f"{vae.config.downsample}.")
    latent = resolution // vae.config.downsample
    weights_file = os.fspath(autoencoder)
    manifest = latents_manifest(
        num_examples=len(paths), shard_size=shard_size, latent_shape=(latent, latent, vae.config.latent_channels),
        classes=classes, resolution=resolution, scale=vae.config.scaling_factor,
        autoencoder={"file": weights_file, "sha256": autoencoder_sha256(weights_file), "dtype": dtype},
        images_sha256=_images_sha256(paths, labels, root), status="extracting", split=split)
    previous = out / "manifest.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        def comparable(m):  # the same weights may be named by another path
            return {**m, "status": None, "split": manifest_split(m),
                    "autoencoder": {**m.get("autoencoder", {}), "file": None}}

        differing = [k for k, v in comparable(manifest).items() if comparable(old).get(k) != v]
        if differing:
            raise ValueError(f"{out} holds an extraction of other inputs (they differ in {differing}): give a new "
                             "OUT, or delete it to start again.")
        if old["status"] == "complete":
            print(f"extract-latents: {out} is complete ({len(paths)} images).", file=sys.stderr)
            return old
    host, hosts = jax.process_index(), jax.process_count()
    if host == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, manifest)
    multihost_utils.sync_global_devices("extract-latents: manifest written")

    devices = jax.local_devices()
    if batch_size % len(devices):
        raise ValueError(f"--batch-size {batch_size} must be a multiple of this host's {len(devices)} devices.")
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    graphdef, state = nnx.split(vae)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    @jax.jit
    def encode_with_flip(state, images_uint8):
        images = images_uint8.astype(np.float32) / 127.5 - 1.0
        both = jax.numpy.stack([images, images[:, :, ::-1]], axis=1)  # [B, 2, H, W, 3]
        mean, logvar = nnx.merge(graphdef, state).encode(both.reshape(-1, *both.shape[2:]))
        moments = jax.numpy.concatenate([mean, logvar], axis=-1)
        return moments.reshape(images.shape[0], 2, *moments.shape[1:])

    counts = manifest["shard_counts"]
    mine = [s for s in range(host, len(counts), hosts)
            if not _shard_is_whole(out, s, counts[s], manifest["latent_shape"])]
    progress = _Progress(total=sum(counts[s] for s in mine))
    print(f"extract-latents: host {host}/{hosts}: {len(mine)} of {len(counts)} shards to do "
          f"({progress.total} images) on {len(devices)} device(s).", file=sys.stderr, flush=True)

    def load(index: int) -> np.ndarray:
        with Image.open(storage.loadable(paths[index])) as image:
            return adm_center_crop(image, resolution)

    for shard in mine:
        start = shard * shard_size
        indices = list(range(start, start + counts[shard]))
        loader = grain.MapDataset.source(indices).map(load).batch(batch_size)
        moments = []
        for batch in loader.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)):
            n = len(batch)
            padded = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
            moments.append(np.asarray(encode_with_flip(state, jax.device_put(padded, batch_sharding)))[:n])
            progress.add(n)
        write_latent_shard(out, shard, np.concatenate(moments), labels[start: start + counts[shard]])
    multihost_utils.sync_global_devices("extract-latents: shards written")
    if host == 0:
        missing = [s for s, count in enumerate(counts) if not _shard_is_whole(out, s, count,
                                                                              manifest["latent_shape"])]
        if missing:
            raise RuntimeError(f"Shards {missing[:10]} of {out} are missing after every host finished; run the same "
                               "command again to extract them.")
        manifest["status"] = "complete"
        write_manifest(out, manifest)
    return manifest

