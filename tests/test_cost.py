"""The dry run's numbers against closed forms and against XLA's compiled memory use."""

import jax
import jax.numpy as jnp
import pytest

from analysis.chips import CHIPS
from models.diffusion import GaussianDiffusion, linear_betas
from models.flops import decoder_macs, dit_compute, inception_macs
from scaling.cli import main
from scaling.config import load_config
from scaling.cost import activation_bytes, planned_model, run_cost, run_evaluation_flops, run_training_flops
from scaling.train_step import init_state, make_optimizer, make_train_step


def test_state_memory_and_wall_time_follow_from_the_parameter_count():
    config = load_config("imagenet256:XL/2")
    cost = run_cost(config, chip="v4", chips=8, utilization=0.5)
    params = dit_compute(planned_model(config)).params
    # float32 parameters, EMA, Adam's two moments and gradients: 20 bytes per parameter, plus step, count and key.
    assert cost["state_replicated"] == pytest.approx(20 * params, abs=64)
    assert cost["state_fsdp"] == pytest.approx(20 * params / 8, rel=0.01)  # a few small leaves stay whole
    assert cost["gflops"] == pytest.approx(118.6, rel=0.01)  # the paper's Table 4
    seconds = run_training_flops(config) / (8 * CHIPS["v4"].peak_flops * 0.5)
    assert cost["hours"] == pytest.approx(seconds / 3600) and cost["chip_hours"] == pytest.approx(8 * seconds / 3600)
    assert cost["local_batch"] == 32 and cost["fits"] == "replicated"
    small = run_cost(config, chip="v5e", chips=8, utilization=0.5)  # 16 GiB chips
    assert small["state_fsdp"] + small["activations_remat"] < 16 * 2**30 < small["state_fsdp"] + small["activations"]
    assert small["fits"] == "fsdp+remat"
    two_slices = run_cost(config, chip="v4", chips=16, utilization=0.5, slices=2)  # fsdp over the 8 of a slice
    assert (two_slices["state_fsdp"], two_slices["state_replicated"]) == (cost["state_fsdp"], cost["state_replicated"])
    assert two_slices["chip_hours"] == pytest.approx(cost["chip_hours"]) and two_slices["local_batch"] == 16


def test_activation_estimate_is_within_20_percent_of_xla_on_this_cpu():
    config = load_config("imagenet256:B/2", ["model.dtype=float32", "model.depth=3"])  # not a fitted config
    model = planned_model(config)
    optimizer = make_optimizer(config)
    abstract = jax.eval_shape(lambda: init_state(model, optimizer, 0))
    step = jax.jit(make_train_step(model, GaussianDiffusion(linear_betas(1000), learn_sigma=True), optimizer, 0.9999),
                   donate_argnums=(0,))

    def temporaries(batch: int) -> int:
        inputs = {"image": jax.ShapeDtypeStruct((batch, 32, 32, 4), jnp.float32),
                  "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
        return step.lower(abstract, inputs).compile().memory_analysis().temp_size_in_bytes

    measured = temporaries(8) - temporaries(4)  # what 4 more examples keep
    assert 0.8 < activation_bytes(model, 4, remat=False) / measured < 1.2


def test_dry_run_command(capsys):
    assert main(["grid", "--config", "imagenet256", "--workdir", "unused", "--dry-run", "--models", "S/8,XL/2",
                 "--chip", "H100", "--chips", "16", "--utilization", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 2 runs on 16 x H100" in out and "nothing is launched" in out
    assert "XL/2  118.62" in out and "chip-hours" in out and "nvidia.com H100" in out
    assert main(["grid", "--config", "imagenet256", "--workdir", "unused", "--dry-run", "--chip", "v9"]) == 2
    assert "--chip 'v9': use one of v4" in capsys.readouterr().err
    assert main(["grid", "--config", "imagenet256", "--workdir", "unused", "--dry-run", "--slices", "3"]) == 2
    assert "--slices 3: give a positive number of slices that divides --chips 8" in capsys.readouterr().err


def test_the_dry_run_prices_evaluation():
    # XL/2 at 400K steps: one FID-50K with 250 DDPM steps, each sample decoded and run through FID's Inception.
    config = load_config("imagenet256:XL/2")
    macs = dit_compute(planned_model(config)).macs
    expected = 2 * (50_000 * 250 * macs + 50_000 * (decoder_macs(32) + inception_macs()))
    assert run_evaluation_flops(config) == pytest.approx(expected)
    guided = load_config("imagenet256:XL/2,cfg")  # guidance runs the model twice per sampling step
    assert run_evaluation_flops(guided) - run_evaluation_flops(config) == pytest.approx(2 * 50_000 * 250 * macs)
    cost = run_cost(config, chip="H100", chips=8, utilization=0.4)
    assert cost["evaluation_chip_hours"] == pytest.approx(expected / (CHIPS["H100"].peak_flops * 0.4) / 3600)
    # Inception-v3 is published at 5.71 GMACs per image (torchvision's model table); the decoder is checked against
    # diffusers' PyTorch model below.
    assert inception_macs() == pytest.approx(5.71e9, rel=0.005)
    # A kill loses half the interval between checkpoints: XL/2's 50K steps take 6.4 h on 8 H100 at 40%, so the
    # 30-minute cadence bounds it; S/8's 50K steps take 9 seconds, which bound its own.
    assert cost["kill_loss_hours"] == pytest.approx(0.25)
    small = load_config("imagenet256:S/8")
    steps_hours = run_cost(small, chip="H100", chips=8, utilization=0.4)["hours"] * 50_000 / small.train.steps
    assert run_cost(small, chip="H100", chips=8, utilization=0.4)["kill_loss_hours"] == pytest.approx(steps_hours / 2)
    # The held-out loss alone (no sampling): 1000 images at 8 timesteps every 10K steps, 40 times in 400K steps.
    alone = load_config("imagenet256:XL/2", ["eval.every=0", "eval.validation_examples=1000",
                                             "eval.validation_every=10000", "data.validation_path=val"])
    assert run_evaluation_flops(alone) == pytest.approx(2 * 40 * 1000 * 8 * macs)


def test_the_decoders_count_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    import torch

    from models.torch_flops import count_torch_macs

    model = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4).eval()

    class Decode(torch.nn.Module):
        def __init__(self, autoencoder):
            super().__init__()
            self.autoencoder = autoencoder

        def forward(self, z):
            return self.autoencoder.decode(z).sample

    counted, _ = count_torch_macs(Decode(model), (torch.zeros(1, 4, 8, 8),))
    assert decoder_macs(8) == counted.total
