"""ADM's metrics against closed forms and brute-force versions."""

import numpy as np
import pytest
import scipy.linalg

from scaling.evaluation.metrics import (
    FeatureStatistics,
    frechet_distance,
    frechet_distance_of_features,
    gaussian_statistics,
    inception_score,
    knn_radii,
    precision_recall,
)


def _random_covariance(rng, dim, samples):
    features = rng.standard_normal((samples, dim)) @ rng.standard_normal((dim, dim))
    return np.cov(features, rowvar=False)


def _frechet_as_adm(mu1, sigma1, mu2, sigma2):
    """ADM's evaluator: scipy's sqrtm of S1 S2, retried with 1e-6 on the diagonals when not finite, real part."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def _frechet_by_eigenvalues(mu1, sigma1, mu2, sigma2):
    """tr sqrt(S1 S2) as the sum of square roots of the (real, non-negative) eigenvalues of S1 S2."""
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt


def test_frechet_closed_forms():
    distance = frechet_distance
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    # Diagonal covariances: |dmu|^2 + sum (sqrt a - sqrt b)^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    sigma = _random_covariance(rng, 6, 50)
    # Equal covariances: the means alone.
    assert distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-7)
    # Scaled covariance c^2 S: (1 - c)^2 tr S.
    assert distance(mu1, sigma, mu1, 4 * sigma) == pytest.approx(np.trace(sigma), rel=1e-7)
    assert abs(distance(mu1, sigma, mu1, sigma)) < 1e-9 * np.trace(sigma)


@pytest.mark.parametrize("samples", [200, 12])  # 12 < 30 dimensions: rank-deficient covariances
def test_frechet_distance_agrees_with_adms_sqrtm_and_an_eigenvalue_reference(samples):
    rng = np.random.default_rng(samples)
    mu1, mu2 = rng.standard_normal(30), rng.standard_normal(30)
    sigma1, sigma2 = _random_covariance(rng, 30, samples), _random_covariance(rng, 30, samples)
    reference = _frechet_by_eigenvalues(mu1, sigma1, mu2, sigma2)
    with np.errstate(all="ignore"):
        adm = _frechet_as_adm(mu1, sigma1, mu2, sigma2)
    distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert adm == pytest.approx(reference, rel=1e-6)
    assert distance == pytest.approx(reference, rel=1e-6) and distance == pytest.approx(adm, rel=1e-6)


@pytest.mark.parametrize("samples", [5, 29, 30, 31, 400])  # fewer, as many and more samples than dimensions
def test_frechet_distance_of_features_is_the_distance_of_their_statistics(samples):
    rng = np.random.default_rng(samples)
    features = rng.standard_normal((samples, 30)) @ rng.standard_normal((30, 30)) + rng.standard_normal(30)
    mu2, sigma2 = rng.standard_normal(30), _random_covariance(rng, 30, 50)
    expected = _frechet_by_eigenvalues(*gaussian_statistics(features), mu2, sigma2)
    # rel 1e-6 as above: the reference's eigenvalues of a rank-deficient S1 S2 carry round-off of ~sqrt(eps)
    assert frechet_distance_of_features(features, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_of_features(features, *gaussian_statistics(features)) < 1e-9 * np.trace(sigma2)
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance_of_features(features, np.zeros(4), np.eye(4))


def test_frechet_rejects_mismatched_or_broken_statistics():
    sigma = np.eye(3)
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(3), sigma, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        frechet_distance(np.full(3, np.nan), sigma, np.zeros(3), sigma)


def test_streaming_statistics_match_numpy():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((101, 5)) * 3 + 7
    stats = FeatureStatistics(5)
    for chunk in np.array_split(features, [10, 11, 60]):  # uneven batches, one of a single row
        stats.add(chunk)
    assert stats.count == 101
    np.testing.assert_allclose(stats.mean, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStatistics.of(features[:1]).covariance
    with pytest.raises(ValueError, match="NaN or Inf"):
        stats.add(np.full((2, 5), np.inf))


def test_inception_score_on_constructed_predictions():
    classes = 10
    assert inception_score(np.full((50, classes), 1 / classes)) == pytest.approx(1.0)
    confident = np.eye(classes)[np.arange(50) % classes]  # balanced, each prediction certain
    assert inception_score(confident) == pytest.approx(classes)
    # Contiguous chunks in file order, the last one short: chunk scores 4, 1 and 2 (two certain classes).
    chunks = np.concatenate([np.eye(4)[np.arange(8) % 4], np.full((8, 4), 0.25), np.eye(4)[[0, 1, 0, 1]]])
    assert inception_score(chunks, split_size=8) == pytest.approx((4 + 1 + 2) / 3)
    with pytest.raises(ValueError, match="not logits"):
        inception_score(np.random.default_rng(0).standard_normal((5, 3)))


def _brute_force_precision_recall(real, fake, k):
    def squared(u, v):
        return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)

    real_radii = np.sort(squared(real, real), axis=1)[:, k]
    fake_radii = np.sort(squared(fake, fake), axis=1)[:, k]
    cross = squared(real, fake)
    precision = (cross <= real_radii[:, None]).any(axis=0).mean()
    recall = (cross <= fake_radii[None, :]).any(axis=1).mean()
    return precision, recall


@pytest.mark.parametrize("block_size", [5, 7, 10_000])
def test_precision_recall_against_brute_force(block_size):
    rng = np.random.default_rng(2)
    # Small integers: every squared distance is exact in float16, so blocking is the only difference.
    real = rng.integers(0, 6, (41, 3)).astype(np.float32)
    fake = (rng.integers(0, 6, (29, 3)) + np.array([2, 0, 0])).astype(np.float32)
    precision, recall = precision_recall(real, fake, block_size=block_size)
    expected = _brute_force_precision_recall(real, fake, 3)
    assert (precision, recall) == pytest.approx(expected)
    assert 0 < precision < 1 and 0 < recall < 1
    assert precision_recall(real, real, block_size=block_size) == (1.0, 1.0)
    # The reference's radii computed once and passed in give the same result.
    radii = knn_radii(real, 3, block_size)
    assert precision_recall(real, fake, block_size=block_size, real_radii=radii) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one radius per real feature vector"):
        precision_recall(real, fake, real_radii=radii[:-1])


def test_precision_recall_falls_back_to_float32_when_float16_overflows():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((20, 4)).astype(np.float32) * 1000  # squared distances far beyond float16's range
    fake = real[:15] + 1
    assert precision_recall(real, fake) == pytest.approx(_brute_force_precision_recall(real, fake, 3))


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than k=3 fake"):
        precision_recall(np.zeros((10, 2)), np.zeros((3, 2)))
