"""The paper's training recipe (dit_paper.md section 7) as the base of every config."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "S/2"  # DiT-SIZE/PATCH: sets patch_size; size sets depth/width/heads unless given below
    config.model.depth = 0  # 0: from the name (paper Table 1)
    config.model.hidden_size = 0
    config.model.num_heads = 0
    config.model.block = "adaLN-Zero"
    config.model.learn_sigma = True
    config.model.class_dropout_prob = 0.1
    config.model.dtype = "float32"  # matmul compute dtype; "bfloat16" for mixed precision
    config.model.remat = False  # recompute block activations in the backward pass to save memory

    config.data = ml_collections.ConfigDict()
    config.data.source = "fashion_mnist"  # fashion_mnist | latent_shards
    config.data.path = ""  # "" = the source's default location
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
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    config.train.keep_checkpoints = 2  # newest checkpoints kept
    config.train.keep_every = 50_000  # also keep every K-th step for analysis (0: none)
    config.train.param_sharding = "replicated"  # replicated | fsdp (shard parameters over the data axis)
    config.train.async_checkpoints = True
    return config
