"""New architectures trained, counted, sampled and evaluated exactly as DiT is: a model factory plugged in by name.

A factory is named "path/to/file.py:build" or "package.module:build": a function

    build(*, input_size, in_channels, num_classes, learn_sigma, rngs, **family_args) -> nnx.Module

whose module is called as `model(x, t, y, dropout_key=None)`: x the noisy input [N, H, W, C] (NHWC), t integer
timesteps [N], y integer labels [N] with `num_classes` as the null label (the module replaces labels by it at
random when given a dropout key, for classifier-free guidance). It returns [N, H, W, 2C] under learned sigma
(eps, then the variance interpolation values), else [N, H, W, C]. Guidance, compute counting (`models.flops`),
parameters, checkpoints, sampling and evaluation are the toolkit's, for any such module. A factory that also
takes `dtype` gets the run's compute dtype (model.dtype, "auto" resolved), and one that takes
`class_dropout_prob` gets the recipe's (model.class_dropout_prob).

Build the module from models/ops.py (`ops.Linear` for linear layers, `ops.attention` for attention,
`ops.apply_layers` for the stack of blocks), as DiT and models/modern_dit.py do: a comparison then measures the
architectures, not the kernels under them (the compute dtype's mixed-precision products and their gradients, the
attention backend chosen per device, the CPU workarounds). Plain flax layers work too, but run on other kernels.

`FactoryConfig` is to a plugged-in model what `DiTConfig` is to a DiT: hashable, stored in the run's manifest
(with the SHA-256 of the factory's source file), and the argument of `build_model`, `abstract_model` and
`models.flops.model_compute`, which take either kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.dit import COMPUTE_DTYPES, DiT, DiTConfig, abstract_module

CONTRACT_ARGUMENTS = ("input_size", "in_channels", "num_classes", "learn_sigma", "rngs")
RECIPE_ARGUMENTS = ("dtype", "class_dropout_prob")  # passed where the factory accepts them
CALL_SIGNATURE = "model(x, t, y, dropout_key=None)"


class FactoryError(ValueError):
    """A model factory that cannot be loaded or breaks the contract of the module docstring."""


@dataclasses.dataclass(frozen=True)
class FactoryConfig:
    """A plugged-in model: its factory, the data shape it is built for and the family's arguments of one size."""

    factory: str  # "path/to/file.py:build" or "package.module:build"
    family: str  # the family's name in model names, run directories and records, e.g. "ModernDiT"
    size: str  # the member of the family, e.g. "S/4"
    input_size: int
    in_channels: int
    num_classes: int
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    dtype: str = "float32"
    args: tuple = ()  # the family's keyword arguments as sorted (name, value) pairs (hashable, for caches)
    source_sha256: str = ""  # of the factory's source file, when the run started

    def __post_init__(self):
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}.")
        for field in ("input_size", "in_channels", "num_classes"):
            value = getattr(self, field)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FactoryConfig.{field} must be a positive integer, got {value!r}.")

    @classmethod
    def of(cls, factory: str, *, family: str = "", size: str = "", args: dict | None = None,
           **fields) -> FactoryConfig:
        """The config of `factory` with `args` as a dict; family defaults to the factory's module name."""
        family = family or factory_module_name(factory)
        return cls(factory=factory, family=family, size=size, args=_frozen_args(args or {}),
                   source_sha256=factory_source_sha256(factory), **fields)

    @property
    def name(self) -> str:
        """"ModernDiT-S/4": the family and its member (the family alone for a factory without sizes)."""
        return f"{self.family}-{self.size}" if self.size else self.family

    @property
    def block(self) -> str:
        """The records' `block` of a plugged-in model: its family (DiT's are its conditioning blocks)."""
        return self.family

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def hidden_size(self) -> int | None:
        """The width, where the family's arguments give one (precision "auto" weighs it on a CPU)."""
        return dict(self.args).get("hidden_size")

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "args": dict(self.args)}


ModelConfig = DiTConfig | FactoryConfig


def _frozen_args(args: dict) -> tuple:
    def frozen(value):
        if isinstance(value, dict):
            return tuple(sorted((k, frozen(v)) for k, v in value.items()))
        return tuple(frozen(v) for v in value) if isinstance(value, list | tuple) else value

    return tuple(sorted((str(k), frozen(v)) for k, v in args.items()))


def config_to_json(config: ModelConfig) -> dict:
    """The manifest's `model` entry: the config's fields (a factory's with `factory` and its args as a dict)."""
    return config.to_json() if isinstance(config, FactoryConfig) else dataclasses.asdict(config)


def config_from_json(data: dict) -> ModelConfig:
    """The config of a manifest's `model` entry (`config_to_json`), DiT or plugged in."""
    if "factory" not in data:
        return DiTConfig(**data)
    fields = {f.name for f in dataclasses.fields(FactoryConfig)}
    return FactoryConfig(**{**{k: v for k, v in data.items() if k in fields}, "args": _frozen_args(data["args"])})


# ----------------------------------------------------------------------------------------------------------------
# Loading a factory
# ----------------------------------------------------------------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str]:
    target, sep, function = spec.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise FactoryError(f"model factory {spec!r}: name it as path/to/file.py:FUNCTION or package.module:FUNCTION "
                           "(e.g. models/modern_dit.py:build).")
    return target, function


def factory_module_name(spec: str) -> str:
    """"path/to/my_net.py:build" -> "my_net"; "pkg.my_net:build" -> "my_net"."""
    target, _ = _split_spec(spec)
    return Path(target).stem if target.endswith(".py") else target.rpartition(".")[2]


def factory_source_path(spec: str) -> Path:
    """The source file of a factory (a .py path as given, or where its module is found)."""
    target, _ = _split_spec(spec)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FactoryError(f"model factory {spec!r}: no file {path.resolve()}. Give a path from the directory "
                               "the command runs in (or an absolute one), or an importable module:FUNCTION.")
        return path
    if os.getcwd() not in sys.path:  # a module beside the user, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError) as e:
        raise FactoryError(f"model factory {spec!r}: cannot import {target!r} ({e}).") from e
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise FactoryError(f"model factory {spec!r}: no importable module {target!r}; check the name, or name the "
                           "file as path/to/file.py:FUNCTION.")
    return Path(found.origin)


def factory_source_sha256(spec: str) -> str:
    return hashlib.sha256(factory_source_path(spec).read_bytes()).hexdigest()


def load_factory(spec: str) -> Callable:
    """The factory function `spec` names (its file imported once per process)."""
    target, function = _split_spec(spec)
    path = factory_source_path(spec)
    if target.endswith(".py"):
        name = f"dit_scaling_factory_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        module = sys.modules.get(name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses and pickling look the module up by name
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
    else:
        module = importlib.import_module(target)
    build = getattr(module, function, None)
    if not callable(build):
        raise FactoryError(f"model factory {spec!r}: {path} has no function {function!r}.")
    return build


def check_factory_signature(build: Callable, spec: str, family_args: dict) -> dict:
    """The keyword arguments build() gets beyond the family's (`RECIPE_ARGUMENTS` it accepts), or a FactoryError
    naming the contract arguments it lacks, the family arguments it does not take and the arguments it requires
    that nobody gives."""
    parameters = inspect.signature(build).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    keyword = {name for name, p in parameters.items()
               if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    problems = []
    lacking = [a for a in CONTRACT_ARGUMENTS if a not in keyword and not takes_any]
    if lacking:
        problems.append(f"it lacks the argument(s) {', '.join(lacking)} of the contract build(*, "
                        f"{', '.join(CONTRACT_ARGUMENTS)}, **family_args)")
    unknown = [a for a in family_args if a not in keyword and not takes_any]
    if unknown:
        problems.append(f"it takes no argument(s) {', '.join(unknown)}, which the config's family arguments give")
    given = {*CONTRACT_ARGUMENTS, *family_args, *RECIPE_ARGUMENTS}
    required = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
                and name not in given]
    if required:
        problems.append(f"it requires {', '.join(required)}, which neither the toolkit nor the family arguments "
                        "give (add them to model.factory_args or model.family_sizes, or give them defaults)")
    if problems:
        raise FactoryError(f"model factory {spec!r}: " + "; ".join(problems) + ".")
    return {a: None for a in RECIPE_ARGUMENTS if a in keyword or takes_any}


# ----------------------------------------------------------------------------------------------------------------
# Building and checking
# ----------------------------------------------------------------------------------------------------------------


def _build_factory_model(config: FactoryConfig, rngs: nnx.Rngs) -> nnx.Module:
    build = load_factory(config.factory)
    family_args = {name: value for name, value in config.args}
    recipe = check_factory_signature(build, config.factory, family_args)
    recipe = {name: getattr(config, name) for name in recipe}
    model = build(input_size=config.input_size, in_channels=config.in_channels, num_classes=config.num_classes,
                  learn_sigma=config.learn_sigma, rngs=rngs, **recipe, **family_args)
    if not isinstance(model, nnx.Module):
        raise FactoryError(f"model factory {config.factory!r} returned {type(model).__name__}, not a flax.nnx "
                           "Module.")
    return model


def build_model(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The model of a config: a DiT, or the factory's module."""
    if isinstance(config, DiTConfig):
        return DiT(config, rngs=rngs)
    return _build_factory_model(config, rngs)


def abstract_model(config: ModelConfig) -> nnx.Module:
    """The model with shape/dtype placeholders for arrays: for counting and graph definitions, allocating nothing."""
    return abstract_module(lambda rngs: build_model(config, rngs))


def check_contract(config: FactoryConfig, seed: int = 0, batch: int = 2) -> None:
    """Build the factory's model and call it as training and sampling do (with and without a dropout key); a
    FactoryError names what breaks the contract (the signature, the output's shape or dtype, a non-finite output
    at initialisation). Built and called in one compiled program: eagerly every operation compiles alone."""
    side, channels = config.input_size, config.in_channels
    x = jax.random.normal(jax.random.key(seed), (batch, side, side, channels))
    t = jnp.linspace(0, 999, batch).astype(jnp.int32)
    y = jnp.arange(batch, dtype=jnp.int32) % config.num_classes
    what = f"model factory {config.factory!r} ({config.name})"

    def forward(x, t, y, key):
        model = _build_factory_model(config, nnx.Rngs(seed))
        return model(x, t, y), model(x, t, y, dropout_key=key)

    try:
        shapes = jax.eval_shape(forward, x, t, y, jax.random.key(seed + 1))
    except TypeError as e:
        raise FactoryError(f"{what}: its module cannot be called as {CALL_SIGNATURE} ({e}).") from e
    expected = (batch, side, side, config.out_channels)
    for out in shapes:
        if not hasattr(out, "shape") or tuple(out.shape) != expected:
            shape = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
            sigma = "2 x in_channels with learn_sigma (eps, then the variance values)" if config.learn_sigma \
                else "in_channels without learned sigma"
            raise FactoryError(f"{what}: for x of shape {tuple(x.shape)} (NHWC) it returned {shape}; the contract "
                               f"is {expected}, channels {sigma}.")
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise FactoryError(f"{what}: it returned {out.dtype} values; the contract is floating point.")
    outputs = jax.jit(forward)(x, t, y, jax.random.key(seed + 1))
    if not all(bool(jnp.all(jnp.isfinite(out))) for out in outputs):
        raise FactoryError(f"{what}: its output at initialisation is not finite (NaN or inf) for inputs drawn "
                           "from N(0, 1); check its initialisers and normalisations.")
