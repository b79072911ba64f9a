"""Training runs in one process: configs, data, records, corrupt checkpoints, divergence, the grid, evaluation."""

import gzip
import itertools
import json
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from run_helpers import TINY, leaves, smoke

from analysis import records, schema
from analysis.schema import read_jsonl as read_records
from models.dit import PAPER_MODELS, short_name
from scaling.checkpoints import load_final_params
from scaling.cli import main
from scaling.config import apply_override, load_config, run_name, validate
from scaling.cost import remaining_costs, run_training_flops
from scaling.data import FashionMNIST, make_dataset, read_idx
from scaling.grid import grid_models, load_grid_configs, parse_shard, plan_shards, run_grid, shard_plan
from scaling.latents import write_latents
from scaling.train import TrainingDiverged, train

# -- configs and data ----------------------------------------------------------------------------------------------


def test_config_overrides_are_typed_and_checked():
    config = load_config("fmnist:B/4,smoke", ["train.steps=7", "train.learning_rate=3e-4", "data.flip=true",
                                              "model.dtype=bfloat16"])
    assert (config.train.steps, config.train.learning_rate, config.data.flip) == (7, 3e-4, True)
    assert config.model.hidden_size == 48 and config.model.name == "B/4"
    with pytest.raises(ValueError, match="no field 'train.stepz'"):
        apply_override(config, "train.stepz=3")
    with pytest.raises(ValueError, match="expected true or false"):
        apply_override(config, "data.flip=maybe")
    with pytest.raises(ValueError, match="size must be one of"):
        load_config("fmnist:M/8")
    with pytest.raises(ValueError, match="Unknown config"):
        load_config("cifar:S/8")
    paper = load_config("imagenet256:XL/2")
    assert (paper.train.batch_size, paper.train.learning_rate, paper.train.ema_decay) == (256, 1e-4, 0.9999)
    assert (paper.train.weight_decay, paper.model.class_dropout_prob, paper.data.flip) == (0.0, 0.1, True)
    # The paper's schedule: checkpoints (all kept) every 50K steps, unguided FID-50K with 250 DDPM steps at 400K.
    assert (paper.train.checkpoint_every, paper.train.keep_every, paper.eval.every) == (50_000, 50_000, 400_000)
    assert paper.train.checkpoint_minutes == 30  # and at least every half hour of wall time
    assert (paper.eval.num_samples, tuple(paper.eval.sampling_steps), paper.eval.guidance_scale) == (50_000, (250,), 1)
    headline = load_config("imagenet256:XL/2,cfg,512,block=in-context")
    assert (headline.eval.guidance_scale, headline.data.resolution, headline.model.block) == (1.5, 512, "in-context")
    with pytest.raises(ValueError, match="unknown option 'block=film'"):
        load_config("imagenet256:XL/2,block=film")


def test_idx_reader_and_fashion_mnist_layout(fmnist_dir, tmp_path):
    source = FashionMNIST(str(fmnist_dir))
    assert len(source) == 256 and source.images.shape == (256, 32, 32, 1)
    raw = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(source.images[:, 2:30, 2:30, 0], raw)  # padded by 2 on each side
    assert source.images[:, :2].max() == 0
    broken = tmp_path / "broken-idx"
    broken.write_bytes(gzip.decompress((fmnist_dir / "train-images-idx3-ubyte.gz").read_bytes())[:5000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(broken)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path))


def test_fashion_mnist_at_16_is_the_mean_of_2x2_blocks_and_reaches_the_classifier_at_32(fmnist_dir):
    full, half = FashionMNIST(str(fmnist_dir)), FashionMNIST(str(fmnist_dir), resolution=16)
    assert half.image_shape == (16, 16, 1) and half.images.dtype == np.uint8
    brute_force = np.array([[[round(full.images[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean()) for j in range(16)]
                             for i in range(16)] for n in range(5)])
    np.testing.assert_array_equal(half.images[:5, ..., 0], brute_force)
    enlarged = half.at_classifier_resolution(half.images[:5])
    assert enlarged.shape == (5, 32, 32, 1)
    np.testing.assert_array_equal(enlarged[:, ::2, ::2], half.images[:5])  # each pixel repeated 2 x 2
    np.testing.assert_array_equal(enlarged[:, 1::2, 1::2], half.images[:5])
    np.testing.assert_array_equal(full.at_classifier_resolution(full.images[:5]), full.images[:5])
    with pytest.raises(ValueError, match="resolution 24: use one of"):
        FashionMNIST(str(fmnist_dir), resolution=24)
    # The fmnist config keeps the paper's token grid on 16x16 inputs: patch 8 -> 4, and overriding the
    # resolution moves the patch with it.
    config = load_config("fmnist:XL/8")
    assert (config.data.resolution, config.model.patch_size) == (16, 4)
    assert load_config("fmnist:XL/8", ["data.resolution=32"]).model.patch_size == 8
    assert load_config("fmnist:XL/3").model.patch_size == 0  # not a paper config: the name's patch, as it is


def test_hosts_share_each_global_batch(fmnist_dir):
    source = FashionMNIST(str(fmnist_dir))
    whole = make_dataset(source, global_batch=8, seed=1, flip=True)
    halves = [make_dataset(source, global_batch=8, seed=1, flip=True, process_index=i, process_count=2)
              for i in range(2)]
    for b in range(3):
        np.testing.assert_array_equal(np.concatenate([h[b]["image"] for h in halves]), whole[b]["image"])
    first_epoch = np.concatenate([whole[b]["label"] for b in range(32)])
    np.testing.assert_array_equal(np.sort(first_epoch), np.sort(source.labels))  # each example once per epoch
    images = whole[0]["image"]
    assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1


# -- one run ---------------------------------------------------------------------------------------------------------


def test_smoke_run_writes_documented_records_and_manifest(fmnist_dir, tmp_path, capsys):
    assert main(["train", *smoke(fmnist_dir), "--workdir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step 20/20" in out and "steps/s" in out and "ETA" in out
    records = read_records(tmp_path / "run" / "records.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["model_name"] == "DiT-S/8"
    assert manifest["params"] > 0 and manifest["starts"][0]["versions"]["jax"]
    # model.dtype "auto": the chosen dtype is the one the model ran in, with the evidence for it.
    chosen = manifest["starts"][0]["precision"]
    assert chosen["requested"] == "auto" and chosen["dtype"] == manifest["model"]["dtype"] and chosen["reason"]
    for record in records:
        assert set(schema.StepRecord.field_docs()) == set(record)
        assert record["images_seen"] == 8 * record["step"]
        assert record["train_gflops_cumulative"] == pytest.approx(3 * manifest["gflops_per_image"] * 8 * record["step"])
        assert np.isfinite(record["loss"]) and record["loss"] == pytest.approx(record["mse"] + record["vb"], rel=1e-5)
    assert all(r["step_time"] > 0 and 0 < r["utilization"] < 1 for r in records[1:])


def test_the_same_command_refuses_a_different_config(fmnist_dir, tmp_path):
    config = load_config("fmnist:S/8,smoke", [f"data.path={fmnist_dir}", "train.steps=5"])
    train(config, tmp_path / "run")
    apply_override(config, "train.learning_rate=0.5")
    with pytest.raises(ValueError, match="train.learning_rate differ"):
        train(config, tmp_path / "run")
    # A run written before a field existed resumes with the field at its default, and only there.
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["config"]["model"]["scan_blocks"]
    manifest_path.write_text(json.dumps(manifest))
    scanned = load_config("fmnist:S/8,smoke", [f"data.path={fmnist_dir}", "train.steps=6", "model.scan_blocks=True"])
    with pytest.raises(ValueError, match="model.scan_blocks differ"):
        train(scanned, tmp_path / "run")
    # What the backward pass recomputes may change (a resume on a machine with less memory).
    train(load_config("fmnist:S/8,smoke", [f"data.path={fmnist_dir}", "train.steps=6", "model.remat=True",
                                           "model.remat_policy=dots_saveable"]), tmp_path / "run")
    assert json.loads(manifest_path.read_text())["status"] == "finished"


def _zero_bytes_in_the_largest_state_file(checkpoint: Path) -> None:
    data_files = sorted((p for p in (checkpoint / "state").rglob("*") if p.is_file() and p.stat().st_size > 1000),
                        key=lambda p: -p.stat().st_size)
    blob = bytearray(data_files[0].read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)
    data_files[0].write_bytes(blob)


def _alter_the_recorded_checksum(checkpoint: Path) -> None:  # as if a value had changed and still decoded
    path = checkpoint / "meta" / "metadata"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "checksum": (meta["checksum"] + 1) % 2**32}))


@pytest.mark.parametrize("damage, error", [
    # Zeros in a chunk either fail to decode (as an array, or as its zstd stream) or decode to other values,
    # depending on where they land.
    (_zero_bytes_in_the_largest_state_file,
     "error while reading array|Data corruption detected|does not match its checksum"),
    (lambda checkpoint: shutil.rmtree(checkpoint / "meta"), 'Item "meta" was not found'),
    (_alter_the_recorded_checksum, "does not match its checksum"),
], ids=["corrupt", "partial", "altered"])
def test_damaged_checkpoint_is_skipped_with_a_warning(fmnist_dir, tmp_path, caplog, damage, error):
    config = load_config("fmnist:S/8,smoke", [f"data.path={fmnist_dir}", *TINY])
    train(config, tmp_path / "run")  # checkpoints at 10 and 20
    damage(tmp_path / "run" / "checkpoints" / "20")
    with pytest.raises(Exception, match=error):  # never read as if it were sound
        load_final_params(tmp_path / "run")
    apply_override(config, "train.steps=30")
    with caplog.at_level(logging.WARNING):
        train(config, tmp_path / "run")
    assert "step 20" in caplog.text and "skipping it" in caplog.text
    assert len(list((tmp_path / "run" / "corrupt_checkpoints").iterdir())) == 1
    assert [r["step"] for r in read_records(tmp_path / "run" / "records.jsonl")] == [5, 10, 15, 20, 25, 30]


def test_checkpoint_without_a_checksum_loads_with_a_warning(fmnist_dir, tmp_path, caplog):
    config = load_config("fmnist:S/8,smoke", [f"data.path={fmnist_dir}", *TINY])
    train(config, tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "20" / "meta" / "metadata"
    path.write_text(json.dumps({"wall_time": json.loads(path.read_text())["wall_time"]}))  # as written before
    apply_override(config, "train.steps=25")
    with caplog.at_level(logging.WARNING):
        train(config, tmp_path / "run")
    assert "before checkpoints carried checksums" in caplog.text
    assert [r["step"] for r in read_records(tmp_path / "run" / "records.jsonl")] == [5, 10, 15, 20, 25]
    assert not (tmp_path / "run" / "corrupt_checkpoints").exists()


def test_state_checksum_sees_every_change():
    import jax
    import jax.numpy as jnp

    from scaling.checkpoints import state_checksum

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    state = {"params": {"w": w, "b": jnp.asarray(rng.standard_normal(5), jnp.bfloat16)},
             "step": jnp.asarray(7, jnp.int32), "rng": jnp.asarray([1, 2], jnp.uint32)}

    def brute_force(tree):  # sum over leaves and positions i of (crc32(path) | 1)(2i+1) bits, modulo 2^32
        total = 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            leaf = np.asarray(leaf)
            bits = leaf.view({2: np.uint16, 4: np.uint32}[leaf.dtype.itemsize]).ravel().astype(np.int64)
            total += (zlib.crc32(name.encode()) | 1) * int(np.sum(bits * (2 * np.arange(bits.size) + 1)))
        return total % 2**32

    assert state_checksum(state) == brute_force(state)
    # The same arrays as a checkpoint restores them (string keys, lists) have the same checksum.
    restored = {"params": {"b": state["params"]["b"], "w": w}, "rng": state["rng"], "step": state["step"]}
    assert state_checksum({**restored, "blocks": {str(i): jnp.full(2, i) for i in range(12)}}) == \
        state_checksum({**state, "blocks": {i: jnp.full(2, i) for i in range(12)}})
    changed = [{**state, "params": {**state["params"], "w": w.at[1, 2].multiply(-1)}},  # a sign
               {**state, "params": {**state["params"], "w": w.at[0, 0].set(np.nextafter(w[0, 0], np.inf))}},
               {**state, "params": {**state["params"], "w": w.at[0, 1].set(w[2, 3]).at[2, 3].set(w[0, 1])}},
               {**state, "params": {**state["params"], "b": state["params"]["b"].at[4].add(1)}},
               {**state, "step": state["step"] + 1}]
    for tree in changed:
        assert state_checksum(tree) != state_checksum(state)
        assert state_checksum(tree) == brute_force(tree)


def test_divergence_stops_with_the_last_good_state(tmp_path, capsys):
    rng = np.random.default_rng(0)
    moments = rng.standard_normal((64, 2, 8, 8, 8)).astype(np.float32)
    moments[..., 4:] = -3.0  # log-variance
    write_latents(tmp_path / "latents", moments, rng.integers(0, 5, 64), classes=list("abcde"), resolution=64,
                  scale=0.18215, autoencoder={}, shard_size=40)
    overrides = [f"data.path={tmp_path / 'latents'}", "data.resolution=64", "eval.every=0", "train.batch_size=8",
                 "train.steps=30",
                 "train.log_every=1", "train.checkpoint_every=10", "train.learning_rate=1e4",
                 "train.async_checkpoints=false", *TINY]
    config = load_config("imagenet256:S/2", overrides)
    with pytest.raises(TrainingDiverged, match=r"at step (\d+)\. The last good state") as error:
        train(config, tmp_path / "run")
    bad_step = int(error.value.args[0].split("at step ")[1].split(".")[0])
    records = read_records(tmp_path / "run" / "records.jsonl")
    assert [r["step"] for r in records] == list(range(1, bad_step))
    assert all(np.isfinite(r["loss"]) for r in records)
    params = load_final_params(tmp_path / "run", ema=False)
    assert all(np.isfinite(x).all() for x in leaves(params))
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "diverged"
    # The command line says so without a traceback (the same command replays the bad step).
    command = ["train", "--config", "imagenet256:S/2", "--workdir", str(tmp_path / "run")]
    assert main([*command, *[f"--config.{o}" for o in overrides]]) == 3
    assert f"at step {bad_step}. The last good state" in capsys.readouterr().err
    # The checkpointed state is exactly that of a run stopped just before the bad step.
    apply_override(config, f"train.steps={bad_step - 1}")
    train(config, tmp_path / "stopped")
    for a, b in zip(leaves(params), leaves(load_final_params(tmp_path / "stopped", ema=False)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_several_steps_per_call_compute_what_single_steps_do(fmnist_dir, tmp_path):
    def run(name, *overrides):
        config = load_config("fmnist:S/8,smoke", [f"data.path={fmnist_dir}", "train.log_every=10", *TINY, *overrides])
        train(config, tmp_path / name)
        return {r["step"]: r["loss"] for r in read_records(tmp_path / name / "records.jsonl")}

    single = run("single")
    # Five steps per call, stopped at step 15; resumed with ten per call: the first call (5 steps) regains the grid.
    run("called", "train.steps=15", "train.steps_per_call=5")
    called = run("called", "train.steps_per_call=10")
    assert sorted(called) == [10, 15, 20]
    np.testing.assert_allclose([called[10], called[20]], [single[10], single[20]], rtol=1e-5)
    for a, b in zip(leaves(load_final_params(tmp_path / "called")), leaves(load_final_params(tmp_path / "single")),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"steps_per_call \(3\) must divide train.steps \(20\)"):
        validate(load_config("fmnist:S/8,smoke", ["train.steps_per_call=3"]))


def test_train_step_reports_the_gradient_norm():
    # After AdamW's first step its first moment is (1 - b1) g: an independent read of the gradient.
    import jax
    import jax.numpy as jnp

    from models.diffusion import GaussianDiffusion, linear_betas
    from models.dit import DiTConfig
    from scaling.configs.common import base_config
    from scaling.train_step import init_state, make_optimizer, make_train_step

    config = base_config()
    model_config = DiTConfig(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10)
    optimizer = make_optimizer(config)
    step = jax.jit(make_train_step(model_config, GaussianDiffusion(linear_betas(1000)), optimizer, 0.9999))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 4), jnp.int32)}
    state, metrics = step(init_state(model_config, optimizer, 0), batch)
    first_moment = np.concatenate([np.ravel(x) for x in leaves(state["opt_state"][0].mu)]).astype(np.float64)
    expected = np.linalg.norm(first_moment) / (1 - config.train.b1)
    assert bool(metrics["finite"])
    np.testing.assert_allclose(float(metrics["grad_norm"]), expected, rtol=1e-5)


# Ten steps with one evaluation: the same run on one device, four simulated devices, and two processes.
# -- the grid --------------------------------------------------------------------------------------------------------


def test_grid_selection():
    models = ["S/8", "S/4", "S/2", "B/8", "B/4", "DiT-B/2"]
    assert grid_models("fmnist", models, ["B/4", "DiT-S/8"]) == ["S/8", "B/4"]
    assert grid_models("fmnist") == [short_name(m) for m in PAPER_MODELS]
    # A plugged-in family's grid trains its members by default.
    assert grid_models("modern_dit_fmnist", None, ["XL/4", "S/4"]) == ["S/4", "XL/4"]
    with pytest.raises(ValueError, match="outside the study"):
        grid_models("fmnist", models, ["XL/2"])
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("2")
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("3/3")


def test_shards_balance_training_compute(capsys):
    configs = load_grid_configs("imagenet256", [short_name(m) for m in PAPER_MODELS], validate=False)
    cost = remaining_costs(configs)
    # Paper convention: Gflops (MACs) x 3 x batch x steps, times 2 FLOPs per MAC.
    assert cost["XL/2"] == pytest.approx(2 * 3 * 118.6e9 * 256 * 400_000, rel=0.01)
    shards = plan_shards(cost, 3)
    assert sorted(sum(shards, [])) == sorted(configs)  # every run in exactly one shard
    loads = sorted(sum(cost[m] for m in shard) for shard in shards)
    # XL/2 alone is over a third of the grid: it is a shard by itself, the others within 1.3x of each other.
    assert ["XL/2"] in shards and cost["XL/2"] > sum(cost.values()) / 3
    assert loads[1] / loads[0] <= 1.3
    assert plan_shards(dict(reversed(cost.items())), 3) == shards  # the same split on every machine

    # Against the best split by brute force: LPT is within Graham's 4/3 - 1/(3m) of it.
    few = {m: cost[m] for m in ["XL/4", "L/4", "B/2", "B/4", "S/2", "XL/8", "L/8", "S/4"]}
    best = min(max(sum(cost[m] for m, side in zip(few, sides, strict=True) if side == s) for s in (0, 1))
               for sides in itertools.product((0, 1), repeat=len(few)))
    planned = max(sum(cost[m] for m in shard) for shard in plan_shards(few, 2))
    assert cost["XL/2"] == run_training_flops(configs["XL/2"])
    assert best <= planned <= (4 / 3 - 1 / 6) * best

    assert main(["grid", "--config", "imagenet256", "--workdir", "unused", "--plan-shards", "3"]) == 0
    out = capsys.readouterr().out
    assert "--shard 0/3" in out and "XL/2 alone exceeds an equal share" in out


def _record_steps(workdir: Path, steps: list[int], step_time: float) -> None:
    for step in steps:
        schema.append_jsonl(workdir / schema.STEPS_FILE, schema.StepRecord.of(
            step=step, global_batch=8, gflops_per_image=1.0, loss=0.5, mse=0.5, vb=None, grad_norm=1.0,
            wall_time=step * step_time, time=0.0, step_time=step_time, flops_per_step=1.0, peak_flops=1.0).to_json())


def test_shards_use_measured_step_times_and_the_first_plan_stands(tmp_path):
    models = ["S/8", "S/4", "B/8", "B/4"]
    configs = load_grid_configs("fmnist", models, validate=False)
    workdirs = {m: tmp_path / run_name(c) for m, c in configs.items()}
    by_compute = remaining_costs(configs, workdirs)
    assert by_compute == {m: run_training_flops(c) for m, c in configs.items()}
    # S/8 measured 100x slower per FLOP than B/8, halfway through; the others are priced at the median rate.
    steps = configs["S/8"].train.steps
    flops_per_step = {m: run_training_flops(c) / steps for m, c in configs.items()}
    _record_steps(workdirs["S/8"], [steps // 2], 100 * 1e-9 * flops_per_step["S/8"])
    _record_steps(workdirs["B/8"], [steps // 2], 1e-9 * flops_per_step["B/8"])
    measured = remaining_costs(configs, workdirs)
    assert measured["S/8"] == pytest.approx(100e-9 * flops_per_step["S/8"] * steps / 2)
    assert measured["B/8"] == pytest.approx(1e-9 * flops_per_step["B/8"] * steps / 2)
    rate = np.median([100e-9, 1e-9])
    assert measured["B/4"] == pytest.approx(rate * run_training_flops(configs["B/4"]))

    first = shard_plan(configs, 2, tmp_path, workdirs, write=True)
    assert first == plan_shards(measured, 2) and (tmp_path / "shards-2.json").is_file()
    _record_steps(workdirs["S/4"], [steps - 1], 1e3)  # new records change the costs, not the kept split
    assert shard_plan(configs, 2, tmp_path, workdirs, write=True) == first
    with pytest.raises(ValueError, match="splits other configs"):
        shard_plan({m: configs[m] for m in models[:3]}, 2, tmp_path, workdirs, write=False)


def test_grid_skips_finished_runs_and_survives_a_failure(fmnist_dir, tmp_path, capsys):
    overrides = [f"data.path={fmnist_dir}", "train.steps=5"]
    outcome = run_grid("fmnist:smoke", tmp_path, models=["S/8", "S/3", "B/8"], overrides=overrides)
    assert outcome["S/8"] == "finished" and outcome["B/8"] == "finished"
    assert outcome["S/3"].startswith("failed") and "not divisible by patch_size 3" in outcome["S/3"]
    again = run_grid("fmnist:smoke", tmp_path, models=["S/8", "B/8"], overrides=overrides)
    assert again == {"S/8": "skipped", "B/8": "skipped"}
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DiT-S-8" in out and "finished" in out and "5/5" in out
    # Another conditioning block of the same model is another run in the same grid directory (the ablation).
    ablation = run_grid("fmnist:smoke", tmp_path, models=["S/8"], overrides=[*overrides, "model.block=in-context"])
    assert ablation == {"S/8": "finished"}
    assert json.loads((tmp_path / "DiT-S-8-in-context" / "manifest.json").read_text())["block"] == "in-context"
    assert json.loads((tmp_path / "DiT-S-8" / "manifest.json").read_text())["block"] == "adaLN-Zero"


def test_grid_workers_report_failures_through_their_manifests_and_logs(fmnist_dir, tmp_path, capsys):
    """Two workers: a diverged run's reason is the error its manifest records; a run that fails before it has a
    manifest is described by the last line of its log; the progress lines reach the console."""
    overrides = [f"data.path={fmnist_dir}", "train.steps=20", "train.log_every=1", "train.learning_rate=1e4", *TINY]
    outcome = run_grid("fmnist:smoke", tmp_path, models=["S/8", "S/3"], overrides=overrides, workers=2)
    manifest = schema.read_manifest(tmp_path / "DiT-S-8")
    assert manifest.status == "diverged" and manifest.error.startswith("TrainingDiverged: Loss is ")
    assert outcome["S/8"] == f"failed: {manifest.error}"
    assert not (tmp_path / "DiT-S-3" / schema.MANIFEST_FILE).exists()
    last_line = (tmp_path / "DiT-S-3" / schema.LOG_FILE).read_text().rstrip().splitlines()[-1]
    assert "not divisible by patch_size 3" in last_line and outcome["S/3"] == f"failed: exit code 1: {last_line}"
    out = capsys.readouterr().out
    assert "[DiT-S-8] step 1/20" in out and "Traceback" not in out  # progress shown; details in the logs only
    assert "Traceback" in (tmp_path / "DiT-S-8" / schema.LOG_FILE).read_text()


_OPENBLAS_THREADS = """
import ctypes
import numpy  # loads OpenBLAS
(library,) = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line and ".so" in line}
blas = ctypes.CDLL(library)
print(next(getattr(blas, name)() for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                                               "openblas_get_num_threads") if hasattr(blas, name)))
"""


@pytest.mark.skipif(sys.platform != "linux" or os.cpu_count() < 2, reason="finds OpenBLAS through /proc; 2 cores")
def test_a_worker_on_one_core_runs_blas_on_one_thread(monkeypatch):
    """numpy's OpenBLAS starts a thread per core of the machine, and its idle threads spin on the other workers'
    cores; a worker confined to one core has one."""
    import subprocess

    from scaling.grid import worker_environment

    def threads(env):
        return int(subprocess.run([sys.executable, "-c", _OPENBLAS_THREADS], env=env, capture_output=True,
                                  text=True, check=True).stdout)

    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):  # set for every test process by conftest.py
        monkeypatch.delenv(variable, raising=False)
    assert threads(dict(os.environ)) > 1
    assert threads(worker_environment([0])) == 1


# -- evaluation during training -------------------------------------------------------------------------------


def test_evaluations_are_recorded_with_their_protocol_and_never_repeated(fmnist_dir, tmp_path, capsys):
    overrides = [f"data.path={fmnist_dir}", "eval.every=10", "eval.num_samples=24", "eval.batch_size=8",
                 "eval.sampling_steps=(5, 10)", "eval.num_reference=100", "eval.classifier_epochs=1",
                 "eval.validation_examples=8", "eval.validation_timesteps=2", "eval.validation_every=5"]
    config = load_config("fmnist:S/8,smoke", overrides)
    train(config, tmp_path / "run")
    path = tmp_path / "run" / "evaluations.jsonl"
    evaluations = read_records(path)
    # The held-out loss on its own, denser schedule; the samples every eval.every steps.
    assert [(r["step"], r["protocol"]["sampling_steps"]) for r in evaluations] == [
        (5, None), (10, 5), (10, 10), (10, None), (15, None), (20, 5), (20, 10), (20, None)]
    assert {r["metric"] for r in evaluations if r["protocol"]["sampler"] is None} == {"val-loss-8"}
    validation = [r for r in evaluations if not r["protocol"]["sampler"]]
    evaluations = [r for r in evaluations if r["protocol"]["sampler"]]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for record in evaluations:
        assert record["metric"] == "FD-FashionCNN-24" and record["value"] > 0
        assert 0 <= record["precision"] <= 1 and 0 <= record["class_accuracy"] <= 1
        assert 1 <= record["classifier_score"] <= 10
        assert record["protocol"]["num_samples"] == 24 and record["protocol"]["sampler"] == "dpm-solver++"
        assert record["sampling_gflops_per_image"] == pytest.approx(
            manifest["gflops_per_image"] * record["protocol"]["sampling_steps"])
        assert record["train_gflops_cumulative"] == pytest.approx(3 * manifest["gflops_per_image"] * 8 * record["step"])
    assert "eval step 20: FD-FashionCNN-24" in capsys.readouterr().out
    # The floor: the first 24 held-out test images against the same reference, the Frechet distance of their
    # FashionCNN features computed here in closed form; one value for the run (real images do not train).
    import scipy.linalg

    from scaling import data as data_lib
    from scaling.evaluation.fd_fashion_cnn import classifier_outputs
    from scaling.evaluation.in_training import prepare_feature_network

    assert len({(r["floor"], r["floor_class_accuracy"]) for r in evaluations}) == 1
    # At 16x16 (the fmnist config's), enlarged 2x2 for the classifier as the samples are.
    source = data_lib.FashionMNIST(str(fmnist_dir), resolution=16)
    classifier = prepare_feature_network(config, source)
    reference = classifier_outputs(classifier, source.at_classifier_resolution(source.images[:100]))[0]
    reference = reference.astype(np.float64)
    test_images = data_lib.FashionMNIST(str(fmnist_dir), split="test", resolution=16).images[:24]
    held_out = classifier_outputs(classifier, source.at_classifier_resolution(test_images))[0]
    held_out = held_out.astype(np.float64)
    a, b = np.cov(reference, rowvar=False), np.cov(held_out, rowvar=False)
    # tr sqrt(AB) from the eigenvalues of AB (real and >= 0 for covariances; 24 images leave most of them 0)
    trace_sqrt = np.sum(np.sqrt(np.clip(scipy.linalg.eigvals(a @ b).real, 0, None)))
    expected = np.sum((reference.mean(0) - held_out.mean(0)) ** 2) + np.trace(a + b) - 2 * trace_sqrt
    assert evaluations[0]["floor"] == pytest.approx(expected, rel=1e-4)
    assert 0 <= evaluations[0]["floor_class_accuracy"] <= 1

    # The same command on the finished run evaluates nothing again; a lost evaluation is recomputed, identically.
    path.write_text("".join(json.dumps(r) + "\n" for r in evaluations[:2]))
    train(config, tmp_path / "run")
    again = read_records(path)
    assert [r["value"] for r in again if r["protocol"]["sampler"] is None] == pytest.approx(
        [validation[-1]["value"]], rel=1e-9)
    again = [r for r in again if r["protocol"]["sampler"]]
    assert [(r["step"], r["protocol"]) for r in again] == [(r["step"], r["protocol"]) for r in evaluations]
    assert [r["value"] for r in again] == pytest.approx([r["value"] for r in evaluations], rel=1e-9)
    assert main(["status", str(tmp_path)]) == 0
    assert f"FD-FashionCNN-24={again[-1]['value']:.4g} (step 20), val-loss-8=" in capsys.readouterr().out

    # The records are the contract with analysis/: its loader reads this run as it was written.
    loaded = records.load(tmp_path)
    assert loaded.runs.loc[0, "model"] == "DiT-S/8" and loaded.runs.loc[0, "resolution"] == 16
    assert loaded.runs.loc[0, "status"] == "finished"
    assert loaded.runs.loc[0, "gflops"] == manifest["gflops_per_image"] and loaded.runs.loc[0, "batch_size"] == 8
    written = schema.read_steps(tmp_path / "run")
    assert list(loaded.steps["step"]) == [r.step for r in written] == [5, 10, 15, 20]
    for field in schema.StepRecord.field_docs():  # every field as written
        assert loaded.steps[field].tolist() == [getattr(r, field) for r in written], field
    manifest_record = schema.read_manifest(tmp_path / "run")
    assert (manifest_record.size, manifest_record.patch, manifest_record.resolution) == ("S", 8, 16)
    assert manifest_record.code_revision  # the tests run in a git checkout
    table = loaded.evaluations
    assert table.loc[table["sampler"].isna(), "val_loss"].tolist()[-1] == validation[-1]["value"]
    table = table[table["sampler"].notna()]
    assert list(table["fd_fashioncnn"]) == [r["value"] for r in again]
    assert list(table["sampling_steps"]) == [5, 10, 5, 10] and table["protocol"].nunique() == 2
    assert table["sampling_gflops_per_image"].tolist() == [r["sampling_gflops_per_image"] for r in again]


def test_evaluation_settings_are_checked():
    with pytest.raises(ValueError, match="needs data.autoencoder .* and eval.reference"):
        validate(load_config("imagenet256:S/8", ["eval.every=100"]))
    validate(load_config("imagenet256:S/8", ["data.autoencoder=vae", "eval.reference=ref.npz"]))
    with pytest.raises(ValueError, match="eval.sampler must be one of ddpm, ddim, dpm-solver\\+\\+"):
        validate(load_config("fmnist:S/8", ["eval.sampler=euler"]))
    validate(load_config("fmnist:S/8", ["eval.guidance_scale=2.0"]))  # guides the one channel there is
    with pytest.raises(ValueError, match="single image channel"):
        validate(load_config("fmnist:S/8", ["eval.guidance_scale=2.0", "eval.guidance_channels=3"]))
    with pytest.raises(ValueError, match="keep_every must be 0 or a multiple of train.checkpoint_every"):
        validate(load_config("imagenet256:S/8", ["train.keep_every=12345"]))
    with pytest.raises(ValueError, match="model.dtype must be auto or one of float32, bfloat16, float16"):
        validate(load_config("fmnist:S/8", ["model.dtype=fp8"]))


def test_embedded_default_data_is_fashion_mnist():
    # Installed by `make` from Debian's dataset-fashion-mnist.
    source = FashionMNIST()
    assert len(source) == 60_000 and source.images.shape == (60_000, 32, 32, 1)
    np.testing.assert_array_equal(np.bincount(source.labels), [6000] * 10)
    assert len(FashionMNIST(split="test")) == 10_000


def test_records_reach_tensorboard(fmnist_dir, tmp_path):
    # TensorBoard's own reader (it checks each record's CRCs) against the run's step records.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(load_config("fmnist:S/8,smoke", [f"data.path={fmnist_dir}", *TINY]), tmp_path / "run")
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    steps = schema.read_steps(tmp_path / "run")
    assert [e.step for e in board.Scalars("loss")] == [r.step for r in steps] == [5, 10, 15, 20]
    np.testing.assert_allclose([e.value for e in board.Scalars("loss")], [r.loss for r in steps], rtol=1e-6)
    assert "utilization" in board.Tags()["scalars"]


def test_checkpoints_by_wall_time(fmnist_dir, tmp_path):
    # A cadence of a tiny fraction of a minute is due at every logged step (5, 10, 15): by steps alone only 20.
    by_steps = ["--config.train.checkpoint_every=20", "--config.train.keep_checkpoints=10", *TINY]
    assert main(["train", *smoke(fmnist_dir, "--workdir", str(tmp_path / "steps"), *by_steps)]) == 0
    assert sorted(int(p.name) for p in (tmp_path / "steps" / "checkpoints").iterdir()) == [20]
    timed = [*by_steps, "--config.train.checkpoint_minutes=1e-9"]
    assert main(["train", *smoke(fmnist_dir, "--workdir", str(tmp_path / "timed"), *timed)]) == 0
    assert sorted(int(p.name) for p in (tmp_path / "timed" / "checkpoints").iterdir()) == [5, 10, 15, 20]
    # The cadence may change when the run resumes (it changes no training); a negative one is refused.
    assert main(["train", *smoke(fmnist_dir, "--workdir", str(tmp_path / "timed"), *by_steps,
                                 "--config.train.steps=40")]) == 0
    assert sorted(int(p.name) for p in (tmp_path / "timed" / "checkpoints").iterdir()) == [5, 10, 15, 20, 40]
    with pytest.raises(ValueError, match="train.checkpoint_minutes must be >= 0"):
        validate(load_config("fmnist:S/8,smoke", ["train.checkpoint_minutes=-1"]))
