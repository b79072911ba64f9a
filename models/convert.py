"""Weight files (PyTorch .pt/.bin, .safetensors) and official PyTorch DiT checkpoints <-> this package's Flax DiT.

`dit_from_torch(source)` builds a DiT from an official state dict (a .pt path or a mapping of official key names
to arrays); `dit_to_torch(model)` returns the official state dict of one of our models, and
`save_torch_file` writes it so the official sampling scripts load it.

PyTorch files are read without executing code from them: the zip format that torch.save has written since
PyTorch 1.6 is parsed here with a restricted unpickler that builds numpy arrays and refuses every global outside
a short allow-list, so torch is not needed. Other formats fall back to torch.load(weights_only=True) when torch
is installed. `read_safetensors` parses .safetensors files (a JSON header and raw tensors) without the
safetensors package; `read_weights` picks the reader by file name. Every loader checks the exact set of tensor
names and their shapes.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from models.dit import DIT_SIZES, DiT, DiTConfig, abstract_dit, sincos_position_embedding

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

TRAINING_CHECKPOINT_KEYS = ("ema", "model")  # official train.py saves {"model", "ema", "opt", "args"}


class TorchFileError(ValueError):
    """A PyTorch file that cannot be read as a tensor state dict."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    size, stride = tuple(size), tuple(stride)
    if any(s < 0 for s in stride):
        raise TorchFileError("tensor with negative strides")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else -1
    if last >= storage.size:
        raise TorchFileError(f"tensor of shape {size} reaches past its storage of {storage.size} elements "
                             "(truncated or corrupt file)")
    if not all(size):
        return np.zeros(size, storage.dtype)
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=[s * storage.itemsize for s in stride])
    return np.array(view)


def _rebuild_parameter(data, _requires_grad, _backward_hooks, *_unused):
    return data


_SCRIPT_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")


class ScriptModule(types.SimpleNamespace):
    """A module object of a TorchScript archive, reduced to its attributes (tensors, submodules, flags)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles torch.save's data.pkl into numpy arrays; refuses any global that is not plain tensor data.
    With `script_modules`, the `__torch__.*` module classes of a TorchScript archive become `ScriptModule`s
    (their code is never run)."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("argparse", "Namespace"): types.SimpleNamespace,  # the args saved in official training checkpoints
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, script_modules: bool):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._script_modules = script_modules
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if self._script_modules and module.startswith("__torch__."):
            return ScriptModule
        if self._script_modules and module == "torch.jit._pickle" and name in _SCRIPT_LIST_BUILDERS:
            return list
        raise TorchFileError(f"refusing to load global '{module}.{name}': the file holds more than tensors and "
                             "plain containers. Re-save it as a state dict (torch.save(model.state_dict(), path)).")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"unsupported persistent record {pid[:2]!r}")
        if key not in self._storages:
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError as e:
                raise TorchFileError(f"storage {key} is missing from the archive (truncated file)") from e
            if len(raw) < numel * dtype.itemsize:
                raise TorchFileError(f"storage {key} holds {len(raw)} bytes, expected {numel * dtype.itemsize}")
            self._storages[key] = np.frombuffer(raw, dtype, count=numel).astype(storage_type.dtype, copy=False)
        return self._storages[key]


def _read_zip(path: str, script_modules: bool = False) -> object:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchFileError("not a torch.save archive (expected exactly one <name>/data.pkl)")
        prefix = pickles[0].split("/")[0]
        names = set(archive.namelist())
        byteorder = archive.read(f"{prefix}/byteorder").decode().strip() if f"{prefix}/byteorder" in names \
            else "little"
        data = archive.read(pickles[0])
        return _RestrictedUnpickler(io.BytesIO(data), archive, prefix, byteorder, script_modules).load()


def _reading(path: str, read):
    """read(), with every failure reported as a TorchFileError that names the file."""
    try:
        return read()
    except TorchFileError as e:
        raise TorchFileError(f"Cannot read {path}: {e}") from e
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise TorchFileError(f"Cannot read {path}: the file is corrupt or truncated ({e}).") from e


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor attribute of a TorchScript archive (torch.jit.save) as {dotted.module.path: numpy array},
    read without torch and without running the archive's code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No TorchScript file at {path}.")
    root = _reading(path, lambda: _read_zip(path, script_modules=True))
    if not isinstance(root, ScriptModule):
        raise TorchFileError(f"{path} is not a TorchScript module archive.")
    tensors = {}

    def collect(module: ScriptModule, prefix: str):
        for name, value in vars(module).items():
            if isinstance(value, np.ndarray):
                tensors[prefix + name] = value
            elif isinstance(value, ScriptModule):
                collect(value, f"{prefix}{name}.")

    collect(root, "")
    return tensors


def _read_with_torch(path: str) -> object:
    try:
        import torch
    except ImportError as e:
        raise TorchFileError(
            f"{path} is not a zip-format PyTorch file (legacy format?), and reading other formats needs torch: "
            "pip install 'dit-scaling[torch]', or re-save the file with a current torch.save."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise TorchFileError(f"torch cannot read it either: the file is corrupt or truncated ({e})") from e

    def to_numpy(value):
        if isinstance(value, torch.Tensor):
            value = value.detach()
            return value.float().numpy().astype(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16 \
                else value.numpy()
        if isinstance(value, Mapping):
            return OrderedDict((k, to_numpy(v)) for k, v in value.items())
        return value

    return to_numpy(obj)


def read_torch_file(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file into {name: numpy array} without executing code from it.

    Official training checkpoints ({"model", "ema", "opt", "args"}) give their "ema" weights unless `key` names
    another entry.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No PyTorch file at {path}.")
    def read():
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        if _starts_like_zip(path):
            raise TorchFileError("a zip archive without its central directory: the file is truncated or corrupt")
        return _read_with_torch(path)

    obj = _reading(path, read)
    if not isinstance(obj, Mapping):
        raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    if key is None and not _is_state_dict(obj):
        key = next((k for k in TRAINING_CHECKPOINT_KEYS if k in obj), None)
    if key is not None:
        if key not in obj:
            raise TorchFileError(f"{path} has no entry {key!r}; its entries are {sorted(obj)}.")
        obj = obj[key]
    if not _is_state_dict(obj):
        raise TorchFileError(f"{path} is not a state dict of tensors (entries: {sorted(obj)[:10]}).")
    return OrderedDict(obj)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a .safetensors file (an 8-byte header length, a JSON header, then raw little-endian tensors) into
    {name: numpy array}, checking that every tensor lies inside the file and matches its declared size."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No safetensors file at {path}.")
    data = np.memmap(path, np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)

    def fail(problem: str):
        raise TorchFileError(f"Cannot read {path} as safetensors: {problem}.")

    if data.size < 8:
        fail("shorter than its 8-byte header length (truncated or not a safetensors file)")
    header_size = int.from_bytes(bytes(data[:8]), "little")
    if header_size > data.size - 8:
        fail(f"its header claims {header_size} bytes but the file has {data.size - 8} after the length "
             "(truncated or not a safetensors file)")
    try:
        header = json.loads(bytes(data[8: 8 + header_size]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"its header is not JSON ({e})")
    body = data[8 + header_size:]
    tensors = OrderedDict()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in _SAFETENSORS_DTYPES:
            fail(f"tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        if not 0 <= begin <= end <= body.size or end - begin != math.prod(shape) * dtype.itemsize:
            fail(f"tensor {name!r} ({entry['dtype']} {list(shape)}) spans bytes {begin}..{end} of a "
                 f"{body.size}-byte body (truncated or corrupt file)")
        tensors[name] = np.frombuffer(body[begin:end], dtype).reshape(shape).astype(dtype.newbyteorder("="))
    return tensors


def read_weights(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
    """A weight file as {name: numpy array}: .safetensors by its format, anything else as a PyTorch file."""
    if os.fspath(path).endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_file(path, key=key)


def state_dict_problems(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple], shown: int) -> str:
    """How a state dict differs from the expected names and shapes (its first `shown` missing, unexpected and
    mis-shaped tensors), or "" when it matches exactly."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"missing {missing[:shown]}" if missing else "",
                f"unexpected {unexpected[:shown]}" if unexpected else "",
                f"wrong shapes {wrong[:shown]}" if wrong else ""]
    return "; ".join(p for p in problems if p)


def _starts_like_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


# ----------------------------------------------------------------------------------------------------------------
# Name and layout mapping
# ----------------------------------------------------------------------------------------------------------------

# Each entry: official module prefix -> (our module path, layer kind, block index). Kinds: "linear" (torch weight is
# [out, in], ours [in, out]), "conv" (OIHW vs HWIO), "embed" (same layout). With scan_blocks our blocks are stacked:
# official block i is slice i of the leading axis of every array under "blocks"; the block index is None elsewhere.
def _module_map(config: DiTConfig) -> list[tuple[str, tuple, str, int | None]]:
    modules = [
        ("x_embedder.proj", ("patch_embed",), "conv", None),
        ("t_embedder.mlp.0", ("t_embedder", "fc1"), "linear", None),
        ("t_embedder.mlp.2", ("t_embedder", "fc2"), "linear", None),
        ("y_embedder.embedding_table", ("y_embedder", "table"), "embed", None),
    ]
    for i in range(config.depth):
        for official, ours in (("attn.qkv", ("attn", "qkv")), ("attn.proj", ("attn", "proj")),
                               ("mlp.fc1", ("mlp", "fc1")), ("mlp.fc2", ("mlp", "fc2")),
                               ("adaLN_modulation.1", ("modulation",))):
            if config.scan_blocks:
                modules.append((f"blocks.{i}.{official}", ("blocks", *ours), "linear", i))
            else:
                modules.append((f"blocks.{i}.{official}", ("blocks", i, *ours), "linear", None))
    modules += [
        ("final_layer.linear", ("final_layer", "linear"), "linear", None),
        ("final_layer.adaLN_modulation.1", ("final_layer", "modulation"), "linear", None),
    ]
    return modules


def _tensor_map(config: DiTConfig) -> dict[str, tuple[tuple, str, int | None]]:
    """Official tensor name -> (our state path, transform, block index or None)."""
    tensors = {}
    for official, ours, kind, block in _module_map(config):
        if kind == "embed":
            tensors[f"{official}.weight"] = ((*ours, "embedding"), "none", block)
        else:
            tensors[f"{official}.weight"] = ((*ours, "kernel"), kind, block)
            tensors[f"{official}.bias"] = ((*ours, "bias"), "none", block)
    return tensors


# Our layout's axes as a permutation of the official layout's: [out, in] -> [in, out]; OIHW -> HWIO.
_OUR_AXES = {"linear": (1, 0), "conv": (2, 3, 1, 0), "none": None}


def _to_ours(array: np.ndarray, transform: str) -> np.ndarray:
    axes = _OUR_AXES[transform]
    return array if axes is None else array.transpose(axes)


def _to_official(array: np.ndarray, transform: str) -> np.ndarray:
    axes = _OUR_AXES[transform]
    return array if axes is None else array.transpose(np.argsort(axes))


def _official_shape(our_shape: tuple, transform: str) -> tuple:
    axes = _OUR_AXES[transform]
    return our_shape if axes is None else tuple(our_shape[i] for i in np.argsort(axes))


def official_state_dict_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the official state dict for an adaLN-Zero config (pos_embed included)."""
    _require_official_block(config)
    our_state = dict(nnx.to_flat_state(nnx.state(abstract_dit(config), nnx.Param)))
    shapes = {"pos_embed": (1, config.num_tokens, config.hidden_size)}
    for name, (path, transform, block) in _tensor_map(config).items():
        our_shape = tuple(our_state[path].shape)
        shapes[name] = _official_shape(our_shape if block is None else our_shape[1:], transform)
    return shapes


def _require_official_block(config: DiTConfig) -> None:
    if config.block != "adaLN-Zero":
        raise ValueError(f"The official checkpoint layout exists only for adaLN-Zero DiTs, not {config.block!r}.")


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


def _infer_config(state: Mapping[str, np.ndarray], num_heads: int | None, input_size: int | None,
                  scan_blocks: bool) -> DiTConfig:
    def shape(name):
        if name not in state:
            raise TorchFileError(f"missing tensor {name!r}: this is not an official DiT state dict.")
        return state[name].shape

    hidden, in_channels, patch, _ = shape("x_embedder.proj.weight")
    depth = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    num_classes = shape("y_embedder.embedding_table.weight")[0] - 1
    out_channels = shape("final_layer.linear.weight")[0] // patch**2
    if out_channels not in (in_channels, 2 * in_channels):
        raise TorchFileError(f"final_layer.linear has {out_channels} output channels per pixel; expected "
                             f"{in_channels} or {2 * in_channels}.")
    mlp_ratio = shape("blocks.0.mlp.fc1.weight")[0] / hidden
    if input_size is None:
        if "pos_embed" not in state:
            raise TorchFileError("the state dict has no pos_embed, so the input size is unknown: pass input_size.")
        tokens = shape("pos_embed")[1]
        input_size = int(round(tokens**0.5)) * patch
    if num_heads is None:
        standard = {(d, w): h for d, w, h in DIT_SIZES.values()}
        if (depth, hidden) not in standard:
            raise ValueError(f"A DiT of depth {depth} and width {hidden} is not a standard config, so its head "
                             "count cannot be inferred: pass num_heads.")
        num_heads = standard[(depth, hidden)]
    return DiTConfig(depth=depth, hidden_size=hidden, num_heads=num_heads, patch_size=patch, input_size=input_size,
                     in_channels=in_channels, num_classes=num_classes, learn_sigma=out_channels == 2 * in_channels,
                     mlp_ratio=mlp_ratio, scan_blocks=scan_blocks)


def dit_from_torch(source: str | os.PathLike | Mapping[str, np.ndarray], num_heads: int | None = None, *,
                   input_size: int | None = None, key: str | None = None, scan_blocks: bool = False) -> DiT:
    """A DiT (adaLN-Zero) carrying the weights of an official PyTorch state dict.

    `source` is a .pt/.pth path (read without torch when it is a zip-format file; `key` picks an entry of a
    training checkpoint, default "ema") or a mapping from official key names to arrays. Depth, width, patch size,
    input size (from pos_embed, or `input_size`), channels, classes and learned sigma are inferred from the
    shapes; num_heads from the argument or from the standard config of that depth and width. `scan_blocks`
    stacks the blocks for a scan (see DiTConfig).
    """
    state = read_torch_file(source, key=key) if isinstance(source, str | os.PathLike) else source
    state = {k: np.asarray(v) for k, v in state.items()}
    config = _infer_config(state, num_heads, input_size, scan_blocks)
    expected = official_state_dict_shapes(config)
    if input_size is not None and "pos_embed" not in state:
        expected.pop("pos_embed")
    problems = state_dict_problems(state, expected, shown=8)
    if problems:
        raise TorchFileError(f"State dict does not match an official {config.name} at input size "
                             f"{config.input_size}: {problems}")
    if "pos_embed" in state:
        fixed = sincos_position_embedding(config.hidden_size, config.grid_size)
        error = float(np.max(np.abs(state["pos_embed"].reshape(fixed.shape).astype(np.float64) - fixed)))
        if error > 1e-5:
            raise TorchFileError(f"pos_embed differs from the fixed 2-D sin-cos embedding by {error:.2e}; this "
                                 "model uses the fixed embedding, so these weights would not reproduce.")

    graphdef, abstract_state = nnx.split(abstract_dit(config))
    flat = dict(nnx.to_flat_state(abstract_state))
    arrays = {}  # our path -> the array, or (stacked blocks) the list of per-block arrays in block order
    for name, (path, transform, block) in _tensor_map(config).items():
        ours = _to_ours(state[name], transform).astype(np.float32)
        if block is None:
            arrays[path] = ours
        else:
            arrays.setdefault(path, []).append(ours)
    for path, array in arrays.items():
        flat[path] = flat[path].replace(jnp.asarray(np.stack(array) if isinstance(array, list) else array))
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def dit_to_torch(model: DiT) -> OrderedDict[str, np.ndarray]:
    """The official state dict (names and PyTorch layouts, float32 numpy) of an adaLN-Zero DiT."""
    config = model.config
    _require_official_block(config)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    state = OrderedDict(pos_embed=sincos_position_embedding(config.hidden_size, config.grid_size)[None].copy())
    for name, (path, transform, block) in _tensor_map(config).items():
        ours = np.asarray(flat[path][...], np.float32)
        state[name] = np.ascontiguousarray(_to_official(ours if block is None else ours[block], transform))
    return state


def save_torch_file(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """torch.save a {name: array} state dict (what the official scripts load). Needs torch."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("Writing .pt files needs torch: pip install 'dit-scaling[torch]'.") from e
    torch.save(OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items()), path)
