"""Drawing samples from a DiT (or a plugged-in model) for evaluation: batches sharded over every device (and
host), compiled once per sampler; latent models' samples decoded by the autoencoder inside the same sharded
program."""

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

    def sample(params, labels: np.ndarray, seed: int, first_batch: int = 0) -> np.ndarray:
        out = []
        for b, start in enumerate(range(0, len(labels), batch_size), start=first_batch):
            y = labels[start:start + batch_size]
            y = np.concatenate([y, np.zeros(batch_size - len(y), y.dtype)])  # one compiled shape
            y = jax.make_array_from_callback(y.shape, data_sharding, lambda index, y=y: y[index])
            samples = sample_batch(params, jax.random.fold_in(jax.random.key(seed), b), y, vae_state)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                samples = multihost_utils.process_allgather(samples, tiled=True)
            out.append(np.asarray(samples, np.float32)[: min(batch_size, len(labels) - start)])
        return np.concatenate(out)

    return sample
