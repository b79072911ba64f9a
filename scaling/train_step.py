"""The training state and the jitted step, free of data and checkpoint dependencies (benchmarks import them too):
AdamW from a config, the state's arrays (parameters, optimizer, EMA, step, RNG) and one step of diffusion training."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.diffusion import GaussianDiffusion
from models.plugin import ModelConfig, abstract_model, build_model


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
