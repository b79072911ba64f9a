"""The small-data metric of CPU-sized studies: FD-FashionCNN (the Frechet distance of a Fashion-MNIST classifier's
penultimate features) with precision, recall, the classifier score and class accuracy. A metric of its own name,
never "FID": the feature network is not the Inception."""

from __future__ import annotations

import functools

import numpy as np
import scipy.special

from scaling.evaluation import metrics


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


def fd_fashion_cnn_metrics(classifier, real_images: np.ndarray, fake_images: np.ndarray,
                       fake_labels: np.ndarray | None = None) -> dict:
    """FD-FashionCNN (Frechet distance of the classifier's penultimate features), precision and recall on those
    features, the classifier score (the Inception Score's formula with the classifier's softmax; at most the
    number of classes) and, given the labels the samples were generated for, the classifier's accuracy on them."""
    real_features, _ = classifier_outputs(classifier, real_images)
    return fd_fashion_cnn_metrics_of_features(real_features, *classifier_outputs(classifier, fake_images), fake_labels)


def fd_fashion_cnn_metrics_of_features(real_features: np.ndarray, fake_features: np.ndarray, fake_probs: np.ndarray,
                                   fake_labels: np.ndarray | None = None) -> dict:
    """`fd_fashion_cnn_metrics` from the classifier's outputs (real features can then be computed once per run)."""
    precision, recall = metrics.precision_recall(real_features, fake_features)
    distance = metrics.frechet_distance_of_features(fake_features, *metrics.gaussian_statistics(real_features))
    return {
        "fd_fashioncnn": distance,
        "precision": precision,
        "recall": recall,
        "classifier_score": metrics.inception_score(fake_probs, split_size=len(fake_probs)),
        "class_accuracy": None if fake_labels is None
        else float(np.mean(fake_probs.argmax(axis=1) == np.asarray(fake_labels))),
        "n": len(fake_features),
        "n_reference": len(real_features),
        "feature_network": "FashionCNN",
    }
