"""FD-FashionCNN and the other small-data metrics behave as a sample-quality metric must."""

import logging

import numpy as np
import pytest
import scipy.ndimage

from models.fashion_cnn import Recipe, trained_fashion_cnn
from scaling.data import FashionMNIST
from scaling.evaluation import metrics
from scaling.evaluation.fd_fashion_cnn import (
    cached_reference,
    classifier_outputs,
    fd_fashion_cnn_metrics,
    fd_fashion_cnn_metrics_of_features,
)

RECIPE = Recipe(epochs=1, batch_size=128, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    cache = tmp_path_factory.mktemp("cache")
    classifier = trained_fashion_cnn(train.images[:6400], train.labels[:6400], 10, RECIPE, cache_dir=cache)
    return classifier, train, test, cache


def _fd(classifier, real, fake):
    return fd_fashion_cnn_metrics(classifier, real, fake)["fd_fashioncnn"]


def test_real_data_scores_far_better_than_noise(setup):
    classifier, train, test, _ = setup
    real, held_out = train.images[-1000:], test.images[:1000]
    noise = np.random.default_rng(0).integers(0, 256, held_out.shape, dtype=np.uint8)
    result = fd_fashion_cnn_metrics(classifier, real, held_out, test.labels[:1000])
    assert result["fd_fashioncnn"] * 20 < _fd(classifier, real, noise)
    assert result["precision"] > 0.6 and result["recall"] > 0.6
    assert result["class_accuracy"] > 0.75  # real test images with their true labels
    assert 3 < result["classifier_score"] <= 10  # at most the number of classes
    shuffled = fd_fashion_cnn_metrics(classifier, real, held_out, np.roll(test.labels[:1000], 1))
    assert shuffled["class_accuracy"] < 0.3


def test_distance_grows_monotonically_with_noise_and_blur(setup):
    classifier, train, test, _ = setup
    real, held_out = train.images[-1000:], test.images[:1000].astype(np.float64)
    rng = np.random.default_rng(1)

    def as_uint8(x):
        return np.clip(np.round(x), 0, 255).astype(np.uint8)

    noisy = [_fd(classifier, real, as_uint8(held_out + rng.normal(0, sigma, held_out.shape)))
             for sigma in (0, 25, 50, 100)]
    blurred = [_fd(classifier, real, as_uint8(scipy.ndimage.gaussian_filter(held_out, (0, s, s, 0))))
               for s in (0, 0.7, 1.4, 2.8)]
    assert np.all(np.diff(noisy) > 0), noisy
    assert np.all(np.diff(blurred) > 0), blurred


def test_classifier_is_cached_by_data_and_seed(setup, caplog):
    classifier, train, _, cache = setup
    images = train.images[:200]
    before = set((cache / "fashion_cnn").glob("*.npz"))
    with caplog.at_level(logging.INFO, logger="models.fashion_cnn"):
        again = trained_fashion_cnn(train.images[:6400], train.labels[:6400], 10, RECIPE, cache_dir=cache)
    assert "training" not in caplog.text
    np.testing.assert_array_equal(classifier_outputs(again, images)[0], classifier_outputs(classifier, images)[0])
    # A corrupt cache file is reported and replaced by a fresh training run (on fewer images: a new entry).
    small = trained_fashion_cnn(train.images[:640], train.labels[:640], 10, RECIPE, cache_dir=cache)
    (entry,) = set((cache / "fashion_cnn").glob("*.npz")) - before
    entry.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="models.fashion_cnn"):
        retrained = trained_fashion_cnn(train.images[:640], train.labels[:640], 10, RECIPE, cache_dir=cache)
    assert "unreadable" in caplog.text
    np.testing.assert_allclose(classifier_outputs(retrained, images)[0], classifier_outputs(small, images)[0],
                               rtol=1e-5, atol=1e-5)


def test_the_reference_is_computed_once_and_kept(setup, tmp_path, caplog):
    classifier, train, test, _ = setup
    real, fake = train.images[-300:], test.images[:100]
    first = cached_reference(classifier, real, tmp_path)
    (saved,) = (tmp_path / "fd_reference").iterdir()
    np.testing.assert_array_equal(first.radii, metrics.knn_radii(classifier_outputs(classifier, real)[0]))
    again = cached_reference(classifier, real, tmp_path)
    np.testing.assert_array_equal(again.radii, first.radii)
    assert fd_fashion_cnn_metrics_of_features(again, *classifier_outputs(classifier, fake)) == pytest.approx(
        fd_fashion_cnn_metrics(classifier, real, fake))
    other = cached_reference(classifier, real[:-1], tmp_path)  # other images: another entry
    assert len(other.radii) == len(real) - 1 and len(list((tmp_path / "fd_reference").iterdir())) == 2
    saved.write_bytes(b"not an npz")  # a damaged entry is computed again, with a warning, and replaced
    with caplog.at_level(logging.WARNING):
        repaired = cached_reference(classifier, real, tmp_path)
    assert "unreadable" in caplog.text
    np.testing.assert_array_equal(repaired.radii, first.radii)
    assert cached_reference(classifier, real, tmp_path).features.shape == first.features.shape
