"""The small-data metric of CPU-sized studies: FD-FashionCNN (the Frechet distance of a Fashion-MNIST classifier's
penultimate features) with precision, recall, the classifier score and class accuracy. A metric of its own name,
never "FID": the feature network is not the Inception."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import scipy.special
from flax import nnx

from scaling.evaluation import metrics

log = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class Reference:
    """The real images' classifier features with what every evaluation against them needs: their Gaussian
    statistics and k-NN radii (the radii of 10,000 features cost seconds, far more than scoring 250 samples), so a
    run computes them once."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    radii: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> Reference:
        return cls(features, *metrics.gaussian_statistics(features), metrics.knn_radii(features))


def cached_reference(classifier, images: np.ndarray, cache_dir: str | os.PathLike) -> Reference:
    """`Reference.of` the classifier's features of `images` (uint8 at the classifier's resolution), kept in
    cache_dir/fd_reference under a hash of the classifier's parameters and the images: the runs of a study share
    one reference, and its radii cost more than a small run's evaluations."""
    import jax

    digest = hashlib.sha256(f"k={metrics.PRECISION_RECALL_K};{images.shape};{images.dtype}".encode())
    for leaf in jax.tree.leaves(nnx.state(classifier)):
        digest.update(np.asarray(leaf).tobytes())
    digest.update(np.ascontiguousarray(images).tobytes())
    path = Path(cache_dir) / "fd_reference" / f"{digest.hexdigest()[:20]}.npz"
    if path.is_file():
        try:
            with np.load(path) as saved:
                reference = Reference(*(saved[f.name] for f in dataclasses.fields(Reference)))
            if reference.features.shape[0] == reference.radii.shape[0] == len(images):
                return reference
            log.warning("FD reference cache %s does not match its images; computing it again.", path)
        except (KeyError, ValueError, OSError) as e:
            log.warning("FD reference cache %s is unreadable (%s); computing it again.", path, e)
    reference = Reference.of(classifier_outputs(classifier, images)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial.npz")  # the runs of a grid may write at once
    np.savez(partial, **dataclasses.asdict(reference))
    os.replace(partial, path)
    return reference


def fd_fashion_cnn_metrics(classifier, real_images: np.ndarray, fake_images: np.ndarray,
                           fake_labels: np.ndarray | None = None) -> dict:
    """FD-FashionCNN (Frechet distance of the classifier's penultimate features), precision and recall on those
    features, the classifier score (the Inception Score's formula with the classifier's softmax; at most the
    number of classes) and, given the labels the samples were generated for, the classifier's accuracy on them."""
    reference = Reference.of(classifier_outputs(classifier, real_images)[0])
    return fd_fashion_cnn_metrics_of_features(reference, *classifier_outputs(classifier, fake_images), fake_labels)


def fd_fashion_cnn_metrics_of_features(reference: Reference, fake_features: np.ndarray, fake_probs: np.ndarray,
                                       fake_labels: np.ndarray | None = None) -> dict:
    """`fd_fashion_cnn_metrics` from the classifier's outputs against a `Reference` prepared once."""
    precision, recall = metrics.precision_recall(reference.features, fake_features, real_radii=reference.radii)
    distance = metrics.frechet_distance_of_features(fake_features, reference.mu, reference.sigma)
    return {
        "fd_fashioncnn": distance,
        "precision": precision,
        "recall": recall,
        "classifier_score": metrics.inception_score(fake_probs, split_size=len(fake_probs)),
        "class_accuracy": None if fake_labels is None
        else float(np.mean(fake_probs.argmax(axis=1) == np.asarray(fake_labels))),
        "n": len(fake_features),
        "n_reference": len(reference.features),
        "feature_network": "FashionCNN",
    }
