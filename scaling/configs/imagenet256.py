"""The paper's runs: DiT on 256x256 ImageNet through SD-VAE latents (32x32x4), 1000 classes, 400K steps.

Variants: "S/8" ... "XL/2". Training reads pre-extracted latents (data.source = latent_shards, data.path = the
shard directory).
"""

from scaling.configs.common import base_config


def get_config(variant: str = "XL/2"):
    config = base_config()
    config.model.name = variant
    config.data.source = "latent_shards"
    config.data.resolution = 256
    return config
