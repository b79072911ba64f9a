"""ModernDiT: DiT with the modern transformer block of LightningDiT (Yao et al. 2025, "Reconstruction vs.
Generation: Taming Optimization Dilemma in Latent Diffusion Models"): a SwiGLU feed-forward layer, RMSNorm in place
of LayerNorm, and 2-D rotary position embeddings in attention in place of the fixed sin-cos embedding added to the
tokens. The conditioning stays DiT's adaLN-Zero (a zero-initialised regression of shift, scale and gate from
c = t_emb + y_emb). LightningDiT's other changes (its autoencoder, training schedule and loss terms) are not here.

This file is a model plug-in, the worked example of `model.factory`: `build` follows the contract of
models/plugin.py, and `scaling/configs/modern_dit_fmnist.py` trains the family through the grid with the miniature
study's recipe. It uses nothing of the toolkit but DiT's timestep and label embedders, `unpatchify`, and the
kernels of models/ops.py (its linear layers, attention and stack of blocks), so that it and DiT compare on the same
kernels.

Forward multiply-accumulates per image (the paper's "Gflops"), with T tokens, width d, SwiGLU width h, depth L,
patch p and C input / O output channels: T p^2 C d (patch embedding) + 256 d + d^2 (timestep MLP)
+ L (6 d^2 + 4 T d^2 + 2 T^2 d + 3 T d h) + 2 d^2 + T d p^2 O (final layer). DiT's differs only in its MLP, 8 T d^2
where this has 3 T d h; with h = 8d/3 (rounded down) the two are within a fraction of a percent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import ops
from models.dit import LabelEmbedder, TimestepEmbedder, unpatchify

ROPE_BASE = 10_000.0


def swiglu_hidden_size(hidden_size: int) -> int:
    """8d/3 (rounded down): SwiGLU's three matrices then cost what a 4d-wide two-matrix MLP costs."""
    return 8 * hidden_size // 3


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm without a learned scale (adaLN supplies the scale), in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def rope_angles(grid_size: int, head_dim: int) -> jax.Array:
    """Rotation angles [T, R/2] of 2-D RoPE for a grid_size x grid_size token grid: the first half of the R rotated
    dimensions turn with the token's row, the second half with its column. R is head_dim rounded down to a
    multiple of 4; the remaining dimensions pass unrotated (partial rotary)."""
    quarter = head_dim // 4
    frequencies = ROPE_BASE ** (-jnp.arange(quarter, dtype=jnp.float32) / max(quarter, 1))
    rows, cols = jnp.meshgrid(jnp.arange(grid_size), jnp.arange(grid_size), indexing="ij")
    by_row = rows.reshape(-1, 1) * frequencies
    by_col = cols.reshape(-1, 1) * frequencies
    return jnp.concatenate([by_row, by_col], axis=-1)


def apply_rope(x_BTHK: jax.Array, angles_TA: jax.Array) -> jax.Array:
    """Rotate consecutive pairs of the first 2A dimensions of each head by the angles; the rest pass through."""
    rotated = 2 * angles_TA.shape[-1]
    pairs = x_BTHK[..., :rotated].reshape(*x_BTHK.shape[:-1], -1, 2)
    cos, sin = jnp.cos(angles_TA)[None, :, None], jnp.sin(angles_TA)[None, :, None]
    even, odd = pairs[..., 0], pairs[..., 1]
    turned = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(*x_BTHK.shape[:-1], -1)
    return jnp.concatenate([turned, x_BTHK[..., rotated:]], axis=-1)


def _linear(d_in: int, d_out: int, dtype, rngs: nnx.Rngs, *, zero: bool = False) -> ops.Linear:
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return ops.Linear(d_in, d_out, kernel_init=init, dtype=dtype, rngs=rngs)


class ModernBlock(nnx.Module):
    """adaLN-Zero around RMSNorm, self-attention with 2-D RoPE, and a SwiGLU feed-forward layer."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        d, h = hidden_size, swiglu_hidden_size(hidden_size)
        self.num_heads, self.dtype = num_heads, dtype
        self.qkv = _linear(d, 3 * d, dtype, rngs)
        self.proj = _linear(d, d, dtype, rngs)
        self.gate_up = _linear(d, 2 * h, dtype, rngs)  # the gate and the up projection as one matrix
        self.down = _linear(h, d, dtype, rngs)
        self.modulation = _linear(d, 6 * d, dtype, rngs, zero=True)

    def attention(self, x_BTD: jax.Array, angles_TA: jax.Array) -> jax.Array:
        b, t, d = x_BTD.shape
        qkv_BT3HK = self.qkv(x_BTD).reshape(b, t, 3 * self.num_heads, d // self.num_heads)
        q_BTHK, k_BTHK, v_BTHK = jnp.split(qkv_BT3HK, 3, axis=2)
        q_BTHK, k_BTHK = apply_rope(q_BTHK, angles_TA), apply_rope(k_BTHK, angles_TA)
        return self.proj(ops.attention(q_BTHK, k_BTHK, v_BTHK, self.dtype))

    def __call__(self, x_BTD: jax.Array, c_BD: jax.Array, angles_TA: jax.Array) -> jax.Array:
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in jnp.split(
            self.modulation(nnx.silu(c_BD)), 6, axis=-1))
        x_BTD = x_BTD + gate1 * self.attention(rms_norm(x_BTD) * (1 + scale1) + shift1, angles_TA)
        gate, up = jnp.split(self.gate_up(rms_norm(x_BTD) * (1 + scale2) + shift2), 2, axis=-1)
        return x_BTD + gate2 * self.down(nnx.silu(gate) * up)


class ModernDiT(nnx.Module):
    def __init__(self, *, input_size: int, in_channels: int, num_classes: int, learn_sigma: bool, depth: int,
                 hidden_size: int, num_heads: int, patch_size: int, class_dropout_prob: float, dtype: str,
                 rngs: nnx.Rngs):
        if input_size % patch_size or hidden_size % num_heads:
            raise ValueError(f"ModernDiT: input_size {input_size} must be a multiple of patch_size {patch_size}, "
                             f"and hidden_size {hidden_size} of num_heads {num_heads}.")
        d, p = hidden_size, patch_size
        self.patch_size, self.in_channels = p, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grid_size = input_size // p
        self.num_tokens = self.grid_size**2
        self.head_dim = d // num_heads
        self.patch_embed = _linear(p * p * in_channels, d, dtype, rngs)
        self.t_embedder = TimestepEmbedder(d, dtype=dtype, rngs=rngs)
        self.y_embedder = LabelEmbedder(num_classes, d, class_dropout_prob, rngs=rngs)
        self.blocks = nnx.List([ModernBlock(d, num_heads, dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.final_modulation = _linear(d, 2 * d, dtype, rngs, zero=True)
        self.final_linear = _linear(d, p * p * self.out_channels, dtype, rngs, zero=True)

    def __call__(self, x_NHWC: jax.Array, t_N: jax.Array, y_N: jax.Array, dropout_key=None) -> jax.Array:
        n, g, p = x_NHWC.shape[0], self.grid_size, self.patch_size
        patches = x_NHWC.reshape(n, g, p, g, p, self.in_channels).transpose(0, 1, 3, 2, 4, 5)
        x_NTD = self.patch_embed(patches.reshape(n, self.num_tokens, -1))
        c_ND = self.t_embedder(t_N) + self.y_embedder(y_N, dropout_key).astype(jnp.float32)
        x_NTD = ops.apply_layers(self.blocks, x_NTD, c_ND, rope_angles(g, self.head_dim))
        shift, scale = jnp.split(self.final_modulation(nnx.silu(c_ND)), 2, axis=-1)
        x_NTD = rms_norm(x_NTD) * (1 + scale[:, None]) + shift[:, None]
        return unpatchify(self.final_linear(x_NTD), p, self.out_channels)


def build(*, input_size: int, in_channels: int, num_classes: int, learn_sigma: bool, rngs: nnx.Rngs, depth: int,
          hidden_size: int, num_heads: int, patch_size: int, class_dropout_prob: float = 0.1,
          dtype: str = "float32") -> ModernDiT:
    """The model factory (models/plugin.py's contract); depth, hidden_size, num_heads and patch_size are the
    family's arguments."""
    return ModernDiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                     learn_sigma=learn_sigma, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                     patch_size=patch_size, class_dropout_prob=class_dropout_prob, dtype=dtype, rngs=rngs)
