"""ADM's evaluation suite with the FID Inception in JAX: features of uint8 images, reference batches, and FID,
sFID, Inception Score, precision and recall of a sample batch."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import numpy as np
import scipy.special
from etils import epath

from analysis.schema import FID_FEATURE_NETWORK
from scaling.evaluation import metrics
from scaling.evaluation.npz import ReferenceBatch, SampleBatch, atomic_savez, check_images, read_images

log = logging.getLogger(__name__)


@functools.cache
def _jitted_forward():
    import jax

    # The network runs far longer than it compiles: LLVM's full optimisation (XLA's default level) even where a
    # process lowers the level for everything else, as the tests do (docs/benchmarks.md, "The test suite").
    return jax.jit(lambda model, images: model(images), compiler_options={"xla_backend_optimization_level": 3})


@dataclasses.dataclass
class Activations:
    pool: np.ndarray  # [N, 2048]
    spatial: np.ndarray  # [N, 2023]
    probs: np.ndarray | None  # [N, 1008] softmax of the bias-free logits, when the logits weight is loaded


@functools.lru_cache(maxsize=4)
def _replicated(model, devices: tuple):
    """The model's weights on each of `devices`, and the sharding that splits a batch over them."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    return jax.device_put(model, NamedSharding(mesh, P())), NamedSharding(mesh, P("batch"))


def inception_activations(model, images: np.ndarray, batch_size: int = 64, devices=None) -> Activations:
    """Inception features of uint8 images, in batches (the last one padded to keep one compiled shape), each
    split over `devices` (default: the first device alone)."""
    import jax
    import jax.numpy as jnp

    images = check_images(images, "images")
    forward = _jitted_forward()
    sharding, splits = None, 1
    if devices is not None and len(devices) > 1:
        model, sharding = _replicated(model, tuple(devices))
        splits = len(devices)
        batch_size = -(-batch_size // splits) * splits
    pool, spatial, probs = [], [], []
    start_time = time.perf_counter()
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        # One compiled shape where there are several batches; a batch split over devices needs a multiple of them.
        size = batch_size if len(images) > batch_size else -(-len(chunk) // splits) * splits
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)]).astype(np.float32)
        padded = jnp.asarray(padded) if sharding is None else jax.device_put(padded, sharding)
        features = forward(model, padded)
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
    (mu, sigma), (mu_s, sigma_s) = metrics.gaussian_statistics(acts.pool), metrics.gaussian_statistics(acts.spatial)
    atomic_savez(epath.Path(out), {"arr_0": images, "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s})


@dataclasses.dataclass(frozen=True)
class InceptionReference:
    """What every sample batch is scored against, computed once per reference batch: the Gaussian statistics of
    its pool and spatial features, and, where the file holds its images, the pool features with their k-NN radii
    for precision and recall (the radii cost N^2 distances, more than the rest of an evaluation)."""

    pool: tuple[np.ndarray, np.ndarray]
    spatial: tuple[np.ndarray, np.ndarray]
    features: np.ndarray | None
    radii: np.ndarray | None

    @property
    def n(self) -> int | None:
        return None if self.features is None else len(self.features)


def prepare_reference(reference: ReferenceBatch, model, batch_size: int = 64) -> InceptionReference:
    """The InceptionReference of a reference batch: the file's statistics where it holds them, the Inception's
    features of its images otherwise (and always for precision and recall, when it holds images)."""
    acts = None if reference.images is None else inception_activations(model, reference.images, batch_size)
    return InceptionReference(pool=reference.pool or metrics.gaussian_statistics(acts.pool),
                              spatial=reference.spatial or metrics.gaussian_statistics(acts.spatial),
                              features=None if acts is None else acts.pool,
                              radii=None if acts is None else metrics.knn_radii(acts.pool))


def evaluate_samples(samples: SampleBatch, reference: InceptionReference, model, batch_size: int = 64) -> dict:
    """ADM's five numbers for a sample batch against a prepared reference. Inception Score is None without the
    logits weight; precision and recall are None when the reference file holds statistics only."""
    acts = inception_activations(model, samples.images, batch_size)
    precision = recall = None
    if reference.features is not None:
        precision, recall = metrics.precision_recall(reference.features, acts.pool, real_radii=reference.radii)
    return {
        "n": len(samples.images),
        "n_reference": reference.n,
        "fid": metrics.frechet_distance_of_features(acts.pool, *reference.pool),
        "sfid": metrics.frechet_distance_of_features(acts.spatial, *reference.spatial),
        "inception_score": None if acts.probs is None else metrics.inception_score(acts.probs),
        "precision": precision,
        "recall": recall,
        "uint8_convention": samples.convention,
        "feature_network": FID_FEATURE_NETWORK,
    }
