"""Benchmark: the project's DiT training step side by side with an independent PyTorch DiT on this machine.

    python -m scaling.benchmarks.compare --models S/2,B/4,XL/2 --batch 8 --rounds 3

The PyTorch peer is models.torch_dit (the official models.py's adaLN-Zero DiT) with the same step: the
learned-sigma diffusion loss (MSE on epsilon plus the variational bound on the variance, ADM's hybrid loss),
AdamW with the study's hyperparameters and an EMA update, at 256px (32x32x4 latents, 1000 classes). Variants:
jax-float32 and jax-bfloat16 (the project's step, `scaling.benchmarks.train`), torch-eager and torch-compile
(float32; torch.compile of the model and loss, forward and backward, default mode; AdamW runs eagerly with its
foreach kernels in both PyTorch variants). Each measurement runs in a fresh process and the variants alternate
within every round (reversed every other round), so a drift of the machine hits all of them alike. A round's value
is the median of --steps timed steps after two warm-up steps; reported are the median over rounds, the range, and
each JAX variant's speed relative to the fastest PyTorch variant. Before each measurement the cores' load from other
processes is sampled over a second; a busy machine is named in the output. `--remat MODELS` recomputes block
activations in both frameworks (torch.utils.checkpoint per block), `--scan-blocks MODELS` scans the JAX blocks.
Needs torch (`pip install 'dit-scaling[torch]'`).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from models.dit import canonical_name, dit_config
from scaling.benchmarks import model_names, run_measurement

JAX_VARIANTS = ("jax-float32", "jax-bfloat16")
TORCH_VARIANTS = ("torch-eager", "torch-compile")
VARIANTS = JAX_VARIANTS + TORCH_VARIANTS
BUSY_FRACTION = 0.1  # other processes using more than a tenth of the cores skew the timings


def other_load(seconds: float = 1.0) -> float:
    """Fraction of all cores busy over `seconds` while this process sleeps (so: other processes' load)."""
    def busy_and_total():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = busy_and_total()
    time.sleep(seconds)
    busy1, total1 = busy_and_total()
    return (busy1 - busy0) / max(total1 - total0, 1)


def torch_training_loss(model, diffusion):
    """ADM's hybrid loss (mean over the batch) of a PyTorch DiT: loss(x_start [N, C, H, W], t [N], noise, y)."""
    import torch

    tables = {name: torch.tensor(diffusion.table(name), dtype=torch.float32) for name in (
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
        "posterior_log_variance_clipped", "log_betas")}

    def at(name, t):
        return tables[name][t][:, None, None, None]

    def cdf(v):  # ADM's tanh approximation of the standard normal CDF
        return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    def loss(x_start, t, noise, y):
        x_t = at("sqrt_alphas_cumprod", t) * x_start + at("sqrt_one_minus_alphas_cumprod", t) * noise
        eps, var_values = model(x_t, t, y).chunk(2, dim=1)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        # The variational bound trains the variance only (the mean's gradient comes from the MSE).
        true_mean = at("posterior_mean_coef1", t) * x_start + at("posterior_mean_coef2", t) * x_t
        true_log_var = at("posterior_log_variance_clipped", t)
        frac = (var_values + 1) / 2
        log_var = frac * at("log_betas", t) + (1 - frac) * true_log_var
        pred_x0 = (x_t - at("sqrt_one_minus_alphas_cumprod", t) * eps.detach()) / at("sqrt_alphas_cumprod", t)
        mean = at("posterior_mean_coef1", t) * pred_x0 + at("posterior_mean_coef2", t) * x_t
        kl = 0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        # Decoder NLL at t = 0: a discretised Gaussian with bins of 2/255.
        inv_std = torch.exp(-0.5 * log_var)
        upper, lower = cdf(inv_std * (x_start - mean + 1 / 255)), cdf(inv_std * (x_start - mean - 1 / 255))
        log_prob = torch.where(x_start < -0.999, torch.log(upper.clamp(min=1e-12)),
                               torch.where(x_start > 0.999, torch.log((1 - lower).clamp(min=1e-12)),
                                           torch.log((upper - lower).clamp(min=1e-12))))
        vb = torch.where(t == 0, -log_prob.mean(dim=(1, 2, 3)), kl.mean(dim=(1, 2, 3))) / math.log(2)
        return (mse + vb).mean()

    return loss


def _torch_step_time(model_name: str, batch: int, steps: int, compiled: bool, remat: bool) -> dict:
    import torch
    from torch.utils.checkpoint import checkpoint

    from models.diffusion import GaussianDiffusion, linear_betas
    from models.torch_dit import ReferenceDiT
    from scaling.configs.common import base_config

    torch.manual_seed(0)
    train, model_config = base_config().train, dit_config(model_name)
    model = ReferenceDiT(input_size=32, patch_size=model_config.patch_size, hidden_size=model_config.hidden_size,
                         depth=model_config.depth, num_heads=model_config.num_heads, num_classes=1000)
    if remat:
        for block in model.blocks:
            block.forward = lambda x, c, forward=block.forward: checkpoint(forward, x, c, use_reentrant=False)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.b1, train.b2), eps=train.eps,
                                  weight_decay=train.weight_decay, foreach=True)
    loss_fn = torch_training_loss(model, GaussianDiffusion(linear_betas(1000)))
    loss_fn = torch.compile(loss_fn) if compiled else loss_fn

    def step(x_start, y):
        loss = loss_fn(x_start, torch.randint(0, 1000, (batch,)), torch.randn_like(x_start), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - train.ema_decay)
        return loss

    x_start, y = torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,))
    start = time.perf_counter()
    loss = step(x_start, y)  # torch.compile compiles here
    first_step_s = time.perf_counter() - start
    step(x_start, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(x_start, y)
        times.append(time.perf_counter() - start)
    return {"step_s": float(np.median(times)), "compile_s": first_step_s, "loss": float(loss)}


def measure(variant: str, model: str, batch: int, steps: int, remat: bool, scan_blocks: bool) -> dict:
    """One measurement, in this process."""
    from scaling.host import keep_freed_memory

    keep_freed_memory()
    if variant in JAX_VARIANTS:
        from scaling.benchmarks.train import bench_one

        result = bench_one(model, batch, variant.removeprefix("jax-"), steps, "all" if remat else "none",
                           scan_blocks)
    else:
        result = _torch_step_time(model, batch, steps, variant == "torch-compile", remat)
    return {"variant": variant, "model": canonical_name(model), "step_s": result["step_s"],
            "setup_s": result["compile_s"], "loss": result["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="S/2,B/4,XL/2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"a comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median taken)")
    parser.add_argument("--remat", default="none",
                        help="models that recompute block activations (both frameworks): a comma list or 'none'")
    parser.add_argument("--scan-blocks", default="none",
                        help="models whose JAX blocks run as one scan (model.scan_blocks): a comma list or 'none'")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # variant,model: measure in this process, print JSON
    args = parser.parse_args()
    models = model_names(args.models)
    remat, scanned = set(model_names(args.remat)), set(model_names(args.scan_blocks))
    if args.one:
        variant, model = args.one.split(",")
        print(json.dumps(measure(variant, model, args.batch, args.steps, model in remat, model in scanned)))
        return
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}.")
    import jax
    import torch

    from scaling.host import cpu_flags, cpu_model

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    print(f"jax {jax.__version__}; torch {torch.__version__} with {torch.get_num_threads()} threads", flush=True)
    print(f"CPU: {cpu_model()} ({', '.join(flags) or 'no AVX2'}); batch {args.batch}; {args.rounds} rounds of "
          f"{args.steps} timed steps; remat: {', '.join(sorted(remat)) or 'none'}; JAX blocks scanned: "
          f"{', '.join(sorted(scanned)) or 'none'}", flush=True)
    times: dict[tuple[str, str], list[float]] = {}
    for model in models:
        for round_index in range(args.rounds):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for variant in order:
                load = other_load()
                r = run_measurement("scaling.benchmarks.compare", "--one", f"{variant},{model}", "--batch",
                                    str(args.batch), "--steps", str(args.steps), "--remat", args.remat,
                                    "--scan-blocks", args.scan_blocks)
                busy = f"  (other processes kept {load:.0%} of the cores busy)" if load > BUSY_FRACTION else ""
                if isinstance(r, str):
                    print(f"{canonical_name(model):9} {variant:14} round {round_index + 1}: failed: {r}{busy}",
                          flush=True)
                    continue
                times.setdefault((model, variant), []).append(r["step_s"])
                print(f"{r['model']:9} {variant:14} round {round_index + 1}: {r['step_s']:8.3f} s/step "
                      f"(compile or first step {r['setup_s']:.1f} s, loss {r['loss']:.3f}){busy}", flush=True)
        _summarise(model, variants, times)


def _summarise(model: str, variants: list[str], times: dict) -> None:
    medians = {v: float(np.median(times[(model, v)])) for v in variants if (model, v) in times}
    print(f"{canonical_name(model)}: median s/step (min-max over rounds)")
    for variant, median in medians.items():
        values = times[(model, variant)]
        print(f"  {variant:14} {median:8.3f}  ({min(values):.3f}-{max(values):.3f})")
    torch_medians = {v: medians[v] for v in TORCH_VARIANTS if v in medians}
    if torch_medians:
        fastest = min(torch_medians, key=torch_medians.get)
        for variant in JAX_VARIANTS:
            if variant in medians:
                print(f"  {variant} is {torch_medians[fastest] / medians[variant]:.2f}x the speed of {fastest}, "
                      f"the fastest PyTorch variant", flush=True)


if __name__ == "__main__":
    main()
