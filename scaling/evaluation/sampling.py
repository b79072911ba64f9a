"""Drawing samples from a DiT (or a plugged-in model) for evaluation: batches sharded over every device (and
host), compiled once per sampler; latent models' samples decoded by the autoencoder inside the same sharded
program. `sharded_features` turns samples into features where they were drawn, so that hosts exchange features
(kilobytes a sample), never decoded images (786 KB a sample at 256px in float32)."""

from __future__ import annotations

import numpy as np


def make_sampler(model_config, diffusion, *, sampling_steps: int, sampler: str, guidance_scale: float,
                 guidance_channels: int, batch_size: int, mesh, autoencoder=None):
    """sample(params, labels, seed) -> samples in [-1, 1] (NHWC float32) of the DiT with `params` for `labels`,
    in batches sharded over the mesh's data axis (compiled once per sampler). Batch b starts from the noise of
    fold_in(key(seed), b), so equal seeds give equal starting noise; `first_batch` numbers the batches of a call
from there, so a long sampling job split into calls draws what one call would. With `autoencoder` (a
    models.autoencoder.AutoencoderKL) the DiT's outputs are latents times its scaling factor, and the samples are
    their decoded images."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from models.diffusion import guided_model_fn
    from models.plugin import abstract_model
    from scaling.devices import BATCH_AXES

    if batch_size % jax.device_count():
        raise ValueError(f"eval.batch_size {batch_size} must be a multiple of the device count "
                         f"{jax.device_count()}.")
    graphdef = nnx.graphdef(abstract_model(model_config))
    if autoencoder is not None:
        vae_graphdef, vae_state = nnx.split(autoencoder)
        vae_state = jax.device_put(vae_state, NamedSharding(mesh, P()))
        scale = autoencoder.config.scaling_factor
    else:
        vae_state = None
    spaced = diffusion.for_sampler(sampler, sampling_steps)
    data_sharding = NamedSharding(mesh, P(BATCH_AXES))
    shape = (model_config.input_size, model_config.input_size, model_config.in_channels)

    @jax.jit
    def sample_batch(params, key, y, vae_state):
        model = nnx.merge(graphdef, params)
        noise = jax.lax.with_sharding_constraint(jax.random.normal(key, (y.shape[0], *shape)), data_sharding)
        if guidance_scale == 1.0:
            model_fn = lambda x, t: model(x, t, y)  # noqa: E731
        else:
            model_fn = guided_model_fn(model, y, guidance_scale, null_label=model_config.num_classes,
                                       in_channels=model_config.in_channels,
                                       cfg_channels=guidance_channels or None)
        samples = spaced.sample(model_fn, noise, jax.random.fold_in(key, 1), sampler=sampler)
        if vae_state is None:
            return samples
        return nnx.merge(vae_graphdef, vae_state).decode(samples / scale)

    def global_batches(params, labels: np.ndarray, seed: int, first_batch: int):
        """(first row, samples as a global array sharded over every device) per batch of `labels`."""
        for b, start in enumerate(range(0, len(labels), batch_size), start=first_batch):
            y = labels[start:start + batch_size]
            y = np.concatenate([y, np.zeros(batch_size - len(y), y.dtype)])  # one compiled shape
            y = jax.make_array_from_callback(y.shape, data_sharding, lambda index, y=y: y[index])
            yield start, sample_batch(params, jax.random.fold_in(jax.random.key(seed), b), y, vae_state)

    def sample(params, labels: np.ndarray, seed: int, first_batch: int = 0) -> np.ndarray:
        out = []
        for start, samples in global_batches(params, labels, seed, first_batch):
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                samples = multihost_utils.process_allgather(samples, tiled=True)
            out.append(np.asarray(samples, np.float32)[: min(batch_size, len(labels) - start)])
        return np.concatenate(out)

    def local_batches(params, labels: np.ndarray, seed: int, first_batch: int = 0):
        """What `sample` draws, without moving samples between hosts: per batch, (the rows that this host's
        devices drew, those samples as float32 numpy). Rows from len(labels) on are the last batch's padding: every
        host gets as many rows, even one whose rows are all padding."""
        for start, samples in global_batches(params, labels, seed, first_batch):
            shards = {shard.index[0].indices(batch_size)[:2]: shard for shard in samples.addressable_shards}
            slices = sorted(shards.items())  # one per batch slice (replicas give the same)
            yield (np.concatenate([np.arange(start + first, start + stop) for (first, stop), _ in slices]),
                   np.concatenate([np.asarray(shard.data, np.float32) for _, shard in slices]))

    sample.local_batches = local_batches
    return sample


def sharded_features(sampler, params, labels: np.ndarray, seed: int, features_of,
                     first_samples: int = 0) -> dict[str, np.ndarray]:
    """Features of the samples `sampler` (a `make_sampler`) draws for `labels`, computed where they were drawn:
    each host turns its own samples into features with `features_of` (float32 samples [n, H, W, C] -> a dict of
    per-sample arrays [n, ...]), and the hosts exchange those features, never the samples, but for the first
    `first_samples` samples themselves (returned as "samples": what a run keeps to look at). Returns every
    sample's features in the order of `labels`, on every host, as one process computing them all would."""
    import jax

    first_samples = min(first_samples, len(labels))
    rows, parts, first = [], [], None
    for batch_rows, samples in sampler.local_batches(params, labels, seed):
        rows.append(batch_rows)
        parts.append(features_of(samples))  # padding rows too: every host contributes arrays of one shape
        if first is None:
            first = np.zeros((first_samples, *samples.shape[1:]), np.float32)
        kept = batch_rows < first_samples
        first[batch_rows[kept]] = samples[kept]
    mine = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    mine["row"] = np.concatenate(rows)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        def gather(array: np.ndarray) -> np.ndarray:  # as bytes: JAX without x64 would round float64 to float32
            rows = np.ascontiguousarray(array).reshape(len(array), -1).view(np.uint8)
            gathered = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
            return gathered.view(array.dtype).reshape(-1, *array.shape[1:])

        mine = {name: gather(array) for name, array in mine.items()}
        if first_samples:  # each of the first samples was drawn on one host, and is zeros on the others
            first = gather(first).reshape(-1, *first.shape).sum(axis=0)
    order = np.argsort(mine.pop("row"))[:len(labels)]  # the padding, rows len(labels) on, sorts last
    features = {name: array[order] for name, array in mine.items()}
    return {**features, "samples": first} if first_samples else features
