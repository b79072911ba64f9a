"""An independent PyTorch DiT (Peebles & Xie, 2023), the adaLN-Zero model of the official models.py. Needs torch.

The second implementation the tests compare the JAX model against, and the PyTorch peer the benchmarks time
(scaling.benchmarks.compare). Written from the architecture of the official release; the module tree
is laid out so that ``state_dict()`` keys and shapes match the official checkpoints exactly
(e.g. ``blocks.0.adaLN_modulation.1.weight``).

No label dropout and no dropout anywhere (the official model drops labels in training only, at no cost that
matters to a benchmark).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ReferenceDiT",
    "modulate",
    "timestep_embedding",
    "sincos_pos_embed_2d",
    "randomize_",
]


def modulate(x, shift, scale):
    """adaLN modulation: x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t [N] -> [N, dim], order [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _sincos_1d(dim, pos):
    """[sin(pos*omega), cos(pos*omega)] with omega_k = 1/10000^(k/(dim/2)); float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos table [grid_size**2, dim] in float64, tokens in row-major (h, w) order.

    First dim/2 channels encode the column (w) index, the next dim/2 the row (h) index.
    """
    assert dim % 4 == 0, "hidden size must be divisible by 4"
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = p, then flatten to [N, T, d] (tokens row-major)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t):
        # frequencies are computed in float32; cast only to run the MLP in the model's dtype
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label table with num_classes + 1 rows (the last row is the null / CFG class)."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, split as (3, heads, head_dim)."""

    def __init__(self, dim, num_heads, attention="sdpa"):
        super().__init__()
        assert dim % num_heads == 0 and attention in ("sdpa", "matmul")
        self.num_heads, self.head_dim, self.attention = num_heads, dim // num_heads, attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each [N, heads, T, head_dim]
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            o = attn.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attention="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, attention)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LayerNorm -> modulate(shift, scale) -> Linear(d, p*p*out_channels)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class ReferenceDiT(nn.Module):
    """DiT with official key names. forward(x [N,C,H,W], t [N], y [N]) -> [N, out_channels, H, W]."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        num_classes=1000,
        learn_sigma=True,
        attention="sdpa",
    ):
        super().__init__()
        assert input_size % patch_size == 0
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        pos = torch.from_numpy(sincos_pos_embed_2d(hidden_size, self.grid_size)).float()[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed, but saved in state_dict
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, attention) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        """[N, T, p*p*C] (per-token order p_row, p_col, channel) -> [N, C, H, W]."""
        n, p, c, g = x.shape[0], self.patch_size, self.out_channels, self.grid_size
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # n c h p_row w p_col
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        """Classifier-free guidance on a [cond; uncond] batch (second half: null labels).

        x's first half is duplicated; the first ``cfg_channels`` output channels are guided
        (same guided eps in both halves), the remaining channels pass through unchanged.
        ``cfg_channels=None`` guides all in_channels. The official release guides 3.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


@torch.no_grad()
def randomize_(model, seed, std=0.02):
    """Fill every parameter except pos_embed with N(0, std^2) values from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.split(".")[-1] == "pos_embed":
            continue
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) * std)
    return model
