"""The Stable Diffusion KL-f8 autoencoder (diffusers' AutoencoderKL, the sd-vae-ft-ema/-mse weights the DiT paper
used) in Flax NNX, and the loader of its published files.

    vae = load_autoencoder(PATH)          # a diffusers folder (config.json + weights) or one weights file
    mean, logvar = vae.encode(x)          # x: NHWC images in [-1, 1]; the posterior of the unscaled latent
    images = vae.decode(z)                # z: NHWC unscaled latents; NHWC images in [-1, 1] (not clipped)

The diffusion model sees `vae.config.scaling_factor * z` (0.18215 for KL-f8). Images are NHWC; a 256x256x3 image
becomes a 32x32x4 latent. Module and parameter names mirror diffusers' (encoder.down_blocks.0.resnets.1.conv1 ...)
so a file maps onto the model name for name. Convolutions and attention products run in `config.dtype` with
float32 accumulation; group norms, the softmax and the outputs stay float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.convert import TorchFileError, read_weights, state_dict_problems

LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clipped to this, as diffusers and CompVis do
NORM_EPSILON = 1e-6
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # diffusers' names
# The attention names of diffusers before 0.15 (sd-vae-ft-ema's .bin files use them) -> today's names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of a KL autoencoder in diffusers' terms; the defaults are the published KL-f8 config."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    latent_channels: int = 4
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"  # compute dtype of convolutions and attention products

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels or self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError(f"Invalid autoencoder config {self}.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"Every block_out_channels entry {self.block_out_channels} must be a multiple of "
                             f"norm_num_groups {self.norm_num_groups}.")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"Autoencoder dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}.")

    @property
    def downsample(self) -> int:
        """Image pixels per latent pixel along each side (8 for KL-f8)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping, dtype: str = "float32") -> AutoencoderConfig:
        """From the dict of a diffusers AutoencoderKL config.json, refusing what this model does not implement."""
        depth = len(config.get("block_out_channels", cls.block_out_channels))
        unsupported = {
            "_class_name": (config.get("_class_name", "AutoencoderKL"), "AutoencoderKL"),
            "down_block_types": (list(config.get("down_block_types", ["DownEncoderBlock2D"] * depth)),
                                 ["DownEncoderBlock2D"] * depth),
            "up_block_types": (list(config.get("up_block_types", ["UpDecoderBlock2D"] * depth)),
                               ["UpDecoderBlock2D"] * depth),
            "act_fn": (config.get("act_fn", "silu"), "silu"),
            "shift_factor": (config.get("shift_factor"), None),
            "latents_mean": (config.get("latents_mean"), None),
            "latents_std": (config.get("latents_std"), None),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"Autoencoder config has {key}={value!r}; only the KL-f8 family is supported "
                                 f"({key}={supported!r}).")
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        return cls(**{k: v for k, v in config.items() if k in fields}, dtype=dtype)


def _group_norm(channels: int, config: AutoencoderConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # The two-pass variance: the one-pass E[x^2] - E[x]^2 loses digits on the decoder's large activations.
    return nnx.GroupNorm(channels, num_groups=config.norm_num_groups, epsilon=NORM_EPSILON, dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


def _conv(in_channels: int, out_channels: int, kernel: int, config: AutoencoderConfig, rngs: nnx.Rngs, *,
          strides: int = 1, padding="SAME") -> nnx.Conv:
    return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=strides, padding=padding,
                    dtype=jnp.dtype(config.dtype), preferred_element_type=jnp.float32, rngs=rngs)


class ResnetBlock(nnx.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, config: AutoencoderConfig, rngs: nnx.Rngs):
        self.norm1 = _group_norm(in_channels, config, rngs)
        self.conv1 = _conv(in_channels, out_channels, 3, config, rngs)
        self.norm2 = _group_norm(out_channels, config, rngs)
        self.conv2 = _conv(out_channels, out_channels, 3, config, rngs)
        self.conv_shortcut = _conv(in_channels, out_channels, 1, config, rngs) if in_channels != out_channels \
            else None

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x_BHWC)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)) + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all pixels, pre-GroupNorm, with a residual connection."""

    def __init__(self, channels: int, config: AutoencoderConfig, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.group_norm = _group_norm(channels, config, rngs)

        def linear():
            return nnx.Linear(channels, channels, dtype=self.dtype, preferred_element_type=jnp.float32, rngs=rngs)

        self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        tokens_BTC = self.group_norm(x_BHWC).reshape(b, h * w, c)
        q_BTC, k_BTC, v_BTC = self.to_q(tokens_BTC), self.to_k(tokens_BTC), self.to_v(tokens_BTC)
        logits_BTS = jnp.einsum("btc,bsc->bts", q_BTC.astype(self.dtype), k_BTC.astype(self.dtype),
                                preferred_element_type=jnp.float32) / math.sqrt(c)
        weights_BTS = jax.nn.softmax(logits_BTS, axis=-1)
        out_BTC = jnp.einsum("bts,bsc->btc", weights_BTS.astype(self.dtype), v_BTC.astype(self.dtype),
                             preferred_element_type=jnp.float32)
        return x_BHWC + self.to_out(out_BTC).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, config: AutoencoderConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, config, rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(channels, config, rngs)] if config.mid_block_add_attention
                                   else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """A stride-2 3x3 conv after padding one pixel on the bottom and right only (diffusers' padding=0 variant)."""

    def __init__(self, channels: int, config: AutoencoderConfig, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, config, rngs, strides=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int, config: AutoencoderConfig, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class EncoderBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, downsample: bool,
                 config: AutoencoderConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config, rngs)
                                 for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample(out_channels, config, rngs)] if downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class DecoderBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, upsample: bool,
                 config: AutoencoderConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config, rngs)
                                 for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample(out_channels, config, rngs)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, config: AutoencoderConfig, rngs: nnx.Rngs):
        channels = config.block_out_channels
        self.conv_in = _conv(config.in_channels, channels[0], 3, config, rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block, i < len(channels) - 1,
                         config, rngs) for i in range(len(channels))])
        self.mid_block = MidBlock(channels[-1], config, rngs)
        self.conv_norm_out = _group_norm(channels[-1], config, rngs)
        self.conv_out = _conv(channels[-1], 2 * config.latent_channels, 3, config, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    def __init__(self, config: AutoencoderConfig, rngs: nnx.Rngs):
        channels = config.block_out_channels[::-1]
        self.conv_in = _conv(config.latent_channels, channels[0], 3, config, rngs)
        self.mid_block = MidBlock(channels[0], config, rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, i < len(channels) - 1,
                         config, rngs) for i in range(len(channels))])
        self.conv_norm_out = _group_norm(channels[-1], config, rngs)
        self.conv_out = _conv(channels[-1], config.out_channels, 3, config, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Images [N, H, W, 3] in [-1, 1] <-> a diagonal Gaussian over latents [N, H/f, W/f, latent_channels]."""

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs)
        self.decoder = Decoder(config, rngs)
        moments = 2 * config.latent_channels
        self.quant_conv = _conv(moments, moments, 1, config, rngs) if config.use_quant_conv else None
        self.post_quant_conv = _conv(config.latent_channels, config.latent_channels, 1, config, rngs) \
            if config.use_post_quant_conv else None

    @nnx.jit
    def encode(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior's mean and (clipped) log-variance, both [N, H/f, W/f, latent_channels] float32.
        Compiled once per input shape."""
        moments = self.encoder(x_BHWC)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    @nnx.jit
    def decode(self, z_BhwC: jax.Array) -> jax.Array:
        """Compiled once per input shape. Images [N, H, W, out_channels] float32 from unscaled latents."""
        if self.post_quant_conv is not None:
            z_BhwC = self.post_quant_conv(z_BhwC)
        return self.decoder(z_BhwC).astype(jnp.float32)


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """One draw from the diagonal Gaussian N(mean, exp(logvar))."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def abstract_autoencoder(config: AutoencoderConfig) -> AutoencoderKL:
    """An autoencoder whose arrays are shape/dtype placeholders."""
    return nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------------------------------------------
# Loading diffusers files
# ----------------------------------------------------------------------------------------------------------------

def _diffusers_name(path: tuple) -> tuple[str, str]:
    """Our state path -> (diffusers tensor name, layout transform)."""
    *module, leaf = (str(p) for p in path)
    module = ["to_out.0" if m == "to_out" else m for m in module]
    if leaf == "kernel":
        return ".".join([*module, "weight"]), "linear" if module[-1].startswith("to_") else "conv"
    return ".".join([*module, "weight" if leaf == "scale" else leaf]), "none"


_OUR_AXES = {"linear": (1, 0), "conv": (2, 3, 1, 0), "none": None}  # [out, in] -> [in, out]; OIHW -> HWIO


def diffusers_state_shapes(config: AutoencoderConfig) -> dict[str, tuple[int, ...]]:
    """Names and (PyTorch-layout) shapes of the diffusers state dict of `config`'s autoencoder."""
    shapes = {}
    for path, variable in nnx.to_flat_state(nnx.state(abstract_autoencoder(config), nnx.Param)):
        name, transform = _diffusers_name(path)
        axes = _OUR_AXES[transform]
        shape = tuple(variable.shape)
        shapes[name] = shape if axes is None else tuple(shape[i] for i in np.argsort(axes))
    return shapes


def _modern_name(name: str) -> str:
    prefix, _, last = name.rpartition(".")
    module_prefix, _, module = prefix.rpartition(".")
    if module in LEGACY_ATTENTION_NAMES and ".attentions." in name:
        return f"{module_prefix}.{LEGACY_ATTENTION_NAMES[module]}.{last}"
    return name


def find_autoencoder_files(path: str | os.PathLike) -> tuple[str, str | None]:
    """(weights file, config.json or None) for a diffusers folder (or a pipeline folder with vae/) or a file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "vae")):
            for name in WEIGHT_FILES:
                if os.path.isfile(os.path.join(folder, name)):
                    config = os.path.join(folder, "config.json")
                    return os.path.join(folder, name), config if os.path.isfile(config) else None
        raise FileNotFoundError(f"No autoencoder weights in {path}: expected one of {list(WEIGHT_FILES)} there or "
                                "in its vae/ folder (the diffusers layout of stabilityai/sd-vae-ft-ema).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No autoencoder at {path}: give a diffusers folder or a .safetensors/.bin file.")
    config = os.path.join(os.path.dirname(path), "config.json")
    return path, config if os.path.isfile(config) else None


def load_autoencoder(path: str | os.PathLike, *, dtype: str = "float32") -> AutoencoderKL:
    """The autoencoder of a diffusers AutoencoderKL folder or weights file (.safetensors, or .bin read without
    executing it). The architecture comes from config.json beside the weights (the published KL-f8 config when
    there is none); the file must hold exactly that architecture's tensors, under today's or the legacy
    attention names. `dtype` "bfloat16" runs convolutions and attention products in bf16 (faster decoding)."""
    weights_path, config_path = find_autoencoder_files(path)
    if config_path is None:
        config = AutoencoderConfig(dtype=dtype)
    else:
        try:
            config = AutoencoderConfig.from_diffusers(json.loads(open(config_path).read()), dtype=dtype)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"Cannot read the autoencoder config {config_path}: {e}") from e
    state = {_modern_name(k): np.asarray(v) for k, v in read_weights(weights_path).items()}
    expected = diffusers_state_shapes(config)
    problems = state_dict_problems(state, expected, shown=6)
    if problems:
        size = sum(math.prod(s) for s in expected.values())
        found = sum(v.size for v in state.values())
        source = f"the config {config_path}" if config_path else "the published KL-f8 config (no config.json)"
        raise TorchFileError(
            f"{weights_path} does not hold the autoencoder of {source}: that has {len(expected)} tensors "
            f"({size:,} parameters), the file {len(state)} ({found:,}); {problems}")

    graphdef, abstract_state = nnx.split(abstract_autoencoder(config))
    flat = []
    for path_, variable in nnx.to_flat_state(abstract_state):
        name, transform = _diffusers_name(path_)
        axes = _OUR_AXES[transform]
        array = state[name] if axes is None else state[name].transpose(axes)
        flat.append((path_, variable.replace(jnp.asarray(array, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
