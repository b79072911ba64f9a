"""The paper's runs: DiT on ImageNet through SD-VAE latents, 1000 classes, 400K steps at batch 256 (the paper's
section 4), with its schedule: checkpoints every 50K steps (all kept, for the curves of Figs. 6 and 9) and FID-50K
(250 DDPM steps, unguided, as the scaling study's Table 4) at 400K.

Variants: "MODEL[,OPTION...]", MODEL one of S/8 ... XL/2. Options:
- "cfg": evaluate with classifier-free guidance 1.5 (the paper's headline numbers) instead;
- "512": 512x512 images (64x64 latents), the paper's XL/2 512px run;
- "block=NAME": a conditioning block of the ablation (adaLN-Zero, adaLN, cross-attention, in-context). The grid
  names a run by model and block (DiT-XL-2-in-context), so `grid --config imagenet256:block=in-context
  --models XL/2` and its siblings share one grid directory.

Every run needs --config.data.path (the `dit-scaling extract-latents` OUT), --config.data.autoencoder (the
autoencoder that encoded them, which decodes the samples) and --config.eval.reference (ADM's reference batch,
e.g. VIRTUAL_imagenet256_labeled.npz).
"""

from models.dit import BLOCKS
from scaling.configs.common import base_config

CHECKPOINT_EVERY = 50_000
# 50K steps of XL/2 take hours on 8 chips: a lost spot slice or a kill -9 loses at most half an hour instead.
CHECKPOINT_MINUTES = 30.0
GUIDANCE_SCALE = 1.5  # the paper's headline FIDs (Table 2 and 3); its scaling numbers are unguided


def get_config(variant: str = "XL/2"):
    model, *options = variant.split(",")
    config = base_config()
    config.model.name = model
    config.data.source = "latent_shards"
    config.data.resolution = 256
    config.data.num_threads = 16  # each example is one range read, which on gs:// waits on the network
    config.train.checkpoint_every = CHECKPOINT_EVERY
    config.train.checkpoint_minutes = CHECKPOINT_MINUTES
    config.train.keep_every = CHECKPOINT_EVERY
    config.eval.every = config.train.steps  # FID-50K at 400K
    config.eval.num_samples = 50_000
    config.eval.num_reference = 50_000
    config.eval.batch_size = 256
    config.eval.sampler = "ddpm"
    config.eval.sampling_steps = (250,)
    for option in options:
        name, _, value = option.partition("=")
        if option == "cfg":
            config.eval.guidance_scale = GUIDANCE_SCALE
        elif option == "512":
            config.data.resolution = 512
        elif name == "block" and value in BLOCKS:
            config.model.block = value
        else:
            raise ValueError(f"imagenet256 variant {variant!r}: unknown option {option!r}; use cfg, 512 or "
                             f"block=NAME with NAME one of {', '.join(BLOCKS)}.")
    return config
