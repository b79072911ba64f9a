"""ModernDiT (models/modern_dit.py: DiT with SwiGLU, RMSNorm and 2-D rotary positions) on Fashion-MNIST, with the
miniature study's recipe and sizes: the worked example of a new architecture trained through the grid.

Variants are the fmnist config's ("S/4", "XL/2,default", ...): the same recipe, data, evaluation and compute
accounting, with model.factory naming the plug-in and model.family_sizes listing the family's 12 members (the
miniature DiT's depth, width and heads with each patch size), which `grid` trains by default.
"""

from scaling.configs import fmnist

PATCH_SIZES = (8, 4, 2)


def get_config(variant: str = "S/4"):
    config = fmnist.get_config(variant)
    config.model.factory = "models.modern_dit:build"
    config.model.family = "ModernDiT"
    config.model.family_sizes = {
        f"{size}/{patch}": {"depth": depth, "hidden_size": width, "num_heads": heads,
                            "patch_size": patch * config.data.resolution // fmnist.PAPER_LATENT_SIZE}
        for size, (depth, width, heads) in fmnist.MINIATURE_SIZES.items() for patch in PATCH_SIZES}
    return config
