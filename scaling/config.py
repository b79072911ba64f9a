"""Study configs: ml_collections files with a get_config(variant) function, plus command-line overrides.

A config is named `NAME:VARIANT` where NAME is a built-in config (`fmnist`, `imagenet256`) or a path to a Python
file, e.g. `fmnist:S/8,smoke` or `my_study.py:XL/2`. Overrides are `key.path=value` strings whose values are
parsed to the type of the field they replace.

ml_collections' config_flags is not used: it parses overrides as absl flags of the whole command line (with a
private FlagValues the `--config.*` flags are never registered), which does not combine with the subcommands of
`dit-scaling`, and the grid applies one list of overrides to twelve configs. This parser gives the same syntax,
errors that list a section's fields, and integers written as 1e3.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import math

import ml_collections
from etils import epath

from analysis import schema
from models.dit import DIT_SIZES, DiTConfig, canonical_name, parse_model_name
from models.plugin import FactoryConfig, factory_module_name
from models.timesteps import SAMPLERS
from scaling import precision

BUILTIN = ("fmnist", "imagenet256", "modern_dit_fmnist")


def load_python_file(path: str | epath.Path):
    """Import a Python file given by path (a user's config or model factory) as a module."""
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No Python file at {path}.")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    name, _, variant = spec.partition(":")
    if name in BUILTIN:
        module = importlib.import_module(f"scaling.configs.{name}")
    elif name.endswith(".py"):
        module = load_python_file(name)
    else:
        raise ValueError(f"Unknown config {name!r}: use one of {list(BUILTIN)} or a path to a .py file, "
                         "followed by :VARIANT (e.g. fmnist:S/8).")
    if not hasattr(module, "get_config"):
        raise ValueError(f"Config {name} has no get_config(variant) function.")
    config = module.get_config(variant) if variant else module.get_config()
    for override in overrides:
        apply_override(config, override)
    return config


def _parse_int(text: str) -> int:
    """An integer, also written as 1e3 or 4e5 (which must come out whole)."""
    if "e" not in text.lower():
        return int(text)
    value = float(text)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def _parse_sequence(text: str, current: tuple | list):
    """A tuple (or list) written as 8,16 or (8, 16) or [8, 16]; a single value is a sequence of one and the empty
    text an empty one. Entries take the type of the current entries (ints in a tuple of ints)."""
    value = () if text.strip() in ("", "()", "[]") else ast.literal_eval(text)
    value = tuple(value) if isinstance(value, tuple | list) else (value,)
    kinds = {type(v) for v in current}
    if len(kinds) == 1 and not all(type(v) in kinds for v in value):
        raise ValueError(f"entries must be {kinds.pop().__name__}s")
    return type(current)(value)


def _expected(current, field_type: type) -> str:
    """What an override of a field holding `current` (of `field_type`: a placeholder's declared type) looks like."""
    if field_type is bool:
        return "true or false (also yes/no, 1/0)"
    if field_type is int:
        return "an int such as 1000 or 1e3"
    if field_type is float:
        return "a float such as 0.5 or 1e-4"
    if field_type in (tuple, list):
        kinds = {type(v).__name__ for v in current or ()}
        entries = f" of {kinds.pop()}s" if len(kinds) == 1 else ""
        return f"a {field_type.__name__}{entries} such as (8,) or 8,16"
    if field_type is ml_collections.ConfigDict:
        return "a dict such as {'depth': 12} (or set one field: SECTION.FIELD=VALUE)"
    return f"a Python literal of type {field_type.__name__}"


def _parse_value(key: str, text: str, current, field_type: type):
    """The override's text as a value of the field's type (a field that is None now, typed by nothing, takes a
    Python literal or else the text); a value of another shape is an error naming the field, the value and what
    the field takes."""
    if current is None and text.strip().lower() == "none":
        return None
    try:
        if field_type is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if field_type is int:
            return _parse_int(text)
        if field_type is float:
            return float(text)
        if field_type is str:
            return text
        if field_type in (tuple, list):
            return _parse_sequence(text, current if current is not None else field_type())
        if field_type is type(None):
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
        value = ast.literal_eval(text)
        if not isinstance(value, dict if field_type is ml_collections.ConfigDict else field_type):
            raise ValueError(text)
        return value
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(f"{key}: expected {_expected(current, field_type)}, got {text!r}.") from None


def _did_you_mean(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=3)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply one `a.b.c=value` override in place, parsing value to the field's type."""
    key, sep, text = override.partition("=")
    if not sep:
        raise ValueError(f"Override {override!r} is not of the form key.path=value.")
    *parents, leaf = key.split(".")
    node, path = config, []
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            where = ".".join(path) or "the config"
            sections = [k for k, v in node.items() if isinstance(v, ml_collections.ConfigDict)]
            raise ValueError(f"Override {override!r}: {where} has no section {part!r}; its sections: "
                             f"{sorted(sections)}.{_did_you_mean(part, sections)}")
        node = node[part]
        path.append(part)
    if parents == ["model", "factory_args"] and leaf not in node:  # the factory's own arguments: any name
        try:
            node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[leaf] = text
        return
    if leaf not in node:
        raise ValueError(f"Override {override!r}: config has no field {key!r}; fields here: {sorted(node.keys())}."
                         f"{_did_you_mean(leaf, node.keys())}")
    node[leaf] = _parse_value(key, text, node[leaf], node.get_type(leaf))


def model_config(config: ml_collections.ConfigDict, *, input_size: int, in_channels: int,
                 num_classes: int, dtype: str | None = None) -> DiTConfig | FactoryConfig:
    """The model config of a study config, for data of the given shape: a DiTConfig, or with model.factory the
    plugged-in model's FactoryConfig (model.factory_args, then model.family_sizes[model.name]). `dtype`: the
    compute dtype (default: the config's model.dtype, "auto" resolved for this machine and the model's width by
    scaling.precision)."""
    m = config.model
    if m.factory:
        sizes = m.family_sizes.to_dict()
        if sizes and m.name not in sizes:
            raise ValueError(f"model.name {m.name!r} is not a member of the {m.family or m.factory} family; "
                             f"model.family_sizes has {list(sizes)}.")
        args = {**m.factory_args.to_dict(), **sizes.get(m.name, {})}
        width = args.get("hidden_size")
        return FactoryConfig.of(
            m.factory, family=m.family, size=m.name if sizes else "", args=args, input_size=input_size,
            in_channels=in_channels, num_classes=num_classes, learn_sigma=m.learn_sigma,
            class_dropout_prob=m.class_dropout_prob, dtype=dtype or precision.resolve(m.dtype, width).dtype)
    size, patch = parse_model_name(m.name)
    depth, width, heads = DIT_SIZES[size]
    width = m.hidden_size or width
    return DiTConfig(
        depth=m.depth or depth, hidden_size=width, num_heads=m.num_heads or heads, patch_size=m.patch_size or patch,
        input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=m.learn_sigma,
        class_dropout_prob=m.class_dropout_prob, block=m.block,
        dtype=dtype or precision.resolve(m.dtype, width).dtype,
        remat=m.remat, remat_policy=m.remat_policy, scan_blocks=m.scan_blocks)


def model_name(config: ml_collections.ConfigDict) -> str:
    """The name records give the config's model: "DiT-S/8", or a plugged-in family's "ModernDiT-S/4"."""
    m = config.model
    if m.factory:
        family = m.family or factory_module_name(m.factory)
        return f"{family}-{m.name}" if m.family_sizes.to_dict() else family
    return canonical_name(m.name)


def run_name(config: ml_collections.ConfigDict) -> str:
    """The name of the config's run: its directory in a grid (schema.run_dir_name) and its `run` in records:
    "DiT-S-8", "DiT-XL-2-in-context", "ModernDiT-S-4"."""
    if config.model.factory:
        return schema.run_dir_name(model_name(config))
    return schema.run_dir_name(model_name(config), config.model.block)


def family_members(config: ml_collections.ConfigDict) -> list[str] | None:
    """The model names a grid of this config trains by default: a plugged-in family's members (None for DiT:
    the paper's 12)."""
    return list(config.model.family_sizes.to_dict()) or None if config.model.factory else None


def _non_finite_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """`field = value` for every float field, at any depth, that holds NaN or inf."""
    found = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            found += _non_finite_fields(value, f"{prefix}{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            found.append(f"{prefix}{name} = {value}")
    return found


def _positive_ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def validate(config: ml_collections.ConfigDict) -> None:
    """Check the training fields that no later step would catch clearly."""
    non_finite = _non_finite_fields(config)
    if non_finite:  # the range checks below say nothing useful about NaN
        raise ValueError(f"Invalid config: {'; '.join(non_finite)}: every number of a config must be finite.")
    train = config.train
    checks = [
        (train.steps > 0, "train.steps must be positive"),
        (train.batch_size > 0, "train.batch_size must be positive"),
        (train.learning_rate > 0, "train.learning_rate must be positive"),
        (train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (0 <= train.b1 < 1 and 0 <= train.b2 < 1, "train.b1 and train.b2 (Adam's decay rates) must be in [0, 1)"),
        (train.eps > 0, "train.eps must be positive"),
        (0 <= train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (train.seed >= 0 and config.eval.seed >= 0, "train.seed and eval.seed must be >= 0"),
        (0 <= config.model.class_dropout_prob < 1, "model.class_dropout_prob must be in [0, 1)"),
        (train.log_every > 0, "train.log_every must be positive"),
        (train.checkpoint_every > 0, "train.checkpoint_every must be positive"),
        (train.checkpoint_minutes >= 0, "train.checkpoint_minutes must be >= 0 (0: checkpoints by steps only)"),
        (train.keep_checkpoints > 0, "train.keep_checkpoints must be positive"),
        (train.steps_per_call > 0 and all(n % train.steps_per_call == 0 for n in (
            train.steps, train.log_every, train.checkpoint_every, config.eval.every, config.eval.validation_every)),
         f"train.steps_per_call ({train.steps_per_call}) must divide train.steps ({train.steps}), train.log_every "
         f"({train.log_every}), train.checkpoint_every ({train.checkpoint_every}), eval.every "
         f"({config.eval.every}) and eval.validation_every ({config.eval.validation_every}): records, checkpoints "
         "and evaluations fall between calls"),
        (train.param_sharding in ("replicated", "fsdp"), "train.param_sharding must be replicated or fsdp"),
        (train.slices >= 0, "train.slices must be >= 0 (0: the slices the devices report)"),
        (config.model.dtype in (precision.AUTO, *precision.DTYPES),
         f"model.dtype must be {precision.AUTO} or one of {', '.join(precision.DTYPES)}"),
        (config.diffusion.num_timesteps > 1, "diffusion.num_timesteps must be > 1"),
        (config.eval.every >= 0,
         "eval.every must be >= 0 (0 turns sample evaluations off; the held-out loss has eval.validation_every)"),
        (config.eval.sampler in SAMPLERS, f"eval.sampler must be one of {', '.join(SAMPLERS)}"),
        (len(config.eval.sampling_steps) > 0 and _positive_ints(config.eval.sampling_steps),
         "eval.sampling_steps must list positive step counts"),
        (_positive_ints(config.eval.final_sampling_steps),
         "eval.final_sampling_steps must list positive step counts (or be empty)"),
        (all(isinstance(s, int) and s >= 0 and s != config.eval.seed for s in config.eval.final_seeds),
         f"eval.final_seeds must list seeds >= 0 other than eval.seed ({config.eval.seed}), or be empty"),
        (all(isinstance(g, (int, float)) and g >= 1 and g != config.eval.guidance_scale
             for g in config.eval.final_guidance_scales),
         f"eval.final_guidance_scales must list scales >= 1 other than eval.guidance_scale "
         f"({config.eval.guidance_scale}), or be empty"),
        (config.eval.validation_examples >= 0 and config.eval.validation_timesteps > 0,
         "eval.validation_examples must be >= 0 (0 turns the held-out loss off) and eval.validation_timesteps > 0"),
        (config.eval.validation_every >= 0 and (config.eval.validation_every == 0 or config.eval.every == 0
                                                 or config.eval.every % config.eval.validation_every == 0),
         f"eval.validation_every ({config.eval.validation_every}) must be >= 0 (0: at the eval.every steps) and "
         f"divide eval.every ({config.eval.every}), so that every sample evaluation has the held-out loss beside it "
         "(the pairs `dit-scaling loss-proxy` fits)"),
        (config.eval.num_samples > 3 and config.eval.num_reference > 3,
         "eval.num_samples and eval.num_reference must exceed 3 (precision/recall use 3 neighbours)"),
        (config.eval.batch_size > 0, "eval.batch_size must be positive"),
        (config.eval.guidance_scale >= 1, "eval.guidance_scale must be >= 1 (1 turns guidance off)"),
        (config.data.source != "fashion_mnist" or config.eval.guidance_channels in (0, 1),
         "eval.guidance_channels must be 0 (all) or 1 for Fashion-MNIST's single image channel"),
        (train.checkpoint_every <= 0 or (train.keep_every >= 0 and train.keep_every % train.checkpoint_every == 0),
         "train.keep_every must be 0 or a multiple of train.checkpoint_every (it keeps some of those written)"),
        (config.eval.every == 0 or config.data.source == "fashion_mnist"
         or (config.data.autoencoder and config.eval.reference),
         "eval.every > 0 on latents needs data.autoencoder (the decoder) and eval.reference (an ADM reference batch, "
         "e.g. from `dit-scaling reference`) for FID"),
        (config.eval.validation_examples == 0 or config.data.source != "latent_shards" or config.data.validation_path,
         "eval.validation_examples > 0 (the held-out loss) on latents needs data.validation_path: latents of held-out "
         "images, from `dit-scaling extract-latents VAL_DIR OUT --split validation`"),
        (config.eval.validation_examples == 0 or config.eval.every > 0 or config.eval.validation_every > 0,
         "eval.validation_examples > 0 needs a schedule: eval.validation_every > 0 (alone: the held-out loss without "
         "sampling) or eval.every > 0"),
    ]
    if config.model.factory:
        from models.plugin import factory_source_path

        factory_source_path(config.model.factory)  # a FactoryError names a factory that is not there
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ValueError("Invalid config: " + "; ".join(problems) + ".")
