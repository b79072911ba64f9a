"""Evaluation during training: the evaluator a run builds once and calls at its evaluation steps.

Every evaluator follows one interface (`Evaluator`): `protocols` lists what it measures every `every` steps,
`final_protocols` what it measures at the last step only, and `run(step, params, protocols)` scores the EMA
parameters and returns one `schema.EvaluationRecord` per protocol. `build_evaluator(config, ...)` builds the
evaluators of the run's data: Fashion-MNIST runs are scored with FD-FashionCNN against the training split (one
protocol per eval.sampling_steps entry, and per eval.final_sampling_steps entry at the last step) and, with
eval.validation_examples, with the diffusion loss on held-out test images at fixed timesteps. Latent runs are
scored with FID (`FIDEvaluator`): samples decoded by data.autoencoder, FID Inception features, against the ADM
reference batch eval.reference, as FID-10K or FID-50K by eval.num_samples.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
from etils import epath

from analysis import schema
from analysis.schema import FID_FEATURE_NETWORK, EvaluationProtocol, EvaluationRecord
from scaling import data as data_lib
from scaling.evaluation import metrics
from scaling.evaluation.fd_fashion_cnn import (
    Reference,
    cached_reference,
    classifier_outputs,
    fd_fashion_cnn_metrics_of_features,
)
from scaling.evaluation.inception import inception_activations
from scaling.evaluation.npz import to_uint8
from scaling.evaluation.sampling import make_sampler, sharded_features
from scaling.host import CACHE_DIR

FD_FASHION_CNN_FAMILY = "FD-FashionCNN"


class Evaluator(Protocol):
    every: int  # steps between evaluations (and the last step)
    # Whether the state is checkpointed before each evaluation: true where an evaluation costs enough (sampling)
    # that a run stopped during it should resume there rather than retrain up to it.
    checkpoint_first: bool
    protocols: list[EvaluationProtocol]
    final_protocols: list[EvaluationProtocol]

    def run(self, step: int, params, protocols: list[EvaluationProtocol]) -> list[EvaluationRecord]:
        """Score the model with `params` (trained for `step` steps) under each protocol."""


def evaluation_protocols(config, sampling_steps=None, *, seed: int | None = None,
                         guidance_scale: float | None = None) -> list[EvaluationProtocol]:
    """One protocol per entry of `sampling_steps` (default: eval.sampling_steps), with eval.seed and
    eval.guidance_scale unless given: everything that makes two evaluation points comparable."""
    e = config.eval
    seed = int(e.seed) if seed is None else seed
    guidance_scale = float(e.guidance_scale) if guidance_scale is None else float(guidance_scale)
    guided = schema.is_guided(guidance_scale)
    if config.data.source == "latent_shards":
        reference, feature_network = epath.Path(e.reference).name, FID_FEATURE_NETWORK
        decoder = autoencoder_name(config.data.autoencoder)
    else:
        reference = data_name(config, "train", int(e.num_reference))
        feature_network = (f"FashionCNN(epochs={int(e.classifier_epochs)}, "
                           f"examples={int(e.classifier_examples) or 'all'}, seed={int(config.train.seed)})")
        decoder = None
    return [EvaluationProtocol(sampler=e.sampler, sampling_steps=int(steps), guidance_scale=guidance_scale,
                               guidance_channels=int(e.guidance_channels) if guided else None,
                               num_samples=int(e.num_samples), seed=seed, uint8_convention="dit",
                               reference=reference, feature_network=feature_network, decoder=decoder)
            for steps in (e.sampling_steps if sampling_steps is None else sampling_steps)]


def data_name(config, split: str, n: int) -> str:
    """How a protocol names Fashion-MNIST images: "fashion_mnist:train[:10000]", with the resolution where it is not
    the 32x32 of the padded originals ("fashion_mnist@16x16:test[:200]")."""
    resolution = config.data.resolution or data_lib.FashionMNIST.classifier_resolution
    at = "" if resolution == data_lib.FashionMNIST.classifier_resolution else f"@{resolution}x{resolution}"
    return f"{config.data.source}{at}:{split}[:{n}]"


def autoencoder_name(path: str) -> str:
    """How a protocol names the decoder: its weights file and the start of its SHA-256."""
    from models.autoencoder import find_autoencoder_files
    from scaling.latents import autoencoder_sha256

    return f"{epath.Path(find_autoencoder_files(path)[0]).name} sha256:{autoencoder_sha256(path)[:16]}"


def final_evaluation_protocols(config) -> list[EvaluationProtocol]:
    """The protocols of the last step alone: eval.final_sampling_steps not already among eval.sampling_steps', and
    the first sampling-step count with each of eval.final_seeds and eval.final_guidance_scales."""
    e = config.eval
    extra = [s for s in e.final_sampling_steps if s not in tuple(e.sampling_steps)]
    first = [e.sampling_steps[0]]
    return (evaluation_protocols(config, extra)
            + [p for seed in e.final_seeds for p in evaluation_protocols(config, first, seed=int(seed))]
            + [p for scale in e.final_guidance_scales
               for p in evaluation_protocols(config, first, guidance_scale=float(scale))])


def prepare_feature_network(config, source):
    """The FashionCNN of a run's evaluation (trained once per data and recipe on the 32x32 training images, then
    loaded from the cache; every resolution is scored by the same network): a grid running several runs at once
    prepares it first, so that they do not all train it."""
    from models.fashion_cnn import Recipe, trained_fashion_cnn

    e = config.eval
    if source.image_shape[0] != source.classifier_resolution:
        source = data_lib.FashionMNIST(config.data.path, resolution=source.classifier_resolution)
    n_train = int(e.classifier_examples) or len(source)
    recipe = Recipe(epochs=int(e.classifier_epochs), seed=int(config.train.seed))
    return trained_fashion_cnn(source.images[:n_train], source.labels[:n_train], source.num_classes, recipe,
                               cache_dir=CACHE_DIR)


def pending_protocols(done: list[EvaluationRecord], step: int,
                      protocols: list[EvaluationProtocol]) -> list[EvaluationProtocol]:
    """The protocols not yet evaluated at `step` (an evaluation already recorded is never repeated)."""
    measured = {(record.step, record.protocol) for record in done}
    return [p for p in protocols if (step, p) not in measured]


def protocol_sampler(cache: dict, evaluator, protocol: EvaluationProtocol, autoencoder=None):
    """The sampler of a protocol for an evaluator (its config, model_config, diffusion and mesh), compiled once
    per (sampler, steps, guidance) and kept in `cache`."""
    key = (protocol.sampler, protocol.sampling_steps, protocol.guidance_scale)
    if key not in cache:
        cache[key] = make_sampler(
            evaluator.model_config, evaluator.diffusion, sampling_steps=protocol.sampling_steps,
            sampler=protocol.sampler, guidance_scale=protocol.guidance_scale,
            guidance_channels=int(evaluator.config.eval.guidance_channels),
            batch_size=int(evaluator.config.eval.batch_size), mesh=evaluator.mesh, autoencoder=autoencoder)
    return cache[key]


def real_data_floor(config, classifier, reference: Reference) -> dict:
    """What real images score: the first eval.num_samples held-out test images against the same reference, with
    the same feature network. A perfect model's samples score about this at the same N; no model scores far below.
    Returns the details every FD record carries: `floor` (their FD) and `floor_class_accuracy`."""
    held_out = data_lib.open_source(config, split="test")
    n = int(config.eval.num_samples)
    if n > len(held_out):
        raise ValueError(f"eval.num_samples={n} exceeds the {len(held_out)} held-out test images that give the "
                         "metric's floor.")
    images = held_out.at_classifier_resolution(held_out.images[:n])
    real = fd_fashion_cnn_metrics_of_features(reference, *classifier_outputs(classifier, images),
                                              held_out.labels[:n])
    return {"floor": real["fd_fashioncnn"], "floor_class_accuracy": real["class_accuracy"]}


KEPT_SAMPLES = 100  # of a final evaluation's samples, kept in the run: ten of each class for the sample figures


def kept_samples_path(protocol: EvaluationProtocol) -> str:
    """Where in a run the samples of a final evaluation lie: samples/final-dpm-solver++16-guidance4.npz."""
    return f"samples/final-{protocol.sampler}{protocol.sampling_steps}-guidance{protocol.guidance_scale:g}.npz"


def keep_samples(workdir: epath.Path, protocol: EvaluationProtocol, samples: np.ndarray, labels: np.ndarray) -> str:
    """Write the first KEPT_SAMPLES samples (uint8 at the model's resolution) and their labels into the run, as an
    .npz of arr_0 (images) and arr_1 (labels) like ADM's sample batches; returns the path within the run."""
    from scaling.evaluation.npz import atomic_savez

    path = kept_samples_path(protocol)
    atomic_savez(workdir / path, {"arr_0": samples[:KEPT_SAMPLES], "arr_1": labels[:KEPT_SAMPLES].astype(np.int64),
                                  "uint8_convention": np.array(protocol.uint8_convention)})
    return path


class SmallDataEvaluator:
    """Scores a run's EMA model with the small-data metrics: each host computes the classifier outputs of the
    samples its devices drew, and the hosts exchange those (`sharded_features`). The classifier, the real
    reference features and each sampler are prepared on first use and reused at every evaluation of the run. With
    a `workdir`, the last step's first samples of the first sampling-step count are kept there (`keep_samples`)."""

    checkpoint_first = True

    def __init__(self, config, source, model_config, diffusion, compute, mesh, workdir: epath.Path | None = None):
        self.workdir = workdir
        self.config, self.source, self.model_config = config, source, model_config
        self.diffusion, self.compute, self.mesh = diffusion, compute, mesh
        self.every = int(config.eval.every)
        self.protocols = evaluation_protocols(config)
        self.final_protocols = final_evaluation_protocols(config)
        self._classifier = None
        self._reference = None
        self._floor = None
        self._samplers = {}

    def _prepare(self) -> None:
        self._classifier = prepare_feature_network(self.config, self.source)
        reference = self.source.images[: int(self.config.eval.num_reference)]
        self._reference = cached_reference(self._classifier, self.source.at_classifier_resolution(reference),
                                           CACHE_DIR)
        self._floor = real_data_floor(self.config, self._classifier, self._reference)

    def _sampler(self, protocol: EvaluationProtocol):
        return protocol_sampler(self._samplers, self, protocol)

    def _keeps_samples(self, step: int, protocol: EvaluationProtocol) -> bool:
        """At the last step, the samples of the first sampling-step count and eval.seed, guided or not (every host
        takes part in gathering them; the first writes them)."""
        e = self.config.eval
        return (self.workdir is not None and step == int(self.config.train.steps)
                and protocol.sampling_steps == int(e.sampling_steps[0]) and protocol.seed == int(e.seed))

    def run(self, step: int, params, protocols: list[EvaluationProtocol]) -> list[EvaluationRecord]:
        import jax

        if self._classifier is None:
            self._prepare()
        e = self.config.eval
        labels = np.arange(int(e.num_samples)) % self.source.num_classes  # class-balanced
        records = []
        for protocol in protocols:
            start = time.perf_counter()

            def outputs(samples, protocol=protocol):
                images = self.source.at_classifier_resolution(to_uint8(samples, protocol.uint8_convention))
                return dict(zip(("features", "probs"), classifier_outputs(self._classifier, images), strict=True))

            keeps = self._keeps_samples(step, protocol)
            out = sharded_features(self._sampler(protocol), params, labels, protocol.seed, outputs,
                                   first_samples=KEPT_SAMPLES if keeps else 0)
            result = fd_fashion_cnn_metrics_of_features(self._reference, out["features"], out["probs"], labels)
            details = {k: v for k, v in result.items() if k not in ("fd_fashioncnn", "feature_network")}
            details.update(self._floor)
            if keeps and jax.process_index() == 0:
                details["samples"] = keep_samples(self.workdir, protocol,
                                                  to_uint8(out["samples"], protocol.uint8_convention), labels)
            records.append(EvaluationRecord.of(
                step=step, metric=schema.metric_name(FD_FASHION_CNN_FAMILY, len(labels)), value=result["fd_fashioncnn"],
                protocol=protocol, gflops_per_image=self.compute.gflops, global_batch=self.config.train.batch_size,
                details=details, seconds=time.perf_counter() - start, time=time.time()))
        return records


def validation_timesteps(config) -> list[int]:
    """eval.validation_timesteps timesteps spread evenly over the diffusion: the middle of equal intervals."""
    count, total = int(config.eval.validation_timesteps), int(config.diffusion.num_timesteps)
    return [int((i + 0.5) * total / count) for i in range(count)]


def held_out_name(config, held_out, n: int) -> str:
    """How a protocol names the held-out images: "fashion_mnist:test[:200]", or a latent run's validation latents
    by their folder and the fingerprint of their image list, "latent_shards:imagenet-val@3f2a9c01d4e7[1000 spread]"
    (n evenly spaced: `data.held_out_indices`)."""
    if config.data.source == "latent_shards":
        fingerprint = held_out.manifest.get("images_sha256", "")[:12]
        return f"{config.data.source}:{epath.Path(config.data.validation_path).name}@{fingerprint}[{n} spread]"
    return data_name(config, "test", n)


class ValidationLossEvaluator:
    """The diffusion loss of the EMA model on held-out images (Fashion-MNIST's test split, a latent run's
    data.validation_path) at fixed timesteps, with fixed noise: the same inputs at every evaluation, so the values
    compare across steps and runs. The metric is the mean squared error of the predicted noise (the paper's
    L_simple) averaged over images and timesteps: the cheap proxy of sample quality that scaling work after DiT
    uses. The held-out set is opened when the evaluator is built, so a missing or mismatched one stops the run
    before it trains."""

    checkpoint_first = False  # a few forwards: a run stopped during one replays its steps instead

    def __init__(self, config, source, model_config, diffusion, compute, mesh):
        self.config, self.model_config, self.diffusion = config, model_config, diffusion
        self.compute, self.mesh = compute, mesh
        self.held_out = data_lib.open_held_out(config, source)
        self.timesteps = validation_timesteps(config)
        self.every = int(config.eval.validation_every or config.eval.every)
        n = int(config.eval.validation_examples)
        data_lib.held_out_indices(self.held_out, n)  # too few held-out images stop the run before it trains
        self.protocols = [EvaluationProtocol(
            sampler=None, sampling_steps=None, guidance_scale=None, guidance_channels=None, num_samples=n,
            seed=int(config.eval.seed), uint8_convention=None, reference=held_out_name(config, self.held_out, n),
            feature_network=f"none: noise-prediction MSE at timesteps {self.timesteps}")]
        self.final_protocols = []
        self._loss = None
        self._inputs = None

    def _prepare(self) -> None:
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from models.plugin import abstract_model
        from scaling.devices import BATCH_AXES

        e = self.config.eval
        sharding = NamedSharding(self.mesh, P(BATCH_AXES))
        images, labels = data_lib.held_out_inputs(self.held_out, int(e.validation_examples), int(e.seed))
        n = len(labels)
        key = jax.random.key(int(e.seed))
        # One row per (timestep, image): fixed noise, drawn once, so every evaluation sees the same inputs.
        t = np.repeat(np.asarray(self.timesteps, np.int32), n)
        noise = np.asarray(jax.random.normal(key, (len(t), *images.shape[1:])), np.float32)
        self._inputs = {"x": np.tile(images, (len(self.timesteps), 1, 1, 1)),
                        "y": np.tile(labels, len(self.timesteps)), "t": t, "noise": noise}
        graphdef = nnx.graphdef(abstract_model(self.model_config))
        diffusion = self.diffusion

        @jax.jit
        def batch_mse(params, x, y, t, noise, weight):
            model = nnx.merge(graphdef, params)
            x, y, t, noise, weight = (jax.lax.with_sharding_constraint(a, sharding) for a in (x, y, t, noise, weight))
            mse = diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x, t, noise)["mse"]
            return jnp.sum(mse * weight)

        self._loss = batch_mse

    def run(self, step: int, params, protocols: list[EvaluationProtocol]) -> list[EvaluationRecord]:
        if not protocols:
            return []
        if self._loss is None:
            self._prepare()
        start = time.perf_counter()
        batch_size, rows = int(self.config.eval.batch_size), len(self._inputs["t"])
        total = 0.0
        for first in range(0, rows, batch_size):
            chunk = {k: v[first:first + batch_size] for k, v in self._inputs.items()}
            real = len(chunk["t"])
            # One compiled shape: the last batch is padded with rows of weight 0.
            chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, axis=0)]) for k, v in chunk.items()}
            weight = (np.arange(batch_size) < real).astype(np.float32)
            total += float(self._loss(params, chunk["x"], chunk["y"], chunk["t"], chunk["noise"], weight))
        protocol = self.protocols[0]
        return [EvaluationRecord.of(
            step=step, metric=schema.metric_name(schema.VALIDATION_FAMILY, protocol.num_samples), value=total / rows,
            protocol=protocol, gflops_per_image=self.compute.gflops, global_batch=self.config.train.batch_size,
            seconds=time.perf_counter() - start, time=time.time())]


class FIDEvaluator:
    """FID of a latent run's EMA model: class-balanced samples (the same noise and labels at every step), decoded
    by data.autoencoder inside the sharded sampling program, FID Inception features computed by each host of its
    own samples over its devices (hosts exchange the pool features alone: `sharded_features`), the Frechet
    distance to eval.reference's statistics. The autoencoder, the Inception, the reference and each sampler are
    prepared on first use and reused."""

    checkpoint_first = True

    def __init__(self, config, source, model_config, diffusion, compute, mesh):
        self.config, self.source, self.model_config = config, source, model_config
        self.diffusion, self.compute, self.mesh = diffusion, compute, mesh
        self.every = int(config.eval.every)
        self.protocols = evaluation_protocols(config)
        self.final_protocols = final_evaluation_protocols(config)
        self._samplers = {}
        self._autoencoder = self._inception = self._reference = None

    def _prepare(self) -> None:
        from models.autoencoder import load_autoencoder
        from models.inception import load_fid_inception
        from scaling.evaluation.npz import read_reference

        self._autoencoder = load_autoencoder(self.config.data.autoencoder)
        self._inception = load_fid_inception(self.config.eval.inception_weights or None)
        reference = read_reference(self.config.eval.reference)
        self._reference = reference.pool or metrics.gaussian_statistics(
            inception_activations(self._inception, reference.images).pool)

    def _sampler(self, protocol: EvaluationProtocol):
        return protocol_sampler(self._samplers, self, protocol, autoencoder=self._autoencoder)

    def run(self, step: int, params, protocols: list[EvaluationProtocol]) -> list[EvaluationRecord]:
        if not protocols:
            return []
        if self._autoencoder is None:
            self._prepare()
        import jax

        e = self.config.eval
        labels = np.arange(int(e.num_samples)) % self.source.num_classes
        records = []
        for protocol in protocols:
            start = time.perf_counter()

            def pool_features(samples, protocol=protocol):
                images = to_uint8(samples, protocol.uint8_convention)
                return {"pool": inception_activations(self._inception, images, devices=jax.local_devices()).pool}

            features = sharded_features(self._sampler(protocol), params, labels, protocol.seed, pool_features)["pool"]
            fid = metrics.frechet_distance_of_features(features, *self._reference)
            records.append(EvaluationRecord.of(
                step=step, metric=schema.metric_name("FID", len(features)), value=fid, protocol=protocol,
                gflops_per_image=self.compute.gflops, global_batch=self.config.train.batch_size,
                seconds=time.perf_counter() - start, time=time.time()))
        return records


class Evaluators:
    """Several evaluators, each on its own schedule: each protocol goes to the evaluator that measures it."""

    def __init__(self, evaluators: list):
        self.evaluators = evaluators
        self.protocols = [p for e in evaluators for p in e.protocols]
        self.final_protocols = [p for e in evaluators for p in e.final_protocols]

    def protocols_at(self, step: int, total_steps: int, checkpoint_first: bool = False) -> list[EvaluationProtocol]:
        """What is measured at `step`: the protocols of each evaluator whose schedule falls there, and at the last
        step every evaluator's protocols and final protocols (with `checkpoint_first`, only those of evaluators
        that want the state checkpointed before them)."""
        last = step == total_steps
        return [p for e in self.evaluators if step > 0 and (last or step % e.every == 0)
                and (e.checkpoint_first or not checkpoint_first)
                for p in e.protocols + (e.final_protocols if last else [])]

    def run(self, step: int, params, protocols: list[EvaluationProtocol]) -> list[EvaluationRecord]:
        records = []
        for evaluator in self.evaluators:
            mine = set(evaluator.protocols) | set(evaluator.final_protocols)
            records += evaluator.run(step, params, [p for p in protocols if p in mine])
        return records


def build_evaluator(config, source, model_config, diffusion, compute, mesh,
                    workdir: epath.Path | None = None) -> Evaluator:
    """The evaluators of a run's data source (config.validate has refused sources without one); the small-data
    evaluator keeps its final samples in `workdir`."""
    evaluators = []
    if config.eval.every:
        evaluators.append(FIDEvaluator(config, source, model_config, diffusion, compute, mesh)
                          if config.data.source == "latent_shards"
                          else SmallDataEvaluator(config, source, model_config, diffusion, compute, mesh, workdir))
    if config.eval.validation_examples:
        evaluators.append(ValidationLossEvaluator(config, source, model_config, diffusion, compute, mesh))
    return Evaluators(evaluators)
