"""The devices of a run: the ("slice", "data") mesh a batch splits over, how parameters are placed on it, and one
device's matmul peak, measured where the run is (the denominator of the step records' utilisation)."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("slice", "data")  # a batch splits over every device: over the slices, then within each


def make_mesh(slices: int = 0) -> jax.sharding.Mesh:
    """The devices as a ("slice", "data") mesh: "data" spans the devices of one slice (joined by the fast
    inter-chip interconnect), "slice" the slices (joined by the data-centre network). Batches split over both
    axes; fsdp splits parameters over "data" alone, so between slices only the gradients' all-reduce travels.
    `slices` 0 takes the slices the devices report (a TPU multislice's device.slice_index). Devices that report
    a single slice (GPUs, simulated CPU hosts) form slices by process: then `slices` must be the process count.
    """
    devices = jax.devices()
    reported = len({getattr(d, "slice_index", 0) for d in devices})
    slices = slices or reported
    if len(devices) % slices:
        raise ValueError(f"{len(devices)} devices do not split into {slices} slices of equal size.")
    # Auto axes: XLA propagates shardings through the model (explicit axes would demand annotations everywhere).
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    if slices == 1:
        return jax.make_mesh((1, len(devices)), BATCH_AXES, axis_types=axis_types)
    by_process = slices != reported
    if by_process and (reported > 1 or slices != jax.process_count()):
        raise ValueError(f"train.slices={slices}, but the devices are in {reported} slice(s) and "
                         f"{jax.process_count()} process(es): set train.slices to 0 (the devices' slices), or to the "
                         "process count where the devices report a single slice (each process is then one).")
    grid = mesh_utils.create_hybrid_device_mesh((1, len(devices) // slices), (slices, 1), devices,
                                                process_is_granule=by_process)
    return jax.sharding.Mesh(grid, BATCH_AXES, axis_types=axis_types)


def fsdp_axis(shape: tuple[int, ...], devices: int) -> int | None:
    """The axis fsdp splits an array of `shape` along: the largest that the device count divides (None: the
    array stays replicated)."""
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % devices == 0 and shape[axis] >= devices:
            return axis
    return None


def param_sharding(leaf, mesh: jax.sharding.Mesh, mode: str) -> NamedSharding:
    """Replicated, or (fsdp) split along `fsdp_axis`."""
    axis = fsdp_axis(leaf.shape, mesh.shape["data"]) if mode == "fsdp" else None
    if axis is None:
        return NamedSharding(mesh, P())
    spec = [None] * leaf.ndim
    spec[axis] = "data"
    return NamedSharding(mesh, P(*spec))


def measure_matmul_peak(dtype: str) -> float:
    """Best FLOP/s of one device on a square matmul in `dtype` (2 n^3 FLOPs), measured here and now."""
    n = 1024 if jax.default_backend() == "cpu" else 8192  # 96% of the 2048 peak on a CPU, in a sixth of the time
    a = jnp.ones((n, n), dtype)
    # float32 accumulation, as the model's matmuls use (bf16 x bf16 -> f32 is the fast path on CPUs with AMX).
    matmul = jax.jit(lambda x: jax.lax.dot(x, x, preferred_element_type=jnp.float32))
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
