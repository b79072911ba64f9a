"""FashionCNN: a small classifier of 32x32 grayscale images whose penultimate features define the small-data
metrics of CPU-sized studies ("FD-FashionCNN", never "FID"; see scaling/evaluation/fd_fashion_cnn.py).

Three conv-ReLU-maxpool stages (32, 64, 128 channels) and a 128-unit ReLU layer (the features), then the class
logits. `trained_fashion_cnn` trains it deterministically (fixed seed, fixed data order, AdamW) on a dataset's
training split and caches the weights under a key made of the data's SHA-256, the seed and the recipe, so every
evaluation of a study uses the same network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

log = logging.getLogger(__name__)

FEATURES = 128


class FashionCNN(nnx.Module):
    def __init__(self, num_classes: int = 10, channels: int = 1, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(channels, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(64, 128, (3, 3), rngs=rngs)
        self.features = nnx.Linear(4 * 4 * 128, FEATURES, rngs=rngs)
        self.head = nnx.Linear(FEATURES, num_classes, rngs=rngs)

    def embed(self, images_NHWC: jax.Array) -> jax.Array:
        """Penultimate features [N, 128] of uint8 (or 0..255 float) images [N, 32, 32, C]."""
        x = images_NHWC.astype(jnp.float32) / 127.5 - 1.0
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nnx.max_pool(jax.nn.relu(conv(x)), (2, 2), (2, 2))
        return jax.nn.relu(self.features(x.reshape(x.shape[0], -1)))

    def __call__(self, images_NHWC: jax.Array) -> jax.Array:
        """Class logits."""
        return self.head(self.embed(images_NHWC))


@dataclasses.dataclass(frozen=True)
class Recipe:
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0


def _cache_key(images: np.ndarray, labels: np.ndarray, num_classes: int, recipe: Recipe) -> str:
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps({**dataclasses.asdict(recipe), "num_classes": num_classes, "architecture": 1}).encode())
    return digest.hexdigest()[:20]


@nnx.jit
def _train_step(model: FashionCNN, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array) -> jax.Array:
    """One AdamW step on the cross-entropy (module level: a second training reuses the compiled step)."""
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train_fashion_cnn(images: np.ndarray, labels: np.ndarray, num_classes: int, recipe: Recipe) -> FashionCNN:
    """Train from scratch: the same data and recipe give the same weights on the same machine."""
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"expected uint8 images [N, H, W, C] and N labels, got {images.dtype} {images.shape} "
                         f"and {np.shape(labels)}.")
    # Initialised in one compiled program: eagerly, each layer's initialiser compiles on its own (about 4 s).
    model = nnx.jit(lambda: FashionCNN(num_classes, images.shape[-1], rngs=nnx.Rngs(recipe.seed)))()
    optimizer = nnx.Optimizer(model, optax.adamw(recipe.learning_rate), wrt=nnx.Param)
    order_rng = np.random.default_rng(recipe.seed)
    steps_per_epoch = len(images) // recipe.batch_size
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = order_rng.permutation(len(images))
        for i in range(steps_per_epoch):
            batch = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            loss = _train_step(model, optimizer, jnp.asarray(images[batch]), jnp.asarray(labels[batch]))
        log.info("FashionCNN epoch %d/%d: loss %.4f, %.0f s", epoch + 1, recipe.epochs, float(loss),
                 time.perf_counter() - start)
    return model


def trained_fashion_cnn(images: np.ndarray, labels: np.ndarray, num_classes: int, recipe: Recipe = Recipe(), *,
                        cache_dir: str | os.PathLike) -> FashionCNN:
    """The FashionCNN for this training data and recipe: loaded from the cache (cache_dir/fashion_cnn), or trained
    and cached there."""
    cache = Path(cache_dir) / "fashion_cnn"
    path = cache / f"{_cache_key(images, labels, num_classes, recipe)}.npz"
    model = nnx.eval_shape(lambda: FashionCNN(num_classes, images.shape[-1], rngs=nnx.Rngs(recipe.seed)))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    if path.is_file():
        try:
            with np.load(path) as saved:
                loaded = [saved[f"p{i}"] for i in range(len(leaves))]
            if all(a.shape == b.shape for a, b in zip(loaded, leaves, strict=True)):
                return nnx.merge(graphdef, jax.tree.unflatten(treedef, [jnp.asarray(a) for a in loaded]))
        except (KeyError, ValueError, OSError) as e:
            log.warning("FashionCNN cache %s is unreadable (%s); training again.", path, e)
        log.warning("FashionCNN cache %s does not fit this network; training again.", path)
    log.info("training the FashionCNN feature network (cached afterwards in %s)", path)
    model = train_fashion_cnn(images, labels, num_classes, recipe)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial.npz")  # several hosts may write at once
    np.savez(partial, **{f"p{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(nnx.state(model)))})
    os.replace(partial, path)
    return model
