"""Miniature DiTs on Fashion-MNIST (10 classes) at 16x16, for scaling studies on a CPU.

Variants: "S/8" ... "XL/2" pick the miniature size and patch; an option after a comma picks the recipe:
",smoke" (seconds per run, no evaluation: for trying a command), or a preset of `dit-scaling study`, which
names its presets as this config does: ",tiny" (every step of the study at toy size), ",default" (the same as no
option) or ",full".

The miniature family keeps the paper's shape (its Table 1): widths 384/768/1024/1152 divided by 16 (24/48/64/72),
depths 12/12/24/28 divided by 6 and rounded (2/2/4/5), heads 6/12/16/16 divided by 8 and rounded up (1/2/2/2 heads
of 24-36 dimensions; the paper's have 64-72). Heads of 8-9 dimensions (3/6/8/8) learned no better and cost DiT-XL/2
1.75x the time per training step: the attention logits (heads x tokens^2 per image) dominate a 256-token step of so
narrow a model. The names keep the paper's token grids: the paper's patches 8, 4 and 2 over its 32x32 latents give
16, 64 and 256 tokens, and so do patches 4, 2 and 1 over the miniature's input, the 28x28 images padded to 32x32 and
averaged over 2x2 blocks to 16x16 (data.resolution; model.patch_size follows it, so 32 gives patches 8, 4, 2). A
token then holds 16, 4 or 1 values, fewer than any width, as the paper's 256/64/16 latent values are fewer than its
widths; at 32x32 a patch of 8 holds 64 values, more than S and B are wide, which capped S/8 and B/8 at an error of
about 1 - width/64.

Why 16x16 (measured on a 2-core AMD EPYC with AVX-512, docs/benchmarks.md "The miniature study"): the same
tokens cost the same, and DiT-B/2's 1500 steps reached FD-FashionCNN-250 47 against a floor of 3.4 (real
held-out images) at 16x16, 135 against 5.2 at 32x32 (DPM-Solver++ with 16 steps), with guided class accuracy
0.64 against 0.41. Samples are scored at 32x32: the FashionCNN sees every image enlarged 2x2 (samples, reference
and held-out images alike).
"""

from scaling.configs.common import base_config

# name -> (depth, width, heads)
MINIATURE_SIZES = {"S": (2, 24, 1), "B": (2, 48, 2), "L": (4, 64, 2), "XL": (5, 72, 2)}
PAPER_PATCHES = ("8", "4", "2")
PAPER_LATENT_SIZE = 32  # the paper's 256px images as SD latents
RESOLUTION = 16

# The study presets: one recipe for all 12 configs (the paper trains every config alike), chosen by measurement;
# docs/benchmarks.md ("The miniature study") has the numbers.
# - Adam lr 3e-3 with betas (0.9, 0.99), EMA 0.99, batch 16: at 16x16 over 1500 steps DiT-B/2 scored FD 47 at
#   3e-3, 50 at 6e-3 and 52 at 1.5e-3; EMA 0.995 48; batch 32 for half the steps 51; lr 6e-3 with b2 0.999 44 for
#   B/2 but 60 for the deeper XL/2 (34 at 3e-3, b2 0.99).
# - DPM-Solver++(2M): at 8 steps it samples what DDIM needs far more steps for (B/2 at 32x32: 157 against DDIM's
#   178); DDPM and DDIM stay available (eval.sampler).
# - default: 1500 steps, evaluated every 250 (Fig. 6 and 9 curves) with 250 samples and 8 steps, and at the last
#   step with 16, 32 and 64 steps too (Fig. 10, to where sampling saturates: with 4 steps every smaller model beat a
#   larger one sampled so far below saturation, which is not the paper's comparison; with 16 and 32 only, one seed's
#   XL/2 still improved beyond the noise from 16 to 32, 14.0 to 12.7, and 64 gave 13.2), with noise seed 1 (the
#   evaluation's noise, beside every comparison) and with guidance 4 (Fig. 7's setting, its class accuracy); the
#   held-out loss on 200 test images at 4 timesteps every 125 steps, so each sample evaluation has it beside it (the
#   loss -> FD pairs) and each config's curve spans 12x in compute (the isoFLOP profiles). 2000 steps (then with
#   flips) cost a fifth more time for no better class conditioning (guided class accuracy L/2 0.68, XL/2 0.66,
#   against 0.67 and 0.71 at 1500). Evaluation batches of 50 run sampling and the held-out loss at about 0.7 of
#   training's rate per forward pass; 250 at 0.5 to 0.7.
# - 250 samples per evaluation: FD-FashionCNN's bias at 250 samples is the same for every config, so orderings
#   and fits hold; the floor is measured at the same N.
PRESETS = {  # config fields by path; checkpoints fall at the evaluation steps
    "tiny": {"train.steps": 40, "train.batch_size": 8, "eval.every": 20, "eval.num_samples": 60,
                    "eval.sampling_steps": (4,), "eval.final_sampling_steps": (8,), "eval.final_seeds": (1,),
                    "eval.final_guidance_scales": (4.0,), "eval.validation_examples": 32,
                    "eval.validation_timesteps": 4, "eval.validation_every": 10, "eval.classifier_epochs": 1,
                    "eval.classifier_examples": 4000, "eval.num_reference": 1000, "train.log_every": 20,
                    "train.steps_per_call": 10},
    "default": {"train.steps": 1500, "train.batch_size": 16, "eval.every": 250, "eval.num_samples": 250,
                "eval.sampling_steps": (8,), "eval.final_sampling_steps": (16, 32, 64), "eval.final_seeds": (1,),
                "eval.final_guidance_scales": (4.0,), "eval.validation_examples": 200,
                "eval.validation_timesteps": 4, "eval.validation_every": 125, "eval.classifier_epochs": 2,
                "eval.classifier_examples": 0, "eval.num_reference": 10_000, "train.log_every": 250,
                "train.steps_per_call": 25},
    "full": {"train.steps": 15_000, "train.batch_size": 16, "eval.every": 2500, "eval.num_samples": 1000,
             "eval.sampling_steps": (8,), "eval.final_sampling_steps": (16, 32, 64), "eval.final_seeds": (1,),
             "eval.final_guidance_scales": (4.0,), "eval.validation_examples": 1000,
             "eval.validation_timesteps": 8, "eval.validation_every": 500, "eval.classifier_epochs": 2,
             "eval.classifier_examples": 0, "eval.num_reference": 10_000, "train.log_every": 500,
             "train.steps_per_call": 25},
}


def get_config(variant: str = "S/8"):
    model, *options = variant.split(",")
    size, _, patch = model.partition("/")
    if size not in MINIATURE_SIZES:
        raise ValueError(f"fmnist variant {variant!r}: size must be one of {list(MINIATURE_SIZES)} (e.g. 'S/8').")
    unknown = [o for o in options if o not in ("smoke", *PRESETS)]
    if unknown or len(options) > 1:
        raise ValueError(f"fmnist variant {variant!r}: give at most one option of smoke, {', '.join(PRESETS)}.")
    config = base_config()
    config.model.name = model
    config.model.depth, config.model.hidden_size, config.model.num_heads = MINIATURE_SIZES[size]
    config.data.source = "fashion_mnist"
    config.data.resolution = RESOLUTION
    # No flips: Fashion-MNIST's articles all face one way (every shoe's toe points left), so a flipped image is one
    # the data never holds; a model trained on flips draws them half the time, and the reference (FD) and the
    # classifier (class accuracy) count them as errors: the FashionCNN puts 0.00 of flipped ankle boots and 0.16
    # of flipped sneakers in their class (0.94, 0.98 unflipped). The paper flips ImageNet's photographs, whose
    # mirror images are as likely as they are.
    config.data.flip = False
    if patch in PAPER_PATCHES:
        # The paper's patch over its 32x32 latents, scaled to this input: the same token grid at any resolution.
        # Other patches are taken as they are.
        config.model.patch_size = config.data.get_ref("resolution") * int(patch) // PAPER_LATENT_SIZE
    config.train.learning_rate = 3e-3
    config.train.b2 = 0.99
    config.train.ema_decay = 0.99
    config.train.keep_every = 0
    config.eval.sampler = "dpm-solver++"
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
    config.eval.batch_size = min(50, config.eval.num_samples)
    return config
