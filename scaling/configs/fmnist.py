"""Miniature DiTs on Fashion-MNIST (32x32x1 pixels, 10 classes), for scaling studies on a CPU.

Variants: "S/8" ... "XL/2" pick the miniature size and patch; ",smoke" shrinks the run to seconds.
Miniature sizes keep the paper's shape (deeper and wider with size, head dim 32).
"""

from scaling.configs.common import base_config

# name -> (depth, width, heads)
MINIATURE_SIZES = {"S": (2, 32, 1), "B": (2, 64, 2), "L": (4, 96, 3), "XL": (5, 128, 4)}


def get_config(variant: str = "S/8"):
    model, *options = variant.split(",")
    size, _, _ = model.partition("/")
    if size not in MINIATURE_SIZES:
        raise ValueError(f"fmnist variant {variant!r}: size must be one of {list(MINIATURE_SIZES)} (e.g. 'S/8').")
    config = base_config()
    config.model.name = model
    config.model.depth, config.model.hidden_size, config.model.num_heads = MINIATURE_SIZES[size]
    config.data.source = "fashion_mnist"
    config.train.steps = 3000
    config.train.batch_size = 32
    config.train.learning_rate = 1e-3
    config.train.ema_decay = 0.995
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_every = 0
    config.eval.every = 1000
    config.eval.sampling_steps = (100,)
    config.eval.batch_size = 500
    config.eval.guidance_channels = 0  # one image channel: the paper's 3-channel mode does not apply
    for option in options:
        if option == "smoke":
            config.train.steps = 20
            config.train.batch_size = 8
            config.train.log_every = 5
            config.train.checkpoint_every = 10
            config.train.async_checkpoints = False
            config.eval.every = 0
        else:
            raise ValueError(f"fmnist: unknown option {option!r} (known: smoke).")
    return config
