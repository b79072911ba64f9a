"""Compute accounting in the paper's convention: "Gflops" = forward multiply-accumulates (MACs) per image.

One multiply-add counts as one flop; every matrix product counts (the two attention products included);
elementwise work (norms, activations, softmax, additions) is ignored; the autoencoder is excluded.
Training compute = 3 x Gflops x batch x steps; sampling compute = Gflops x steps (x2 with guidance).
To compare with 6ND-style FLOPs, multiply by 2 (analysis.schema converts: FLOPS_PER_MAC, training_flops).

Two independent counts must agree:
- `count_macs` walks the jaxpr of any JAX function (through jit, scan, remat, cond, custom_jvp/vjp);
- `dit_macs_by_term` is the closed form for a DiT config.
`xla_flops` reads XLA's own cost analysis, which counts a multiply and an add separately (so about 2x MACs)
plus elementwise work: a cross-check, not the source of truth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.dit import TIMESTEP_FREQUENCY_DIM, DiT, DiTConfig, abstract_dit, count_params

# Primitives whose work is a sum of products but which this counter cannot size: refuse rather than undercount.
_UNSIZED_PRODUCT_WORDS = {"dot", "conv", "convolution", "matmul", "attention", "einsum", "gemm"}


@dataclasses.dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one call, split by primitive."""

    total: int
    by_primitive: dict[str, int]

    @property
    def gmacs(self) -> float:
        return self.total / 1e9


def _dot_general_macs(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    contracted = math.prod(lhs_shape[d] for d in lhs_contract)
    return math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_macs(eqn) -> int:
    # Each output element sums kernel_spatial x in_features_per_group products; the kernel's input-feature dim
    # already holds in_features / feature_group_count.
    rhs_shape = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs_shape) // rhs_shape[out_feature_dim]
    return math.prod(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _sub_jaxprs(item)


def _count_jaxpr(jaxpr, counts: Counter, multiplier: int) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            counts[name] += multiplier * _dot_general_macs(eqn)
        elif name == "conv_general_dilated":
            counts[name] += multiplier * _conv_macs(eqn)
        elif name == "scan":
            _count_jaxpr(eqn.params["jaxpr"].jaxpr, counts, multiplier * eqn.params["length"])
        elif name == "cond":
            # Branches are alternatives: count the most expensive one.
            branch_counts = []
            for branch in eqn.params["branches"]:
                branch_counter = Counter()
                _count_jaxpr(branch.jaxpr, branch_counter, multiplier)
                branch_counts.append(branch_counter)
            counts.update(max(branch_counts, key=lambda c: sum(c.values())))
        elif name == "while":
            body = Counter()
            _count_jaxpr(eqn.params["body_jaxpr"].jaxpr, body, 1)
            if sum(body.values()):
                raise ValueError(
                    "count_macs met a while loop with matrix products and an unknown trip count. Use "
                    "jax.lax.scan, or jax.lax.fori_loop with Python-int bounds (which lowers to scan)."
                )
        else:
            subs = [sub for key, value in eqn.params.items()
                    if key not in ("jvp_jaxpr_fun", "fwd_jaxpr_thunk", "bwd") for sub in _sub_jaxprs(value)]
            if subs:
                for sub in subs:
                    _count_jaxpr(sub, counts, multiplier)
            elif _UNSIZED_PRODUCT_WORDS & set(name.split("_")):
                raise ValueError(f"count_macs cannot size the primitive {name!r}; express it with dot_general "
                                 "(jnp.einsum / jnp.matmul) or a convolution so its products are counted.")


def count_macs(fn: Callable, *args, **kwargs) -> MacCount:
    """Multiply-accumulates of fn(*args, **kwargs), from its jaxpr. Args may be jax.ShapeDtypeStruct."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    counts: Counter = Counter()
    _count_jaxpr(closed.jaxpr, counts, 1)
    return MacCount(total=int(sum(counts.values())), by_primitive=dict(counts))


def _example_inputs(config, batch: int):
    return (
        jax.ShapeDtypeStruct((batch, config.input_size, config.input_size, config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )


def forward_macs(model: nnx.Module, config) -> int:
    """Forward MACs per image of a model called as model(x, t, y) (concrete or abstract) on `config`'s input
    shape (a DiTConfig or a plugged-in FactoryConfig), counted from its jaxpr."""
    graphdef, state = nnx.split(model)

    def forward(state, x, t, y):
        return nnx.merge(graphdef, state)(x, t, y)

    return count_macs(forward, state, *_example_inputs(config, batch=1)).total


def dit_macs(model: DiT) -> int:
    """Forward MACs per image of a DiT (concrete or `abstract_dit`), counted from its jaxpr."""
    return forward_macs(model, model.config)


def dit_macs_by_term(config: DiTConfig) -> dict[str, int]:
    """Closed-form forward MACs per image of a DiT, by term (the paper's convention of the module docstring)."""
    d, m, depth = config.hidden_size, config.mlp_hidden_size, config.depth
    t = config.num_tokens
    p2 = config.patch_size**2
    block = config.block
    seq = t + 2 if block == "in-context" else t  # in-context carries the t and y tokens through every block
    terms = {
        "patch_embed": t * p2 * config.in_channels * d,
        "timestep_mlp": TIMESTEP_FREQUENCY_DIM * d + d * d,
        "attention_qkv": depth * 3 * seq * d * d,
        "attention_scores": depth * seq * seq * d,
        "attention_values": depth * seq * seq * d,
        "attention_proj": depth * seq * d * d,
        "mlp": depth * 2 * seq * d * m,
        "final_linear": t * d * p2 * config.out_channels,
    }
    if block in ("adaLN-Zero", "adaLN"):
        terms["modulation"] = depth * (6 if block == "adaLN-Zero" else 4) * d * d
        terms["final_modulation"] = 2 * d * d
    if block == "cross-attention":
        cond_tokens = 2
        terms["cross_attention_q"] = depth * t * d * d
        terms["cross_attention_kv"] = depth * 2 * cond_tokens * d * d
        terms["cross_attention_scores"] = depth * t * cond_tokens * d
        terms["cross_attention_values"] = depth * t * cond_tokens * d
        terms["cross_attention_proj"] = depth * t * d * d
    return terms


def dit_macs_analytic(config: DiTConfig) -> int:
    return sum(dit_macs_by_term(config).values())


def xla_flops(fn: Callable, *args) -> float:
    """XLA's cost-analysis FLOPs of jit(fn)(*args): multiply and add counted separately, elementwise included."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax returned one dict per device program
        analysis = analysis[0]
    return float(analysis["flops"])


@dataclasses.dataclass(frozen=True)
class ModelCompute:
    """What the paper reports for a model: forward Gflops (GMACs) per image, parameters and tokens."""

    model: str
    block: str
    input_size: int
    tokens: int | None  # None: a plugged-in model that states none
    params: int
    macs: int

    @property
    def gflops(self) -> float:
        return self.macs / 1e9


@functools.cache
def dit_compute(config: DiTConfig) -> ModelCompute:
    """Gflops (jaxpr count, checked against the closed form) and parameters of a DiT config. Kept per config for
    the process: tracing an XL model takes seconds."""
    model = abstract_dit(config)
    macs = dit_macs(model)
    analytic = dit_macs_analytic(config)
    if macs != analytic:
        raise AssertionError(f"{config.name} ({config.block}): jaxpr count {macs} != closed form {analytic}; "
                             "the model and its compute formula have drifted apart.")
    return ModelCompute(model=config.name, block=config.block, input_size=config.input_size,
                        tokens=config.num_tokens, params=count_params(model), macs=macs)


@functools.cache
def model_compute(config) -> ModelCompute:
    """`dit_compute` for a DiTConfig; for a plugged-in model (models.plugin.FactoryConfig) its jaxpr count under
    the same convention, with the tokens its module states as `num_tokens` (None when it states none)."""
    if isinstance(config, DiTConfig):
        return dit_compute(config)
    from models.plugin import abstract_model

    model = abstract_model(config)
    tokens = getattr(model, "num_tokens", None)
    return ModelCompute(model=config.name, block=config.block, input_size=config.input_size,
                        tokens=int(tokens) if tokens is not None else None, params=count_params(model),
                        macs=forward_macs(model, config))


# ----------------------------------------------------------------------------------------------------------------
# What an evaluation runs besides the diffusion model: decoding latents and the feature network
# ----------------------------------------------------------------------------------------------------------------


def _module_macs(build: Callable[[], nnx.Module], call: Callable, *inputs) -> int:
    """MACs of call(module, *inputs) for an abstract module (no weights allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    return count_macs(lambda state, *x: call(nnx.merge(graphdef, state), *x), state, *inputs).total


@functools.cache
def decoder_macs(latent_size: int) -> int:
    """MACs of decoding one latent of `latent_size` x `latent_size` into an image with the published KL-f8
    autoencoder (the post-quantisation convolution and the decoder)."""
    from models.autoencoder import AutoencoderConfig, AutoencoderKL

    config = AutoencoderConfig()

    def decode(model, z):
        return model.decoder(model.post_quant_conv(z) if model.post_quant_conv is not None else z)

    latent = jax.ShapeDtypeStruct((1, latent_size, latent_size, config.latent_channels), jnp.float32)
    return _module_macs(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)), decode, latent)


@functools.cache
def inception_macs() -> int:
    """MACs of FID's Inception on one image (pool features and the spatial ones, at its 299 x 299 input)."""
    from models.inception import INPUT_SIZE, FIDInception

    image = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return _module_macs(lambda: FIDInception(rngs=nnx.Rngs(0)), lambda m, x: m.features_of_normalized(x), image)
