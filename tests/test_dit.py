"""The DiT model: shapes, initialisation, embeddings, label dropout, guidance, and its blocks unrolled, scanned,
recomputed and on the fused attention path (the kernels themselves: tests/test_ops.py)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ops
from models.dit import (
    BLOCKS,
    PAPER_MODELS,
    DiT,
    DiTConfig,
    dit_config,
    drop_labels,
    parse_model_name,
    sincos_position_embedding,
    timestep_sinusoid,
    unpatchify,
)

SMALL = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10)


def _inputs(n=4, size=8, channels=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, size, size, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, n), jnp.int32)
    y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
    return x, t, y


def _randomize(model: nnx.Module, seed: int = 0, std: float = 0.02) -> nnx.Module:
    """Give every parameter (zero-initialised ones included) random values so outputs are non-trivial."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


# Compiled forwards: eagerly, every operation of a first call compiles on its own (15 s for one small DiT).
_forward = nnx.jit(lambda model, x, t, y, dropout_key=None: model(x, t, y, dropout_key=dropout_key))
_forward_with_cfg = nnx.jit(lambda model, x, t, y, scale, cfg_channels: model.forward_with_cfg(
    x, t, y, scale, cfg_channels=cfg_channels), static_argnames="cfg_channels")


def test_paper_names_cover_the_grid():
    assert len(PAPER_MODELS) == 12
    assert PAPER_MODELS[0] == "DiT-S/8" and PAPER_MODELS[-1] == "DiT-XL/2"
    config = dit_config("XL/2")
    assert (config.depth, config.hidden_size, config.num_heads, config.num_tokens) == (28, 1152, 16, 256)
    assert dit_config("DiT-B/4", input_size=64).num_tokens == 256
    assert parse_model_name("DiT-L/8") == ("L", 8)
    with pytest.raises(ValueError, match="Unknown DiT model name"):
        parse_model_name("XXL/2")


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_fresh_model_outputs_zeros(block, learn_sigma):
    model = DiT(DiTConfig(**SMALL, block=block, learn_sigma=learn_sigma), rngs=nnx.Rngs(0))
    out = model(*_inputs())
    assert out.shape == (4, 8, 8, 8 if learn_sigma else 4)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out).max()) == 0.0


def test_adaln_zero_blocks_start_as_identity():
    model = DiT(DiTConfig(**SMALL), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 16, 64))
    c = jax.random.normal(jax.random.key(2), (3, 64))
    for i in range(model.config.depth):
        np.testing.assert_array_equal(model.block(i)(x, c), x)


def test_initialisation_follows_the_official_scheme():
    config = DiTConfig(**SMALL)
    model = DiT(config, rngs=nnx.Rngs(0))
    d, p, c = config.hidden_size, config.patch_size, config.in_channels

    def within_xavier(kernel, fan_in, fan_out):
        limit = math.sqrt(6 / (fan_in + fan_out))
        values = np.asarray(kernel)
        # Uniform on [-limit, limit]: bounded, and its std is limit / sqrt(3).
        return np.abs(values).max() <= limit and abs(values.std() - limit / math.sqrt(3)) < 0.1 * limit

    assert within_xavier(model.block(0).attn.qkv.kernel[...], d, 3 * d)
    assert within_xavier(model.block(0).mlp.fc1.kernel[...], d, 4 * d)
    # The patch embedding's fan-out is the width (official: Xavier on the [d, C*p*p] view), not width * p * p.
    assert within_xavier(model.patch_embed.kernel[...], c * p * p, d)
    for table in (model.t_embedder.fc1.kernel[...], model.y_embedder.table.embedding[...]):
        assert abs(float(np.std(table)) - 0.02) < 0.002
    for zero in (model.block(0).modulation.kernel[...], model.final_layer.modulation.kernel[...],
                 model.final_layer.linear.kernel[...], model.final_layer.linear.bias[...],
                 model.block(0).attn.qkv.bias[...], model.patch_embed.bias[...]):
        assert float(jnp.abs(zero).max()) == 0.0


def test_position_embedding_against_elementwise_formula():
    d, grid = 16, 3
    table = sincos_position_embedding(d, grid)
    assert table.shape == (grid * grid, d) and table.dtype == np.float32
    quarter = d // 4
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        for j in range(d):
            half, k = divmod(j, d // 2)
            position = col if half == 0 else row  # first half encodes the column
            fn, kk = (math.sin, k) if k < quarter else (math.cos, k - quarter)
            expected = fn(position / 10000 ** (kk / quarter))
            assert table[token, j] == pytest.approx(expected, abs=1e-7)


def test_timestep_sinusoid_against_formula():
    t = jnp.array([0.0, 1.0, 999.0, 0.5])
    emb = np.asarray(timestep_sinusoid(t, dim=8, max_period=10000))
    for i, ti in enumerate(np.asarray(t)):
        freqs = [math.exp(-math.log(10000) * k / 4) for k in range(4)]
        expected = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        np.testing.assert_allclose(emb[i], expected, atol=2e-4)


def test_unpatchify_inverts_a_brute_force_patchify():
    n, grid, p, c = 2, 3, 2, 5
    image = np.arange(n * grid * p * grid * p * c, dtype=np.float32).reshape(n, grid * p, grid * p, c)
    tokens = np.zeros((n, grid * grid, p * p * c), np.float32)
    for b in range(n):
        for h in range(grid):
            for w in range(grid):
                for pr in range(p):
                    for pc in range(p):
                        for ch in range(c):
                            tokens[b, h * grid + w, (pr * p + pc) * c + ch] = image[b, h * p + pr, w * p + pc, ch]
    np.testing.assert_array_equal(unpatchify(jnp.asarray(tokens), p, c), image)


def test_label_dropout():
    y = jnp.arange(20000) % 10
    dropped = drop_labels(jax.random.key(0), y, 0.1, null_label=10)
    is_null = np.asarray(dropped == 10)
    assert abs(is_null.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(y)[~is_null])

    model = _randomize(DiT(DiTConfig(**SMALL, class_dropout_prob=0.5), rngs=nnx.Rngs(0)))
    x, t, y = _inputs(n=16)
    key = jax.random.key(3)
    expected = _forward(model, x, t, drop_labels(key, y, 0.5, null_label=10))
    np.testing.assert_allclose(_forward(model, x, t, y, dropout_key=key), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(_forward(model, x, t, y), _forward(model, x, t, y))  # no key: no dropout


@pytest.mark.parametrize("cfg_channels", [3, None])
def test_forward_with_cfg_semantics(cfg_channels):
    model = _randomize(DiT(DiTConfig(**SMALL), rngs=nnx.Rngs(0)))
    x, t, y = _inputs(n=6)
    y = y.at[3:].set(10)
    scale = 4.0
    guided = _forward_with_cfg(model, x, t, y, scale, cfg_channels=cfg_channels)
    half = x[:3]
    cond = _forward(model, half, t[:3], y[:3])
    uncond = _forward(model, half, t[3:], y[3:])
    k = 4 if cfg_channels is None else cfg_channels
    expected_eps = uncond[..., :k] + scale * (cond[..., :k] - uncond[..., :k])
    np.testing.assert_allclose(guided[:3, ..., :k], expected_eps, atol=1e-5)
    np.testing.assert_allclose(guided[3:, ..., :k], expected_eps, atol=1e-5)
    np.testing.assert_allclose(guided[:3, ..., k:], cond[..., k:], atol=1e-6)  # unguided channels pass through
    np.testing.assert_allclose(guided[3:, ..., k:], uncond[..., k:], atol=1e-6)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:5], t[:5], y[:5], scale)


@pytest.mark.parametrize("block", BLOCKS)
def test_bfloat16_compute_tracks_float32(block):
    config = DiTConfig(**SMALL, block=block)
    f32 = _randomize(DiT(config, rngs=nnx.Rngs(0)), std=0.05)
    bf16 = DiT(DiTConfig(**SMALL, block=block, dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(f32, nnx.Param))
    x, t, y = _inputs()
    reference, low = f32(x, t, y), bf16(x, t, y)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(low - reference).max()) < 0.02 * float(jnp.abs(reference).max())


def _relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b))


def test_bad_configs_and_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        dit_config("S/8", input_size=20)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(**{**SMALL, "num_heads": 3})
    with pytest.raises(ValueError, match="block must be one of"):
        DiTConfig(**SMALL, block="film")
    with pytest.raises(ValueError, match="positive integer"):
        DiTConfig(**{**SMALL, "depth": 0})
    with pytest.raises(ValueError, match="Unknown DiTConfig fields"):
        dit_config("S/2", width=3)
    with pytest.raises(ValueError, match="remat_policy must be one of nothing_saveable"):
        DiTConfig(**SMALL, remat=True, remat_policy="everything")
    model = DiT(DiTConfig(**SMALL), rngs=nnx.Rngs(0))
    x, t, y = _inputs()
    with pytest.raises(ValueError, match="channels-last"):
        model(jnp.transpose(x, (0, 3, 1, 2)), t, y)
    with pytest.raises(ValueError, match="must have shape"):
        model(x, t[:2], y)


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_remat_policies_change_what_is_recomputed_not_results(scan_blocks):
    x, t, y = _inputs()
    plain = _randomize(DiT(DiTConfig(**SMALL, scan_blocks=scan_blocks), rngs=nnx.Rngs(0)))
    params = nnx.state(plain, nnx.Param)

    def jitted_grad(config):
        graphdef = nnx.graphdef(DiT(config, rngs=nnx.Rngs(0)))
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, y) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))

    def matmuls(config):  # dot_general ops in the program JAX hands to XLA, recomputed ones included
        return jitted_grad(config).lower(params).as_text().count("stablehlo.dot_general")

    reference_grads = None if scan_blocks else jitted_grad(plain.config)(params)
    counts = {}
    for policy in ops.REMAT_POLICIES:
        config = DiTConfig(**SMALL, scan_blocks=scan_blocks, remat=True, remat_policy=policy)
        if not scan_blocks:  # scanned gradients equal unrolled ones (test_scanned_blocks_compute_what_...)
            for a, b in zip(jax.tree.leaves(jitted_grad(config)(params)), jax.tree.leaves(reference_grads),
                            strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        counts[policy] = matmuls(config)
    # Recomputing the whole block runs its forward matmuls again; keeping the matmuls' outputs runs none twice;
    # keeping only the linear layers' outputs reruns attention's two batched products.
    unrecomputed = matmuls(plain.config)
    assert counts["dots_saveable"] == unrecomputed
    assert unrecomputed < counts["dots_with_no_batch_dims_saveable"] < counts["nothing_saveable"]


@pytest.mark.parametrize("block, remat", [*((b, False) for b in BLOCKS), ("adaLN-Zero", True)])
def test_scanned_blocks_compute_what_the_unrolled_blocks_do(block, remat):
    config = DiTConfig(**{**SMALL, "depth": 3}, block=block, remat=remat)
    unrolled = _randomize(DiT(config, rngs=nnx.Rngs(0)))
    scanned = DiT(dataclasses.replace(config, scan_blocks=True), rngs=nnx.Rngs(0))
    stacked = jax.tree.map(lambda *blocks: jnp.stack(blocks), *(nnx.state(b, nnx.Param) for b in unrolled.blocks))
    nnx.update(scanned, {**nnx.state(unrolled, nnx.Param), "blocks": stacked})
    assert scanned.blocks.attn.qkv.kernel.shape == (3, 64, 192)  # one array per parameter, block i = slice i
    np.testing.assert_array_equal(scanned.block(2).mlp.fc1.kernel[...], unrolled.blocks[2].mlp.fc1.kernel[...])
    x, t, y = _inputs()

    def value_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, y) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss, grads), (scanned_loss, scanned_grads) = value_and_grads(unrolled), value_and_grads(scanned)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6)
    blocks = grads.pop("blocks")
    scanned_blocks = scanned_grads.pop("blocks")
    for a, b in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    for i in range(config.depth):
        per_block = jax.tree.map(lambda array: array[i], scanned_blocks)  # noqa: B023
        for a, b in zip(jax.tree.leaves(per_block), jax.tree.leaves(blocks[i]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_the_fused_attention_path_computes_what_the_matmul_attention_does(monkeypatch):
    model = _randomize(DiT(DiTConfig(**SMALL), rngs=nnx.Rngs(0)), std=0.2)
    x, t, y = _inputs()

    def value_and_grads():
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, t, y) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    assert ops.fused_attention_implementation(jnp.bfloat16, 16) is None  # on this CPU: the matmul attention
    einsum_loss, einsum_grads = value_and_grads()
    # The branch NVIDIA GPUs take (with "cudnn"), here with the XLA implementation of the same function.
    monkeypatch.setattr(ops, "fused_attention_implementation", lambda dtype, head_dim: "xla")
    fused_loss, fused_grads = value_and_grads()
    np.testing.assert_allclose(fused_loss, einsum_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(fused_grads), jax.tree.leaves(einsum_grads), strict=True):
        assert _relative_error(a, b) < 1e-4  # float32 sums in another order
