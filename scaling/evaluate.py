"""Sample batches, reference batches and the ADM evaluation of one against the other.

Files follow ADM's .npz layout so they open in its evaluator unchanged:
- a sample batch holds `arr_0` (uint8 [N, H, W, 3], NHWC RGB) and optionally `arr_1` (int labels), plus
  `uint8_convention`, how decoder outputs in [-1, 1] became bytes (see `to_uint8`);
- a reference batch holds `arr_0` (reference images, used for precision and recall) and optionally the
  statistics `mu`, `sigma` (pool_3, FID) and `mu_s`, `sigma_s` (spatial, sFID); without them they are computed
  from `arr_0`. `write_reference` makes one from an image folder or an array file.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import scipy.special

from scaling import metrics

log = logging.getLogger(__name__)

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


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 NHWC RGB [N, H, W, 3], got {images.dtype} {images.shape}.")
    return images


def write_sample_batch(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None,
                       convention: str = "dit") -> None:
    """Write uint8 NHWC images (and labels) as an ADM sample batch, atomically."""
    images = _check_images(images, "samples")
    if convention not in UINT8_CONVENTIONS:
        raise ValueError(f"unknown uint8 convention {convention!r}; choose one of {sorted(UINT8_CONVENTIONS)}.")
    arrays = {"arr_0": images, "uint8_convention": np.array(convention)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, np.int64)
    _atomic_savez(Path(path), arrays)


def _atomic_savez(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


def _load_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No batch file at {path}.")
    try:
        return np.load(path, allow_pickle=False)
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
        images = _check_images(data["arr_0"], f"{path}: arr_0")
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
        images = _check_images(data["arr_0"], f"{path}: arr_0") if "arr_0" in data else None
        pool = (data["mu"], data["sigma"]) if "mu" in data else None
        spatial = (data["mu_s"], data["sigma_s"]) if "mu_s" in data else None
    if images is None and (pool is None or spatial is None):
        raise ValueError(f"{path} needs reference images (arr_0) or both statistics (mu, sigma and mu_s, sigma_s).")
    return ReferenceBatch(images, pool, spatial)


def read_images(source: str | os.PathLike) -> np.ndarray:
    """uint8 NHWC RGB images from a folder of image files (sorted by name; all of one size) or an array file
    (.npz with arr_0, or .npy)."""
    source = Path(source)
    if source.is_dir():
        from PIL import Image

        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) in {source}.")
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise ValueError(f"images in {source} have different sizes {sorted(sizes)[:3]}; resize them first.")
        return np.stack(images)
    if source.suffix == ".npy":
        return _check_images(np.load(source, allow_pickle=False), str(source))
    with _load_npz(source) as data:
        if "arr_0" not in data:
            raise ValueError(f"{source} has no arr_0 image array.")
        return _check_images(data["arr_0"], f"{source}: arr_0")


@functools.cache
def _jitted_forward():
    import jax

    return jax.jit(lambda model, images: model(images))


@dataclasses.dataclass
class Activations:
    pool: np.ndarray  # [N, 2048]
    spatial: np.ndarray  # [N, 2023]
    probs: np.ndarray | None  # [N, 1008] softmax of the bias-free logits, when the logits weight is loaded


def inception_activations(model, images: np.ndarray, batch_size: int = 64) -> Activations:
    """Inception features of uint8 images, in batches (the last one padded to keep one compiled shape)."""
    import jax.numpy as jnp

    images = _check_images(images, "images")
    forward = _jitted_forward()
    pool, spatial, probs = [], [], []
    start_time = time.perf_counter()
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)]) \
            if len(chunk) < batch_size and len(images) > batch_size else chunk
        features = forward(model, jnp.asarray(padded, jnp.float32))
        pool.append(np.asarray(features.pool[: len(chunk)], np.float64))
        spatial.append(np.asarray(features.spatial[: len(chunk)], np.float64))
        if features.logits is not None:
            probs.append(scipy.special.softmax(np.asarray(features.logits[: len(chunk)], np.float64), axis=1))
        done = start + len(chunk)
        rate = done / (time.perf_counter() - start_time)
        log.info("inception: %d/%d images, %.1f images/s, ETA %.0f s", done, len(images), rate,
                 (len(images) - done) / rate)
    return Activations(np.concatenate(pool), np.concatenate(spatial), np.concatenate(probs) if probs else None)


def write_reference(source: str | os.PathLike, out: str | os.PathLike, model, batch_size: int = 64) -> None:
    """A reference batch in ADM's layout from an image folder or array file: arr_0 plus mu/sigma/mu_s/sigma_s."""
    images = read_images(source)
    acts = inception_activations(model, images, batch_size)
    pool, spatial = metrics.FeatureStatistics.of(acts.pool), metrics.FeatureStatistics.of(acts.spatial)
    _atomic_savez(Path(out), {"arr_0": images, "mu": pool.mean, "sigma": pool.covariance,
                              "mu_s": spatial.mean, "sigma_s": spatial.covariance})


def metric_name(metric: str, n: int) -> str:
    """'FID-50K' style names: the metric with its sample count."""
    return f"{metric}-{n // 1000}K" if n % 1000 == 0 else f"{metric}-{n}"


def evaluate_samples(samples: SampleBatch, reference: ReferenceBatch, model, batch_size: int = 64) -> dict:
    """ADM's five numbers for a sample batch against a reference batch. Inception Score is None without the
    logits weight; precision and recall are None when the reference file holds statistics only."""
    acts = inception_activations(model, samples.images, batch_size)
    ref_acts = inception_activations(model, reference.images, batch_size) if reference.images is not None \
        else None
    ref_pool = reference.pool or _stats(ref_acts.pool)
    ref_spatial = reference.spatial or _stats(ref_acts.spatial)
    precision = recall = None
    if ref_acts is not None:
        precision, recall = metrics.precision_recall(ref_acts.pool, acts.pool)
    n = len(samples.images)
    return {
        "n": n,
        "n_reference": None if reference.images is None else len(reference.images),
        "fid": metrics.frechet_distance(*_stats(acts.pool), *ref_pool),
        "sfid": metrics.frechet_distance(*_stats(acts.spatial), *ref_spatial),
        "inception_score": None if acts.probs is None else metrics.inception_score(acts.probs),
        "precision": precision,
        "recall": recall,
        "uint8_convention": samples.convention,
        "feature_network": "inception-2015-12-05",
    }


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stats = metrics.FeatureStatistics.of(features)
    return stats.mean, stats.covariance


# ----------------------------------------------------------------------------------------------------------------
# The small-data metric (CPU-sized studies): FD-FashionCNN and friends
# ----------------------------------------------------------------------------------------------------------------


def classifier_outputs(classifier, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features [N, 128], class probabilities [N, K]) of a FashionCNN for uint8 images."""
    forward = _jitted_classifier()
    features, probs = [], []
    for start in range(0, len(images), batch_size):
        f, logits = forward(classifier, images[start:start + batch_size])
        features.append(np.asarray(f, np.float64))
        probs.append(scipy.special.softmax(np.asarray(logits, np.float64), axis=1))
    return np.concatenate(features), np.concatenate(probs)


@functools.cache
def _jitted_classifier():
    import jax

    def forward(classifier, images):
        features = classifier.embed(images)
        return features, classifier.head(features)

    return jax.jit(forward)


def small_data_metrics(classifier, real_images: np.ndarray, fake_images: np.ndarray,
                       fake_labels: np.ndarray | None = None) -> dict:
    """FD-FashionCNN (Frechet distance of the classifier's penultimate features), precision and recall on those
    features, the classifier score (the Inception Score's formula with the classifier's softmax; at most the
    number of classes) and, given the labels the samples were generated for, the classifier's accuracy on them."""
    real_features, _ = classifier_outputs(classifier, real_images)
    return small_data_metrics_of_features(real_features, *classifier_outputs(classifier, fake_images), fake_labels)


def small_data_metrics_of_features(real_features: np.ndarray, fake_features: np.ndarray, fake_probs: np.ndarray,
                                   fake_labels: np.ndarray | None = None) -> dict:
    """`small_data_metrics` from the classifier's outputs (real features can then be computed once per run)."""
    precision, recall = metrics.precision_recall(real_features, fake_features)
    return {
        "fd_fashioncnn": metrics.frechet_distance(*_stats(fake_features), *_stats(real_features)),
        "precision": precision,
        "recall": recall,
        "classifier_score": metrics.inception_score(fake_probs, split_size=len(fake_probs)),
        "class_accuracy": None if fake_labels is None
        else float(np.mean(fake_probs.argmax(axis=1) == np.asarray(fake_labels))),
        "n": len(fake_features),
        "n_reference": len(real_features),
        "feature_network": "FashionCNN",
    }


# ----------------------------------------------------------------------------------------------------------------
# Evaluation during training
# ----------------------------------------------------------------------------------------------------------------

EVALUATIONS_FILE = "evaluations.jsonl"


def make_sampler(model_config, diffusion, *, sampling_steps: int, sampler: str, guidance_scale: float,
                 guidance_channels: int, batch_size: int, mesh):
    """sample(params, labels, seed) -> samples in [-1, 1] (NHWC float32) of the DiT with `params` for `labels`,
    in batches sharded over the mesh's data axis (compiled once per sampler). Batch b starts from the noise of
    fold_in(key(seed), b), so equal seeds give equal starting noise."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from models.diffusion import guided_model_fn
    from models.dit import abstract_dit

    if batch_size % jax.device_count():
        raise ValueError(f"eval.batch_size {batch_size} must be a multiple of the device count "
                         f"{jax.device_count()}.")
    graphdef = nnx.graphdef(abstract_dit(model_config))
    spaced = diffusion.respace(f"ddim{sampling_steps}" if sampler == "ddim" else str(sampling_steps))
    data_sharding = NamedSharding(mesh, P("data"))
    shape = (model_config.input_size, model_config.input_size, model_config.in_channels)

    @jax.jit
    def sample_batch(params, key, y):
        model = nnx.merge(graphdef, params)
        noise = jax.lax.with_sharding_constraint(jax.random.normal(key, (y.shape[0], *shape)), data_sharding)
        if guidance_scale == 1.0:
            model_fn = lambda x, t: model(x, t, y)  # noqa: E731
        else:
            model_fn = guided_model_fn(model, y, guidance_scale, null_label=model_config.num_classes,
                                       cfg_channels=guidance_channels or None)
        return spaced.sample(model_fn, noise, jax.random.fold_in(key, 1), sampler=sampler)

    def sample(params, labels: np.ndarray, seed: int) -> np.ndarray:
        out = []
        for b, start in enumerate(range(0, len(labels), batch_size)):
            y = labels[start:start + batch_size]
            y = np.concatenate([y, np.zeros(batch_size - len(y), y.dtype)])  # one compiled shape
            y = jax.make_array_from_callback(y.shape, data_sharding, lambda index, y=y: y[index])
            samples = sample_batch(params, jax.random.fold_in(jax.random.key(seed), b), y)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                samples = multihost_utils.process_allgather(samples, tiled=True)
            out.append(np.asarray(samples, np.float32)[: min(batch_size, len(labels) - start)])
        return np.concatenate(out)

    return sample


def evaluation_protocols(config) -> list[dict]:
    """One protocol per eval.sampling_steps entry: everything that makes two evaluation points comparable."""
    e = config.eval
    return [{"sampler": e.sampler, "sampling_steps": int(steps), "guidance_scale": float(e.guidance_scale),
             "guidance_channels": int(e.guidance_channels) if e.guidance_scale != 1.0 else None,
             "num_samples": int(e.num_samples), "seed": int(e.seed), "uint8_convention": "dit",
             "reference": f"{config.data.source}:train[:{int(e.num_reference)}]",
             "feature_network": f"FashionCNN(epochs={int(e.classifier_epochs)}, "
                                f"examples={int(e.classifier_examples) or 'all'}, seed={int(config.train.seed)})"}
            for steps in e.sampling_steps]


def pending_evaluations(workdir: Path, step: int, config) -> list[dict]:
    """The protocols not yet evaluated at `step` (re-running an existing evaluation is skipped)."""
    from scaling.train import read_records

    done = [(r.get("step"), r.get("protocol")) for r in read_records(Path(workdir) / EVALUATIONS_FILE)]
    return [p for p in evaluation_protocols(config) if (step, p) not in done]


class RunEvaluator:
    """Scores a run's EMA model with the small-data metrics; built once per run (the classifier, the real
    reference features and each sampler are prepared on first use and reused at every evaluation)."""

    def __init__(self, config, source, model_config, diffusion, compute, mesh):
        self.config, self.source, self.model_config = config, source, model_config
        self.diffusion, self.compute, self.mesh = diffusion, compute, mesh
        self._classifier = None
        self._samplers = {}

    def _prepare(self):
        from models.fashion_cnn import Recipe, trained_fashion_cnn

        e = self.config.eval
        n_train = int(e.classifier_examples) or len(self.source)
        recipe = Recipe(epochs=int(e.classifier_epochs), seed=int(self.config.train.seed))
        self._classifier = trained_fashion_cnn(self.source.images[:n_train], self.source.labels[:n_train],
                                               self.source.num_classes, recipe)
        self._reference_features, _ = classifier_outputs(self._classifier,
                                                         self.source.images[: int(e.num_reference)])

    def _sampler(self, protocol: dict):
        key = (protocol["sampler"], protocol["sampling_steps"], protocol["guidance_scale"])
        if key not in self._samplers:
            self._samplers[key] = make_sampler(
                self.model_config, self.diffusion, sampling_steps=protocol["sampling_steps"],
                sampler=protocol["sampler"], guidance_scale=protocol["guidance_scale"],
                guidance_channels=int(self.config.eval.guidance_channels), batch_size=int(self.config.eval.batch_size),
                mesh=self.mesh)
        return self._samplers[key]

    def evaluate(self, step: int, ema_params, protocols: list[dict]) -> list[dict]:
        if self._classifier is None:
            self._prepare()
        e = self.config.eval
        labels = np.arange(int(e.num_samples)) % self.source.num_classes  # class-balanced
        records = []
        for protocol in protocols:
            start = time.perf_counter()
            samples = self._sampler(protocol)(ema_params, labels, int(e.seed))
            images = to_uint8(samples, protocol["uint8_convention"])
            result = small_data_metrics_of_features(self._reference_features,
                                                    *classifier_outputs(self._classifier, images), labels)
            guided = 2 if protocol["guidance_scale"] != 1.0 else 1
            records.append({
                "step": step, "metric": metric_name("FD-FashionCNN", len(images)),
                "value": result["fd_fashioncnn"], **result, "protocol": protocol,
                "sampling_gflops_per_image": self.compute.gflops * protocol["sampling_steps"] * guided,
                "train_gflops_cumulative": 3 * self.compute.gflops * self.config.train.batch_size * step,
                "seconds": time.perf_counter() - start, "time": time.time()})
        return records
