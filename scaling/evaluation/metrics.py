"""Sample-quality metrics with the exact definitions of ADM's evaluation suite, which produced the DiT paper's
FID, sFID, Inception Score, Precision and Recall (evaluations/evaluator.py of openai/guided-diffusion).

Everything here works on numpy feature arrays and returns Python floats; the feature networks live in models/.

- `FeatureStatistics`: streaming mean and covariance in float64 (covariance divides by N - 1, as np.cov).
- `frechet_distance`: |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), with tr sqrt(S1 S2) = tr sqrt(A S2 A),
  A = S1^(1/2), from two symmetric eigendecompositions (round-off's negative eigenvalues clipped to zero). ADM
  takes scipy's general sqrtm of S1 S2 instead: the value agrees to ~1e-7 relative, also for the rank-deficient
  covariances of few samples (tested against it), in a sixth of the time on 2048 Inception features
  (docs/benchmarks.md, "Evaluation"). `frechet_distance_of_features` takes the first Gaussian's features [N, D]
  instead: for N <= D it is exact through the N x N matrix F S2 F^T (S1 = F^T F, F the centred features over
  sqrt(N - 1); S1 S2 and F S2 F^T have the same non-zero eigenvalues), no D x D eigendecomposition: FID-1000
  needs none.
- `inception_score`: exp(E_x KL(p(y|x) || p(y))) per contiguous chunk of 5000 predictions, averaged over chunks.
- `precision_recall`: k-nearest-neighbour manifolds (k=3) of Kynkaanniemi et al., distances in blocks, computed
  in float16 first and again in float32 for any block with a non-finite value; a reference's radii (`knn_radii`)
  can be computed once and reused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.special

INCEPTION_SCORE_SPLIT = 5000
PRECISION_RECALL_K = 3
DISTANCE_BLOCK = 10_000


@dataclasses.dataclass
class FeatureStatistics:
    """Running float64 sums of features and their outer products: add batches, read mean and covariance."""

    dim: int
    count: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [N, {self.dim}], got {features.shape}.")
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or Inf: the feature network or its input is broken.")
        self.count += features.shape[0]
        self.total += features.sum(axis=0)
        self.outer += features.T @ features

    @property
    def mean(self) -> np.ndarray:
        self._need(1)
        return self.total / self.count

    @property
    def covariance(self) -> np.ndarray:
        self._need(2)
        mean = self.mean
        return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def _need(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"statistics need at least {n} feature vectors, got {self.count}.")

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStatistics:
        features = np.asarray(features)
        stats = cls(features.shape[-1])
        stats.add(features)
        return stats


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of feature vectors [N, D], in float64."""
    stats = FeatureStatistics.of(features)
    return stats.mean, stats.covariance


def _check_gaussians(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} "
                         f"and {sigma2.shape}; both sides must come from the same feature network.")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or Inf.")
    return mu1, sigma1, mu2, sigma2


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _distance(mu1, sigma1, mu2, sigma2, inner: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), from a symmetric `inner` with the non-zero eigenvalues
    of S1 S2 (round-off's negative eigenvalues clipped to zero)."""
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module docstring)."""
    mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
    root1 = _psd_sqrt(sigma1)
    return _distance(mu1, sigma1, mu2, sigma2, root1 @ sigma2 @ root1)


def frechet_distance_of_features(features: np.ndarray, mu2, sigma2) -> float:
    """`frechet_distance` between the Gaussian fitted to `features` [N, D] and N(mu2, sigma2); exact through an
    N x N matrix when N <= D (see the module docstring)."""
    mu1, sigma1 = gaussian_statistics(features)
    if len(features) > mu1.size:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    mu1, sigma1, mu2, sigma2 = _check_gaussians(mu1, sigma1, mu2, sigma2)
    factor = (np.asarray(features, np.float64) - mu1) / np.sqrt(len(features) - 1)
    return _distance(mu1, sigma1, mu2, sigma2, factor @ sigma2 @ factor.T)


def inception_score(probs: np.ndarray, split_size: int = INCEPTION_SCORE_SPLIT) -> float:
    """ADM's Inception Score of class probabilities [N, K] (rows sum to 1): for each contiguous chunk of
    `split_size` rows (the last may be shorter), exp(mean over rows of KL(p(y|x) || mean p(y))); the mean of
    the chunk scores. 0 log 0 counts as 0."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"inception_score expects probabilities of shape [N, classes], got {probs.shape}.")
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1, atol=1e-3):
        raise ValueError("inception_score expects finite, non-negative rows that sum to 1 (softmax outputs), "
                         "not logits.")
    scores = []
    for start in range(0, probs.shape[0], split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        scores.append(np.exp(scipy.special.rel_entr(part, marginal).sum(axis=1).mean()))
    return float(np.mean(scores))


def _squared_distances(u: np.ndarray, v: np.ndarray, dtype) -> np.ndarray:
    """max(|u|^2 - 2 u.v + |v|^2, 0) with inputs and every intermediate rounded to `dtype`."""
    u, v = u.astype(dtype), v.astype(dtype)
    norm_u = np.sum(u.astype(np.float32) ** 2, axis=1).astype(dtype)
    norm_v = np.sum(v.astype(np.float32) ** 2, axis=1).astype(dtype)
    dot = (u.astype(np.float32) @ v.astype(np.float32).T).astype(dtype)
    return np.maximum(norm_u[:, None] - 2 * dot + norm_v[None, :], dtype(0))


def _block_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        distances = _squared_distances(u, v, np.float16)
    if not np.isfinite(distances).all():
        distances = _squared_distances(u, v, np.float32)
    return distances.astype(np.float32)


def knn_radii(features: np.ndarray, k: int = PRECISION_RECALL_K, block_size: int = DISTANCE_BLOCK) -> np.ndarray:
    """Squared distance from each point [N, D] to its k-th nearest neighbour in its own set (itself at index 0):
    the radii of `precision_recall`'s balls. A reference's radii cost N^2 distances, far more than the rest of
    an evaluation: compute them once per reference and pass them as `precision_recall(real_radii=...)`."""
    features = np.asarray(features, np.float32)
    radii = np.empty(features.shape[0], np.float32)
    for start in range(0, features.shape[0], block_size):
        rows = np.concatenate([_block_distances(features[start:start + block_size], features[col:col + block_size])
                               for col in range(0, features.shape[0], block_size)], axis=1)
        radii[start:start + block_size] = np.partition(rows, k, axis=1)[:, k]
    return radii


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = PRECISION_RECALL_K,
                     block_size: int = DISTANCE_BLOCK, real_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them.

    Precision: the fraction of fake points inside the k-NN ball of some real point; recall: the fraction of
    real points inside the k-NN ball of some fake point (a point is inside when its squared distance is <= the
    ball's squared radius). `real_radii`: `knn_radii(real_features, k, block_size)`, computed here if not given."""
    real, fake = np.asarray(real_features, np.float32), np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected two feature arrays [N, D] with the same D, got {real.shape} and {fake.shape}.")
    for name, features in (("real", real), ("fake", fake)):
        if features.shape[0] <= k:
            raise ValueError(f"precision_recall needs more than k={k} {name} feature vectors, got "
                             f"{features.shape[0]}.")
        if not np.isfinite(features).all():
            raise ValueError(f"{name} features contain NaN or Inf.")
    if real_radii is None:
        real_radii = knn_radii(real, k, block_size)
    elif np.shape(real_radii) != (real.shape[0],):
        raise ValueError(f"real_radii has shape {np.shape(real_radii)}; expected one radius per real feature vector "
                         f"({real.shape[0]},): pass knn_radii(real_features, k, block_size).")
    fake_radii = knn_radii(fake, k, block_size)
    fake_inside = np.zeros(fake.shape[0], bool)
    real_inside = np.zeros(real.shape[0], bool)
    for r in range(0, real.shape[0], block_size):
        for f in range(0, fake.shape[0], block_size):
            distances = _block_distances(real[r:r + block_size], fake[f:f + block_size])
            fake_inside[f:f + block_size] |= (distances <= real_radii[r:r + block_size, None]).any(axis=0)
            real_inside[r:r + block_size] |= (distances <= fake_radii[None, f:f + block_size]).any(axis=1)
    return float(fake_inside.mean()), float(real_inside.mean())
