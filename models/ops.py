"""How the models compute: the kernels and hardware workarounds that every architecture in models/ builds from.

The architectures (models/dit.py, models/modern_dit.py, plug-ins) say what is computed; this module says how, so
that architectures compared with each other run on the same kernels:

- `Linear`: nnx.Linear as one 2-D `mixed_precision_matmul`, whose operands are in the compute dtype, whose
  accumulation and output are float32, and whose own gradient keeps all three products of a training step in the
  compute dtype;
- `attention`: multi-head softmax attention, cuDNN's fused kernel where the device has one for the operands,
  else a matmul attention with its own backward pass;
- `apply_layers`: a stack of layers unrolled or as one lax.scan over stacked arrays (`stack_layers`), optionally
  recomputed in the backward pass (`REMAT_POLICIES`), the residual stream materialised between unrolled layers on
  CPU (`materialize_on_cpu`).

Parameters stay float32; the compute dtype (float32, bfloat16 or float16) is the dtype of the products' operands.
Where a choice here was measured, docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

# What a layer that recomputes (remat) keeps from its forward pass: names of jax.checkpoint_policies.
# nothing_saveable recomputes the whole layer; dots_saveable keeps every matmul's output and recomputes only
# the elementwise work (norms, modulation, GELU, softmax), so no matmul runs twice;
# dots_with_no_batch_dims_saveable keeps the linear layers' outputs and recomputes attention's products too.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")

# ----------------------------------------------------------------------------------------------------------------
# Matrix products
# ----------------------------------------------------------------------------------------------------------------


def _transposed_product(x_MK: jax.Array, g_MN: jax.Array) -> jax.Array:
    """x^T g [K, N] with float32 accumulation, shaped so that XLA:CPU reaches its fast low-precision kernels.

    XLA:CPU folds a plain transpose into the dot as an operand layout, which its YNNPACK bf16 kernels reject (the
    dot then falls back to a slower float32 kernel, or fails outright). A transpose through a 3-D view cannot be
    folded away. Other backends see an ordinary transpose."""
    rows = x_MK.shape[0]
    if rows % 8:  # zero rows add nothing to x^T g
        pad = ((0, 8 - rows % 8), (0, 0))
        x_MK, g_MN = jnp.pad(x_MK, pad), jnp.pad(g_MN, pad)
        rows = x_MK.shape[0]
    xt_KM = jnp.transpose(x_MK.reshape(rows // 8, 8, -1), (2, 0, 1)).reshape(-1, rows)
    return jnp.dot(xt_KM, g_MN, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_precision_matmul(x_MK: jax.Array, w_KN: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """x @ w with both operands cast to `dtype` (a jnp.dtype) and float32 accumulation and output.

    The backward pass casts the incoming gradient to `dtype` too, so all three products of a training step run
    on the same (fast) kernels; autodiff of the plain product would pair a float32 gradient with `dtype`
    operands, which XLA computes in float32. The gradients are float32."""
    return _mixed_precision_matmul_fwd(x_MK, w_KN, dtype)[0]


def _mixed_precision_matmul_fwd(x_MK, w_KN, dtype):
    x_MK, w_KN = x_MK.astype(dtype), w_KN.astype(dtype)
    return jnp.dot(x_MK, w_KN, preferred_element_type=jnp.float32), (x_MK, w_KN)


def _mixed_precision_matmul_bwd(dtype, residuals, g_MN):
    x_MK, w_KN = residuals
    g_MN = g_MN.astype(dtype)
    dx_MK = jax.lax.dot_general(g_MN, w_KN, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if dtype == jnp.float32:
        dw_KN = jax.lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        dw_KN = _transposed_product(x_MK, g_MN)
    return dx_MK, dw_KN


mixed_precision_matmul.defvjp(_mixed_precision_matmul_fwd, _mixed_precision_matmul_bwd)


class Linear(nnx.Linear):
    """nnx.Linear (same parameters, `kernel` [in, out] and `bias`) computed as one 2-D `mixed_precision_matmul` in
    the module's `dtype` (None: float32), bias added in float32; the output is float32.

    Leading axes are folded together first: XLA:CPU turns the backward of a [B, T, D] x [D, F] product into
    transposes and slow dots, where the 2-D form reaches its fast matmul kernels. nnx.Linear's `precision`,
    `dot_general` and `promote_dtype` options are not used."""

    def __call__(self, x: jax.Array) -> jax.Array:
        leading = x.shape[:-1]
        dtype = jnp.dtype(self.dtype or jnp.float32)
        y = mixed_precision_matmul(x.reshape(-1, x.shape[-1]), self.kernel[...], dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(*leading, -1)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def fused_attention_implementation(dtype, head_dim: int) -> str | None:
    """"cudnn" where jax.nn.dot_product_attention has cuDNN's fused (flash) kernel for these operands: an NVIDIA GPU
    of compute capability 8.0 or more, bf16 or fp16 operands, and a head dimension that is a multiple of 8 up to
    128 (256 from compute capability 9.0). None elsewhere: `matmul_attention`, whose products and custom gradient
    reach the fast kernels of CPUs and TPUs."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 8:
        return None
    try:
        capability = float(getattr(jax.devices()[0], "compute_capability", None))
    except (TypeError, ValueError):  # ROCm names its chips ("gfx90a"); cuDNN is NVIDIA's
        return None
    if capability < 8.0 or head_dim > (256 if capability >= 9.0 else 128):
        return None
    return "cudnn"


def attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, dtype) -> jax.Array:
    """Multi-head attention softmax(q k^T / sqrt(K)) v of queries q [B, T, H, K] over keys k and values v
    [B, S, H, K] -> [B, T, H*K], the products' operands in `dtype`: cuDNN's fused kernel where
    `fused_attention_implementation` names one (output in `dtype`), else `matmul_attention` (output float32).

    Callers holding q, k and v in one projection split it with jnp.split, whose gradient is one concatenation;
    indexing would pad each part's gradient to the full shape and add them."""
    implementation = fused_attention_implementation(dtype, q_BTHK.shape[-1])
    if implementation is None:
        return matmul_attention(q_BTHK, k_BSHK, v_BSHK, jnp.dtype(dtype))
    return fused_attention(q_BTHK, k_BSHK, v_BSHK, dtype, implementation)


def fused_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, dtype, implementation: str
                    ) -> jax.Array:
    """`attention` through jax.nn.dot_product_attention with `implementation` ("cudnn" on NVIDIA GPUs, "xla"
    anywhere) and its gradient: [B, T, H*K] in `dtype`."""
    q_BTHK, k_BSHK, v_BSHK = (a.astype(dtype) for a in (q_BTHK, k_BSHK, v_BSHK))
    out_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, implementation=implementation)
    return out_BTHK.reshape(*out_BTHK.shape[:2], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def matmul_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHK: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`attention` as two batched matmuls with `dtype` (a jnp.dtype) operands and float32 accumulation, the softmax
    in float32: [B, T, H*K] float32.

    The heads move in front of the tokens first ([B, H, T, K]), so that every product has its batch dimensions
    leading, as XLA:CPU's batched matmul wants them: with the heads between tokens and features, a 256-token
    forward pass took three times as long (docs/benchmarks.md). Its own backward pass gives all four backward
    products `dtype` operands (autodiff would pair the float32 gradient with `dtype` operands, which XLA computes
    in float32) and returns each gradient in its input's dtype. Reverse-mode only: a custom VJP has no
    forward-mode derivative."""
    return _matmul_attention_fwd(q_BTHK, k_BSHK, v_BSHK, dtype)[0]


def _heads_first(x_BTHK: jax.Array) -> jax.Array:
    return jnp.transpose(x_BTHK, (0, 2, 1, 3))


def _matmul_attention_fwd(q_BTHK, k_BSHK, v_BSHK, dtype):
    input_dtypes = tuple(jnp.zeros(0, a.dtype) for a in (q_BTHK, k_BSHK, v_BSHK))  # residuals must be arrays
    q_BHTK, k_BHSK, v_BHSK = (_heads_first(a.astype(dtype)) for a in (q_BTHK, k_BSHK, v_BSHK))
    logits_BHTS = jnp.matmul(q_BHTK, jnp.swapaxes(k_BHSK, -1, -2), preferred_element_type=jnp.float32)
    weights_BHTS = jax.nn.softmax(logits_BHTS * q_BHTK.shape[-1] ** -0.5, axis=-1)
    out_BHTK = jnp.matmul(weights_BHTS.astype(dtype), v_BHSK, preferred_element_type=jnp.float32)
    out_BTHK = _heads_first(out_BHTK)
    return out_BTHK.reshape(*out_BTHK.shape[:2], -1), (q_BHTK, k_BHSK, v_BHSK, weights_BHTS, input_dtypes)


def _matmul_attention_bwd(dtype, residuals, g_BTD):
    q_BHTK, k_BHSK, v_BHSK, weights_BHTS, input_dtypes = residuals
    b, heads, t, head_dim = q_BHTK.shape
    g_BHTK = _heads_first(g_BTD.reshape(b, t, heads, head_dim)).astype(dtype)
    dweights_BHTS = jnp.matmul(g_BHTK, jnp.swapaxes(v_BHSK, -1, -2), preferred_element_type=jnp.float32)
    dv_BHSK = jnp.matmul(jnp.swapaxes(weights_BHTS.astype(dtype), -1, -2), g_BHTK,
                         preferred_element_type=jnp.float32)
    # softmax backward: w * (dw - sum(dw * w)), then the 1/sqrt(head_dim) scale of the logits.
    dlogits_BHTS = weights_BHTS * (dweights_BHTS - jnp.sum(dweights_BHTS * weights_BHTS, -1, keepdims=True))
    dlogits_BHTS = (dlogits_BHTS * head_dim**-0.5).astype(dtype)
    dq_BHTK = jnp.matmul(dlogits_BHTS, k_BHSK, preferred_element_type=jnp.float32)
    dk_BHSK = jnp.matmul(jnp.swapaxes(dlogits_BHTS, -1, -2), q_BHTK, preferred_element_type=jnp.float32)
    return tuple(_heads_first(grad).astype(like.dtype) for grad, like in zip((dq_BHTK, dk_BHSK, dv_BHSK),
                                                                             input_dtypes, strict=True))


matmul_attention.defvjp(_matmul_attention_fwd, _matmul_attention_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Stacks of layers
# ----------------------------------------------------------------------------------------------------------------


def materialize_on_cpu(x: jax.Array) -> jax.Array:
    """x, computed into its own buffer on XLA:CPU (elsewhere x unchanged).

    XLA:CPU fuses the residual stream's chain of cheap adds into every consumer, so each layer recomputes the
    contributions of all earlier layers (quadratic in depth). optimization_barrier does not stop it there, but a
    conditional boundary does. The predicate, that x's first element is finite, is not known at compile time; the
    other branch fills the output with NaN, which changes nothing that was not already lost."""
    if jax.default_backend() != "cpu":
        return x
    first = x.reshape(-1)[0]
    return jax.lax.cond(jnp.isfinite(first), lambda a: a, lambda a: jnp.full_like(a, jnp.nan), x)


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
    """Modules of one structure as one module whose arrays carry a leading layer axis (layer i is slice i)."""
    graphdef = nnx.graphdef(layers[0])
    return nnx.merge(graphdef, jax.tree.map(lambda *arrays: jnp.stack(arrays), *map(nnx.state, layers)))


def stacked_layer(stacked: nnx.Module, index: int) -> nnx.Module:
    """Layer `index` of `stack_layers`' module: a copy of its slice of the stacked arrays."""
    graphdef, layers = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda array: array[index], layers))


def apply_layers(layers, x: jax.Array, *context: jax.Array, scanned: bool = False,
                 remat_policy: str | None = None) -> jax.Array:
    """x through the layers in order, each called as layer(x, *context).

    `layers` is a sequence of modules (run one after the other, the stream materialised after each on CPU), or
    with `scanned` one module of `stack_layers` (run as one lax.scan, so a program compiles one layer whatever the
    depth). A `remat_policy` (one of REMAT_POLICIES) recomputes each layer's activations in the backward pass,
    keeping what the policy names."""
    policy = None if remat_policy is None else getattr(jax.checkpoint_policies, remat_policy)
    if not scanned:
        def apply(layer, *args):
            return layer(*args)

        if policy is not None:
            apply = nnx.remat(apply, policy=policy)
        for layer in layers:
            x = materialize_on_cpu(apply(layer, x, *context))
        return x
    graphdef, states = nnx.split(layers)

    def step(x, state):
        return nnx.merge(graphdef, state)(x, *context), None

    if policy is not None:
        step = jax.checkpoint(step, policy=policy)
    return jax.lax.scan(step, x, states)[0]
