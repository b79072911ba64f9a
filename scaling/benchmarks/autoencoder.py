"""Benchmark: SD autoencoder (KL-f8) encode and decode throughput on the default JAX device.

    python -m scaling.benchmarks.autoencoder --resolution 256 --batch 4 --dtypes float32,bfloat16

Prints, per compute dtype: images/s for encoding (images -> posterior moments, what extract-latents runs twice
per image: the crop and its flip) and decoding (latents -> images, once per sample), the GMAC per image counted
from the jaxpr, and achieved TFLOP/s (2 x MACs). Weights are random at the published KL-f8 architecture.
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from analysis.schema import FLOPS_PER_MAC
from models.autoencoder import COMPUTE_DTYPES, AutoencoderConfig, AutoencoderKL
from models.flops import count_macs
from scaling.host import keep_freed_memory


def _seconds_per_call(fn, *args, iters: int) -> tuple[float, float]:
    """(compile + first call s, mean s per later call)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return first, (time.perf_counter() - start) / iters


def bench(resolution: int, batch: int, dtype: str, iters: int) -> list[dict]:
    config = AutoencoderConfig(dtype=dtype)
    vae = AutoencoderKL(config, rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(1), (batch, resolution, resolution, config.in_channels),
                                minval=-1, maxval=1)
    latent = resolution // config.downsample
    latents = jax.random.normal(jax.random.key(2), (batch, latent, latent, config.latent_channels))
    graphdef, state = nnx.split(vae)
    rows = []
    for what, fn, x in (("encode", vae.encode, images), ("decode", vae.decode, latents)):
        macs = count_macs(lambda state, x, what=what: getattr(nnx.merge(graphdef, state), what)(x), state, x[:1]).total
        first, per_call = _seconds_per_call(fn, x, iters=iters)
        rows.append({"what": what, "dtype": dtype, "batch": batch, "first_s": first, "images_per_s": batch / per_call,
                     "gmac": macs / 1e9, "tflops": FLOPS_PER_MAC * macs * batch / per_call / 1e12})
    return rows


def main() -> None:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtypes", default=",".join(COMPUTE_DTYPES))
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"{args.resolution}px, batch {args.batch}")
    print(f"{'':7} {'dtype':9} {'first s':>8} {'img/s':>8} {'GMAC/img':>9} {'TFLOP/s':>8}")
    for dtype in args.dtypes.split(","):
        for r in bench(args.resolution, args.batch, dtype, args.iters):
            print(f"{r['what']:7} {r['dtype']:9} {r['first_s']:8.1f} {r['images_per_s']:8.2f} {r['gmac']:9.1f} "
                  f"{r['tflops']:8.3f}", flush=True)


if __name__ == "__main__":
    main()
