"""ImageNet to latents: ADM's crop, the latent files and their refusals, extraction on two devices, resuming."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from run_helpers import cli, write_fake_imagenet, write_tiny_autoencoder

from scaling.latents import LatentShards, adm_center_crop, list_image_folder, write_latents


def _direct_adm_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's recipe written out with PIL's own crop box."""
    image = image.convert("RGB")
    while image.width >= 2 * size and image.height >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    ratio = size / min(image.width, image.height)
    image = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("size, mode", [((300, 217), "RGB"), ((1201, 513), "RGB"), ((64, 64), "L"),
                                        ((65, 190), "RGBA"), ((40, 50), "RGB")])
def test_adm_center_crop_matches_the_recipe_done_with_pil(size, mode):
    rng = np.random.default_rng(sum(size))
    pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)
    crop = adm_center_crop(image, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, _direct_adm_crop(image, 64))
    if size == (64, 64):  # already at size: the crop is the image
        np.testing.assert_array_equal(crop[..., 0], pixels[..., 0])


def _moments(n, latent=4, seed=0):
    rng = np.random.default_rng(seed)
    moments = np.zeros((n, 2, latent, latent, 8), np.float32)
    moments[:, 0, ..., :4] = 1.0 + rng.standard_normal((n, latent, latent, 4)) * 0.01   # crop: mean near +1
    moments[:, 1, ..., :4] = -1.0 + rng.standard_normal((n, latent, latent, 4)) * 0.01  # flip: mean near -1
    moments[..., 4:] = math.log(4.0)  # variance 4
    return moments


def _write(directory, n=25, **overrides):
    kwargs = dict(classes=["a", "b", "c"], resolution=32, scale=0.5, autoencoder={"file": "vae", "sha256": "ab" * 32},
                  shard_size=10)
    write_latents(directory, _moments(n), np.arange(n) % 3, **{**kwargs, **overrides})


def test_training_inputs_draw_the_posterior_and_the_flip_afresh(tmp_path):
    _write(tmp_path)
    source = LatentShards(tmp_path, resolution=32, autoencoder_sha256="ab" * 32)
    assert len(source) == 25 and source.image_shape == (4, 4, 4) and source.pixels_per_input == 8
    assert [int(source[i]["label"]) for i in (0, 9, 10, 24)] == [0, 0, 1, 0]
    rng = np.random.default_rng(0)
    draws = np.stack([source.to_model_input(source[3], rng, flip=True)["image"] for _ in range(2000)])
    flipped = draws.mean(axis=(1, 2, 3)) < 0
    assert 0.45 < flipped.mean() < 0.55  # the stored flip half the time
    # scale x (mean + std x noise): mean +-0.5, std 0.5 x 2 = 1
    assert abs(draws[~flipped].mean() - 0.5) < 0.02 and abs(draws[flipped].mean() + 0.5) < 0.02
    assert abs(draws[~flipped].std() - 1.0) < 0.02
    unflipped = np.stack([source.to_model_input(source[3], rng, flip=False)["image"] for _ in range(200)])
    assert unflipped.mean() > 0.4


def test_latents_that_do_not_fit_the_config_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="extract-latents IMAGE_DIR OUT"):
        LatentShards(tmp_path / "nothing")
    _write(tmp_path / "ok")
    with pytest.raises(ValueError, match="of 32px images; the config trains at data.resolution=256"):
        LatentShards(tmp_path / "ok", resolution=256)
    with pytest.raises(ValueError, match="not the config's data.autoencoder"):
        LatentShards(tmp_path / "ok", autoencoder_sha256="cd" * 32)
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps({**manifest, "status": "extracting"}))
    with pytest.raises(ValueError, match="has not finished.*run the same extract-latents command"):
        LatentShards(tmp_path / "ok")
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "ok" / "labels-00001.npy").unlink()
    with pytest.raises(ValueError, match="Shard 1 .* is missing"):
        LatentShards(tmp_path / "ok")


def test_image_folder_labels_follow_sorted_class_names(tmp_path):
    write_fake_imagenet(tmp_path / "images", num_classes=3, per_class=2)
    os.rename(tmp_path / "images" / "n00000000", tmp_path / "images" / "zebra")
    paths, labels, classes = list_image_folder(tmp_path / "images")
    assert classes == ["n00000001", "n00000002", "zebra"]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and paths[-1].parent.name == "zebra"


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    """Latents of a fake ImageNet (3 classes x 3 odd-sized images) by a tiny random autoencoder, extracted on two
    simulated devices in shards of 4."""
    root = tmp_path_factory.mktemp("extract")
    images = write_fake_imagenet(root / "images")
    vae = write_tiny_autoencoder(root / "vae")
    command = ["extract-latents", str(images), str(root / "latents"), "--autoencoder", str(vae), "--resolution", "32",
               "--batch-size", "4", "--shard-size", "4"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = cli(*command, env=env)
    assert result.returncode == 0, result.stderr
    return root, command, env, result


def test_extraction_stores_the_autoencoders_posterior_of_each_crop_and_flip(extraction):
    import diffusers
    import torch

    root, _, _, result = extraction
    assert "on 2 device(s)" in result.stderr and "images/s, ETA" in result.stderr
    manifest = json.loads((root / "latents" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_examples"] == 9
    assert manifest["shard_counts"] == [4, 4, 1] and manifest["latent_shape"] == [8, 8, 4]
    assert manifest["classes"] == ["n00000000", "n00000001", "n00000002"] and manifest["crop"] == "adm-center-crop"
    import hashlib
    weights = (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert manifest["autoencoder"]["sha256"] == hashlib.sha256(weights).hexdigest()
    source = LatentShards(root / "latents", resolution=32, autoencoder_sha256=manifest["autoencoder"]["sha256"])

    reference = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    paths, labels, _ = list_image_folder(root / "images")
    crops = np.stack([adm_center_crop(Image.open(p), 32) for p in paths]).astype(np.float32) / 127.5 - 1
    both = np.concatenate([crops, crops[:, :, ::-1]]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(np.ascontiguousarray(both))).latent_dist
    expected = np.concatenate([posterior.mean.numpy(), posterior.logvar.numpy()], axis=1).transpose(0, 2, 3, 1)
    expected = np.stack([expected[:9], expected[9:]], axis=1)
    stored = np.stack([source[i]["moments"] for i in range(9)])
    assert float(np.max(np.abs(stored - expected)) / np.max(np.abs(expected))) < 1e-4
    assert [int(source[i]["label"]) for i in range(9)] == labels.tolist()


def test_extraction_resumes_without_rewriting_and_refuses_other_inputs(extraction):
    root, command, env, _ = extraction
    latents = root / "latents"
    manifest = json.loads((latents / "manifest.json").read_text())
    kept = {p.name: p.stat().st_mtime_ns for p in latents.glob("*-00000.npy")}
    lost = np.load(latents / "moments-00001.npy")
    (latents / "moments-00001.npy").unlink()  # as a kill before shard 1 was whole leaves it
    (latents / "manifest.json").write_text(json.dumps({**manifest, "status": "extracting"}))
    result = cli(*command, env=env)
    assert result.returncode == 0, result.stderr
    assert "1 of 3 shards to do (4 images)" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in latents.glob("*-00000.npy")} == kept
    np.testing.assert_allclose(np.load(latents / "moments-00001.npy"), lost, rtol=1e-5, atol=1e-6)
    assert json.loads((latents / "manifest.json").read_text())["status"] == "complete"

    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(root / "images" / "n00000001" / "new.png")
    result = cli(*command, env=env)
    assert result.returncode == 2 and "holds an extraction of other inputs" in result.stderr
    assert "images_sha256" in result.stderr and "num_examples" in result.stderr
    (root / "images" / "n00000001" / "new.png").unlink()
