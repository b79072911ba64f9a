"""What a grid will cost before it is launched: compute, memory per device, wall time and chip-hours.

`grid --dry-run` prints, for each run: the paper's Gflops, its training compute, the training state's memory per
device (parameters, EMA and Adam's two moments, plus the gradients) with parameters replicated and with them
sharded (fsdp), an activation-memory estimate at the per-device batch with and without remat, the cheapest
setting that fits the chip's HBM, and the wall time and chip-hours at a stated utilisation of the chip's
published peak.

State memory is exact (the bytes of the abstract training state, split as `train.param_sharding=fsdp` splits
it). Activations are an estimate of what a block keeps for the backward pass: 26 T D + 2 h T^2 values per example
(T tokens, D width, h heads; the 2 h T^2 are the attention logits and weights), the constants fitted to XLA's
compiled temporaries on the CPU in float32, which grow exactly in proportion to the batch (S/4, B/4 and S/2: 26.1
and 1.7; tests/test_cost.py checks a 3-block B/2, which the fit did not see). With remat a block keeps its input alone
(T D values) and recomputes the rest, one block at a time.

The training benchmark (`python -m scaling.benchmarks.train`) prints this prediction beside XLA's compiled size of
the same step; how far apart they were, and how far one stated utilisation is from the measured ones, is in
docs/benchmarks.md ("The dry run's estimates").
"""

from __future__ import annotations

import dataclasses
import math

import jax

from models.dit import DiTConfig
from scaling.grid import planned_model
from scaling.train_step import fsdp_axis, init_state, make_optimizer


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float  # dense bf16 FLOP/s, as published
    memory_bytes: float  # HBM per chip
    source: str


GIB, GB = 2**30, 1e9
CHIPS = {
    "v4": Chip(275e12, 32 * GIB, "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2"),
    "v5e": Chip(197e12, 16 * GIB, "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GiB HBM2"),
    "v5p": Chip(459e12, 95 * GIB, "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GiB HBM2e"),
    "v6e": Chip(918e12, 32 * GIB, "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GiB HBM"),
    "H100": Chip(989e12, 80 * GB, "nvidia.com H100 SXM datasheet: 1,979 TFLOPs bf16 with sparsity (989 dense), "
                                  "80 GB HBM3"),
    "H200": Chip(989e12, 141 * GB, "nvidia.com H200 SXM datasheet: 1,979 TFLOPs bf16 with sparsity (989 dense), "
                                   "141 GB HBM3e"),
    "A100": Chip(312e12, 80 * GB, "nvidia.com A100 SXM datasheet: 312 TFLOPs bf16 dense, 80 GB HBM2e"),
}


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


def run_cost(config, *, chip: str, chips: int, utilization: float, slices: int = 1) -> dict:
    """One row of the dry run for a run of `config` on `chips` chips of kind `chip`, in `slices` slices (fsdp
    splits the state within a slice: `train_step.make_mesh`)."""
    from models.flops import model_compute
    from scaling.grid import training_flops

    spec = CHIPS[chip]
    model = planned_model(config)
    compute_model = dataclasses.replace(model, dtype="bfloat16")  # what an accelerator's auto dtype picks
    abstract = jax.eval_shape(lambda: init_state(model, make_optimizer(config), 0))
    batch = config.train.batch_size
    local_batch = batch // chips if batch % chips == 0 else None
    row = {"gflops": model_compute(model).gflops, "training_flops": training_flops(config),
           "local_batch": local_batch}
    for mode in ("replicated", "fsdp"):
        row[f"state_{mode}"] = training_state_bytes(abstract, chips // slices, mode)
    if local_batch and not isinstance(model, DiTConfig):
        row["activations"] = row["activations_remat"] = None
        row["fits"] = "state only: no activation estimate for a plug-in"
    elif local_batch:
        row["activations"] = activation_bytes(compute_model, local_batch, remat=False)
        row["activations_remat"] = activation_bytes(compute_model, local_batch, remat=True)
        options = [("replicated", row["state_replicated"] + row["activations"]),
                   ("fsdp", row["state_fsdp"] + row["activations"]),
                   ("fsdp+remat", row["state_fsdp"] + row["activations_remat"])]
        row["fits"] = next((name for name, need in options if need <= spec.memory_bytes), "no")
    else:
        row["activations"] = row["activations_remat"] = None
        row["fits"] = f"batch {batch} does not split over {chips} chips"
    seconds = row["training_flops"] / (chips * spec.peak_flops * utilization)
    row["hours"] = seconds / 3600
    row["chip_hours"] = seconds / 3600 * chips
    return row
