"""Evaluation during training: the evaluator a run builds once and calls at its evaluation steps.

Every evaluator follows one interface (`Evaluator`): `protocols` lists what it measures (one `schema.Protocol`
per entry of eval.sampling_steps), and `run(step, params, protocols)` samples from the EMA parameters and returns
one `schema.EvaluationRecord` per protocol. `build_evaluator(config, ...)` picks the evaluator of the run's data:
Fashion-MNIST runs are scored with FD-FashionCNN against the training split (latent runs need the autoencoder's
decoder and are scored from written samples with `dit-scaling evaluate`).
"""

from __future__ import annotations

import time
from typing import Protocol as Interface

import numpy as np

from analysis import schema
from analysis.schema import EvaluationRecord, Protocol
from scaling.evaluation.npz import to_uint8
from scaling.evaluation.sampling import make_sampler
from scaling.evaluation.small_data import classifier_outputs, small_data_metrics_of_features

SMALL_DATA_FAMILY = "FD-FashionCNN"


class Evaluator(Interface):
    protocols: list[Protocol]

    def run(self, step: int, params, protocols: list[Protocol]) -> list[EvaluationRecord]:
        """Score the model with `params` (trained for `step` steps) under each protocol."""


def evaluation_protocols(config) -> list[Protocol]:
    """One protocol per eval.sampling_steps entry: everything that makes two evaluation points comparable."""
    e = config.eval
    guided = schema.is_guided(float(e.guidance_scale))
    return [Protocol(sampler=e.sampler, sampling_steps=int(steps), guidance_scale=float(e.guidance_scale),
                     guidance_channels=int(e.guidance_channels) if guided else None,
                     num_samples=int(e.num_samples), seed=int(e.seed), uint8_convention="dit",
                     reference=f"{config.data.source}:train[:{int(e.num_reference)}]",
                     feature_network=f"FashionCNN(epochs={int(e.classifier_epochs)}, "
                                     f"examples={int(e.classifier_examples) or 'all'}, seed={int(config.train.seed)})")
            for steps in e.sampling_steps]


def pending_protocols(done: list[EvaluationRecord], step: int, protocols: list[Protocol]) -> list[Protocol]:
    """The protocols not yet evaluated at `step` (an evaluation already recorded is never repeated)."""
    measured = {(record.step, record.protocol) for record in done}
    return [p for p in protocols if (step, p) not in measured]


class SmallDataEvaluator:
    """Scores a run's EMA model with the small-data metrics. The classifier, the real reference features and each
    sampler are prepared on first use and reused at every evaluation of the run."""

    def __init__(self, config, source, model_config, diffusion, compute, mesh):
        self.config, self.source, self.model_config = config, source, model_config
        self.diffusion, self.compute, self.mesh = diffusion, compute, mesh
        self.protocols = evaluation_protocols(config)
        self._classifier = None
        self._reference_features = None
        self._samplers = {}

    def _prepare(self) -> None:
        from models.fashion_cnn import Recipe, trained_fashion_cnn

        e = self.config.eval
        n_train = int(e.classifier_examples) or len(self.source)
        recipe = Recipe(epochs=int(e.classifier_epochs), seed=int(self.config.train.seed))
        self._classifier = trained_fashion_cnn(self.source.images[:n_train], self.source.labels[:n_train],
                                               self.source.num_classes, recipe)
        self._reference_features, _ = classifier_outputs(self._classifier,
                                                         self.source.images[: int(e.num_reference)])

    def _sampler(self, protocol: Protocol):
        key = (protocol.sampler, protocol.sampling_steps, protocol.guidance_scale)
        if key not in self._samplers:
            self._samplers[key] = make_sampler(
                self.model_config, self.diffusion, sampling_steps=protocol.sampling_steps, sampler=protocol.sampler,
                guidance_scale=protocol.guidance_scale, guidance_channels=int(self.config.eval.guidance_channels),
                batch_size=int(self.config.eval.batch_size), mesh=self.mesh)
        return self._samplers[key]

    def run(self, step: int, params, protocols: list[Protocol]) -> list[EvaluationRecord]:
        if self._classifier is None:
            self._prepare()
        e = self.config.eval
        labels = np.arange(int(e.num_samples)) % self.source.num_classes  # class-balanced
        records = []
        for protocol in protocols:
            start = time.perf_counter()
            images = to_uint8(self._sampler(protocol)(params, labels, int(e.seed)), protocol.uint8_convention)
            result = small_data_metrics_of_features(self._reference_features,
                                                    *classifier_outputs(self._classifier, images), labels)
            details = {k: v for k, v in result.items() if k not in ("fd_fashioncnn", "feature_network")}
            records.append(EvaluationRecord.of(
                step=step, metric=schema.metric_name(SMALL_DATA_FAMILY, len(images)), value=result["fd_fashioncnn"],
                protocol=protocol, gflops_per_image=self.compute.gflops, global_batch=self.config.train.batch_size,
                details=details, seconds=time.perf_counter() - start, time=time.time()))
        return records


def build_evaluator(config, source, model_config, diffusion, compute, mesh) -> Evaluator:
    """The evaluator of a run's data source (config.validate has refused sources without one)."""
    if config.data.source != "fashion_mnist":
        raise ValueError(f"No evaluator during training for data.source={config.data.source!r}: write samples and "
                         "score them with `dit-scaling evaluate`.")
    return SmallDataEvaluator(config, source, model_config, diffusion, compute, mesh)
