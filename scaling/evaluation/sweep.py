"""Offline evaluation of a run: FID records from sample batches (`dit-scaling evaluate --run`), and sweeps
(`dit-scaling sweep`) that sample and score a finished run's kept checkpoints at several training steps and
sampling-step counts, what the paper's Figs. 6, 9 and 10 need at paper scale. A sweep appends one evaluation
record per (step, protocol) and skips every one the run already has, so an interrupted sweep resumes (and a
sample batch interrupted mid-way resumes from its chunks)."""

from __future__ import annotations

import dataclasses
import sys
import time

from etils import epath

from analysis import schema
from scaling.evaluation.write_samples import SamplingOptions


def fid_protocol(*, sampler, sampling_steps, guidance_scale, guidance_channels, num_samples, seed,
                 uint8_convention, reference: str, decoder) -> schema.EvaluationProtocol:
    """The protocol of an FID record of ADM's evaluation suite (the FID Inception's pool features)."""
    return schema.EvaluationProtocol(sampler=sampler, sampling_steps=sampling_steps, guidance_scale=guidance_scale,
                                     guidance_channels=guidance_channels if schema.is_guided(guidance_scale) else None,
                                     num_samples=num_samples, seed=seed, uint8_convention=uint8_convention,
                                     reference=reference, feature_network=schema.FID_FEATURE_NETWORK, decoder=decoder)


def fid_record(run: schema.Manifest, result: dict, *, step: int, protocol: schema.EvaluationProtocol,
               seconds: float | None = None) -> schema.EvaluationRecord:
    """An evaluation record of `run` from `scaling.evaluation.inception.evaluate_samples`' result."""
    details = {k: result[k] for k in ("sfid", "inception_score", "precision", "recall", "n_reference")}
    return schema.EvaluationRecord.of(
        step=step, metric=schema.metric_name("FID", result["n"]), value=result["fid"], protocol=protocol,
        gflops_per_image=run.gflops_per_image, global_batch=run.global_batch, details=details, seconds=seconds,
        time=time.time())


def sweep(run_dir: str | epath.Path, reference_path: str | epath.Path, load_inception, *, sampling_steps: list[int],
          options: SamplingOptions, steps: list[int] | None = None, autoencoder: str | None = None,
          samples_dir: str | epath.Path | None = None, batch_size: int = 64) -> list[schema.EvaluationRecord]:
    """Sample and score `run_dir` at each kept checkpoint of `steps` (default: all kept) and each entry of
    `sampling_steps`, appending the records it lacks; returns the new records. Sample batches go to
    `samples_dir` (default RUN/samples/). `load_inception()` gives the FID Inception, loaded when first needed."""
    from scaling.checkpoints import kept_steps
    from scaling.evaluation.in_training import autoencoder_name
    from scaling.evaluation.inception import evaluate_samples, prepare_reference
    from scaling.evaluation.npz import read_reference, read_sample_batch
    from scaling.evaluation.write_samples import write_samples

    run_dir = epath.Path(run_dir)
    run = schema.read_manifest(run_dir)
    if run is None:
        raise FileNotFoundError(f"{run_dir} holds no run ({schema.MANIFEST_FILE}).")
    kept = kept_steps(run_dir)
    steps = kept if steps is None else steps
    missing = [s for s in steps if s not in kept]
    if missing:
        raise ValueError(f"{run_dir} keeps no checkpoint at steps {missing}; it keeps {kept}.")
    data = run.config.get("data", {})
    autoencoder = autoencoder or data.get("autoencoder", "")
    decoder = autoencoder_name(autoencoder) if data.get("source") == "latent_shards" and autoencoder else None
    reference_batch = read_reference(reference_path)  # read first: a bad file fails before any sampling
    samples_dir = epath.Path(samples_dir) if samples_dir else run_dir / "samples"
    done = {(r.step, r.protocol) for r in schema.read_evaluations(run_dir)}
    new, inception, reference = [], None, None
    for step in steps:
        for count in sampling_steps:
            opts = dataclasses.replace(options, sampling_steps=int(count))
            protocol = fid_protocol(sampler=opts.sampler, sampling_steps=opts.sampling_steps,
                                    guidance_scale=opts.guidance_scale, guidance_channels=opts.guidance_channels,
                                    num_samples=opts.num_samples, seed=opts.seed,
                                    uint8_convention=opts.uint8_convention, reference=epath.Path(reference_path).name,
                                    decoder=decoder)
            if (step, protocol) in done:
                print(f"sweep: step {step}, {opts.sampler} {count} steps: recorded already, skipped",
                      file=sys.stderr, flush=True)
                continue
            start = time.perf_counter()
            path = samples_dir / (f"step{step:07d}-{opts.sampler}{count}-cfg{opts.guidance_scale:g}"
                                  f"-n{opts.num_samples}-seed{opts.seed}.npz")
            write_samples(run_dir, path, opts, step=step, autoencoder=autoencoder or None)
            if inception is None:  # once per sweep, and only when some evaluation is left to do
                inception = load_inception()
                reference = prepare_reference(reference_batch, inception, batch_size)
            result = evaluate_samples(read_sample_batch(path), reference, inception, batch_size)
            record = fid_record(run, result, step=step, protocol=protocol, seconds=time.perf_counter() - start)
            schema.append_jsonl(run_dir / schema.EVALUATIONS_FILE, record.to_json())
            print(f"sweep: step {step}, {opts.sampler} {count} steps: {record.metric} {record.value:.2f}",
                  file=sys.stderr, flush=True)
            new.append(record)
    return new
