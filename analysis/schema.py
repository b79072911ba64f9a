"""The run directory: the one contract between the writers (scaling/) and the readers (analysis/).

A run directory holds

    manifest.json       a `Manifest`: what ran (config, model, compute per image, data, every start, status)
    records.jsonl       one `StepRecord` per logged training step, appended as training goes
    evaluations.jsonl   one `EvaluationRecord` per (training step, protocol), appended after each evaluation
    checkpoints/        orbax checkpoints (never committed; not records)

Every writer builds its records with these classes and writes them with `append_jsonl` / `write_json_atomic`;
`analysis.records.load` reads them back through `Manifest.from_json`, `StepRecord.from_json` and
`EvaluationRecord.from_json`, so a field is defined (name, type, meaning) exactly once, here. Derived fields
(images seen, training and sampling compute, the image resolution of a latent run) are computed by the writer
with the formulas below and stored; readers never guess them.

Compute is counted as the paper counts it: "Gflops" are forward multiply-accumulates per image (autoencoder
excluded); training compute = 3 x Gflops x batch x steps; sampling compute = Gflops x sampling steps (x2 with
classifier-free guidance). A multiply-accumulate is two floating-point operations (FLOPS_PER_MAC): compute set
against a chip's FLOP/s or a 6ND-style count is converted with it, training compute by `training_flops`.

This module imports no JAX (analysis/ never does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing

from etils import epath

from analysis import storage

SCHEMA_VERSION = 1

MANIFEST_FILE = "manifest.json"
STEPS_FILE = "records.jsonl"
EVALUATIONS_FILE = "evaluations.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CORRUPT_CHECKPOINTS_DIR = "corrupt_checkpoints"
TENSORBOARD_DIR = "tensorboard"
LOG_FILE = "train.log"  # the run's printed output, where a grid ran it in a worker process

RUN_STATUSES = ("running", "finished", "failed", "diverged", "preempted", "interrupted")
TRAINING_MULTIPLIER = 3  # training compute per image = 3 x forward (the backward pass costs ~2 forwards)
FLOPS_PER_MAC = 2  # a multiply-accumulate is a multiply and an add
GUIDANCE_MULTIPLIER = 2  # classifier-free guidance runs the model on the conditional and the null label
# The feature network of FID as ADM's evaluator (and so the paper) computes it; protocols name it.
VALIDATION_FAMILY = "val-loss"  # the held-out diffusion loss at fixed timesteps, recorded beside sample metrics
FID_FEATURE_NETWORK = "Inception-v3 2015-12-05 pool_3"

log = logging.getLogger(__name__)


class RecordsError(ValueError):
    """Records that do not follow the schema; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# Compute and names
# ----------------------------------------------------------------------------------------------------------------


def training_compute(gflops, batch_size, steps):
    """Training compute in paper units: 3 x forward GMACs per image x batch x steps (numbers or arrays)."""
    return TRAINING_MULTIPLIER * gflops * batch_size * steps


def training_flops(macs, batch_size, steps=1):
    """Training compute in floating-point operations (what a chip's FLOP/s and 6ND formulas count): FLOPS_PER_MAC x
    training_compute of the forward MACs per image; steps=1 gives the FLOPs of one step."""
    return FLOPS_PER_MAC * training_compute(macs, batch_size, steps)


def is_guided(guidance_scale) -> bool:
    """A guidance scale of 1 (or none) samples without classifier-free guidance."""
    return guidance_scale is not None and not (isinstance(guidance_scale, float) and math.isnan(guidance_scale)) \
        and float(guidance_scale) != 1.0


def sampling_compute(gflops, sampling_steps, guidance_scale=None):
    """Sampling compute per image in paper units: forward GMACs x sampling steps, x2 with guidance."""
    return gflops * sampling_steps * (GUIDANCE_MULTIPLIER if is_guided(guidance_scale) else 1)


def metric_name(family: str, n: int) -> str:
    """A metric named for its feature network and sample count: ("FID", 50000) -> "FID-50K"."""
    return f"{family}-{n // 1000}K" if n % 1000 == 0 else f"{family}-{n}"


def metric_family(metric: str) -> str:
    """"FID-50K" -> "FID", "FD-FashionCNN-400" -> "FD-FashionCNN": the name without its sample count."""
    head, _, tail = metric.rpartition("-")
    return head if head and (tail[:-1].isdigit() and tail[-1] in "KM" or tail.isdigit()) else metric


def metric_column(metric: str) -> str:
    """The column a metric's values are also stored under: "FID-50K" -> "fid"."""
    return metric_family(metric).lower().replace("-", "_")


def run_dir_name(model_name: str, block: str = "adaLN-Zero") -> str:
    """The directory of a model's run in a grid: "DiT-S/8" -> "DiT-S-8"; a conditioning block other than the
    paper's adaLN-Zero is appended ("DiT-XL-2-in-context"), so the block ablation shares one grid directory."""
    return model_name.replace("/", "-") + ("" if block == "adaLN-Zero" else f"-{block}")


# ----------------------------------------------------------------------------------------------------------------
# Typed records
# ----------------------------------------------------------------------------------------------------------------


def _field(doc: str, default=dataclasses.MISSING, default_factory=dataclasses.MISSING):
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"doc": doc})


class _Record:
    """JSON conversion shared by the record classes: a record is written as a flat JSON object of its fields."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, origin: str = "a record"):
        """The record from a parsed JSON object; a missing required field or a wrong type is a RecordsError.
        Unknown fields are ignored (records written by newer code stay readable)."""
        if not isinstance(data, dict):
            raise RecordsError(f"{origin}: expected a JSON object, got {type(data).__name__}.")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = _checked(data[f.name], hints[f.name], f"{origin}: field {f.name!r}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordsError(f"{origin} lacks the field {f.name!r} ({f.metadata['doc']}); it was not written "
                                   "by `dit-scaling train`: load such data as a CSV in the evaluation schema.")
        return cls(**values)

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls)}


def _checked(value, hint, what: str):
    """value, if it fits the annotation (int, float, str, bool, dict, list, their | None unions)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return value
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, dict, list) and isinstance(value, base):
            return value
        if dataclasses.is_dataclass(base) and isinstance(value, dict):
            return base.from_json(value, what)
    raise RecordsError(f"{what} is {value!r}, which is not {_type_name(hint)}.")


def _type_name(hint) -> str:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return " | ".join("None" if option is type(None) else getattr(option, "__name__", str(option))
                      for option in options)


@dataclasses.dataclass(frozen=True)
class StepRecord(_Record):
    """One logged training step (a line of records.jsonl)."""

    step: int = _field("optimizer steps completed")
    images_seen: int = _field("step x global batch")
    loss: float = _field("training loss of this step (mse + vb with learned sigma)")
    mse: float = _field("epsilon mean-squared error of this step")
    vb: float | None = _field("variational-bound term of this step, bits per dimension (null without learned "
                              "sigma)")
    grad_norm: float = _field("global L2 norm of the gradient of this step")
    gflops_per_image: float = _field("forward GMACs per image (the paper's 'Gflops')")
    train_gflops_cumulative: float = _field("3 x gflops_per_image x global batch x step (paper units)")
    wall_time: float = _field("training seconds so far, summed over restarts: compilation, evaluation and "
                              "checkpoint writes included; start-up (restore, peak measurement) and steps lost to a "
                              "kill not")
    time: float = _field("Unix time of this record")
    step_time: float | None = _field("mean seconds per step since the previous record, evaluation excluded; the "
                                     "first step after a start (compilation) is left out, and a record of that step "
                                     "alone has null here")
    images_per_s: float | None = _field("global batch / step_time")
    utilization: float | None = _field("achieved FLOP/s (2 x 3 x MACs x images/s) over the matmul peak measured on "
                                       "one device times the device count (simulated CPU devices share the cores, "
                                       "so it reads low there)")

    @classmethod
    def of(cls, *, step: int, global_batch: int, gflops_per_image: float, loss: float, mse: float,
           vb: float | None, grad_norm: float, wall_time: float, time: float, step_time: float | None,
           flops_per_step: float, peak_flops: float) -> StepRecord:
        """The record of a step, with its derived fields computed here."""
        return cls(step=step, images_seen=step * global_batch, loss=loss, mse=mse, vb=vb, grad_norm=grad_norm,
                   gflops_per_image=gflops_per_image,
                   train_gflops_cumulative=training_compute(gflops_per_image, global_batch, step),
                   wall_time=wall_time, time=time, step_time=step_time,
                   images_per_s=global_batch / step_time if step_time else None,
                   utilization=flops_per_step / step_time / peak_flops if step_time else None)


@dataclasses.dataclass(frozen=True)
class EvaluationProtocol(_Record):
    """Everything that makes two evaluation points comparable; fits combine points of one protocol only."""

    sampler: str | None = _field("ddpm (ancestral), ddim (eta 0) or dpm-solver++ (2M); null when unknown (samples "
                                 "scored as given)")
    sampling_steps: int | None = _field("respaced sampling steps")
    guidance_scale: float | None = _field("classifier-free guidance scale (1: none)")
    guidance_channels: int | None = _field("guided channels (the paper's 3 of 4 latent channels; null: all, or "
                                           "no guidance)")
    num_samples: int = _field("generated samples scored")
    seed: int | None = _field("seed of the noise and labels (the same at every step)")
    uint8_convention: str | None = _field("how outputs in [-1, 1] became bytes: dit (127.5 x + 128) or adm "
                                          "(127.5 (x + 1))")
    reference: str = _field("the real images or statistics the samples are compared with")
    feature_network: str = _field("the network whose features the metric compares")
    decoder: str | None = _field("the autoencoder's decoder, for latent models", default=None)


@dataclasses.dataclass(frozen=True)
class EvaluationRecord(_Record):
    """One sample-quality measurement of a run at a training step (a line of evaluations.jsonl)."""

    step: int = _field("training step of the evaluated (EMA) parameters")
    metric: str = _field("metric name with its sample count, e.g. FID-50K or FD-FashionCNN-1000")
    value: float = _field("the metric's value (lower is better for distances)")
    protocol: EvaluationProtocol = _field("how the samples were drawn and scored")
    train_gflops_cumulative: float = _field("training compute up to step (paper units)")
    sampling_gflops_per_image: float | None = _field("gflops x sampling steps, x2 with guidance (paper units); "
                                                     "null when the sampling steps are unknown")
    details: dict = _field("the metric family's other numbers (FD-FashionCNN: precision, recall, classifier_score, "
                           "class_accuracy, and floor and floor_class_accuracy: what as many real held-out test "
                           "images score against the same reference; FID: sfid, inception_score, precision, "
                           "recall), written as top-level fields", default_factory=dict)
    seconds: float | None = _field("seconds the evaluation took (sampling and scoring)", default=None)
    time: float | None = _field("Unix time of the record", default=None)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        details = data.pop("details")
        clash = set(details) & set(data)
        if clash:
            raise ValueError(f"evaluation details {sorted(clash)} clash with record fields.")
        return {**data, **details}

    @classmethod
    def from_json(cls, data: dict, origin: str = "an evaluation record") -> EvaluationRecord:
        if not isinstance(data, dict):
            raise RecordsError(f"{origin}: expected a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        record = super().from_json({k: v for k, v in data.items() if k in known and k != "details"}, origin)
        return dataclasses.replace(record, details={k: v for k, v in data.items() if k not in known})

    @classmethod
    def of(cls, *, step: int, metric: str, value: float, protocol: EvaluationProtocol, gflops_per_image: float,
           global_batch: int, details: dict | None = None, seconds: float | None = None,
           time: float | None = None) -> EvaluationRecord:
        """The record of an evaluation, with its compute fields computed here."""
        sampling = None if protocol.sampling_steps is None else sampling_compute(
            gflops_per_image, protocol.sampling_steps, protocol.guidance_scale)
        return cls(step=step, metric=metric, value=value, protocol=protocol,
                   train_gflops_cumulative=training_compute(gflops_per_image, global_batch, step),
                   sampling_gflops_per_image=sampling, details=dict(details or {}), seconds=seconds, time=time)


@dataclasses.dataclass(frozen=True)
class Manifest(_Record):
    """What a run is and how far it got (manifest.json, rewritten atomically at every change)."""

    model_name: str = _field("the model's name, e.g. DiT-XL/2")
    size: str | None = _field("DiT size (S, B, L, XL); null for other architectures")
    patch: int | None = _field("patch size; null for other architectures")
    block: str = _field("conditioning block (adaLN-Zero, adaLN, cross-attention, in-context); a plugged-in "
                        "model's family name")
    resolution: int = _field("image resolution in pixels (a latent run's input times the autoencoder's 8)")
    gflops_per_image: float = _field("forward GMACs per image (the paper's 'Gflops'), autoencoder excluded")
    macs_per_image: int = _field("forward multiply-accumulates per image")
    params: int = _field("trainable parameters")
    tokens: int | None = _field("tokens per image (null: a plugged-in model that states none)")
    global_batch: int = _field("images per optimizer step, over all devices")
    seed: int = _field("training seed")
    total_steps: int = _field("steps the run trains for")
    config: dict = _field("the study config (ml_collections, as a dict)")
    model: dict = _field("the architecture's config (a plugged-in model's: its factory, family, arguments and "
                         "source_sha256, the SHA-256 of the factory's source file)")
    data: dict = _field("the data source and its size")
    status: str = _field(f"one of {', '.join(RUN_STATUSES)}")
    starts: list = _field("every (re)start: time, step, versions, devices, matmul peak", default_factory=list)
    code_revision: str | None = _field("git revision of the code that started the run (+dirty with local changes)",
                                       default=None)
    final_step: int | None = _field("the last step, once finished", default=None)
    error: str | None = _field("why the run stopped, when an error stopped it (failed, diverged): the error's type "
                               "and first line", default=None)
    stopped_step: int | None = _field("the last step the run completed before it stopped unfinished (failed, "
                                      "diverged, preempted, interrupted); null while running and once finished",
                                      default=None)
    records_gap: str | None = _field("logged steps missing from records.jsonl up to the checkpoint the run last "
                                     "resumed from (lost after that checkpoint was written, e.g. in a host crash); "
                                     "null when none are", default=None)
    schema_version: int = _field("version of this schema", default=SCHEMA_VERSION)

    @classmethod
    def from_json(cls, data: dict, origin: str = "a manifest") -> Manifest:
        manifest = super().from_json(data, origin)
        if manifest.schema_version > SCHEMA_VERSION:
            raise RecordsError(f"{origin} has schema version {manifest.schema_version}, newer than this code's "
                               f"{SCHEMA_VERSION}; update dit-scaling to read it.")
        if manifest.status not in RUN_STATUSES:
            raise RecordsError(f"{origin}: status {manifest.status!r} is not one of {RUN_STATUSES}.")
        return manifest

    def with_changes(self, **changes) -> Manifest:
        return dataclasses.replace(self, **changes)


def markdown_fields(record_class) -> str:
    """The fields of a record class as a Markdown table (the tables of docs/records.md are these)."""
    lines = ["| field | meaning |", "|---|---|"]
    lines += [f"| {name} | {doc} |" for name, doc in record_class.field_docs().items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSONL file ([] when it does not exist). A torn last line (a writer killed mid-line: no
    final newline) is skipped with a warning; any other line that is not JSON is a RecordsError naming it."""
    path = epath.Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # after the last newline: empty unless the last write was cut short
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RecordsError(f"{path}:{number} is not valid JSON ({e.msg}); fix or delete that line.") from e
    if torn.strip():
        try:
            rows.append(json.loads(torn))  # a complete object written without its newline
        except json.JSONDecodeError:
            log.warning("%s: its last line is cut short (a writer was killed); it is skipped.", path)
    return rows


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line, whole or not at all (`storage.append_text`: a write that fails, for lack of space
    too, leaves the file as it was). A torn last line (left by a crash mid-write) is cut off first, so it never
    joins the new line into one that no reader can parse; a complete last object that only lacks its newline is
    kept and gets it in the same write. On an object store, where a write is whole or absent, nothing is torn."""
    path = epath.Path(path)
    line = json.dumps(record) + "\n"
    if not storage.is_url(path) and path.is_file() and os.path.getsize(path):
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                tail_start = data.rfind(b"\n") + 1
                try:
                    json.loads(data[tail_start:])
                    line = "\n" + line
                except json.JSONDecodeError:
                    f.truncate(tail_start)
                    log.warning("%s: cut off a torn last line before appending.", path)
    storage.append_text(path, line)


def sync_records(workdir: str | os.PathLike) -> None:
    """Make a run's step and evaluation records durable (`storage.sync`). Called before each checkpoint commits,
    so that no checkpoint outlives the records of the steps before it."""
    for name in (STEPS_FILE, EVALUATIONS_FILE):
        storage.sync(epath.Path(workdir) / name)


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace a JSONL file atomically (a reader sees the old file or the new one, never half of one)."""
    storage.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    storage.write_atomic(path, json.dumps(obj, indent=2, default=str))


def read_manifest(workdir: str | os.PathLike) -> Manifest | None:
    """The run's manifest, or None when the directory holds no run."""
    path = epath.Path(workdir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordsError(f"{path} is not valid JSON ({e.msg}).") from e
    return Manifest.from_json(data, str(path))


def write_manifest(workdir: str | os.PathLike, manifest: Manifest) -> None:
    write_json_atomic(epath.Path(workdir) / MANIFEST_FILE, manifest.to_json())


def read_steps(workdir: str | os.PathLike) -> list[StepRecord]:
    path = epath.Path(workdir) / STEPS_FILE
    return [StepRecord.from_json(row, f"{path}:{i + 1}") for i, row in enumerate(read_jsonl(path))]


def read_evaluations(workdir: str | os.PathLike) -> list[EvaluationRecord]:
    path = epath.Path(workdir) / EVALUATIONS_FILE
    return [EvaluationRecord.from_json(row, f"{path}:{i + 1}") for i, row in enumerate(read_jsonl(path))]
