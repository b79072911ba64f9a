"""Benchmark: a host's peak memory during in-training FID, for N samples, against the bytes of N samples' features
and of N decoded images.

    python -m scaling.benchmarks.fid_memory --num 1000,4000 --resolution 256

Each N runs in a fresh process the evaluation path of a latent run (`scaling.evaluation.sampling`: a DiT samples
latents in batches over the devices, a KL-f8 autoencoder decodes them to RESOLUTIONxRESOLUTION images inside the
sampling program, the FID Inception scores each host's own images, `sharded_features` gathers the pool features)
and prints its peak RSS. The DiT (one block of width 32, two sampling steps) and the autoencoder (8 channels) are
small random models, so that the time goes to the Inception, whose cost per image is the real one; the memory a
sample leaves behind is what is measured. With `--processes 2` the processes join as hosts on 127.0.0.1 and each
prints its own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

FEATURES = 2048  # the pool features hosts exchange (float64 once on the host)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(num: int, resolution: int, batch: int) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from models.autoencoder import AutoencoderConfig, AutoencoderKL
    from models.diffusion import GaussianDiffusion, linear_betas
    from models.dit import DiT, dit_config
    from models.inception import load_fid_inception
    from scaling.devices import make_mesh
    from scaling.evaluation import metrics
    from scaling.evaluation.inception import inception_activations
    from scaling.evaluation.npz import to_uint8
    from scaling.evaluation.sampling import make_sampler, sharded_features

    latent = resolution // 8
    autoencoder = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                                  norm_num_groups=4), rngs=nnx.Rngs(0))
    model_config = dit_config("S/8", input_size=latent, in_channels=4, num_classes=10, depth=1, hidden_size=32,
                              num_heads=1)
    params = nnx.state(DiT(model_config, rngs=nnx.Rngs(1)))
    diffusion = GaussianDiffusion(linear_betas(1000), learn_sigma=model_config.learn_sigma)
    sampler = make_sampler(model_config, diffusion, sampling_steps=2, sampler="ddim", guidance_scale=1.0,
                           guidance_channels=0, batch_size=batch, mesh=make_mesh(), autoencoder=autoencoder)
    inception = load_fid_inception()
    labels = np.arange(num) % 10
    baseline = _peak_rss_bytes()
    start = time.perf_counter()

    def pool_features(samples):
        images = to_uint8(samples, "dit")
        return {"pool": inception_activations(inception, images, devices=jax.local_devices()).pool}

    features = sharded_features(sampler, params, labels, 0, pool_features)["pool"]
    rng = np.random.default_rng(0)
    fid = metrics.frechet_distance_of_features(features, rng.standard_normal(FEATURES),
                                               np.eye(FEATURES) + 0.1 * np.ones((FEATURES, FEATURES)))
    print(json.dumps({
        "num": num, "process": jax.process_index(), "processes": jax.process_count(),
        "devices": jax.device_count(), "resolution": resolution, "seconds": round(time.perf_counter() - start, 1),
        "fid": round(float(fid), 3), "peak_rss_mb": round(_peak_rss_bytes() / 2**20),
        "peak_before_sampling_mb": round(baseline / 2**20),
        "features_mb": round(num * FEATURES * 8 / 2**20, 1),
        "decoded_images_mb": round(num * resolution ** 2 * 3 * 4 / 2**20, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", default="1000,4000", help="comma-separated sample counts, one process each")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="samples per sampling batch (all hosts)")
    parser.add_argument("--processes", type=int, default=1, help="hosts joined on 127.0.0.1")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        if os.environ.get("FID_MEMORY_COORDINATOR"):
            from scaling.host import join_processes

            join_processes(os.environ["FID_MEMORY_COORDINATOR"], args.processes,
                           int(os.environ["FID_MEMORY_PROCESS"]))
        _child(args.child, args.resolution, args.batch)
        return
    for num in (int(n) for n in args.num.split(",")):
        command = [sys.executable, "-m", "scaling.benchmarks.fid_memory", "--child", str(num), "--resolution",
                   str(args.resolution), "--batch", str(args.batch), "--processes", str(args.processes)]
        if args.processes == 1:
            subprocess.run(command, check=True)
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            coordinator = f"127.0.0.1:{s.getsockname()[1]}"
        hosts = [subprocess.Popen(command, env={**os.environ, "FID_MEMORY_COORDINATOR": coordinator,
                                                "FID_MEMORY_PROCESS": str(i)}) for i in range(args.processes)]
        if any([host.wait() for host in hosts]):  # every host waited for
            raise SystemExit(f"a host of the N={num} measurement failed")


if __name__ == "__main__":
    main()
