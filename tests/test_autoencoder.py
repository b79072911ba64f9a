"""The SD autoencoder: parity with diffusers' PyTorch AutoencoderKL, the published file layouts, bad files."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.autoencoder import (
    LEGACY_ATTENTION_NAMES,
    AutoencoderConfig,
    diffusers_state_shapes,
    load_autoencoder,
    sample_posterior,
)
from models.convert import TorchFileError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Three resolutions (f = 4), two layers per block, the mid-block attention: every kind of layer of KL-f8.
TINY = dict(block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=8, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)


def _relative_error(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A diffusers AutoencoderKL with random weights (norms perturbed from their 1/0 init), saved as diffusers
    does (.safetensors folder) and as a legacy .bin with the old attention names."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    legacy = tmp_path_factory.mktemp("legacy")
    renamed = {}
    for name, tensor in model.state_dict().items():
        for old, new in LEGACY_ATTENTION_NAMES.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = tensor
    torch.save(renamed, legacy / "diffusion_pytorch_model.bin")
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    return model, folder, legacy


def _torch_outputs(model, images_NCHW, latents_NCHW):
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images_NCHW)).latent_dist
        decoded = model.decode(torch.from_numpy(latents_NCHW)).sample
    return posterior.mean.numpy(), posterior.logvar.numpy(), decoded.numpy()


@pytest.mark.parametrize("layout", ["safetensors", "legacy-bin"])
def test_encode_and_decode_match_diffusers(reference, layout):
    model, folder, legacy = reference
    vae = load_autoencoder(folder if layout == "safetensors" else legacy / "diffusion_pytorch_model.bin")
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)  # not square: catches a swapped H/W
    latents = rng.standard_normal((2, 4, 6, 10)).astype(np.float32)
    mean, logvar, decoded = _torch_outputs(model, images, latents)
    our_mean, our_logvar = vae.encode(jnp.asarray(images.transpose(0, 2, 3, 1)))
    our_decoded = vae.decode(jnp.asarray(latents.transpose(0, 2, 3, 1)))
    assert our_mean.shape == (2, 6, 10, 4) and our_decoded.shape == (2, 24, 40, 3)
    assert _relative_error(np.transpose(our_mean, (0, 3, 1, 2)), mean) < 1e-4
    assert _relative_error(np.transpose(our_logvar, (0, 3, 1, 2)), logvar) < 1e-4
    assert _relative_error(np.transpose(our_decoded, (0, 3, 1, 2)), decoded) < 1e-4
    assert vae.config.scaling_factor == pytest.approx(0.18215) and vae.config.downsample == 4


def test_bfloat16_decoding_stays_close_to_float32(reference):
    _, folder, _ = reference
    latents = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 4)), jnp.float32)
    full = load_autoencoder(folder).decode(latents)
    fast = load_autoencoder(folder, dtype="bfloat16").decode(latents)
    assert fast.dtype == jnp.float32
    assert 1e-4 < _relative_error(fast, np.asarray(full)) < 3e-2  # bf16 really ran, and stays close


def test_posterior_samples_have_the_posterior_moments():
    mean = jnp.full((4000, 2, 2, 4), 0.5)
    logvar = jnp.full_like(mean, math.log(0.25))
    draws = np.asarray(sample_posterior(mean, logvar, jax.random.key(0)))
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.std() - 0.5) < 0.01


def test_published_config_has_the_real_tensor_list():
    """The KL-f8 architecture assumed without a config.json is diffusers' sd-vae-ft-ema, tensor for tensor."""
    published = diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                                        down_block_types=["DownEncoderBlock2D"] * 4,
                                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                                        norm_num_groups=32)
    theirs = {name: tuple(t.shape) for name, t in published.state_dict().items()}
    ours = diffusers_state_shapes(AutoencoderConfig())
    assert ours == theirs
    assert len(ours) == 248 and sum(math.prod(s) for s in ours.values()) == 83_653_863


def test_file_without_config_is_checked_against_the_published_model(reference, tmp_path):
    _, folder, _ = reference
    lone = tmp_path / "vae.safetensors"
    lone.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(TorchFileError, match=r"published KL-f8 config.*248 tensors \(83,653,863 parameters\)"):
        load_autoencoder(lone)


def test_bad_files_are_refused_with_the_reason(reference, tmp_path):
    model, folder, _ = reference
    state = model.state_dict()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    torch.save({k: v for k, v in state.items() if "quant_conv" not in k}, broken / "diffusion_pytorch_model.bin")
    with pytest.raises(TorchFileError, match="missing.*quant_conv"):
        load_autoencoder(broken)
    reshaped = dict(state, **{"decoder.conv_in.bias": torch.zeros(3)})
    torch.save(reshaped, broken / "diffusion_pytorch_model.bin")
    with pytest.raises(TorchFileError, match=r"wrong shapes.*decoder.conv_in.bias: \(3,\)"):
        load_autoencoder(broken)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    (truncated / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match="truncated or corrupt"):
        load_autoencoder(truncated)

    with pytest.raises(FileNotFoundError, match="No autoencoder weights"):
        load_autoencoder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, shift_factor=0.1159)))
    with pytest.raises(ValueError, match="shift_factor=0.1159; only the KL-f8 family"):
        load_autoencoder(broken)
