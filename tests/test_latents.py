"""ImageNet to latents: ADM's crop, the latent files and their refusals, extraction on two devices, resuming."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from run_helpers import cli, cli_on_hosts, write_fake_imagenet, write_tiny_autoencoder

from analysis.schema import FID_FEATURE_NETWORK
from scaling.cli import main
from scaling.latents import NPY_HEADER_READ, LatentShards, adm_center_crop, list_image_folder, write_latents


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


def test_latents_stream_each_example_with_one_range_read(storage_root, monkeypatch):
    from analysis import storage

    _write(storage_root, split="validation")
    written = _moments(25)
    reads = []
    read_range = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda *args: reads.append(args[2]) or read_range(*args))
    source = LatentShards(storage_root, split="validation")
    assert reads == [NPY_HEADER_READ] * 6  # opening reads the headers of 3 shards' two files, no more
    reads.clear()
    for i in (0, 9, 10, 24):
        np.testing.assert_array_equal(source[i]["moments"], written[i])
    assert reads == [written[0].nbytes] * 4  # one read of one row each
    assert source.labels.tolist() == (np.arange(25) % 3).tolist()

    cut = storage_root / "moments-00002.npy"  # cut short under a run that opened it
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(ValueError, match="Shard 2 .* ends before its example 4 .* extract the latents again"):
        source[24]
    with pytest.raises(ValueError, match="Shard 2 .* is missing or does not hold 5 examples"):
        LatentShards(storage_root, split="validation")


def test_latents_that_do_not_fit_the_config_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="extract-latents IMAGE_DIR OUT"):
        LatentShards(tmp_path / "nothing")
    _write(tmp_path / "ok")
    with pytest.raises(ValueError, match="of 32px images; the config trains at data.resolution=256"):
        LatentShards(tmp_path / "ok", resolution=256)
    with pytest.raises(ValueError, match="not the config's data.autoencoder"):
        LatentShards(tmp_path / "ok", autoencoder_sha256="cd" * 32)
    with pytest.raises(ValueError, match="holds the 'train' split, but data.validation_path names the 'validation' "
                                         "split: point it at latents extracted with --split validation"):
        LatentShards(tmp_path / "ok", split="validation", config_field="data.validation_path")
    with pytest.raises(FileNotFoundError, match="extract-latents IMAGE_DIR OUT --split validation.*"
                                                "--config.data.validation_path=OUT"):
        LatentShards(tmp_path / "nothing", split="validation", config_field="data.validation_path")
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "split"}))
    assert len(LatentShards(tmp_path / "ok")) == 25  # written before manifests named their split: training images
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


# -- images to FID: a latent run evaluated with FID during training, `sample`, `evaluate`, `figures` -------------

def _reference_batch(root):
    """An ADM reference batch of the fake ImageNet's crops, written by `dit-scaling reference`."""
    paths, _, _ = list_image_folder(root / "images")
    np.save(root / "crops.npy", np.stack([adm_center_crop(Image.open(p), 32) for p in paths]))
    assert main(["reference", str(root / "crops.npy"), str(root / "reference.npz"), "--batch-size", "16"]) == 0
    return root / "reference.npz"


@pytest.fixture(scope="module")
def latent_grid(extraction):
    """Three 32-step DiT runs on the extracted latents (S/8, S/4, S/2 one block of width 32: 1, 4 and 16 tokens),
    on two simulated devices, with FID-6 (sampled in a batch of 8, 2 rows of padding) at steps 16 and 32 and the
    held-out loss on latents of a validation folder (extracted with --split validation) every 2 steps: the compute
    of their curves overlaps, for isoFLOP profiles."""
    root, command, env, _ = extraction
    write_fake_imagenet(root / "val-images", per_class=2, seed=1)
    result = cli("extract-latents", str(root / "val-images"), str(root / "val-latents"), "--split", "validation",
                 *command[3:], env=env)
    assert result.returncode == 0, result.stderr
    reference = _reference_batch(root)
    overrides = [f"--config.data.path={root / 'latents'}", "--config.data.resolution=32",
                 f"--config.data.autoencoder={root / 'vae'}", f"--config.eval.reference={reference}",
                 "--config.eval.every=16", "--config.eval.num_samples=6", "--config.eval.batch_size=8",
                 "--config.eval.sampling_steps=[2]", "--config.train.steps=32", "--config.train.batch_size=4",
                 "--config.train.log_every=1", "--config.train.checkpoint_every=16", "--config.train.keep_every=0",
                 "--config.train.learning_rate=0.003", "--config.model.depth=1", "--config.model.hidden_size=32",
                 "--config.model.num_heads=1", f"--config.data.validation_path={root / 'val-latents'}",
                 "--config.eval.validation_examples=6", "--config.eval.validation_timesteps=4",
                 "--config.eval.validation_every=2"]
    result = cli("grid", "--config", "imagenet256", "--models", "S/8,S/4,S/2", "--workdir", str(root / "runs"),
                 *overrides, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    return root, root / "runs", reference, env, overrides


@pytest.fixture(scope="module")
def latent_run(latent_grid):
    """The S/4 run of `latent_grid`."""
    root, runs, reference, env, _ = latent_grid
    return root, runs / "DiT-S-4", reference, env


def test_latent_runs_record_fid_with_the_decoder_in_the_protocol(latent_run):
    root, run, reference, _ = latent_run
    evaluations = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    fids = [e for e in evaluations if e["metric"].startswith("FID")]
    assert [(e["step"], e["metric"]) for e in fids] == [(16, "FID-6"), (32, "FID-6")]
    assert all(np.isfinite(e["value"]) and e["value"] > 0 for e in fids)
    protocol = fids[0]["protocol"]
    assert protocol["reference"] == "reference.npz" and protocol["feature_network"] == FID_FEATURE_NETWORK
    assert protocol["decoder"].startswith("diffusion_pytorch_model.safetensors sha256:")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resolution"] == 32  # 8x8 latents x the KL-f4 autoencoder's 4


def test_latent_runs_record_the_held_out_loss_that_isoflop_and_loss_proxy_read(latent_grid, capsys):
    root, runs, _, env, _ = latent_grid
    assert json.loads((root / "val-latents" / "manifest.json").read_text())["split"] == "validation"
    for name in ("DiT-S-8", "DiT-S-4", "DiT-S-2"):
        evaluations = [json.loads(line) for line in (runs / name / "evaluations.jsonl").read_text().splitlines()]
        losses = [e for e in evaluations if e["metric"] == "val-loss-6"]
        assert [e["step"] for e in losses] == list(range(2, 33, 2))
        fingerprint = json.loads((root / "val-latents" / "manifest.json").read_text())["images_sha256"][:12]
        assert losses[0]["protocol"]["reference"] == f"latent_shards:val-latents@{fingerprint}[6 spread]"
        # The noise-prediction MSE of unit-variance noise: near 1 at the start (adaLN-Zero's output starts at 0),
        # falling as the model learns.
        assert 0.5 < losses[0]["value"] < 1.5 and losses[-1]["value"] < losses[0]["value"]
    capsys.readouterr()
    assert main(["isoflop", "--records", str(runs), "--metric", "val-loss-6", "--budgets", "3", "--json"]) == 0
    budgets = json.loads(capsys.readouterr().out)["budgets"]
    assert len(budgets) == 3 and all(b["configs"] == 3 and b["optimal_gflops"] > 0 for b in budgets)
    assert main(["loss-proxy", "--records", str(runs), "--json"]) == 0
    proxy = json.loads(capsys.readouterr().out)
    assert proxy["loss_metric"] == "val-loss-6" and proxy["metric"] == "FID-6" and proxy["n_points"] == 6


def test_the_held_out_loss_alone_needs_no_decoder_nor_reference(latent_grid, tmp_path, capsys):
    root, _, _, env, overrides = latent_grid
    alone = [o for o in overrides if not o.startswith(("--config.data.autoencoder", "--config.eval.reference",
                                                       "--config.eval.every"))]
    result = cli("train", "--config", "imagenet256:S/8", "--workdir", str(tmp_path / "run"), *alone,
                 "--config.eval.every=0", env=env)
    assert result.returncode == 0, result.stderr
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    assert [(e["step"], e["metric"]) for e in evaluations] == [(s, "val-loss-6") for s in range(2, 33, 2)]
    # The same model, data and noise as the grid's S/8 run: the same held-out losses.
    grid = [json.loads(line) for line in (root / "runs" / "DiT-S-8" / "evaluations.jsonl").read_text().splitlines()]
    assert [e["value"] for e in evaluations] == pytest.approx(
        [e["value"] for e in grid if e["metric"] == "val-loss-6"], rel=1e-5)

    # Each mismatch stops the run before it trains (in this process: it fails before compiling anything).
    no_path = [o for o in alone if not o.startswith("--config.data.validation_path")]
    for case, (validation_path, error) in enumerate((
            (f"={tmp_path / 'nowhere'}", "extract-latents IMAGE_DIR OUT --split validation"),
            (f"={root / 'latents'}", "holds the 'train' split, but data.validation_path"),
            (None, "needs data.validation_path"))):
        workdir = tmp_path / f"refused-{case}"
        extra = [] if validation_path is None else [f"--config.data.validation_path{validation_path}"]
        assert main(["train", "--config", "imagenet256:S/8", "--workdir", str(workdir), *no_path, *extra,
                     "--config.eval.every=0"]) == 2
        assert error in capsys.readouterr().err
        assert not (workdir / "records.jsonl").exists()


def test_sample_writes_an_adm_batch_that_resumes_after_a_kill_to_the_same_images(latent_run, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from run_helpers import REPO, environment

    root, run, _, env = latent_run
    command = ["sample", str(run), "--num", "48", "--sampling-steps", "2", "--batch-size", "4",
               "--chunk-batches", "1", "--seed", "3"]
    whole = cli(*command, "--out", str(tmp_path / "whole.npz"), env=env)
    assert whole.returncode == 0, whole.stderr
    assert "images/s, ETA" in whole.stderr

    killed_out = tmp_path / "killed.npz"
    process = subprocess.Popen([sys.executable, "-m", "scaling.cli", *command, "--out", str(killed_out)], cwd=REPO,
                               env=environment(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = tmp_path / "killed.npz.chunks"
    while not (chunks / "chunk-00001.npz").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not killed_out.exists() and 2 <= len(list(chunks.glob("chunk-*.npz"))) < 12
    resumed = cli(*command, "--out", str(killed_out), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert " of 12 chunks to do" in resumed.stderr and "12 of 12" not in resumed.stderr
    again = cli(*command, "--out", str(killed_out), env=env)
    assert again.returncode == 0 and "is complete (48 images with these settings)" in again.stderr

    with np.load(tmp_path / "whole.npz") as a, np.load(killed_out) as b:
        assert a["arr_0"].shape == (48, 32, 32, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        assert np.bincount(a["arr_1"]).tolist() == [16, 16, 16]  # class-balanced
    protocol = json.loads((tmp_path / "whole.json").read_text())
    assert protocol["step"] == 32 and protocol["sampling_steps"] == 2 and protocol["decoder"].startswith("diffusion")
    assert not chunks.exists()


def test_evaluate_and_figures_on_sampled_images(latent_run, tmp_path, capsys):
    root, run, reference, env = latent_run
    result = cli("sample", str(run), "--out", str(tmp_path / "s.npz"), "--num", "8", "--sampling-steps", "2",
                 "--batch-size", "4", "--step", "16", env=env)
    assert result.returncode == 0, result.stderr
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "s.npz"), "--ref", str(reference), "--run", str(run), "--json",
                 "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    last = json.loads((run / "evaluations.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 16 and last["metric"] == "FID-8"  # the step and protocol from the sidecar
    assert last["protocol"]["sampling_steps"] == 2 and last["protocol"]["decoder"].startswith("diffusion")
    printed = json.loads(out[out.index("{"):])
    assert last["value"] == printed["fid"] and printed["n"] == 8
    assert main(["figures", str(root / "runs"), "--out", str(tmp_path / "figures")]) == 0
    assert "wrote" in capsys.readouterr().out


def test_sampling_an_official_checkpoint_decodes_with_the_given_autoencoder(extraction, tmp_path):
    from flax import nnx

    from models.convert import dit_to_torch, save_torch_file
    from models.dit import DiT, dit_config

    root, _, env, _ = extraction
    model = DiT(dit_config("S/4", input_size=8, num_classes=3, depth=1, hidden_size=32, num_heads=1),
                rngs=nnx.Rngs(0))
    save_torch_file(dit_to_torch(model), tmp_path / "official.pt")
    result = cli("sample", str(tmp_path / "official.pt"), "--out", str(tmp_path / "o.npz"), "--num", "4",
                 "--sampling-steps", "2", "--batch-size", "4", "--num-heads", "1", env=env)
    assert result.returncode != 0 and "give --autoencoder" in result.stderr
    result = cli("sample", str(tmp_path / "official.pt"), "--out", str(tmp_path / "o.npz"), "--num", "4",
                 "--sampling-steps", "2", "--batch-size", "4", "--guidance-scale", "1.5", "--num-heads", "1",
                 "--autoencoder", str(root / "vae"), env=env)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "o.npz") as batch:
        assert batch["arr_0"].shape == (4, 32, 32, 3)
    assert json.loads((tmp_path / "o.json").read_text())["guidance_channels"] == 3


def test_sweep_scores_kept_checkpoints_once_per_protocol(latent_run, tmp_path):
    root, run, reference, env = latent_run
    sampling = ["--num", "8", "--batch-size", "4", "--seed", "5"]
    result = cli("sample", str(run), "--out", str(tmp_path / "s.npz"), "--sampling-steps", "3", "--step", "32",
                 *sampling, env=env)
    assert result.returncode == 0, result.stderr
    assert main(["evaluate", str(tmp_path / "s.npz"), "--ref", str(reference), "--run", str(run)]) == 0
    before = (run / "evaluations.jsonl").read_text().splitlines()

    command = ["sweep", str(run), "--ref", str(reference), "--steps", "16,32", "--sampling-steps", "3", *sampling,
               "--samples-dir", str(tmp_path / "sweep")]
    result = cli(*command, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    new = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()[len(before):]]
    # (32, 3) is the batch `evaluate --run` recorded above, with the protocol `sample` wrote beside it: not redone.
    assert [(r["step"], r["protocol"]["sampling_steps"]) for r in new] == [(16, 3)]
    assert "step 32, ddpm 3 steps: recorded already" in result.stderr
    assert all(r["metric"] == "FID-8" and r["protocol"]["seed"] == 5 and r["precision"] is not None for r in new)
    again = cli(*command, env=env)
    assert again.returncode == 0 and "0 new evaluation record(s)" in again.stdout
    assert len((run / "evaluations.jsonl").read_text().splitlines()) == len(before) + 1
    missing = cli("sweep", str(run), "--ref", str(reference), "--steps", "3", env=env)
    assert missing.returncode == 2 and "keeps no checkpoint at steps [3]" in missing.stderr


def test_extraction_and_sampling_on_two_hosts_match_one_host(extraction, latent_run, tmp_path):
    root, command, _, _ = extraction
    out = tmp_path / "latents"
    hosts = cli_on_hosts(*command[:2], str(out), *command[3:])
    assert all(code == 0 for code, _, _ in hosts), hosts[0][2][-3000:] + hosts[1][2][-3000:]
    # Host h takes shards h, h + 2, ...: the three shards split two and one.
    assert "host 0/2: 2 of 3 shards to do (5 images)" in hosts[0][2]
    assert "host 1/2: 1 of 3 shards to do (4 images)" in hosts[1][2]
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    for shard in range(3):
        for kind in ("moments", "labels"):
            np.testing.assert_allclose(np.load(out / f"{kind}-{shard:05d}.npy"),
                                       np.load(root / "latents" / f"{kind}-{shard:05d}.npy"), rtol=1e-5, atol=1e-6)

    _, run, _, env = latent_run  # one host with two devices, against two hosts with one each
    sampling = ["sample", str(run), "--num", "12", "--sampling-steps", "2", "--batch-size", "4", "--chunk-batches",
                "1", "--seed", "7"]
    one = cli(*sampling, "--out", str(tmp_path / "one.npz"), env=env)
    assert one.returncode == 0, one.stderr
    hosts = cli_on_hosts(*sampling, "--out", str(tmp_path / "two.npz"))
    assert all(code == 0 for code, _, _ in hosts), hosts[0][2][-3000:] + hosts[1][2][-3000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert json.loads((tmp_path / "two.json").read_text()) == json.loads((tmp_path / "one.json").read_text())


def test_fid_in_training_on_two_hosts_of_two_devices_matches_one_host(latent_grid, tmp_path):
    """The last step's FID of a run, evaluated again on 2 processes x 2 devices (each host samples, decodes and
    scores its own share, the second host's half of the batch holding the padding; the hosts exchange pool
    features), against what 1 process of 2 devices recorded."""
    import shutil

    _, runs, _, _, overrides = latent_grid
    run = tmp_path / "DiT-S-4"
    shutil.copytree(runs / "DiT-S-4", run)

    def in_training(records):  # other tests add records of other protocols (sweeps, `evaluate --run`)
        return [r for r in records if (r["step"], r["metric"], r["protocol"]["sampling_steps"], r["protocol"]["seed"])
                == (32, "FID-6", 2, 0)]

    records = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    [one_host] = in_training(records)
    (run / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r is not one_host))
    hosts = cli_on_hosts("train", "--config", "imagenet256:S/4", "--workdir", str(run), *overrides,
                         env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=600)
    assert all(code == 0 for code, _, _ in hosts), hosts[0][2][-3000:] + hosts[1][2][-3000:]
    [two_hosts] = in_training([json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()])
    assert two_hosts["protocol"] == one_host["protocol"]
    assert two_hosts["value"] == pytest.approx(one_host["value"], rel=1e-4)
