"""Benchmark: the miniature study's evaluation against its training, per forward pass, on one core.

    python -m scaling.benchmarks.study_eval --models XL/2,S/8 --eval-batches 25,50,125,250

For each config of the study's default preset (`fmnist:MODEL,default`), in one process confined to one core and
single-threaded XLA, as a study's workers are: the training rate (a step of batch B costs about three forward
passes of B images: the forward and a backward of twice its cost), the sampling rate (images x sampling steps per
second, with the preset's sampler and step count; twice that with guidance) and the held-out loss's rate (images x
timesteps per second), each at every --eval-batches size, and their ratio to training's. An evaluation that runs
far below training's rate per forward pass costs wall time the study could train with.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from scaling.benchmarks import model_names

FORWARDS_PER_TRAINING_IMAGE = 3  # a forward and a backward pass, which costs about two forwards


def _best_seconds(fn, repeats: int) -> float:
    """Least wall time of `fn` over `repeats` calls after one that compiles."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_one(model: str, eval_batches: list[int], repeats: int, guidance_scale: float) -> None:
    """Print one line of JSON for the training rate, then one per evaluation batch size."""
    import jax
    import numpy as np

    from models.diffusion import GaussianDiffusion, linear_betas
    from models.flops import model_compute
    from scaling import config as config_lib
    from scaling import data as data_lib
    from scaling.configs.fmnist import get_config
    from scaling.devices import make_mesh
    from scaling.evaluation.in_training import ValidationLossEvaluator
    from scaling.evaluation.sampling import make_sampler
    from scaling.host import cpu_model
    from scaling.train_step import init_state, make_multi_step, make_optimizer, make_train_step

    config = get_config(f"{model},default")
    source = data_lib.open_source(config)
    side, _, channels = source.image_shape
    model_config = config_lib.model_config(config, input_size=side, in_channels=channels,
                                           num_classes=source.num_classes)
    diffusion = GaussianDiffusion(linear_betas(config.diffusion.num_timesteps), learn_sigma=model_config.learn_sigma)
    optimizer = make_optimizer(config)
    state = init_state(model_config, optimizer, 0)
    batch, calls = int(config.train.batch_size), int(config.train.steps_per_call)
    multi_step = jax.jit(make_multi_step(make_train_step(model_config, diffusion, optimizer,
                                                         float(config.train.ema_decay))))
    rng = np.random.default_rng(0)
    batches = {"image": rng.uniform(-1, 1, (calls, batch, *source.image_shape)).astype(np.float32),
               "label": rng.integers(0, source.num_classes, (calls, batch)).astype(np.int32)}

    def train_call():
        nonlocal state
        state, metrics = multi_step(state, batches)
        jax.block_until_ready(metrics)

    train_rate = FORWARDS_PER_TRAINING_IMAGE * batch * calls / _best_seconds(train_call, repeats)
    print(json.dumps({"model": model, "cpu": cpu_model(), "train_batch": batch,
                      "training_forwards_per_s": round(train_rate, 1)}), flush=True)
    params, mesh = state["ema"], make_mesh()
    steps, sampler = int(config.eval.sampling_steps[0]), str(config.eval.sampler)
    labels = np.arange(int(config.eval.num_samples)) % source.num_classes
    guided_forwards = 2 if guidance_scale != 1.0 else 1
    for eval_batch in eval_batches:
        sample = make_sampler(model_config, diffusion, sampling_steps=steps, sampler=sampler,
                              guidance_scale=guidance_scale, guidance_channels=int(config.eval.guidance_channels),
                              batch_size=eval_batch, mesh=mesh)
        sampling_rate = guided_forwards * len(labels) * steps / _best_seconds(
            lambda sample=sample: sample(params, labels, 0), repeats)
        config.eval.batch_size = eval_batch
        validation = ValidationLossEvaluator(config, source, model_config, diffusion, model_compute(model_config),
                                             mesh)
        validation_rate = len(validation.timesteps) * int(config.eval.validation_examples) / _best_seconds(
            lambda validation=validation: validation.run(0, params, validation.protocols), repeats)
        print(json.dumps({"model": model, "eval_batch": eval_batch,
                          "sampler": f"{sampler} {steps} steps, guidance {guidance_scale:g}",
                          "sampling_forwards_per_s": round(sampling_rate, 1),
                          "sampling_vs_training": round(sampling_rate / train_rate, 2),
                          "validation_forwards_per_s": round(validation_rate, 1),
                          "validation_vs_training": round(validation_rate / train_rate, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="XL/2,L/4,S/8")
    parser.add_argument("--eval-batches", default="25,50,125,250")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--core", type=int, default=0, help="the core the measurement is confined to")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    for model in model_names(args.models):
        bench_one(model, [int(b) for b in args.eval_batches.split(",")], args.repeats, args.guidance_scale)


if __name__ == "__main__":
    main()
