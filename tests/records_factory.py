"""Records written the way the toolkit's writers write them, for tests of readers."""

from analysis import schema


def a_manifest(**changes) -> schema.Manifest:
    """The manifest of a small finished Fashion-MNIST run of DiT-S/8; fields can be changed."""
    fields = dict(model_name="DiT-S/8", size="S", patch=8, block="adaLN-Zero", resolution=32,
                  gflops_per_image=0.00055, macs_per_image=550_000, params=55_872, tokens=16, global_batch=32,
                  seed=0, total_steps=1200, config={"data": {"source": "fashion_mnist"}, "train": {"batch_size": 32}},
                  model={"patch_size": 8, "input_size": 32, "in_channels": 1}, data={"source": "fashion_mnist",
                                                                                      "examples": 60000},
                  status="finished", final_step=1200)
    return schema.Manifest(**{**fields, **changes})
