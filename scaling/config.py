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
import importlib
import importlib.util

import ml_collections
from etils import epath

from analysis import schema
from models.dit import DIT_SIZES, DiTConfig, canonical_name, parse_model_name
from models.plugin import FactoryConfig, factory_module_name
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


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, int):
        return int(float(text)) if "e" in text.lower() else int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    return ast.literal_eval(text)


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply one `a.b.c=value` override in place, parsing value to the field's current type."""
    key, sep, text = override.partition("=")
    if not sep:
        raise ValueError(f"Override {override!r} is not of the form key.path=value.")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ValueError(f"Override {override!r}: config has no section {part!r}.")
        node = node[part]
    if parents == ["model", "factory_args"] and leaf not in node:  # the factory's own arguments: any name
        try:
            node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[leaf] = text
        return
    if leaf not in node:
        raise ValueError(f"Override {override!r}: config has no field {key!r}; fields here: {sorted(node.keys())}.")
    try:
        node[leaf] = _parse_value(text, node[leaf])
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"Override {override!r}: {e}") from e


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
        depth=m.depth or depth, hidden_size=width, num_heads=m.num_heads or heads, patch_size=patch,
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


def validate(config: ml_collections.ConfigDict) -> None:
    """Check the training fields that no later step would catch clearly."""
    train = config.train
    checks = [
        (train.steps > 0, "train.steps must be positive"),
        (train.batch_size > 0, "train.batch_size must be positive"),
        (train.learning_rate > 0, "train.learning_rate must be positive"),
        (0 <= train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (train.log_every > 0, "train.log_every must be positive"),
        (train.checkpoint_every > 0, "train.checkpoint_every must be positive"),
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
        (config.eval.every >= 0, "eval.every must be >= 0 (0 turns evaluation off)"),
        (config.eval.sampler in ("ddpm", "ddim"), "eval.sampler must be ddpm or ddim"),
        (len(config.eval.sampling_steps) > 0 and all(int(s) > 0 for s in config.eval.sampling_steps),
         "eval.sampling_steps must list positive step counts"),
        (all(int(s) > 0 for s in config.eval.final_sampling_steps),
         "eval.final_sampling_steps must list positive step counts (or be empty)"),
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
        (config.eval.validation_examples == 0 or config.data.source == "fashion_mnist",
         "eval.validation_examples > 0 (the held-out loss) needs Fashion-MNIST's test split; set it to 0 for latents"),
    ]
    if config.model.factory:
        from models.plugin import factory_source_path

        factory_source_path(config.model.factory)  # a FactoryError names a factory that is not there
    problems = [message for ok, message in checks if not ok]
    if problems:
        raise ValueError("Invalid config: " + "; ".join(problems) + ".")
