"""The pieces of a training step, free of data and checkpoint dependencies (benchmarks import them too):
the device mesh and parameter sharding, the measured matmul peak, the train state, and the jitted step."""

from __future__ import annotations

import math
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.diffusion import GaussianDiffusion
from models.plugin import ModelConfig, abstract_model, build_model

# ----------------------------------------------------------------------------------------------------------------
# Devices, sharding, peak
# ----------------------------------------------------------------------------------------------------------------


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
    n = 2048 if jax.default_backend() == "cpu" else 8192
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


# ----------------------------------------------------------------------------------------------------------------
# Train state and step
# ----------------------------------------------------------------------------------------------------------------


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW from a study config's train section."""
    t = config.train
    return optax.adamw(t.learning_rate, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)


def init_state(model_config: ModelConfig, optimizer, seed: int) -> dict:
    """Parameters, optimizer state, EMA (a copy of the parameters), step and RNG, as a pytree of arrays."""
    model = build_model(model_config, nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema": jax.tree.map(jnp.copy, params),
        "opt_state": optimizer.init(params),
        "rng": jax.random.PRNGKey(seed),
    }


def state_bytes(state) -> int:
    """Bytes of a (possibly abstract) training state's arrays."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def make_train_step(model_config: ModelConfig, diffusion: GaussianDiffusion, optimizer, ema_decay: float):
    graphdef = nnx.graphdef(abstract_model(model_config))

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(state["rng"], state["step"])
        key_t, key_noise, key_drop = jax.random.split(key, 3)
        x_start, labels = batch["image"], batch["label"]
        t = jax.random.randint(key_t, (x_start.shape[0],), 0, diffusion.num_timesteps)
        noise = jax.random.normal(key_noise, x_start.shape, x_start.dtype)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            terms = diffusion.training_losses(lambda x, tt: model(x, tt, labels, dropout_key=key_drop),
                                              x_start, t, noise)
            terms = {name: value.mean() for name, value in terms.items()}
            return terms["loss"], terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        # Applied unconditionally: a guard on device (a cond over the state) costs a copy of the whole state
        # per step. The host stops on a non-finite step and rebuilds the last good state (scaling/train.py).
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
        new_state = {**state, "step": state["step"] + 1, "params": params, "ema": ema, "opt_state": opt_state}
        return new_state, {**terms, "grad_norm": grad_norm, "finite": finite}

    return train_step


def make_multi_step(train_step):
    """Several steps in one call: (state, batches with a leading axis of steps) -> (state, metrics per step)."""
    return lambda state, batches: jax.lax.scan(train_step, state, batches)


def _global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf. Behind an optimization barrier: XLA would otherwise share the
    squares with Adam's second moment and write the squares of all gradients to memory to read them back."""
    # One barrier per leaf: a barrier over all leaves would keep every gradient alive until the last is computed.
    return jnp.sqrt(sum(jnp.sum(jnp.square(jax.lax.optimization_barrier(x))) for x in jax.tree.leaves(tree)))


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of every element of x as uint32 (8-byte elements gain a trailing axis of two words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]).astype(jnp.uint32)


@jax.jit
def _checksum(leaves: list, salts: jax.Array) -> jax.Array:
    total = jnp.uint32(0)
    for index, leaf in enumerate(leaves):
        bits = _as_uint32(leaf)
        # Each element's bits times an odd weight from its position: odd numbers are invertible modulo 2^32, so
        # any change to one element changes the sum (several changes can cancel, with odds of about 2^-32).
        position = jnp.zeros(bits.shape, jnp.uint32)
        for axis, stride in enumerate(np.cumprod((1, *bits.shape[::-1]))[-2::-1]):
            position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
        total = total + jnp.sum(bits * (2 * position + 1), dtype=jnp.uint32) * salts[index]
    return total


def _path_salt(path) -> int:
    """An odd number from a leaf's path, the same whether a checkpoint restored its containers as dicts with
    string keys or as the tuples, named tuples and integer-keyed dicts of the live state."""
    name = "/".join(str(getattr(key, "name", getattr(key, "idx", getattr(key, "key", key)))) for key in path)
    return zlib.crc32(name.encode()) | 1


def state_checksum(state: dict) -> int:
    """An exact checksum of every array of the state (parameters, optimizer, EMA, step, RNG): a weighted sum of
    the bits modulo 2^32, stored with each checkpoint and checked on restore. Integer sums are exact in any
    order, so the value depends neither on how the state is sharded nor on the order of its leaves.

    One jitted program: per-array eager reductions of sharded arrays would put one collective program per
    array in flight at once, and XLA:CPU's simulated devices can deadlock on those (4 devices, 2 cores)."""
    paths_and_leaves = jax.tree_util.tree_leaves_with_path(state)
    salts = np.asarray([_path_salt(path) for path, _ in paths_and_leaves], np.uint32)
    return int(_checksum([leaf for _, leaf in paths_and_leaves], salts))
