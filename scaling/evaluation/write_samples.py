"""`dit-scaling sample`: a trained run (EMA weights of a kept step) or an official DiT checkpoint (.pt) -> N images
in ADM's .npz, what ADM's evaluator and `dit-scaling evaluate` read.

Sampling is sharded over every device and host (scaling.evaluation.sampling) and written in chunks: OUT.chunks/
holds protocol.json and chunk-NNNNN.npz files, each written whole by process 0, so a killed job resumes at the
first missing chunk. Chunk c holds the batches c*k ... of one fixed stream (labels drawn once from the seed,
batch b's noise from fold_in(key(seed), b)), so a resumed job writes exactly what an uninterrupted one would.
When every chunk is there they are joined into OUT and OUT with the suffix .json (the protocol: source, step,
sampler, steps, guidance, seed, labels, decoder, uint8 convention) and the chunks are removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from etils import epath

from analysis import schema, storage
from models.timesteps import SAMPLERS
from scaling.evaluation.npz import UINT8_CONVENTIONS, atomic_savez, to_uint8, write_sample_batch

LABEL_MODES = ("balanced", "random")  # balanced: N / classes of each class (shuffled); random: uniform draws


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    num_samples: int = 50_000
    sampler: str = "ddpm"
    sampling_steps: int = 250
    guidance_scale: float = 1.0
    guidance_channels: int = 3  # the paper's mode: guide 3 of the 4 latent channels; 0 guides all
    seed: int = 0
    labels: str = "balanced"
    batch_size: int = 64  # per sampling call, over all devices
    chunk_batches: int = 8  # batches per resumable chunk
    uint8_convention: str = "dit"

    def __post_init__(self):
        checks = [(self.num_samples > 0, "--num must be positive"),
                  (self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}"),
                  (self.sampling_steps > 0, "--sampling-steps must be positive"),
                  (self.guidance_scale >= 1, "--guidance-scale must be >= 1 (1: no guidance)"),
                  (self.labels in LABEL_MODES, f"--labels must be one of {LABEL_MODES}"),
                  (self.batch_size > 0 and self.chunk_batches > 0, "--batch-size and --chunk-batches must be > 0"),
                  (self.uint8_convention in UINT8_CONVENTIONS, f"--uint8 must be one of {sorted(UINT8_CONVENTIONS)}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclasses.dataclass
class SamplingModel:
    """A model to sample from (a DiT or a plugged-in one): its config, parameters (a pure dict) and where they came
    from."""

    config: object  # models.dit.DiTConfig or models.plugin.FactoryConfig
    params: dict
    source: str
    step: int | None  # training step of a run's checkpoint; None for an official checkpoint
    latent: bool  # the DiT works on autoencoder latents (its samples need decoding)
    autoencoder: str  # the run's data.autoencoder, "" when it names none
    num_timesteps: int = 1000  # of the diffusion it was trained with


def load_sampling_model(source: str | os.PathLike, *, step: int | None = None,
                        num_heads: int | None = None) -> SamplingModel:
    """A run directory (EMA weights of `step`, default the newest checkpoint) or an official .pt checkpoint
    (`num_heads` for one whose depth and width are not a standard config's)."""
    from models.plugin import config_from_json
    from scaling.checkpoints import load_params

    source = epath.Path(source)
    if source.is_dir():
        manifest = schema.read_manifest(source)
        if manifest is None:
            raise FileNotFoundError(f"{source} holds no run ({schema.MANIFEST_FILE}): give a run directory that "
                                    "`dit-scaling train` wrote, or an official DiT checkpoint (.pt).")
        step, params = load_params(source, step=step)
        data = manifest.config.get("data", {})
        return SamplingModel(config_from_json(manifest.model), params, str(source), step,
                             latent=data.get("source") == "latent_shards", autoencoder=data.get("autoencoder", ""),
                             num_timesteps=manifest.config.get("diffusion", {}).get("num_timesteps", 1000))
    if not source.is_file():
        raise FileNotFoundError(f"No run directory or checkpoint file at {source}.")
    if step is not None:
        raise ValueError("--step picks a checkpoint of a run directory; an official checkpoint has one set of "
                         "weights.")
    from flax import nnx

    from models.convert import dit_from_torch

    model = dit_from_torch(source, num_heads)
    return SamplingModel(model.config, nnx.to_pure_dict(nnx.state(model, nnx.Param)), str(source), None,
                         latent=True, autoencoder="")


def sample_labels(options: SamplingOptions, num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(options.seed)
    if options.labels == "random":
        return rng.integers(0, num_classes, options.num_samples).astype(np.int32)
    return rng.permutation(np.arange(options.num_samples) % num_classes).astype(np.int32)


def _progress(done: int, total: int, start: float, already: int) -> None:
    rate = (done - already) / max(time.perf_counter() - start, 1e-9)
    eta = (total - done) / rate if rate else float("inf")
    print(f"sample: {done}/{total} images, {rate:.2f} images/s, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)


def write_samples(source: str | os.PathLike, out: str | os.PathLike, options: SamplingOptions, *,
                  step: int | None = None, num_heads: int | None = None,
                  autoencoder: str | os.PathLike | None = None, autoencoder_dtype: str = "float32") -> dict:
    """Sample `options.num_samples` images of a run or official checkpoint into ADM's .npz at `out`; returns the
    protocol written beside it. A latent model's samples are decoded with `autoencoder` (default: the run's
    data.autoencoder)."""
    import jax

    from models.diffusion import GaussianDiffusion, linear_betas
    from models.flops import model_compute
    from scaling.devices import make_mesh
    from scaling.evaluation.sampling import make_sampler

    out = epath.Path(out)
    model = load_sampling_model(source, step=step, num_heads=num_heads)
    config = model.config
    decoder, vae = None, None
    if model.latent:
        autoencoder = autoencoder or model.autoencoder
        if not autoencoder:
            raise ValueError(f"{source} is a latent model: give --autoencoder (the SD autoencoder folder or file "
                             "its latents came from) to decode its samples.")
        from models.autoencoder import load_autoencoder
        from scaling.evaluation.in_training import autoencoder_name

        vae = load_autoencoder(autoencoder, dtype=autoencoder_dtype)
        decoder = autoencoder_name(autoencoder)
    elif config.in_channels not in (1, 3):
        raise ValueError(f"{source} makes {config.in_channels}-channel images: only 1 (as grey RGB) or 3 can be "
                         "written as an ADM sample batch.")
    guided = schema.is_guided(options.guidance_scale)
    protocol = {"source": model.source, "step": model.step, "model": config.name,
                "sampler": options.sampler, "sampling_steps": options.sampling_steps,
                "guidance_scale": options.guidance_scale,
                "guidance_channels": options.guidance_channels if guided else None, "seed": options.seed,
                "labels": options.labels, "num_samples": options.num_samples, "batch_size": options.batch_size,
                "decoder": decoder, "uint8_convention": options.uint8_convention,
                "gflops_per_image": model_compute(config).gflops}
    if out.is_file() and sidecar(out).is_file() and json.loads(sidecar(out).read_text()) == protocol:
        print(f"sample: {out} is complete ({options.num_samples} images with these settings).", file=sys.stderr)
        return protocol
    chunks_dir = out.with_name(out.name + ".chunks")
    primary = jax.process_index() == 0
    protocol_file = chunks_dir / "protocol.json"
    if protocol_file.is_file():
        previous = json.loads(protocol_file.read_text())
        if previous != protocol:
            differing = sorted(k for k in protocol if previous.get(k) != protocol[k])
            raise ValueError(f"{chunks_dir} holds a sampling job with other settings ({', '.join(differing)} "
                             "differ): run the same command to resume it, or delete the folder to start again.")
    elif primary:
        chunks_dir.mkdir(parents=True, exist_ok=True)
        protocol_file.write_text(json.dumps(protocol, indent=2))

    diffusion = GaussianDiffusion(linear_betas(model.num_timesteps), learn_sigma=config.learn_sigma)
    sample = make_sampler(config, diffusion, sampling_steps=options.sampling_steps, sampler=options.sampler,
                          guidance_scale=options.guidance_scale, guidance_channels=options.guidance_channels,
                          batch_size=options.batch_size, mesh=make_mesh(), autoencoder=vae)
    labels = sample_labels(options, config.num_classes)
    chunk_size = options.batch_size * options.chunk_batches
    chunk_files = [chunks_dir / f"chunk-{c:05d}.npz" for c in range(-(-options.num_samples // chunk_size))]
    missing = np.asarray([not f.is_file() for f in chunk_files])
    if jax.process_count() > 1:  # every host samples the same chunks (collectives): process 0's view decides
        from jax.experimental import multihost_utils

        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    todo = [c for c in range(len(chunk_files)) if missing[c]]
    already = options.num_samples - sum(len(labels[c * chunk_size:(c + 1) * chunk_size]) for c in todo)
    start, done = time.perf_counter(), already
    print(f"sample: {len(todo)} of {len(chunk_files)} chunks to do on {jax.device_count()} device(s)",
          file=sys.stderr, flush=True)
    for c in todo:
        chunk_labels = labels[c * chunk_size:(c + 1) * chunk_size]
        images = sample(model.params, chunk_labels, options.seed, first_batch=c * options.chunk_batches)
        images = to_uint8(images, options.uint8_convention)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if primary:
            atomic_savez(chunk_files[c], {"images": images, "labels": chunk_labels})
        done += len(chunk_labels)
        _progress(done, options.num_samples, start, already)
    if primary:
        parts = [np.load(storage.loadable(f)) for f in chunk_files]
        write_sample_batch(out, np.concatenate([p["images"] for p in parts]),
                           np.concatenate([p["labels"] for p in parts]), options.uint8_convention)
        sidecar(out).write_text(json.dumps(protocol, indent=2))
        chunks_dir.rmtree()
    return protocol


def sidecar(samples: str | os.PathLike) -> epath.Path:
    """The protocol file written beside a sample batch: samples.npz -> samples.json."""
    return epath.Path(samples).with_suffix(".json")
