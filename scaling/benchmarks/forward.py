"""Benchmark: DiT forward throughput on the default JAX device.

    python -m scaling.benchmarks.forward --models S/2,B/4,XL/2 --batch 8 --dtypes float32,bfloat16

Prints, per config and compute dtype: ms per batch, images/s, achieved TFLOP/s (2 x MACs, true FLOPs) and the
device's peak memory where the backend reports it. Weights are random (a fresh model outputs zeros, which some
backends shortcut).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from analysis.schema import FLOPS_PER_MAC
from models.dit import abstract_dit, dit_config
from models.flops import dit_compute
from scaling.host import keep_freed_memory


def bench(name: str, batch: int, dtype: str, iters: int, input_size: int) -> dict:
    config = dit_config(name, dtype=dtype, input_size=input_size)
    graphdef, abstract_state = nnx.split(abstract_dit(config))
    leaves, treedef = jax.tree.flatten(abstract_state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    state = jax.tree.unflatten(treedef, [0.02 * jax.random.normal(k, x.shape, x.dtype)
                                         for k, x in zip(keys, leaves, strict=True)])

    @jax.jit
    def forward(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    x = jax.random.normal(jax.random.key(1), (batch, input_size, input_size, config.in_channels))
    t = jnp.arange(batch, dtype=jnp.int32) % 1000
    y = jnp.arange(batch, dtype=jnp.int32) % config.num_classes
    start = time.perf_counter()
    forward(state, x, t, y).block_until_ready()
    compile_s = time.perf_counter() - start
    forward(state, x, t, y).block_until_ready()
    start = time.perf_counter()
    for _ in range(iters):
        out = forward(state, x, t, y)
    out.block_until_ready()
    step_s = (time.perf_counter() - start) / iters
    macs = dit_compute(dit_config(name, input_size=input_size)).macs
    stats = jax.devices()[0].memory_stats() or {}
    return {"model": config.name, "dtype": dtype, "batch": batch, "compile_s": compile_s, "ms": 1e3 * step_s,
            "images_per_s": batch / step_s, "tflops": FLOPS_PER_MAC * macs * batch / step_s / 1e12,
            "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30}


def main() -> None:
    keep_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="S/2,B/4,XL/2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--input-size", type=int, default=32, help="latent size (32 = 256px images)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"{'model':9} {'dtype':9} {'batch':>5} {'compile s':>9} {'ms/batch':>9} {'img/s':>9} {'TFLOP/s':>8} "
          f"{'peak GiB':>8}")
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            r = bench(name, args.batch, dtype, args.iters, args.input_size)
            print(f"{r['model']:9} {r['dtype']:9} {r['batch']:5d} {r['compile_s']:9.1f} {r['ms']:9.1f} "
                  f"{r['images_per_s']:9.1f} {r['tflops']:8.2f} {r['peak_gib']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
