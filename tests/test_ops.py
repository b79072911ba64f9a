"""The kernels every architecture builds from (models/ops.py): each one's value and gradient against autodiff of
the naive formula, in float32 and bfloat16; the attention backend's choice; the stack of layers; and that the
architectures compute through them."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ops
from models.dit import DiT, DiTConfig
from models.modern_dit import build as build_modern_dit

# Products with `dtype` operands accumulate in float32 whatever `dtype` is: against the naive product of operands
# rounded to `dtype` only the summation order differs.
PRODUCT_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Attention against softmax attention in float32: relative error in norm. bf16 rounds q, k, v, the weights and the
# incoming gradient to 8 bits of mantissa (2^-8 = 0.4%), a few roundings deep.
ATTENTION_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def _rounded(a: jax.Array, dtype) -> jax.Array:
    """a rounded to `dtype` and back to float32: the operand a `dtype` product sees."""
    return a.astype(dtype).astype(jnp.float32)


def _relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b))


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [16, 13])  # 13: the weight gradient pads x^T g to a multiple of 8 rows
def test_mixed_precision_matmul_against_autodiff_of_the_product(dtype, rows):
    x, w, r = _normal(1, (rows, 24)), _normal(2, (24, 40)), _normal(3, (rows, 40))

    def loss(x, w):
        return jnp.sum(r * ops.mixed_precision_matmul(x, w, jnp.dtype(dtype)))

    def naive_loss(x, w):  # the backward pass rounds the incoming gradient r to `dtype` too
        return jnp.sum(_rounded(r, dtype) * jnp.dot(x, w, precision="highest"))

    value = ops.mixed_precision_matmul(x, w, jnp.dtype(dtype))
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    rounded = _rounded(x, dtype), _rounded(w, dtype)
    expected_dx, expected_dw = jax.grad(naive_loss, argnums=(0, 1))(*rounded)
    assert value.dtype == dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(value, jnp.dot(*rounded, precision="highest"), **PRODUCT_TOLERANCE)
    np.testing.assert_allclose(dx, expected_dx, **PRODUCT_TOLERANCE)
    np.testing.assert_allclose(dw, expected_dw, **PRODUCT_TOLERANCE)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_is_nnx_linear_computed_by_the_mixed_precision_matmul(dtype):
    layer = ops.Linear(24, 40, dtype=dtype, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
    plain = nnx.Linear(24, 40, dtype=dtype, rngs=nnx.Rngs(0))
    # The same parameters, so checkpoints and weight conversion see no difference.
    def layout(module):
        return [(jax.tree_util.keystr(path), leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]]

    assert layout(layer) == layout(plain) == [("['bias'].value", (40,)), ("['kernel'].value", (24, 40))]
    x, r = _normal(4, (2, 5, 24)), _normal(5, (2, 5, 40))
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(r * nnx.merge(graphdef, params)(x))

    def naive_loss(x, kernel, bias):  # the backward pass rounds the incoming gradient r to `dtype` too
        return jnp.sum(_rounded(r, dtype) * (jnp.dot(x, kernel, precision="highest") + bias))

    rounded = _rounded(x, dtype), _rounded(layer.kernel[...], dtype)
    out = layer(x)
    assert out.shape == (2, 5, 40) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, jnp.dot(*rounded, precision="highest") + layer.bias[...], **PRODUCT_TOLERANCE)
    grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    expected_dx, expected_dkernel, _ = jax.grad(naive_loss, argnums=(0, 1, 2))(*rounded, layer.bias[...])
    np.testing.assert_allclose(dx, expected_dx, **PRODUCT_TOLERANCE)
    np.testing.assert_allclose(grads["kernel"][...], expected_dkernel, **PRODUCT_TOLERANCE)
    # The bias is added in float32: its gradient is the sum of the unrounded incoming gradient.
    np.testing.assert_allclose(grads["bias"][...], r.sum(axis=(0, 1)), **PRODUCT_TOLERANCE)


def _naive_attention(q_BTHK, k_BSHK, v_BSHK):
    """softmax(q k^T / sqrt(K)) v in float32 throughout: [B, T, H*K]."""
    logits = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, precision="highest") / np.sqrt(q_BTHK.shape[-1])
    out = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v_BSHK, precision="highest")
    return out.reshape(*out.shape[:2], -1)


ENTRY_POINTS = {
    "attention": ops.attention,  # on a CPU: the matmul attention
    "matmul_attention": lambda q, k, v, dtype: ops.matmul_attention(q, k, v, jnp.dtype(dtype)),
    "fused_attention (xla)": lambda q, k, v, dtype: ops.fused_attention(q, k, v, dtype, "xla"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("keys", [6, 3])  # self-attention, and a shorter key sequence as in cross-attention
def test_attention_against_autodiff_of_softmax_attention(entry, dtype, keys):
    attention, tolerance = ENTRY_POINTS[entry], ATTENTION_TOLERANCE[dtype]
    q, k, v = _normal(6, (2, 6, 2, 8)), _normal(7, (2, keys, 2, 8)), _normal(8, (2, keys, 2, 8))
    r = _normal(9, (2, 6, 16))

    def gradients(function, args):
        return jax.grad(lambda *a: jnp.sum(r * function(*a).astype(jnp.float32)), argnums=(0, 1, 2))(*args)

    kernel = jax.jit(lambda *a: attention(*a, dtype))
    assert _relative_error(kernel(q, k, v), _naive_attention(q, k, v)) < tolerance
    for grad, expected in zip(gradients(kernel, (q, k, v)), gradients(_naive_attention, (q, k, v)), strict=True):
        assert grad.dtype == jnp.float32 and grad.shape == expected.shape
        assert _relative_error(grad, expected) < tolerance
    # Gradients come back in each input's dtype.
    low_precision = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    assert all(g.dtype == jnp.bfloat16 for g in gradients(kernel, low_precision))


def test_attention_takes_the_fused_kernel_where_one_is_named(monkeypatch):
    q = k = v = _normal(10, (2, 4, 2, 8))
    assert ops.attention(q, k, v, "bfloat16").dtype == jnp.float32  # the matmul attention here
    monkeypatch.setattr(ops, "fused_attention_implementation", lambda dtype, head_dim: "xla")
    fused = ops.attention(q, k, v, "bfloat16")
    assert fused.dtype == jnp.bfloat16
    np.testing.assert_array_equal(fused, ops.fused_attention(q, k, v, "bfloat16", "xla"))


def test_a_split_projection_gets_its_gradient_as_one_concatenation():
    qkv, r = _normal(11, (2, 6, 6, 8)), _normal(12, (2, 6, 16))

    def loss(qkv):
        return jnp.sum(r * ops.attention(*jnp.split(qkv, 3, axis=2), jnp.bfloat16))

    program = str(jax.make_jaxpr(jax.grad(loss))(qkv))
    assert "concatenate" in program and "pad" not in program


@pytest.mark.parametrize("dtype, head_dim, capability, expected", [
    ("bfloat16", 64, "8.0", "cudnn"),
    ("float16", 72, "8.6", "cudnn"),
    ("float32", 64, "9.0", None),  # cuDNN's fused kernel is bf16/fp16 only
    ("bfloat16", 9, "9.0", None),  # head dimension not a multiple of 8
    ("bfloat16", 192, "8.0", None),  # above 128 before compute capability 9.0
    ("bfloat16", 192, "9.0", "cudnn"),
    ("bfloat16", 64, "7.5", None),
    ("bfloat16", 64, "gfx90a", None),  # a ROCm device
])
def test_fused_attention_implementation_follows_the_device(monkeypatch, dtype, head_dim, capability, expected):
    assert ops.fused_attention_implementation(dtype, head_dim) is None  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(compute_capability=capability)])
    assert ops.fused_attention_implementation(dtype, head_dim) == expected


def test_materialize_on_cpu_is_the_identity_except_on_non_finite_streams():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(jax.jit(ops.materialize_on_cpu)(x), x)
    poisoned = x.at[0, 0, 0].set(jnp.inf)
    if jax.default_backend() == "cpu":
        assert bool(jnp.isnan(jax.jit(ops.materialize_on_cpu)(poisoned)).all())
    else:  # other backends get x itself
        np.testing.assert_array_equal(jax.jit(ops.materialize_on_cpu)(poisoned), poisoned)


class _Residual(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = ops.Linear(8, 8, rngs=rngs)

    def __call__(self, x, scale):
        return x + scale * jnp.tanh(self.linear(x))


@pytest.mark.parametrize("remat_policy", [None, *ops.REMAT_POLICIES])
def test_apply_layers_unrolled_and_scanned_compute_the_layers_in_order(remat_policy):
    layers = [_Residual(nnx.Rngs(i)) for i in range(3)]
    x, scale = _normal(13, (4, 8)), jnp.float32(0.5)
    expected = x
    for layer in layers:
        expected = layer(expected, scale)
    stacked = ops.stack_layers(layers)
    np.testing.assert_array_equal(ops.stacked_layer(stacked, 1).linear.kernel[...], layers[1].linear.kernel[...])
    for result in (ops.apply_layers(nnx.List(layers), x, scale, remat_policy=remat_policy),
                   ops.apply_layers(stacked, x, scale, scanned=True, remat_policy=remat_policy)):
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


def _linear_layers(model: nnx.Module) -> list[nnx.Module]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]


def test_dit_and_modern_dit_compute_through_ops(monkeypatch):
    depth = 2
    modern = build_modern_dit(input_size=8, in_channels=4, num_classes=10, learn_sigma=True, depth=depth,
                              hidden_size=32, num_heads=4, patch_size=2, rngs=nnx.Rngs(0))
    dit = DiT(DiTConfig(depth=depth, hidden_size=32, num_heads=4, patch_size=2, input_size=8, num_classes=10),
              rngs=nnx.Rngs(0))
    for model in (modern, dit):
        linears = _linear_layers(model)
        assert linears and all(isinstance(layer, ops.Linear) for layer in linears)
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return ops.matmul_attention(*args[:3], jnp.dtype(args[3]))

    monkeypatch.setattr(ops, "attention", counted)
    x, t, y = jnp.zeros((2, 8, 8, 4)), jnp.array([1, 500]), jnp.array([3, 10])
    for model in (modern, dit):
        calls.clear()
        out = jax.eval_shape(lambda x, t, y: model(x, t, y), x, t, y)  # noqa: B023
        assert out.shape == (2, 8, 8, 8) and calls == [(2, 16, 4, 8)] * depth
