"""What runs will cost before they are launched: compute, memory per device and time. Every estimate starts from a
run's training compute (`run_training_flops`: analysis.schema's formula for the model the config trains) and
answers one question:

- `run_cost`, on accelerators (`grid --dry-run`): per run, the paper's Gflops, its training FLOPs, the training
  state's memory per device, an activation estimate, the cheapest setting that fits the chip's HBM, and the wall
  time and chip-hours at a stated utilisation of the chip's published peak.
- `predicted_seconds`, on one core of a CPU: the order in which the grid's workers take the runs (costliest
  first) and the study's ETA, from a cost model of steps and evaluations fitted on a reference CPU.
- `remaining_costs`, what each run of a grid has still to pay, for the split of `grid --shard`: measured step
  times where runs have records, else training FLOPs.

The dry run's memory: the training state (parameters, EMA and Adam's two moments, plus the gradients) per device,
with parameters replicated and with them sharded (fsdp), is exact (the bytes of the abstract training state, split
as `train.param_sharding=fsdp` splits it). Activations are an estimate of what a block keeps for the backward
pass: 26 T D + 2 h T^2 values per example (T tokens, D width, h heads; the 2 h T^2 are the attention logits and
weights), the constants fitted to XLA's compiled temporaries on the CPU in float32, which grow exactly in
proportion to the batch (S/4, B/4 and S/2: 26.1 and 1.7; tests/test_cost.py checks a 3-block B/2, which the fit
did not see). With remat a block keeps its input alone (T D values) and recomputes the rest, one block at a time.

The training benchmark (`python -m scaling.benchmarks.train`) prints this prediction beside XLA's compiled size of
the same step; how far apart they were, and how far one stated utilisation is from the measured ones, is in
docs/benchmarks.md ("The dry run's estimates").
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from etils import epath

from analysis import schema
from analysis.chips import CHIPS
from models.dit import DiTConfig
from models.flops import decoder_macs, inception_macs, model_compute
from scaling import config as config_lib
from scaling import data as data_lib
from scaling.devices import fsdp_axis
from scaling.train_step import init_state, make_optimizer

# ----------------------------------------------------------------------------------------------------------------
# A run's training compute
# ----------------------------------------------------------------------------------------------------------------


def planned_model(config):
    """The model config (DiTConfig, or a plug-in's FactoryConfig) a run of `config` trains, known before its data
    is at hand: Fashion-MNIST's shape, or the latents' manifest where they exist, else latents of the published SD
    autoencoder (KL-f8, 4 channels) with ImageNet's 1000 classes."""
    if config.data.source == "fashion_mnist":
        side = config.data.resolution or 32
        shape, classes = (side, side, 1), data_lib.FashionMNIST.num_classes
    elif (epath.Path(config.data.path) / "manifest.json").is_file():
        source = data_lib.open_source(config)
        shape, classes = source.image_shape, source.num_classes
    else:
        from models.autoencoder import AutoencoderConfig

        autoencoder = AutoencoderConfig()
        side = config.data.resolution // 2 ** (len(autoencoder.block_out_channels) - 1)
        shape, classes = (side, side, autoencoder.latent_channels), 1000
    return config_lib.model_config(config, input_size=shape[0], in_channels=shape[2], num_classes=classes,
                                   dtype="float32")


def run_training_flops(config) -> float:
    """The training FLOPs of a whole run of `config` (analysis.schema.training_flops of its model)."""
    return schema.training_flops(model_compute(planned_model(config)).macs, config.train.batch_size,
                                 config.train.steps)


# ----------------------------------------------------------------------------------------------------------------
# On accelerators: the dry run
# ----------------------------------------------------------------------------------------------------------------


def state_bytes_per_device(abstract_state, chips: int, mode: str) -> int:
    """Bytes of the training state on one device, parameters replicated or split as fsdp splits them."""
    total = 0
    for leaf in jax.tree.leaves(abstract_state):
        size = math.prod(leaf.shape) * leaf.dtype.itemsize
        total += size // chips if mode == "fsdp" and fsdp_axis(leaf.shape, chips) is not None else size
    return total


def training_state_bytes(abstract_state, chips: int, mode: str) -> int:
    """Bytes on one device of the training state and the gradients (one more copy of the parameters)."""
    return state_bytes_per_device(abstract_state, chips, mode) + state_bytes_per_device(
        abstract_state["params"], chips, mode)


def activation_bytes(model, batch: int, *, remat: bool) -> int:
    """The estimate of the module docstring for `batch` examples on one device (of a DiT: a plugged-in model's
    activations are its own)."""
    tokens, width, heads = (model.input_size // model.patch_size) ** 2, model.hidden_size, model.num_heads
    value_bytes = 2 if model.dtype == "bfloat16" else 4
    block = batch * (26 * tokens * width + 2 * heads * tokens**2) * value_bytes
    if remat:
        return model.depth * batch * tokens * width * value_bytes + block
    return model.depth * block


def abstract_state(model, config):
    """The training state's shapes and dtypes (no memory allocated)."""
    return jax.eval_shape(lambda: init_state(model, make_optimizer(config), 0))


def training_memory(model, config, batch: int, *, chip: str, chips: int, slices: int = 1,
                    abstract=None) -> dict:
    """What a training step of `model` (with the optimizer of `config`) at global `batch` needs on each of `chips`
    chips of kind `chip` in `slices` slices (fsdp splits the state within a slice: `devices.make_mesh`): the state
    replicated and split, the activations with and without remat (bytes; None where unknown), and `fits`, the first
    setting that fits the chip's memory ("replicated", "fsdp", "fsdp+remat"), "no", or why it cannot be said.
    `abstract`: the state's `abstract_state`, where the caller has it."""
    compute_model = dataclasses.replace(model, dtype="bfloat16")  # what an accelerator's auto dtype picks
    abstract = abstract_state(model, config) if abstract is None else abstract
    local_batch = batch // chips if batch % chips == 0 else None
    row = {"local_batch": local_batch, "activations": None, "activations_remat": None,
           "params": sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract["params"]))}
    for mode in ("replicated", "fsdp"):
        row[f"state_{mode}"] = training_state_bytes(abstract, chips // slices, mode)
    if not local_batch:
        row["fits"] = f"batch {batch} does not split over {chips} chips"
    elif not isinstance(model, DiTConfig):
        row["fits"] = "state only: no activation estimate for a plug-in"
    else:
        row["activations"] = activation_bytes(compute_model, local_batch, remat=False)
        row["activations_remat"] = activation_bytes(compute_model, local_batch, remat=True)
        options = [("replicated", row["state_replicated"] + row["activations"]),
                   ("fsdp", row["state_fsdp"] + row["activations"]),
                   ("fsdp+remat", row["state_fsdp"] + row["activations_remat"])]
        row["fits"] = next((name for name, need in options if need <= CHIPS[chip].memory_bytes), "no")
    return row


def run_cost(config, *, chip: str, chips: int, utilization: float, slices: int = 1) -> dict:
    """One row of the dry run for a run of `config` on `chips` chips of kind `chip`, in `slices` slices."""
    model = planned_model(config)
    row = {"gflops": model_compute(model).gflops, "training_flops": run_training_flops(config),
           **training_memory(model, config, config.train.batch_size, chip=chip, chips=chips, slices=slices)}
    seconds = row["training_flops"] / (chips * CHIPS[chip].peak_flops * utilization)
    row["hours"] = seconds / 3600
    row["chip_hours"] = seconds / 3600 * chips
    # A kill (no SIGTERM to checkpoint on) at a uniformly random moment loses half a checkpoint interval on average.
    interval = config.train.checkpoint_every * seconds / config.train.steps
    if config.train.checkpoint_minutes:
        interval = min(interval, 60 * config.train.checkpoint_minutes)
    row["kill_loss_hours"] = interval / 2 / 3600
    row["evaluation_flops"] = run_evaluation_flops(config)
    row["evaluation_chip_hours"] = row["evaluation_flops"] / (CHIPS[chip].peak_flops * utilization) / 3600
    return row


# ----------------------------------------------------------------------------------------------------------------
# On one core of a CPU: the grid's order and the study's ETA
# ----------------------------------------------------------------------------------------------------------------

# Seconds per step = STEP_OVERHEAD_S + training FLOPs / TRAIN_FLOP_RATE; per evaluation, EVAL_OVERHEAD_S + forward
# FLOPs of sampling and the held-out loss / EVAL_FLOP_RATE. Fitted by least squares to the step times and evaluation
# seconds of a default study, one run per core of a 2-core AMD EPYC (docs/benchmarks.md, "The miniature study");
# the study rescales it by the runs that finish.
STEP_OVERHEAD_S = 0.005
TRAIN_FLOP_RATE = 51e9
EVAL_FLOP_RATE = 53e9
EVAL_OVERHEAD_S = 0.3
RUN_OVERHEAD_S = 8.0  # start, compilation, checkpoints


def evaluation_work(config) -> dict[str, int]:
    """What a run of `config` evaluates over its training: `evaluations`, the steps at which it samples or computes
    the held-out loss; `samples`, the images it samples (each decoded and run through the feature network);
    `sampling_forwards`, the diffusion model's forward passes sampling them (x2 with guidance); and
    `validation_forwards`, those of the held-out loss."""
    e, steps = config.eval, config.train.steps
    every = e.validation_every or e.every
    validations = steps // every + (steps % every != 0) if every and e.validation_examples else 0
    if not e.every:  # the held-out loss alone, or nothing
        return {"evaluations": validations, "samples": 0, "sampling_forwards": 0,
                "validation_forwards": validations * e.validation_examples * e.validation_timesteps}
    sample_steps = steps // e.every + (steps % e.every != 0)
    guided = lambda scale: schema.GUIDANCE_MULTIPLIER if schema.is_guided(scale) else 1  # noqa: E731
    final_steps = [s for s in e.final_sampling_steps if s not in e.sampling_steps]
    samples = e.num_samples * (sample_steps * len(e.sampling_steps) + len(final_steps) + len(e.final_seeds)
                               + len(e.final_guidance_scales))
    sampling = e.num_samples * guided(e.guidance_scale) * (
        sample_steps * sum(e.sampling_steps) + sum(final_steps) + e.sampling_steps[0] * len(e.final_seeds))
    sampling += e.num_samples * e.sampling_steps[0] * sum(guided(scale) for scale in e.final_guidance_scales)
    # validation_every divides eval.every, so the held-out loss's steps include the samples'.
    return {"evaluations": max(sample_steps, validations),
            "samples": samples, "sampling_forwards": sampling,
            "validation_forwards": validations * e.validation_examples * e.validation_timesteps}


def run_evaluation_flops(config) -> float:
    """True FLOPs of a run's evaluations on an accelerator: the model's forward passes (sampling and the held-out
    loss) and, for latent runs, decoding every sample and FID's Inception on it."""
    work, model = evaluation_work(config), planned_model(config)
    macs = model_compute(model).macs * (work["sampling_forwards"] + work["validation_forwards"])
    if config.data.source != "fashion_mnist" and work["samples"]:
        macs += work["samples"] * (decoder_macs(model.input_size) + inception_macs())
    return schema.FLOPS_PER_MAC * macs


def predicted_seconds(config) -> float:
    """The cost model's seconds for one run of `config` on one core of the reference CPU."""
    macs = model_compute(planned_model(config)).macs
    steps = config.train.steps
    seconds = RUN_OVERHEAD_S + steps * STEP_OVERHEAD_S + schema.training_flops(
        macs, config.train.batch_size, steps) / TRAIN_FLOP_RATE
    work = evaluation_work(config)
    forward_passes = work["sampling_forwards"] + work["validation_forwards"]
    evaluation = work["evaluations"] * EVAL_OVERHEAD_S + schema.FLOPS_PER_MAC * macs * forward_passes / EVAL_FLOP_RATE
    return seconds + evaluation


# ----------------------------------------------------------------------------------------------------------------
# What a grid has left: the split into shards
# ----------------------------------------------------------------------------------------------------------------


def remaining_costs(configs: dict, workdirs: dict | None = None) -> dict[str, float]:
    """Each run's cost still to pay, in seconds where any run has measured step times, else in training FLOPs: a
    run with step records costs its mean measured step time x the steps it has left; one without, its training
    FLOPs left x the median seconds per FLOP of the measured runs."""
    total_flops = {model: run_training_flops(config) for model, config in configs.items()}
    flops_left, step_time, steps_left = {}, {}, {}
    for model, config in configs.items():
        steps = schema.read_steps(workdirs[model]) if workdirs and (workdirs[model] / schema.STEPS_FILE).is_file() \
            else []
        steps_left[model] = max(0, config.train.steps - (steps[-1].step if steps else 0))
        flops_left[model] = total_flops[model] * steps_left[model] / config.train.steps
        times = [r.step_time for r in steps if r.step_time]
        if times:
            step_time[model] = float(np.mean(times))
    if not step_time:
        return flops_left
    rate = float(np.median([step_time[m] / (total_flops[m] / configs[m].train.steps) for m in step_time]))
    return {m: step_time[m] * steps_left[m] if m in step_time else flops_left[m] * rate for m in configs}
