"""Benchmark: DiT training throughput, achieved FLOP/s, utilisation and peak memory.

    python -m scaling.benchmarks.train --models S/2,B/4,XL/2 --batch 8 --dtypes float32,bfloat16

For each config (256px: 32x32x4 latents, 1000 classes, learned sigma, the paper's AdamW + EMA step) and compute
dtype, in a fresh process each: the matmul peak of one device measured in that process (`measure_matmul_peak`,
same dtype), the compile time of the training step, the median time of a step, images/s, achieved FLOP/s (a step's
`analysis.schema.training_flops` per second) and its ratio to the peak, and the peak memory (process RSS on CPU,
the device's peak bytes elsewhere) beside the compiled step's own size (XLA's memory analysis) and what
`grid --dry-run` predicts for one device (scaling/cost.py). With both float32 and bfloat16, it says which of them
`model.dtype = "auto"` picks on this machine and whether that is the faster one.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

from models.dit import DiTConfig, canonical_name, dit_config
from models.ops import REMAT_POLICIES
from scaling import precision
from scaling.benchmarks import model_names, run_measurement


def _recomputes(model: str, remat: str) -> bool:
    """Whether `model` recomputes block activations under --remat (a comma list, 'all', 'none' or 'auto')."""
    import jax

    if remat == "auto":  # batch 8 of XL/2 needs it to fit in a 24 GiB CPU machine
        return model == "XL/2" and jax.default_backend() == "cpu"
    return remat == "all" or model in remat.split(",")


def bench_one(model: str, batch: int, dtype: str, steps: int, remat: str, scan_blocks: bool = False,
              remat_policy: str = DiTConfig.remat_policy, depth: int | None = None) -> dict:
    from scaling.host import cpu_model, keep_freed_memory, return_freed_memory_if_large

    keep_freed_memory()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from analysis.schema import training_flops
    from models.diffusion import GaussianDiffusion, linear_betas
    from models.dit import dit_config
    from models.flops import dit_compute
    from scaling.configs.common import base_config
    from scaling.cost import activation_bytes, training_state_bytes
    from scaling.devices import measure_matmul_peak
    from scaling.train_step import init_state, make_optimizer, make_train_step, state_bytes

    config = base_config()
    remat = _recomputes(model, remat)
    blocks = {} if depth is None else {"depth": depth}
    model_config = dit_config(model, dtype=dtype, remat=remat, remat_policy=remat_policy, scan_blocks=scan_blocks,
                              **blocks)
    macs = dit_compute(dit_config(model, **blocks)).macs
    optimizer = make_optimizer(config)
    diffusion = GaussianDiffusion(linear_betas(1000))
    abstract = jax.eval_shape(lambda: init_state(model_config, optimizer, 0))
    if jax.default_backend() == "cpu":
        return_freed_memory_if_large(state_bytes(abstract))
    state = jax.jit(lambda: init_state(model_config, optimizer, 0))()
    step = jax.jit(make_train_step(model_config, diffusion, optimizer, config.train.ema_decay), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch_data = {"image": jnp.asarray(rng.standard_normal((batch, 32, 32, 4)), jnp.float32),
                  "label": jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)}
    start = time.perf_counter()
    step = step.lower(state, batch_data).compile()
    compile_s = time.perf_counter() - start
    analysis = step.memory_analysis()
    compiled_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                      - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    predicted_bytes = training_state_bytes(abstract, 1, "replicated") + activation_bytes(model_config, batch,
                                                                                         remat=remat)
    for _ in range(2):  # warm-up, one step at a time: a step queued behind another holds its memory too
        state, metrics = step(state, batch_data)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch_data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    peak = measure_matmul_peak(dtype)
    achieved = training_flops(macs, batch) / step_s
    stats = jax.devices()[0].memory_stats() or {}
    memory = stats.get("peak_bytes_in_use") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kept = "" if remat_policy == DiTConfig.remat_policy else f"({remat_policy.removesuffix('_saveable')})"
    variant = dtype + (f"+remat{kept}" if remat else "") + ("+scan" if scan_blocks else "")
    return {"model": canonical_name(model), "dtype": variant, "batch": batch,
            "device": cpu_model() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind,
            "compile_s": compile_s, "step_s": step_s, "images_per_s": batch / step_s,
            "achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12, "utilization": achieved / peak,
            "peak_memory_gib": memory / 2**30, "compiled_gib": compiled_bytes / 2**30,
            "predicted_gib": predicted_bytes / 2**30, "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="S/2,B/4,XL/2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--remat", nargs="?", const="all", default="auto",
                        help="models that recompute block activations in the backward pass: a comma list, 'all' or "
                             "'none'; auto (default): XL/2 on CPU, whose batch 8 needs it to fit in 24 GiB; "
                             "alone: all")
    parser.add_argument("--remat-policy", default=DiTConfig.remat_policy, choices=REMAT_POLICIES,
                        help="what a recomputing block keeps (model.remat_policy)")
    parser.add_argument("--scan-blocks", action="store_true", help="run the blocks as one scan (model.scan_blocks)")
    parser.add_argument("--depth", type=int, help="blocks per model (default: the paper's depth); fewer for a quick "
                                                  "check of the script")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # model,dtype: run in this process, print JSON
    args = parser.parse_args()
    if args.one:
        model, dtype = args.one.split(",")
        print(json.dumps(bench_one(model, args.batch, dtype, args.steps, args.remat, args.scan_blocks,
                                   args.remat_policy, args.depth)))
        return
    models = model_names(args.models)
    if args.remat not in ("auto", "all", "none"):
        unknown = set(model_names(args.remat)) - set(models)
        if unknown:
            parser.error(f"--remat names {sorted(unknown)}, which --models does not list ({', '.join(models)}).")
        args.remat = ",".join(model_names(args.remat))
    header = (f"{'model':9} {'dtype':19} {'batch':>5} {'compile s':>9} {'step s':>8} {'img/s':>8} "
              f"{'TFLOP/s':>8} {'peak':>8} {'util':>6} {'mem GiB':>8} {'XLA GiB':>8} {'dry run':>8}")
    print(header)
    device = "? (no measurement succeeded)"
    for model in models:
        auto = precision.resolve(precision.AUTO, dit_config(model).hidden_size)
        step_seconds = {}
        for dtype in args.dtypes.split(","):
            r = run_measurement("scaling.benchmarks.train", "--one", f"{model},{dtype}", "--batch", str(args.batch),
                                "--steps", str(args.steps), "--remat", args.remat,
                                "--remat-policy", args.remat_policy, *(["--scan-blocks"] if args.scan_blocks else []),
                                *(["--depth", str(args.depth)] if args.depth else []))
            if isinstance(r, str):
                print(f"{canonical_name(model):9} {dtype:19} failed: {r}", flush=True)
                continue
            step_seconds[dtype], device = r["step_s"], r["device"]
            print(f"{r['model']:9} {r['dtype']:19} {r['batch']:5d} {r['compile_s']:9.1f} {r['step_s']:8.3f} "
                  f"{r['images_per_s']:8.2f} {r['achieved_tflops']:8.3f} {r['peak_tflops']:8.3f} "
                  f"{r['utilization']:6.1%} {r['peak_memory_gib']:8.2f} {r['compiled_gib']:8.2f} "
                  f"{r['predicted_gib']:8.2f}", flush=True)
        if {"float32", "bfloat16"} <= step_seconds.keys():
            faster = min(("float32", "bfloat16"), key=step_seconds.get)
            ratio = step_seconds["float32"] / step_seconds["bfloat16"]
            verdict = "the faster one" if auto.dtype == faster else f"THE SLOWER ONE (faster here: {faster})"
            print(f"  auto picks {auto.dtype} ({auto.reason}), {verdict}: bf16 runs at {ratio:.2f}x the float32 "
                  "speed", flush=True)
    print(f"device: {device}; peak = measured matmul FLOP/s of one device in the "
          "same dtype; FLOP/s = 2 x 3 x forward MACs x images/s; mem = process RSS on CPU, the device's peak "
          "elsewhere; XLA = the compiled step's arguments, outputs and temporaries; dry run = what `grid "
          "--dry-run` predicts for one device (training state + activation estimate, scaling/cost.py)")


if __name__ == "__main__":
    main()
