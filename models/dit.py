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
This file says what the architecture is; how its linear layers, attention and stack of blocks compute (compute
dtype, attention kernels, custom gradients, scanned and recomputed blocks) is models/ops.py's.
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

from models import ops

BLOCKS = ("in-context", "cross-attention", "adaLN", "adaLN-Zero")  # the paper's Fig. 5 order, worst to best

# Paper Table 1: name -> (layers, hidden size, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (8, 4, 2)
TIMESTEP_FREQUENCY_DIM = 256
LATENT_DOWNSAMPLE = 8  # the SD autoencoder maps 256x256x3 images to 32x32x4 latents
LATENT_CHANNELS = 4
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # matmul dtypes; parameters, norms and softmax stay float32

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
    remat_policy: str = "nothing_saveable"  # with remat: what each block keeps (ops.REMAT_POLICIES)
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
        if self.remat_policy not in ops.REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {', '.join(ops.REMAT_POLICIES)}, "
                             f"got {self.remat_policy!r}.")

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


# Initialisers of the official release.
_xavier_uniform = nnx.initializers.xavier_uniform()
_normal_002 = nnx.initializers.normal(stddev=0.02)
_zeros = nnx.initializers.zeros_init()
# The official patch embedding applies Xavier to the conv weight viewed as [out, in * p * p]: fan_out is the width,
# not width * p * p as Flax's conv fan computation would give.
_patch_embed_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)


class TimestepEmbedder(nnx.Module):
    """Sinusoid of dim 256 -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = ops.Linear(TIMESTEP_FREQUENCY_DIM, hidden_size, kernel_init=_normal_002, dtype=dtype, rngs=rngs)
        self.fc2 = ops.Linear(hidden_size, hidden_size, kernel_init=_normal_002, dtype=dtype, rngs=rngs)

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


class SelfAttention(nnx.Module):
    """Multi-head self-attention: one projection to queries, keys and values, attention, an output projection."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.dtype = num_heads, dtype
        self.qkv = ops.Linear(hidden_size, 3 * hidden_size, kernel_init=_xavier_uniform, dtype=dtype, rngs=rngs)
        self.proj = ops.Linear(hidden_size, hidden_size, kernel_init=_xavier_uniform, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        b, t, d = x_BTD.shape
        qkv_BT3HK = self.qkv(x_BTD).reshape(b, t, 3 * self.num_heads, d // self.num_heads)
        q_BTHK, k_BTHK, v_BTHK = jnp.split(qkv_BT3HK, 3, axis=2)
        return self.proj(ops.attention(q_BTHK, k_BTHK, v_BTHK, self.dtype))


class CrossAttention(nnx.Module):
    """Multi-head attention from image tokens (queries) to a short conditioning sequence (keys and values)."""

    def __init__(self, hidden_size: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.dtype = num_heads, dtype
        self.q = ops.Linear(hidden_size, hidden_size, kernel_init=_xavier_uniform, dtype=dtype, rngs=rngs)
        self.kv = ops.Linear(hidden_size, 2 * hidden_size, kernel_init=_xavier_uniform, dtype=dtype, rngs=rngs)
        self.proj = ops.Linear(hidden_size, hidden_size, kernel_init=_xavier_uniform, dtype=dtype, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, cond_BSD: jax.Array) -> jax.Array:
        b, t, d = x_BTD.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        q_BTHK = self.q(x_BTD).reshape(b, t, heads, head_dim)
        k_BSHK, v_BSHK = jnp.split(self.kv(cond_BSD).reshape(b, cond_BSD.shape[1], 2 * heads, head_dim), 2, axis=2)
        return self.proj(ops.attention(q_BTHK, k_BSHK, v_BSHK, self.dtype))


class Mlp(nnx.Module):
    """Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = ops.Linear(hidden_size, mlp_hidden_size, kernel_init=_xavier_uniform, dtype=dtype, rngs=rngs)
        self.fc2 = ops.Linear(mlp_hidden_size, hidden_size, kernel_init=_xavier_uniform, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nnx.gelu(self.fc1(x), approximate=True))


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
        self.modulation = ops.Linear(d, (6 if gated else 4) * d, kernel_init=_zeros if gated else _xavier_uniform,
                                     dtype=dtype, rngs=rngs)

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
        d, dtype = config.hidden_size, config.dtype
        self.norm = _layer_norm(d, affine=not modulated, rngs=rngs)
        self.modulation = ops.Linear(d, 2 * d, kernel_init=_zeros, dtype=dtype, rngs=rngs) if modulated else None
        self.linear = ops.Linear(d, config.patch_size**2 * config.out_channels, kernel_init=_zeros, dtype=dtype,
                                 rngs=rngs)

    def __call__(self, x_BTD: jax.Array, c_BD: jax.Array) -> jax.Array:
        x_BTD = self.norm(x_BTD)
        if self.modulation is not None:
            shift, scale = jnp.split(self.modulation(nnx.silu(c_BD)), 2, axis=-1)
            x_BTD = _modulate(x_BTD, shift, scale)
        return self.linear(x_BTD)


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
        self.blocks = ops.stack_layers(layers) if config.scan_blocks else nnx.List(layers)
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
        return ops.stacked_layer(self.blocks, index) if self.config.scan_blocks else self.blocks[index]

    def _apply_blocks(self, x_NTD: jax.Array, *context: jax.Array) -> jax.Array:
        """The blocks in order, each called as block(x, *context)."""
        cfg = self.config
        return ops.apply_layers(self.blocks, x_NTD, *context, scanned=cfg.scan_blocks,
                                remat_policy=cfg.remat_policy if cfg.remat else None)

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
        # every random draw, which walks the whole trace so far (docs/benchmarks.md, "Building abstract models").
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
