"""Official checkpoints: reading .pt files without torch, conversion, parity with a PyTorch DiT, export."""

import argparse
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.convert import (
    TorchFileError,
    dit_from_torch,
    dit_to_torch,
    official_state_dict_shapes,
    read_torch_file,
    save_torch_file,
)
from models.dit import DiT, DiTConfig, dit_config, sincos_position_embedding

torch = pytest.importorskip("torch")
from models.torch_dit import ReferenceDiT, randomize_  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _reference(seed=0, **overrides):
    return randomize_(ReferenceDiT(**{**SMALL, **overrides}), seed).eval()


def _inputs(n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, n)
    y = rng.integers(0, 10, n)
    y[n // 2:] = 10  # second half: null label, as guided sampling sends it
    return x, t, y


def _ours(model, fn, x, t, y, *args, **kwargs):
    out = getattr(model, fn)(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y), *args, **kwargs)
    return np.asarray(out).transpose(0, 3, 1, 2)


def _theirs(reference, fn, x, t, y, *args, **kwargs):
    with torch.no_grad():
        return getattr(reference, fn)(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y), *args,
                                      **kwargs).numpy()


@pytest.mark.parametrize("learn_sigma, scan_blocks", [(True, False), (False, False), (True, True)])
def test_forward_matches_pytorch_reference(learn_sigma, scan_blocks, tmp_path):
    reference = _reference(learn_sigma=learn_sigma)
    path = tmp_path / "dit.pt"
    torch.save(reference.state_dict(), path)
    model = dit_from_torch(path, num_heads=4, scan_blocks=scan_blocks)  # stacked: official block i is slice i
    assert model.config.learn_sigma == learn_sigma and model.config.num_classes == 10
    assert model.config.scan_blocks == scan_blocks
    x, t, y = _inputs()
    expected = _theirs(reference, "forward", x, t, y)
    assert np.abs(expected).max() > 0.1  # random weights: a non-trivial output
    np.testing.assert_allclose(_ours(model, "__call__", x, t, y), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("cfg_channels", [3, None])
def test_forward_with_cfg_matches_pytorch_reference(cfg_channels):
    reference = _reference(seed=1)
    model = dit_from_torch({k: v.numpy() for k, v in reference.state_dict().items()}, num_heads=4)
    x, t, y = _inputs()
    expected = _theirs(reference, "forward_with_cfg", x, t, y, 4.0, cfg_channels=cfg_channels)
    ours = _ours(model, "forward_with_cfg", x, t, y, 4.0, cfg_channels=cfg_channels)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_reading_pt_files_does_not_need_torch(tmp_path):
    state = {
        "float": torch.randn(3, 4),
        "transposed": torch.randn(4, 5).t(),  # non-contiguous strides
        "view": torch.arange(20, dtype=torch.float32)[5:15].view(2, 5),  # storage offset
        "half": torch.randn(7).half(),
        "bfloat": torch.randn(6).bfloat16(),
        "long": torch.arange(4),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "state.pt"
    torch.save(state, path)
    expected = {k: v.float().numpy() for k, v in state.items()}
    np.savez(tmp_path / "expected.npz", **expected)
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from models.convert import read_torch_file
state = read_torch_file({str(path)!r})
expected = np.load({str(tmp_path / "expected.npz")!r})
assert list(state) == {list(state)!r}
for k in expected.files:
    assert state[k].shape == expected[k].shape, k
    np.testing.assert_array_equal(state[k].astype(np.float32), expected[k])
assert str(state["bfloat"].dtype) == "bfloat16" and state["long"].dtype == np.int64
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_training_checkpoint_gives_ema_weights(tmp_path):
    ema, raw = _reference(seed=2), _reference(seed=3)
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S/2", global_batch_size=256)}, path)
    np.testing.assert_array_equal(read_torch_file(path)["blocks.0.attn.qkv.weight"],
                                  ema.state_dict()["blocks.0.attn.qkv.weight"].numpy())
    np.testing.assert_array_equal(read_torch_file(path, key="model")["blocks.0.attn.qkv.weight"],
                                  raw.state_dict()["blocks.0.attn.qkv.weight"].numpy())
    with pytest.raises(TorchFileError, match="no entry 'nope'"):
        read_torch_file(path, key="nope")


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"w": Exploit()}, protocol=4))
    with pytest.raises(TorchFileError, match="refusing to load global 'subprocess.call'"):
        read_torch_file(path)
    assert not marker.exists()


def test_corrupt_truncated_and_missing_files(tmp_path):
    path = tmp_path / "dit.pt"
    torch.save(_reference().state_dict(), path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match="truncated.pt"):
        read_torch_file(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 1000)
    with pytest.raises(TorchFileError, match="garbage.pt"):
        read_torch_file(garbage)
    with pytest.raises(FileNotFoundError, match="No PyTorch file"):
        read_torch_file(tmp_path / "absent.pt")


def test_state_dict_mismatches_are_named():
    state = {k: v.numpy() for k, v in _reference().state_dict().items()}
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(TorchFileError, match=r"missing \['blocks.1.mlp.fc2.bias'\]"):
        dit_from_torch(missing, num_heads=4)
    wrong = {**state, "blocks.0.attn.proj.weight": np.zeros((64, 63), np.float32)}
    with pytest.raises(TorchFileError, match=r"blocks.0.attn.proj.weight: \(64, 63\)"):
        dit_from_torch(wrong, num_heads=4)
    extra = {**state, "blocks.0.attn.q_norm.weight": np.zeros(16, np.float32)}
    with pytest.raises(TorchFileError, match="unexpected"):
        dit_from_torch(extra, num_heads=4)
    shifted = {**state, "pos_embed": state["pos_embed"] + 0.1}
    with pytest.raises(TorchFileError, match="pos_embed differs"):
        dit_from_torch(shifted, num_heads=4)
    with pytest.raises(ValueError, match="pass num_heads"):
        dit_from_torch(state)


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_export_round_trip_and_official_loading(scan_blocks, tmp_path):
    model = DiT(DiTConfig(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=16, num_classes=10,
                          scan_blocks=scan_blocks), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.02, p.shape), jnp.float32), params))
    path = tmp_path / "exported.pt"
    save_torch_file(dit_to_torch(model), path)

    reference = ReferenceDiT(**SMALL).eval()
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)  # official names and layouts
    x, t, y = _inputs(seed=5)
    ours = _ours(model, "__call__", x, t, y)
    np.testing.assert_allclose(_theirs(reference, "forward", x, t, y), ours, atol=2e-6, rtol=1e-5)

    reloaded = dit_from_torch(path, num_heads=4, scan_blocks=scan_blocks)
    assert reloaded.config == model.config
    np.testing.assert_array_equal(_ours(reloaded, "__call__", x, t, y), ours)


def test_official_xl2_names_and_shapes():
    shapes = official_state_dict_shapes(dit_config("XL/2"))
    with torch.device("meta"):
        reference = ReferenceDiT()  # DiT-XL/2 at 256px, without allocating its weights
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    # Spot checks against the official DiT-XL/2 checkpoint's state dict.
    assert len(shapes) == 1 + 6 + 1 + 28 * 10 + 4
    assert shapes["pos_embed"] == (1, 256, 1152)
    assert shapes["x_embedder.proj.weight"] == (1152, 4, 2, 2)
    assert shapes["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert shapes["blocks.27.attn.qkv.weight"] == (3456, 1152)
    assert shapes["blocks.0.adaLN_modulation.1.weight"] == (6912, 1152)
    assert shapes["final_layer.linear.weight"] == (32, 1152)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (2304, 1152)


def test_config_inference_from_standard_shapes():
    shapes = official_state_dict_shapes(dit_config("S/4", input_size=64))
    state = {k: np.zeros(v, np.float32) for k, v in shapes.items()}
    state["pos_embed"] = sincos_position_embedding(384, 16)[None]
    model = dit_from_torch(state)
    assert model.config == dit_config("S/4", input_size=64)


def test_only_adaln_zero_has_an_official_layout():
    with pytest.raises(ValueError, match="only for adaLN-Zero"):
        official_state_dict_shapes(dit_config("S/8", block="in-context"))


def test_the_pytorch_benchmark_peer_trains_on_the_projects_loss():
    from models.diffusion import GaussianDiffusion, linear_betas
    from scaling.benchmarks.compare import torch_training_loss

    reference = _reference()
    model = dit_from_torch({k: v.numpy() for k, v in reference.state_dict().items()}, num_heads=4)
    diffusion = GaussianDiffusion(linear_betas(1000))
    x, _, y = _inputs()
    x = np.clip(x / 2, -1, 1)  # latents in [-1, 1] with some at the ends, where the decoder NLL takes its edge bins
    t = np.array([0, 0, 1, 500, 998, 999])
    noise = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    def nhwc(a):
        return jnp.asarray(a.transpose(0, 2, 3, 1))

    ours = diffusion.training_losses(lambda x_t, tt: model(x_t, tt, jnp.asarray(y)), nhwc(x), jnp.asarray(t),
                                     nhwc(noise))["loss"].mean()
    with torch.no_grad():
        theirs = torch_training_loss(reference, diffusion)(*map(torch.from_numpy, (x, t, noise, y)))
    np.testing.assert_allclose(float(theirs), float(ours), rtol=1e-5)
