"""The GPU path, checked and timed in one short run (GPU time is scarce: this does only what follows).

    python -m scaling.benchmarks.gpu            # about 5 minutes on one H100-class GPU

1. The device: JAX version, GPU model, compute capability, what `model.dtype = "auto"` picks.
2. Fused attention: cuDNN's kernel (jax.nn.dot_product_attention, the model's attention on NVIDIA GPUs from
   compute capability 8.0 in bf16) against the matmul attention at DiT-XL/2's shapes: outputs and gradients.
3. Compile times of the S/2 and XL/2 bf16 training steps, in fresh processes: with an empty persistent
   compilation cache, then with the cache that first process wrote.
4. DiT-XL/2 bf16 training (256px, the paper's AdamW + EMA step) at batch 32, 64, 128, ... until a batch does not
   fit: step time, images/s, TFLOP/s (2 x 3 x forward MACs x images/s), and the fraction of the chip's published
   dense bf16 peak (PUBLISHED_BF16_PEAK_TFLOPS) and of the matmul peak measured in the same process.

`--smoke` runs the same code on any backend at toy sizes (S/8 one block deep, batch 2 to compile and 4 to train),
so the script is tested without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from scaling.benchmarks import run_measurement

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s, by device-kind substring; the
# first match wins, so the more specific names come first.
PUBLISHED_BF16_PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("L4", 121.0),
)
UTILISATION_TARGET = 0.5


def published_peak(device_kind: str) -> float | None:
    """The published dense bf16 peak (FLOP/s) of a GPU by its JAX device kind, or None when not listed."""
    for name, tflops in PUBLISHED_BF16_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def _run_train_benchmark(model: str, batch: int, steps: int, env: dict | None = None,
                         depth: int | None = None) -> dict | str:
    """One bf16 `scaling.benchmarks.train` measurement in a fresh process: its JSON, or why it failed."""
    return run_measurement("scaling.benchmarks.train", "--one", f"{model},bfloat16", "--batch", str(batch),
                           "--steps", str(steps), "--remat", "none", *(["--depth", str(depth)] if depth else []),
                           env=env)


def describe_device() -> None:
    import jax

    from scaling import precision

    device = jax.devices()[0]
    chosen = precision.resolve(precision.AUTO, 1152)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} x {device.device_kind}, "
          f"compute capability {getattr(device, 'compute_capability', '-')}; model.dtype auto -> {chosen.dtype} "
          f"({chosen.reason})", flush=True)


def check_fused_attention(smoke: bool) -> bool:
    """cuDNN attention against the matmul attention (value and gradient); True when they agree."""
    import jax
    import jax.numpy as jnp

    from models.ops import fused_attention, fused_attention_implementation, matmul_attention

    dtype = jnp.bfloat16
    batch, tokens, heads, head_dim = (2, 16, 2, 8) if smoke else (8, 256, 16, 72)
    implementation = fused_attention_implementation(dtype, head_dim)
    if implementation is None:
        if not smoke:
            print("fused attention: not available on this device (the model uses the matmul attention)")
            return True
        implementation = "xla"
    qkv = jax.random.normal(jax.random.key(0), (batch, tokens, 3, heads, head_dim), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(1), (batch, tokens, heads * head_dim), jnp.float32)

    def einsum(qkv):
        return matmul_attention(*(qkv[:, :, i] for i in range(3)), jnp.dtype(dtype))

    def fused(qkv):
        return fused_attention(*(qkv[:, :, i] for i in range(3)), dtype, implementation).astype(jnp.float32)

    def value_and_grad(fn):
        out, pullback = jax.vjp(fn, qkv)
        return out, pullback(cotangent)[0]

    (out_a, grad_a), (out_b, grad_b) = jax.jit(lambda: (value_and_grad(einsum), value_and_grad(fused)))()

    def relative(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    errors = relative(out_b, out_a), relative(grad_b, grad_a)
    ok = max(errors) < 2e-2  # bf16 operands: a few ulps of 2^-8 in norm
    print(f"fused attention ({implementation}) vs matmul attention, bf16: relative error of the output "
          f"{errors[0]:.1e}, of the gradient {errors[1]:.1e}: {'agree' if ok else 'DISAGREE'}", flush=True)
    return ok


def compile_times(models: list[str], batch: int, depth: int | None = None) -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        for model in models:
            times = []
            for _ in ("empty cache", "warm cache"):
                result = _run_train_benchmark(model, batch, 1, env, depth)
                times.append(f"{result['compile_s']:.1f} s" if isinstance(result, dict) else f"failed ({result})")
            print(f"compile {model} bf16 training step (batch {batch}): empty persistent cache {times[0]}, "
                  f"warm cache {times[1]}", flush=True)


def throughput(model: str, batches: list[int], steps: int, depth: int | None = None) -> None:
    best = None
    for batch in batches:
        start = time.perf_counter()
        r = _run_train_benchmark(model, batch, steps, depth=depth)
        if isinstance(r, str):
            print(f"{model} bf16 batch {batch}: does not fit or failed ({r})", flush=True)
            break
        peak = published_peak(r["device"])
        of_published = f"{r['achieved_tflops'] * 1e12 / peak:.1%} of the published peak" if peak else \
            "no published peak listed for this device"
        print(f"{model} bf16 batch {batch}: {r['step_s'] * 1e3:.1f} ms/step, {r['images_per_s']:.0f} img/s, "
              f"{r['achieved_tflops']:.1f} TFLOP/s = {of_published}, {r['utilization']:.1%} of the measured matmul "
              f"peak ({r['peak_tflops']:.0f} TFLOP/s); compile {r['compile_s']:.1f} s, peak memory "
              f"{r['peak_memory_gib']:.1f} GiB (XLA's compiled size {r['compiled_gib']:.1f}, the dry run's "
              f"prediction {r['predicted_gib']:.1f}), {time.perf_counter() - start:.0f} s in all", flush=True)
        if best is None or r["achieved_tflops"] > best["achieved_tflops"]:
            best = r
    if best:
        peak = published_peak(best["device"])
        if peak:
            reached = best["achieved_tflops"] * 1e12 / peak
            verdict = "reaches" if reached >= UTILISATION_TARGET else "falls short of"
            print(f"best: batch {best['batch']}, {reached:.1%} of {best['device']}'s published dense bf16 peak "
                  f"({peak / 1e12:.0f} TFLOP/s), which {verdict} the {UTILISATION_TARGET:.0%} target", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any backend (tests the script)")
    args = parser.parse_args()
    import jax

    if jax.default_backend() != "gpu" and not args.smoke:
        sys.exit(f"No GPU here (JAX backend {jax.default_backend()!r}); this script checks the GPU path. "
                 "--smoke runs it at toy sizes anywhere.")
    describe_device()
    agree = check_fused_attention(args.smoke)
    if args.smoke:
        compile_times(["S/8"], 2, depth=1)
        throughput("S/8", [4], 2, depth=1)
    else:
        compile_times(["S/2", "XL/2"], 32)
        throughput("XL/2", [32, 64, 128, 256, 512, 1024], 10)
    if not agree:
        sys.exit("The fused attention disagrees with the matmul attention (see above).")


if __name__ == "__main__":
    main()
