"""Miniature DiTs on Fashion-MNIST (32x32x1 pixels, 10 classes), for scaling studies on a CPU.

Variants: "S/8" ... "XL/2" pick the miniature size and patch; an option after a comma picks the recipe:
",smoke" (seconds per run, no evaluation: for trying a command), or a preset of `dit-scaling study`, which
names its presets as this config does: ",tiny" (every step of the study at toy size), ",default" (the same as no
option) or ",full".

The miniature family keeps the paper's shape (its Table 1): widths 384/768/1024/1152 and heads 6/12/16/16 divided
by 16 and 2 (24/48/64/72 wide, 3/6/8/8 heads of 8-9 dimensions), depths 12/12/24/28 divided by 6 and rounded
(2/2/4/5). On 32x32 images patches 8, 4 and 2 give 16, 64 and 256 tokens, as the paper's 32x32 latents do.
A patch of 8 holds 64 pixel values, more than S and B are wide (24 and 48): predicting the noise of 64 independent
values through that width leaves an error of at least about 1 - width/64 at high noise, so S/8 and B/8 end near
that floor (docs/analysis.md, "The miniature study"). The paper's patch-8 tokens hold 256 latent values,
fewer than any of its widths; a miniature family wide enough for 64 (paper widths / 6) costs 2.7 to 7 times more.
"""

from scaling.configs.common import base_config

# name -> (depth, width, heads)
MINIATURE_SIZES = {"S": (2, 24, 3), "B": (2, 48, 6), "L": (4, 64, 8), "XL": (5, 72, 8)}

# The study presets: one recipe for all 12 configs (the paper trains every config alike), chosen by measurement
# on a 2-core AMD EPYC (AVX2 only, the slowest CPU seen); docs/benchmarks.md ("The miniature study") has the
# numbers.
# - Adam lr 3e-3 with betas (0.9, 0.99), EMA 0.99, batch 16: DiT-XL/4's FD after 1500 steps fell with every larger
#   rate tried, up to 4e-3 with b2 0.99: miniature models in minutes are far from converged, and a larger step
#   size learns faster; 3e-3 keeps a margin below the largest rate tried for the deeper XL/2. Learned sigma made
#   no difference there.
# - default: 1500 steps, evaluated every 250 (Fig. 6 and 9 curves) with 250 samples and 8 DDIM steps, and at the
#   last step with 16 and 32 steps too (Fig. 10, in the paper's range of 16 to 1000 steps: 4 DDIM steps are far
#   from what a model can do); the held-out loss on 200 test images at 4 timesteps every 125 steps, so each
#   sample evaluation has it beside it (the loss -> FD pairs) and each config's curve spans 12x in compute (the
#   isoFLOP profiles: the samples' 6x let only 3 of 12 budgets have an interior minimum, the loss's 6). The
#   patch-2 configs take most of the time, their evaluation close to half of theirs.
# - 250 samples per evaluation: FD-FashionCNN's bias at 250 samples is the same for every config, so orderings
#   and fits hold.
PRESETS = {  # config fields by path; checkpoints fall at the evaluation steps
    "tiny": {"train.steps": 40, "train.batch_size": 8, "eval.every": 20, "eval.num_samples": 60,
                    "eval.sampling_steps": (4,), "eval.final_sampling_steps": (8,), "eval.validation_examples": 32,
                    "eval.validation_timesteps": 4, "eval.validation_every": 10, "eval.classifier_epochs": 1,
                    "eval.classifier_examples": 4000, "eval.num_reference": 1000, "train.log_every": 20,
                    "train.steps_per_call": 10},
    "default": {"train.steps": 1500, "train.batch_size": 16, "eval.every": 250, "eval.num_samples": 250,
                "eval.sampling_steps": (8,), "eval.final_sampling_steps": (16, 32), "eval.validation_examples": 200,
                "eval.validation_timesteps": 4, "eval.validation_every": 125, "eval.classifier_epochs": 2,
                "eval.classifier_examples": 0, "eval.num_reference": 10_000, "train.log_every": 250,
                "train.steps_per_call": 25},
    "full": {"train.steps": 15_000, "train.batch_size": 16, "eval.every": 2500, "eval.num_samples": 1000,
             "eval.sampling_steps": (8,), "eval.final_sampling_steps": (16, 32, 64), "eval.validation_examples": 1000,
             "eval.validation_timesteps": 8, "eval.validation_every": 500, "eval.classifier_epochs": 2,
             "eval.classifier_examples": 0, "eval.num_reference": 10_000, "train.log_every": 500,
             "train.steps_per_call": 25},
}


def get_config(variant: str = "S/8"):
    model, *options = variant.split(",")
    size, _, _ = model.partition("/")
    if size not in MINIATURE_SIZES:
        raise ValueError(f"fmnist variant {variant!r}: size must be one of {list(MINIATURE_SIZES)} (e.g. 'S/8').")
    unknown = [o for o in options if o not in ("smoke", *PRESETS)]
    if unknown or len(options) > 1:
        raise ValueError(f"fmnist variant {variant!r}: give at most one option of smoke, {', '.join(PRESETS)}.")
    config = base_config()
    config.model.name = model
    config.model.depth, config.model.hidden_size, config.model.num_heads = MINIATURE_SIZES[size]
    config.data.source = "fashion_mnist"
    config.train.learning_rate = 3e-3
    config.train.b2 = 0.99
    config.train.ema_decay = 0.99
    config.train.keep_every = 0
    config.eval.sampler = "ddim"
    config.eval.guidance_channels = 0  # one image channel: the paper's 3-channel mode does not apply
    option = options[0] if options else "default"
    if option == "smoke":
        config.train.steps = 20
        config.train.batch_size = 8
        config.train.log_every = 5
        config.train.checkpoint_every = 10
        config.train.async_checkpoints = False
        config.eval.every = 0
        return config
    config.update_from_flattened_dict(PRESETS[option])
    config.train.checkpoint_every = config.eval.every
    config.eval.batch_size = min(250, config.eval.num_samples)
    return config
