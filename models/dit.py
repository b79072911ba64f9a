"""The DiT model family (Peebles & Xie, "Scalable Diffusion Models with Transformers") in Flax NNX.

Images are NHWC. `DiT(config)(x, t, y)` maps latents x [N, H, W, C], integer timesteps t [N] and integer labels
y [N] to [N, H, W, 2C] when sigma is learned (epsilon first, then the variance interpolation values) or
[N, H, W, C] otherwise. Four conditioning blocks follow the paper's ablation (Section 3.2):

- "adaLN-Zero": adaptive LayerNorm scale/shift plus a residual gate, regressed from c = t_emb + y_emb by a
  zero-initialised layer, so every block starts as the identity (the paper's choice for all scaling runs);
- "adaLN": the same without the gate; the regression layer gets the default (Xavier) initialisation;
- "cross-attention": standard pre-norm ViT blocks with a multi-head cross-attention layer after the
  self-attention, attending from the image tokens to the two-token sequence [t_emb, y_emb];
- "in-context": standard pre-norm ViT blocks; t_emb and y_emb are appended to the image tokens as two extra
  tokens and dropped after the last block.

Parameter names, initialisation and numerics follow the official PyTorch release so that its checkpoints load
(see models/convert.py). Every model's output layer is zero-initialised, so a fresh model outputs zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCKS = ("in-context", "cross-attention", "adaLN", "adaLN-Zero")  # the paper's Fig. 5 order, worst to best

# Paper Table 1: name -> (layers, hidden size, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (8, 4, 2)
TIMESTEP_FREQUENCY_DIM = 256
LATENT_DOWNSAMPLE = 8  # the SD autoencoder maps 256x256x3 images to 32x32x4 latents
LATENT_CHANNELS = 4
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # matmul dtypes; parameters, norms and softmax stay float32
# What a block that recomputes (remat) keeps from its forward pass: names of jax.checkpoint_policies.
# nothing_saveable recomputes the whole block; dots_saveable keeps every matmul's output and recomputes only
# the elementwise work (norms, modulation, GELU, softmax), so no matmul runs twice;
# dots_with_no_batch_dims_saveable keeps the linear layers' outputs and recomputes attention's products too.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")

# Paper order (Table 4): sizes S, B, L, XL, each with patch 8, 4, 2.
PAPER_MODELS = tuple(f"DiT-{size}/{patch}" for size in DIT_SIZES for patch in PATCH_SIZES)  # see canonical_name

_NAME_PATTERN = re.compile(r"^(?:DiT-)?(S|B|L|XL)/(\d+)$")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of one DiT. `input_size` is the spatial size of the (latent) input, not the image size."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32
    in_channels: int = LATENT_CHANNELS
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    block: str = "adaLN-Zero"
    dtype: str = "float32"  # compute dtype of matmuls; parameters, norms and softmax stay float32
    remat: bool = False  # recompute each block's activations in the backward pass (less memory, ~1/3 more compute)
    remat_policy: str = "nothing_saveable"  # with remat: what each block keeps (REMAT_POLICIES)
    # The blocks as one lax.scan over stacked arrays (block i is slice i of every array under `blocks`): the step
    # compiles one block whatever the depth. On XLA:CPU unrolled blocks (the default) train S/2 and B/4 faster,
    # scanned ones XL/2 with remat (docs/benchmarks.md).
    scan_blocks: bool = False

    def __post_init__(self):
        for field in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels", "num_classes"):
            value = getattr(self, field)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiTConfig.{field} must be a positive integer, got {value!r}.")
        if self.block not in BLOCKS:
            raise ValueError(f"DiTConfig.block must be one of {BLOCKS}, got {self.block!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                "choose a head count that divides the width."
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2-D sin-cos position embedding."
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}: "
                f"use an input size that is a multiple of {self.patch_size} (pad or crop the latents)."
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}.")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}.")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {', '.join(REMAT_POLICIES)}, got {self.remat_policy!r}.")

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def name(self) -> str:
        """The paper's name (e.g. "DiT-XL/2") when the shape is a standard one, else a descriptive name."""
        for size, (depth, width, heads) in DIT_SIZES.items():
            if (self.depth, self.hidden_size, self.num_heads) == (depth, width, heads):
                return f"DiT-{size}/{self.patch_size}"
        return f"DiT-d{self.depth}w{self.hidden_size}h{self.num_heads}/{self.patch_size}"


def parse_model_name(name: str) -> tuple[str, int]:
    """Split "DiT-XL/2" or "XL/2" into ("XL", 2)."""
    match = _NAME_PATTERN.match(name.strip())
    if not match or int(match.group(2)) < 1:
        raise ValueError(
            f"Unknown DiT model name {name!r}: use SIZE/PATCH with SIZE in {list(DIT_SIZES)} and a positive "
            "patch size, e.g. 'XL/2' or 'DiT-S/8'."
        )
    return match.group(1), int(match.group(2))


def canonical_name(name: str) -> str:
    """"XL/2" or "DiT-XL/2" -> "DiT-XL/2", the name records and tables use."""
    return "DiT-" + short_name(name)


def short_name(name: str) -> str:
    """"XL/2" or "DiT-XL/2" -> "XL/2", the name configs and command lines use."""
    size, patch = parse_model_name(name)
    return f"{size}/{patch}"


def dit_config(name: str, **overrides) -> DiTConfig:
    """The config of a named DiT ("DiT-XL/2" or "XL/2"), with field overrides (e.g. input_size=64, block=...)."""
    size, patch = parse_model_name(name)
    depth, width, heads = DIT_SIZES[size]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DiTConfig)}
    if unknown:
        raise ValueError(f"Unknown DiTConfig fields {sorted(unknown)}.")
    return DiTConfig(**{"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": patch, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


def timestep_sinusoid(t_N: jax.Array, dim: int = TIMESTEP_FREQUENCY_DIM, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, ordered [cos, sin] as in the official release."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_NF = jnp.asarray(t_N, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args_NF), jnp.sin(args_NF)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


@functools.lru_cache(maxsize=16)
def sincos_position_embedding(hidden_size: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid_size**2, hidden_size] (float32, computed in float64).

    Tokens are in row-major (h, w) order. The first half of the channels encodes the column (w) index, the second
    half the row (h) index; within each half [sin(pos * omega), cos(pos * omega)], omega_k = 1/10000^(k/(d/4)).
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")

    def encode(positions):
        angles = positions.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    embedding = np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)
    embedding.setflags(write=False)
    return embedding


def drop_labels(key: jax.Array, y_N: jax.Array, prob: float, null_label: int) -> jax.Array:
    """Replace each label by the null label with probability `prob` (classifier-free guidance training)."""
    drop = jax.random.bernoulli(key, prob, y_N.shape)
    return jnp.where(drop, null_label, y_N)


_xavier_uniform = nnx.initializers.xavier_uniform()
_normal_002 = nnx.initializers.normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()
# The official patch embedding applies Xavier to the conv weight viewed as [out, in * p * p]: fan_out is the width,
# not width * p * p as Flax's conv fan computation would give.
_patch_embed_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)


def _transposed_product(x_MK: jax.Array, g_MN: jax.Array) -> jax.Array:
    """x^T g [K, N] with float32 accumulation, shaped so that XLA:CPU reaches its fast low-precision kernels.

    XLA:CPU folds a plain transpose into the dot as an operand layout, which its YNNPACK bf16 kernels reject (the
    dot then runs in f32 Eigen at ~1/5 of the speed, or fails outright). Transposing through a 3-D view cannot be
    folded away. Other backends see an ordinary transpose."""
    rows = x_MK.shape[0]
    if rows % 8:  # zero rows add nothing to x^T g
        pad = ((0, 8 - rows % 8), (0, 0))
        x_MK, g_MN = jnp.pad(x_MK, pad), jnp.pad(g_MN, pad)
        rows = x_MK.shape[0]
    xt_KM = jnp.transpose(x_MK.reshape(rows // 8, 8, -1), (2, 0, 1)).reshape(-1, rows)
    return jnp.dot(xt_KM, g_MN, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_precision_matmul(x_MK: jax.Array, w_KN: jax.Array, dtype) -> jax.Array:
    """x @ w with both operands cast to `dtype` and float32 accumulation and output.

    The backward pass casts the incoming gradient to `dtype` too, so all three products of a training step run
    on the same (fast) kernels; autodiff of the plain product would pair a float32 gradient with `dtype`
    operands, which XLA computes in float32."""
    return jnp.dot(x_MK.astype(dtype), w_KN.astype(dtype), preferred_element_type=jnp.float32)


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
    """nnx.Linear as one 2-D `mixed_precision_matmul` in the module's compute dtype, bias added in float32.
    Leading axes are folded together first: XLA:CPU turns the backward of a [B, T, D] x [D, F] product into
    transposes and slow dots; the 2-D form reaches its fast matmul kernels."""

    def __call__(self, x: jax.Array) -> jax.Array:
        leading = x.shape[:-1]
        y = mixed_precision_matmul(x.reshape(-1, x.shape[-1]), self.kernel[...], jnp.dtype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...]
        return y.reshape(*leading, -1)


def _linear(in_features: int, out_features: int, init, dtype, rngs: nnx.Rngs) -> Linear:
    """A Linear computing in `dtype` with float32 accumulation and output (bf16 inputs reach the fast
    bf16 x bf16 -> f32 matmul units; norms, softmax and the residual stream stay float32)."""
    return Linear(in_features, out_features, kernel_init=init, dtype=dtype, rngs=rngs)


class TimestepEmbedder(nnx.Module):
    """Sinusoid of dim 256 -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(TIMESTEP_FREQUENCY_DIM, hidden_size, _normal_002, dtype, rngs)
        self.fc2 = _linear(hidden_size, hidden_size, _normal_002, dtype, rngs)

    def __call__(self, t_N: jax.Array) -> jax.Array:
        return self.fc2(nnx.silu(self.fc1(timestep_sinusoid(t_N))))


class LabelEmbedder(nnx.Module):
    """Class-label table with one extra row, the null label (index num_classes) used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nnx.Embed(num_classes + 1, hidden_size, embedding_init=_normal_002, rngs=rngs)

    def __call__(self, y_N: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        if dropout_key is not None and self.dropout_prob > 0:
            y_N = drop_labels(dropout_key, y_N, self.dropout_prob, self.num_classes)
        return self.table(y_N)


# ----------------------------------------------------------------------------------------------------------------
# Transformer layers
# ----------------------------------------------------------------------------------------------------------------


def _layer_norm(hidden_size: int, affine: bool, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch computes it; the one-pass form loses precision on large activations.
    return nnx.LayerNorm(hidden_size, epsilon=1e-6, use_bias=affine, use_scale=affine, use_fast_variance=False,
                         dtype=jnp.float32, rngs=rngs)


def _attention_forward(q_BTHK, k_BSHK, v_BSHK, dtype) -> tuple[jax.Array, jax.Array]:
    """softmax(q k^T / sqrt(head_dim)) v with products in `dtype` (float32 accumulation) and the softmax in
    float32. Returns the output [B, T, H*K] and the attention weights [B, H, T, S], both float32."""
    logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32)
    weights_BHTS = jax.nn.softmax(logits_BHTS * q_BTHK.shape[-1] ** -0.5, axis=-1)
    out_BTHK = jnp.einsum("bhts,bshk->bthk", weights_BHTS.astype(dtype), v_BSHK,
                          preferred_element_type=jnp.float32)
    return out_BTHK.reshape(*out_BTHK.shape[:2], -1), weights_BHTS


def _attention_backward(q_BTHK, k_BSHK, v_BSHK, weights_BHTS, g_BTD, dtype):
    """Gradients (dq, dk, dv), float32, of `_attention_forward`'s output for the incoming gradient g. All four
    products take `dtype` operands: autodiff would pair the float32 gradient with `dtype` operands, which
    XLA computes in float32."""
    b, t, heads, head_dim = q_BTHK.shape
    g_BTHK = g_BTD.reshape(b, t, heads, head_dim).astype(dtype)
    dweights_BHTS = jnp.einsum("bthk,bshk->bhts", g_BTHK, v_BSHK, preferred_element_type=jnp.float32)
    dv_BSHK = jnp.einsum("bhts,bthk->bshk", weights_BHTS.astype(dtype), g_BTHK, preferred_element_type=jnp.float32)
    # softmax backward: w * (dw - sum(dw * w)), then the 1/sqrt(head_dim) scale of the logits.
    dlogits_BHTS = weights_BHTS * (dweights_BHTS - jnp.sum(dweights_BHTS * weights_BHTS, -1, keepdims=True))
    dlogits_BHTS = (dlogits_BHTS * head_dim**-0.5).astype(dtype)
    dq_BTHK = jnp.einsum("bhts,bshk->bthk", dlogits_BHTS, k_BSHK, preferred_element_type=jnp.float32)
    dk_BSHK = jnp.einsum("bhts,bthk->bshk", dlogits_BHTS, q_BTHK, preferred_element_type=jnp.float32)
    return dq_BTHK, dk_BSHK, dv_BSHK


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def self_attention(qkv_BT3HK: jax.Array, dtype) -> jax.Array:
    """Multi-head self-attention of the stacked projections qkv [B, T, 3, H, K] -> [B, T, H*K], float32.

    The gradient of qkv is assembled in one stacked array (autodiff of the three slices pads each gradient
    to the full shape and adds them). Reverse-mode only: a custom VJP has no forward-mode derivative."""
    return _self_attention_fwd(qkv_BT3HK, dtype)[0]


def _self_attention_fwd(qkv_BT3HK, dtype):
    input_dtype = jnp.zeros(0, qkv_BT3HK.dtype)  # the gradient returns in the input's dtype
    qkv_BT3HK = qkv_BT3HK.astype(dtype)
    out_BTD, weights_BHTS = _attention_forward(qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2], dtype)
    return out_BTD, (qkv_BT3HK, weights_BHTS, input_dtype)


def _self_attention_bwd(dtype, residuals, g_BTD):
    qkv_BT3HK, weights_BHTS, input_dtype = residuals
    grads = _attention_backward(qkv_BT3HK[:, :, 0], qkv_BT3HK[:, :, 1], qkv_BT3HK[:, :, 2], weights_BHTS, g_BTD,
                                dtype)
    return (jnp.stack(grads, axis=2).astype(input_dtype.dtype),)


self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cross_attention(q_BTHK: jax.Array, kv_BS2HK: jax.Array, dtype) -> jax.Array:
    """Multi-head attention from queries q [B, T, H, K] to stacked keys and values kv [B, S, 2, H, K]."""
    return _cross_attention_fwd(q_BTHK, kv_BS2HK, dtype)[0]


def _cross_attention_fwd(q_BTHK, kv_BS2HK, dtype):
    input_dtypes = jnp.zeros(0, q_BTHK.dtype), jnp.zeros(0, kv_BS2HK.dtype)
    q_BTHK, kv_BS2HK = q_BTHK.astype(dtype), kv_BS2HK.astype(dtype)
    out_BTD, weights_BHTS = _attention_forward(q_BTHK, kv_BS2HK[:, :, 0], kv_BS2HK[:, :, 1], dtype)
    return out_BTD, (q_BTHK, kv_BS2HK, weights_BHTS, input_dtypes)


def _cross_attention_bwd(dtype, residuals, g_BTD):
    q_BTHK, kv_BS2HK, weights_BHTS, (q_dtype, kv_dtype) = residuals
    dq, dk, dv = _attention_backward(q_BTHK, kv_BS2HK[:, :, 0], kv_BS2HK[:, :, 1], weights_BHTS, g_BTD, dtype)
    return dq.astype(q_dtype.dtype), jnp.stack([dk, dv], axis=2).astype(kv_dtype.dtype)


cross_attention.defvjp(_cross_attention_fwd, _cross_attention_bwd)


def fused_attention_implementation(dtype) -> str | None:
    """"cudnn" where jax.nn.dot_product_attention has cuDNN's fused (flash) kernel for `dtype`: an NVIDIA GPU of
    compute capability 8.0 or more, computing in bf16 or fp16. None elsewhere: the einsum attention above, whose
    products and custom gradient reach the fast kernels of CPUs and TPUs."""
    if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return None
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return "cudnn" if float(capability) >= 8.0 else None
    except (TypeError, ValueError):  # ROCm names its chips ("gfx90a"); cuDNN is NVIDIA's
        return None


def fused_self_attention(qkv_BT3HK: jax.Array, dtype, implementation: str) -> jax.Array:
    """`self_attention` through jax.nn.dot_product_attention with `implementation` ("cudnn", or "xla"):
    [B, T, 3, H, K] -> [B, T, H*K] in `dtype`."""
    q_BTHK, k_BTHK, v_BTHK = (qkv_BT3HK[:, :, i].astype(dtype) for i in range(3))
    out_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, implementation=implementation)
    return out_BTHK.reshape(*out_BTHK.shape[:2], -1)


class SelfAttention(nnx.Module):
    def __init__(self, hidden_size: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.dtype = num_heads, dtype
        self.qkv = _linear(hidden_size, 3 * hidden_size, _xavier_uniform, dtype, rngs)
        self.proj = _linear(hidden_size, hidden_size, _xavier_uniform, dtype, rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        b, t, d = x_BTD.shape
        qkv_BT3HK = self.qkv(x_BTD).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        dtype = jnp.dtype(self.dtype)
        fused = fused_attention_implementation(dtype)
        if fused is None:
            return self.proj(self_attention(qkv_BT3HK, dtype))
        return self.proj(fused_self_attention(qkv_BT3HK, dtype, fused))


class CrossAttention(nnx.Module):
    """Multi-head attention from image tokens (queries) to a short conditioning sequence (keys and values)."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.dtype = num_heads, dtype
        self.q = _linear(hidden_size, hidden_size, _xavier_uniform, dtype, rngs)
        self.kv = _linear(hidden_size, 2 * hidden_size, _xavier_uniform, dtype, rngs)
        self.proj = _linear(hidden_size, hidden_size, _xavier_uniform, dtype, rngs)

    def __call__(self, x_BTD: jax.Array, cond_BSD: jax.Array) -> jax.Array:
        b, t, d = x_BTD.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        q_BTHK = self.q(x_BTD).reshape(b, t, heads, head_dim)
        kv_BS2HK = self.kv(cond_BSD).reshape(b, cond_BSD.shape[1], 2, heads, head_dim)
        return self.proj(cross_attention(q_BTHK, kv_BS2HK, jnp.dtype(self.dtype)))


class Mlp(nnx.Module):
    def __init__(self, hidden_size: int, mlp_hidden_size: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(hidden_size, mlp_hidden_size, _xavier_uniform, dtype, rngs)
        self.fc2 = _linear(mlp_hidden_size, hidden_size, _xavier_uniform, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


def materialize_on_cpu(x: jax.Array) -> jax.Array:
    """x, computed into its own buffer on XLA:CPU (elsewhere x unchanged).

    XLA:CPU fuses the residual stream's chain of cheap adds into every consumer, so each layer recomputes the
    contributions of all earlier layers (quadratic in depth; a tenth of a DiT-B/4 bf16 training step).
    optimization_barrier does not stop it there, but a conditional boundary does. The predicate, that x's first
    element is finite, is not known at compile time; the other branch fills the output with NaN, which changes
    nothing that was not already lost."""
    if jax.default_backend() != "cpu":
        return x
    first = x.reshape(-1)[0]
    return jax.lax.cond(jnp.isfinite(first), lambda a: a, lambda a: jnp.full_like(a, jnp.nan), x)


def _modulate(x_BTD: jax.Array, shift_BD: jax.Array, scale_BD: jax.Array) -> jax.Array:
    return x_BTD * (1 + scale_BD[:, None]) + shift_BD[:, None]


class ModulatedBlock(nnx.Module):
    """adaLN block: LayerNorm scale and shift regressed from c. With `gated` (adaLN-Zero) a residual gate is
    regressed too and the regression layer is zero-initialised, so the block starts as the identity."""

    def __init__(self, config: DiTConfig, *, gated: bool, rngs: nnx.Rngs):
        d, dtype = config.hidden_size, config.dtype
        self.gated = gated
        self.norm1 = _layer_norm(d, affine=False, rngs=rngs)
        self.attn = SelfAttention(d, config.num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = _layer_norm(d, affine=False, rngs=rngs)
        self.mlp = Mlp(d, config.mlp_hidden_size, dtype=dtype, rngs=rngs)
        self.modulation = _linear(d, (6 if gated else 4) * d, _zeros if gated else _xavier_uniform, dtype, rngs)

    def __call__(self, x_BTD: jax.Array, c_BD: jax.Array) -> jax.Array:
        mod = jnp.split(self.modulation(nnx.silu(c_BD)), 6 if self.gated else 4, axis=-1)
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        else:
            shift_msa, scale_msa, shift_mlp, scale_mlp = mod
            gate_msa = gate_mlp = jnp.ones_like(shift_msa)
        x_BTD = x_BTD + gate_msa[:, None] * self.attn(_modulate(self.norm1(x_BTD), shift_msa, scale_msa))
        return x_BTD + gate_mlp[:, None] * self.mlp(_modulate(self.norm2(x_BTD), shift_mlp, scale_mlp))


class TransformerBlock(nnx.Module):
    """Standard pre-norm ViT block (learned LayerNorm affine), optionally with cross-attention to `cond`."""

    def __init__(self, config: DiTConfig, *, cross_attention: bool, rngs: nnx.Rngs):
        d, dtype = config.hidden_size, config.dtype
        self.norm1 = _layer_norm(d, affine=True, rngs=rngs)
        self.attn = SelfAttention(d, config.num_heads, dtype=dtype, rngs=rngs)
        if cross_attention:
            self.norm_cross = _layer_norm(d, affine=True, rngs=rngs)
            self.cross_attn = CrossAttention(d, config.num_heads, dtype=dtype, rngs=rngs)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = _layer_norm(d, affine=True, rngs=rngs)
        self.mlp = Mlp(d, config.mlp_hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, cond_BSD: jax.Array | None = None) -> jax.Array:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        if self.cross_attn is not None:
            x_BTD = x_BTD + self.cross_attn(self.norm_cross(x_BTD), cond_BSD)
        return x_BTD + self.mlp(self.norm2(x_BTD))


class FinalLayer(nnx.Module):
    """LayerNorm -> (adaLN shift/scale from c, for the adaLN blocks) -> zero-initialised Linear to p*p*out."""

    def __init__(self, config: DiTConfig, *, modulated: bool, rngs: nnx.Rngs):
        d = config.hidden_size
        self.norm = _layer_norm(d, affine=not modulated, rngs=rngs)
        self.modulation = (_linear(d, 2 * d, _zeros, config.dtype, rngs)
                           if modulated else None)
        self.linear = _linear(d, config.patch_size**2 * config.out_channels, _zeros, config.dtype, rngs)

    def __call__(self, x_BTD: jax.Array, c_BD: jax.Array) -> jax.Array:
        x_BTD = self.norm(x_BTD)
        if self.modulation is not None:
            shift, scale = jnp.split(self.modulation(nnx.silu(c_BD)), 2, axis=-1)
            x_BTD = _modulate(x_BTD, shift, scale)
        return self.linear(x_BTD)


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
    """Modules of one structure as one module whose arrays carry a leading layer axis (layer i is slice i)."""
    graphdef = nnx.graphdef(layers[0])
    return nnx.merge(graphdef, jax.tree.map(lambda *arrays: jnp.stack(arrays), *map(nnx.state, layers)))


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class DiT(nnx.Module):
    """Diffusion transformer; see the module docstring for inputs, outputs and the four conditioning blocks."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = nnx.Conv(config.in_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                    kernel_init=_patch_embed_init, dtype=config.dtype,
                                    preferred_element_type=jnp.float32, rngs=rngs)
        self.t_embedder = TimestepEmbedder(d, dtype=config.dtype, rngs=rngs)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob, rngs=rngs)
        if config.block in ("adaLN-Zero", "adaLN"):
            gated = config.block == "adaLN-Zero"
            layers = [ModulatedBlock(config, gated=gated, rngs=rngs) for _ in range(config.depth)]
        else:
            cross = config.block == "cross-attention"
            layers = [TransformerBlock(config, cross_attention=cross, rngs=rngs) for _ in range(config.depth)]
        self.blocks = stack_layers(layers) if config.scan_blocks else nnx.List(layers)
        self.final_layer = FinalLayer(config, modulated=config.block in ("adaLN-Zero", "adaLN"), rngs=rngs)

    def __call__(self, x_NHWC: jax.Array, t_N: jax.Array, y_N: jax.Array, *,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Predict [eps, variance values] for latents x_NHWC at timesteps t_N with labels y_N.

        `dropout_key` turns on label dropout (training only): each label becomes the null label with probability
        config.class_dropout_prob. Without it the forward pass is deterministic.
        """
        cfg = self.config
        self._check_input(x_NHWC, t_N, y_N)
        tokens_NTD = self.patch_embed(x_NHWC).reshape(x_NHWC.shape[0], cfg.num_tokens, cfg.hidden_size)
        x_NTD = tokens_NTD + sincos_position_embedding(cfg.hidden_size, cfg.grid_size)
        t_ND = self.t_embedder(t_N)
        y_ND = self.y_embedder(y_N, dropout_key).astype(jnp.float32)
        c_ND = t_ND + y_ND

        if cfg.block == "in-context":
            x_NTD = jnp.concatenate([x_NTD, t_ND[:, None], y_ND[:, None]], axis=1)
            x_NTD = self._apply_blocks(x_NTD)[:, : cfg.num_tokens]
        elif cfg.block == "cross-attention":
            x_NTD = self._apply_blocks(x_NTD, jnp.stack([t_ND, y_ND], axis=1))
        else:
            x_NTD = self._apply_blocks(x_NTD, c_ND)
        patches_NTO = self.final_layer(x_NTD, c_ND)
        return unpatchify(patches_NTO, cfg.patch_size, cfg.out_channels)

    def block(self, index: int) -> nnx.Module:
        """Block `index`: the module itself, or with scan_blocks a copy of its slice of the stacked arrays."""
        if not self.config.scan_blocks:
            return self.blocks[index]
        graphdef, layers = nnx.split(self.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda array: array[index], layers))

    def _apply_blocks(self, x_NTD: jax.Array, *context: jax.Array) -> jax.Array:
        """The blocks in order: one scan over their stacked arrays (scan_blocks), or one after the other."""
        if not self.config.scan_blocks:
            def apply(block, *args):
                return block(*args)

            if self.config.remat:
                apply = nnx.remat(apply, policy=self._remat_policy())
            for block in self.blocks:
                x_NTD = materialize_on_cpu(apply(block, x_NTD, *context))
            return x_NTD
        graphdef, layers = nnx.split(self.blocks)

        def layer(x_NTD, layer_state):
            return nnx.merge(graphdef, layer_state)(x_NTD, *context), None

        if self.config.remat:
            layer = jax.checkpoint(layer, policy=self._remat_policy())
        return jax.lax.scan(layer, x_NTD, layers)[0]

    def _remat_policy(self):
        return getattr(jax.checkpoint_policies, self.config.remat_policy)

    def forward_with_cfg(self, x_NHWC: jax.Array, t_N: jax.Array, y_N: jax.Array, cfg_scale: float, *,
                         cfg_channels: int | None = 3) -> jax.Array:
        """Classifier-free guidance with the official release's semantics.

        The batch's first half is run twice, with y's first half (conditional) and second half (normally the null
        label); the guided eps = eps_uncond + cfg_scale * (eps_cond - eps_uncond) fills both halves of the output.
        Only the first `cfg_channels` output channels are guided: 3 reproduces the paper's numbers (a quirk of the
        official code); None guides all latent channels (the standard formulation). The remaining channels are
        returned unguided.
        """
        if x_NHWC.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (conditional + unconditional halves), "
                             f"got {x_NHWC.shape[0]}.")
        channels = self.config.in_channels if cfg_channels is None else cfg_channels
        if not 0 < channels <= self.config.in_channels:
            raise ValueError(f"cfg_channels must be in 1..{self.config.in_channels} or None, got {cfg_channels}.")
        from models.diffusion import guide

        half = x_NHWC[: x_NHWC.shape[0] // 2]
        cond, uncond = jnp.split(self(jnp.concatenate([half, half]), t_N, y_N), 2)
        first = guide(cond, uncond, cfg_scale, channels)
        second = jnp.concatenate([first[..., :channels], uncond[..., channels:]], axis=-1)
        return jnp.concatenate([first, second])

    def _check_input(self, x_NHWC, t_N, y_N):
        cfg = self.config
        expected = (cfg.input_size, cfg.input_size, cfg.in_channels)
        if x_NHWC.ndim != 4 or tuple(x_NHWC.shape[1:]) != expected:
            raise ValueError(
                f"{cfg.name} expects NHWC input of shape [N, {expected[0]}, {expected[1]}, {expected[2]}], got "
                f"{tuple(x_NHWC.shape)}. Inputs are channels-last; transpose NCHW tensors with (0, 2, 3, 1)."
            )
        n = x_NHWC.shape[0]
        if tuple(t_N.shape) != (n,) or tuple(y_N.shape) != (n,):
            raise ValueError(f"t and y must have shape [{n}], got {tuple(t_N.shape)} and {tuple(y_N.shape)}.")


def unpatchify(patches_NTO: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """[N, h*w, p*p*C] (each token ordered p_row, p_col, channel) -> [N, h*p, w*p, C]."""
    n, t, _ = patches_NTO.shape
    grid = math.isqrt(t)
    x = patches_NTO.reshape(n, grid, grid, patch_size, patch_size, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * patch_size, grid * patch_size, channels)


def abstract_module(build) -> nnx.Module:
    """The module build(rngs) makes, with shape/dtype placeholders for arrays: for counting parameters and compute
    and for graph definitions, allocating nothing."""
    def build_abstract() -> nnx.Module:
        # A reference-backed counter: a plain one, updated under tracing, has nnx look up the tracer's sharding at
        # every random draw, which walks the whole trace so far (XL/2: 10 s to build; 1.4 s like this).
        with nnx.var_defaults(ref=True):
            rngs = nnx.Rngs(0)
        return build(rngs)

    return nnx.eval_shape(build_abstract)


def abstract_dit(config: DiTConfig) -> DiT:
    """A DiT whose arrays are shape/dtype placeholders (`abstract_module`)."""
    return abstract_module(lambda rngs: DiT(config, rngs=rngs))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (the fixed position embedding is not a parameter here)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
