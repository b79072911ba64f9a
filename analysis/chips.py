"""Accelerators as their makers publish them: the peak that turns a budget in chip-hours into compute, and the
memory a training step must fit in. Used by `plan` and the grid's dry run."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_UTILIZATION = 0.4  # of a chip's peak, where none is stated: what well-tuned large training runs reach


@dataclass(frozen=True)
class Chip:
    """An accelerator as its maker publishes it: what a budget in chip-hours buys, and what fits on one."""

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
