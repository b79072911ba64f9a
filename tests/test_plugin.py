"""A new architecture through the same grid: the factory contract, its errors, its compute, training, resuming,
evaluating and sampling through the grid (models/plugin.py, models/modern_dit.py)."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from run_helpers import REPO

from analysis import records, schema
from models.dit import DiTConfig
from models.flops import dit_compute, model_compute
from models.modern_dit import swiglu_hidden_size
from models.plugin import FactoryConfig, FactoryError, check_contract, config_from_json, config_to_json
from scaling.cli import main
from scaling.grid import run_grid

MODERN = "models.modern_dit:build"
MINIATURE_S4 = {"depth": 2, "hidden_size": 24, "num_heads": 3, "patch_size": 4}


def modern_macs_closed_form(*, input_size, in_channels, learn_sigma, depth, hidden_size, patch_size, **_) -> int:
    """ModernDiT's forward MACs per image, term by term (models/modern_dit.py's docstring)."""
    t, d, h, p2 = (input_size // patch_size) ** 2, hidden_size, swiglu_hidden_size(hidden_size), patch_size**2
    out = 2 * in_channels if learn_sigma else in_channels
    block = 6 * d * d + 4 * t * d * d + 2 * t * t * d + 3 * t * d * h
    return t * p2 * in_channels * d + 256 * d + d * d + depth * block + 2 * d * d + t * d * p2 * out


@pytest.mark.parametrize("args,shape", [
    (MINIATURE_S4, (32, 1, 10, True)),
    ({"depth": 5, "hidden_size": 72, "num_heads": 8, "patch_size": 2}, (32, 1, 10, False)),  # head_dim 9: partial
    ({"depth": 3, "hidden_size": 64, "num_heads": 4, "patch_size": 2}, (16, 4, 1000, True)),  # rotary
])
def test_factory_gflops_equal_the_closed_form(args, shape):
    input_size, channels, classes, learn_sigma = shape
    config = FactoryConfig.of(MODERN, family="ModernDiT", size="X", args=args, input_size=input_size,
                              in_channels=channels, num_classes=classes, learn_sigma=learn_sigma)
    check_contract(config)
    compute = model_compute(config)
    assert compute.macs == modern_macs_closed_form(input_size=input_size, in_channels=channels,
                                                   learn_sigma=learn_sigma, **args)
    assert compute.tokens == (input_size // args["patch_size"]) ** 2 and compute.model == "ModernDiT-X"
    # Where 8d/3 is whole (d = 24, 72), SwiGLU's three matrices cost what DiT's 4d-wide MLP does: equal Gflops.
    dit = dit_compute(DiTConfig(depth=args["depth"], hidden_size=args["hidden_size"], num_heads=args["num_heads"],
                                patch_size=args["patch_size"], input_size=input_size, in_channels=channels,
                                num_classes=classes, learn_sigma=learn_sigma))
    assert (compute.macs == dit.macs) == (8 * args["hidden_size"] % 3 == 0)
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config


def test_flops_command_counts_a_factory(capsys):
    arguments = ["flops", "--jax", "models/modern_dit.py:build", "--input-size", "32", "--channels", "1",
                 "--classes", "10", *sum((["--arg", f"{k}={v}"] for k, v in MINIATURE_S4.items()), []), "--json"]
    assert main(arguments) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["macs"] == modern_macs_closed_form(input_size=32, in_channels=1, learn_sigma=True, **MINIATURE_S4)
    assert row["gflops"] == row["macs"] / 1e9 and row["tokens"] == 64 and len(row["source_sha256"]) == 64
    assert main(arguments[:-1]) == 0
    assert "models/modern_dit.py:build" in capsys.readouterr().out


BROKEN = {
    "no_rngs": ("def build(*, input_size, in_channels, num_classes, learn_sigma):\n    return None\n",
                "lacks the argument(s) rngs of the contract"),
    "needs_depth": ("def build(*, input_size, in_channels, num_classes, learn_sigma, rngs, depth):\n"
                    "    return None\n", "requires depth"),
    "not_a_module": ("def build(**kwargs):\n    return lambda x, t, y: x\n", "not a flax.nnx Module"),
    "wrong_channels": ("class M(nnx.Module):\n    def __call__(self, x, t, y, dropout_key=None):\n        return x\n"
                       "def build(**kwargs):\n    return M()\n", "returned (2, 8, 8, 1); the contract is (2, 8, 8, 2)"),
    "no_dropout_key": ("class M(nnx.Module):\n    def __call__(self, x, t, y):\n"
                       "        return jnp.concatenate([x, x], -1)\n"
                       "def build(**kwargs):\n    return M()\n",
                       "cannot be called as model(x, t, y, dropout_key=None)"),
    "nan_at_init": ("class M(nnx.Module):\n    def __call__(self, x, t, y, dropout_key=None):\n"
                    "        return jnp.concatenate([x, x], -1) / 0.0 * 0.0\n"
                    "def build(**kwargs):\n    return M()\n", "at initialisation is not finite"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_factory_gets_an_error_naming_what_is_wrong(tmp_path, name):
    source, message = BROKEN[name]
    path = tmp_path / f"{name}.py"
    path.write_text("import jax.numpy as jnp\nfrom flax import nnx\n" + source)
    config = FactoryConfig.of(f"{path}:build", input_size=8, in_channels=1, num_classes=3)
    with pytest.raises(FactoryError, match=re.escape(message)):
        check_contract(config)


def test_factory_names_that_lead_nowhere(tmp_path):
    with pytest.raises(FactoryError, match="path/to/file.py:FUNCTION or package.module:FUNCTION"):
        FactoryConfig.of("models/modern_dit.py", input_size=8, in_channels=1, num_classes=3)
    with pytest.raises(FactoryError, match="no file"):
        FactoryConfig.of(f"{tmp_path}/missing.py:build", input_size=8, in_channels=1, num_classes=3)
    with pytest.raises(FactoryError, match="cannot import 'no_such_package.net'"):
        FactoryConfig.of("no_such_package.net:build", input_size=8, in_channels=1, num_classes=3)
    with pytest.raises(FactoryError, match="has no function 'make'"):
        check_contract(FactoryConfig.of("models.modern_dit:make", input_size=8, in_channels=1, num_classes=3))
    with pytest.raises(FactoryError, match="takes no argument\\(s\\) width"):
        check_contract(FactoryConfig.of(MODERN, args={**MINIATURE_S4, "width": 3}, input_size=8, in_channels=1,
                                        num_classes=3))


def test_a_factory_model_trains_resumes_evaluates_and_samples_through_the_grid(fmnist_dir, tmp_path, capsys):
    """A copy of the example as a user's file: the grid trains two family members with evaluation, resumes one
    past its end, and refuses to resume it once the factory's source has changed; sampling (guided) and the
    records work as for DiT."""
    factory = tmp_path / "my_family.py"
    shutil.copy(REPO / "models" / "modern_dit.py", factory)
    overrides = [f"data.path={fmnist_dir}", f"model.factory={factory}:build", "model.family=Mine", "train.steps=10",
                 "eval.every=10", "eval.num_samples=16", "eval.batch_size=8", "eval.sampling_steps=(4,)",
                 "eval.num_reference=100", "eval.classifier_epochs=1", "train.checkpoint_every=10"]
    runs = tmp_path / "runs"
    outcome = run_grid("modern_dit_fmnist:smoke", runs, models=["S/8", "B/8"], overrides=overrides)
    assert outcome == {"S/8": "finished", "B/8": "finished"}
    manifest = schema.read_manifest(runs / "Mine-S-8")
    assert (manifest.model_name, manifest.block, manifest.size, manifest.patch) == ("Mine-S/8", "Mine", None, None)
    assert manifest.model["factory"] == f"{factory}:build" and len(manifest.model["source_sha256"]) == 64
    assert manifest.macs_per_image == modern_macs_closed_form(input_size=16, in_channels=1, learn_sigma=True,
                                                              depth=2, hidden_size=24, patch_size=4)
    evaluations = schema.read_evaluations(runs / "Mine-S-8")
    assert [(e.step, e.metric) for e in evaluations] == [(10, "FD-FashionCNN-16")] and evaluations[0].value > 0

    # Resumed past its end: the steps continue from the checkpoint, every step recorded once.
    again = run_grid("modern_dit_fmnist:smoke", runs, models=["S/8"], overrides=[*overrides, "train.steps=20"])
    assert again == {"S/8": "finished"}
    steps = [r.step for r in schema.read_steps(runs / "Mine-S-8")]
    assert steps == sorted(set(steps)) and steps[-1] == 20 and 10 in steps
    assert [e.step for e in schema.read_evaluations(runs / "Mine-S-8")] == [10, 20]
    loaded = records.load(runs)
    assert sorted(loaded.runs["model"]) == ["Mine-B/8", "Mine-S/8"]

    # Guided sampling from the run, with the toolkit's guidance.
    out = tmp_path / "samples.npz"
    assert main(["sample", str(runs / "Mine-S-8"), "--out", str(out), "--num", "8", "--batch-size", "8",
                 "--sampler", "ddim", "--sampling-steps", "4", "--guidance-scale", "2.0",
                 "--guidance-channels", "1"]) == 0
    images = np.load(out)["arr_0"]
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0  # ADM's RGB layout
    capsys.readouterr()

    # The factory's source changed: its weights mean nothing to the new code, so the run does not resume.
    factory.write_text(factory.read_text() + "\n# changed\n")
    changed = run_grid("modern_dit_fmnist:smoke", runs, models=["S/8"], overrides=[*overrides, "train.steps=30"])
    assert changed["S/8"].startswith("failed") and "another version of the model factory" in changed["S/8"]
    assert [r.step for r in schema.read_steps(runs / "Mine-S-8")][-1] == 20  # nothing lost


def test_factory_arguments_from_the_command_line(fmnist_dir, tmp_path):
    """A single factory model without a family: model.factory_args.NAME=VALUE overrides give build() its
    arguments."""
    assert main(["train", "--config", "fmnist:S/8,smoke", "--workdir", str(tmp_path / "run"),
                 f"--config.data.path={fmnist_dir}", "--config.model.factory=models/modern_dit.py:build",
                 "--config.train.steps=5", *(f"--config.model.factory_args.{k}={v}" for k, v in MINIATURE_S4.items())
                 ]) == 0
    manifest = schema.read_manifest(tmp_path / "run")
    assert manifest.model_name == "modern_dit" and manifest.model["args"] == MINIATURE_S4
    assert manifest.config["model"]["factory_args"] == MINIATURE_S4


# -- comparison from records ---------------------------------------------------------------------------------------

RECIPE = {"train": {"batch_size": 64, "learning_rate": 3e-3, "weight_decay": 0.0, "b1": 0.9, "b2": 0.99,
                    "eps": 1e-8, "ema_decay": 0.99}, "diffusion": {"num_timesteps": 1000},
          "data": {"source": "fashion_mnist", "resolution": 0, "flip": True},
          "model": {"learn_sigma": True, "class_dropout_prob": 0.1}}
PROTOCOL = schema.EvaluationProtocol(sampler="ddim", sampling_steps=8, guidance_scale=1.0, guidance_channels=None,
                                     num_samples=250, seed=0, uint8_convention="dit", reference="fmnist train",
                                     feature_network="FashionCNN")


def write_family(directory, family: str, gflops: list[float], speedup: float, recipe=RECIPE, protocol=PROTOCOL):
    """Run directories as the grid writes them: FD = 10 + 400 (speedup x C)^-0.3 at steps 1000, 2000 and 4000."""
    for g in gflops:
        run = directory / schema.run_dir_name(f"{family}-{g}")
        run.mkdir(parents=True)
        schema.write_manifest(run, schema.Manifest(
            model_name=f"{family}-{g}", size=None, patch=None, block=family, resolution=32, gflops_per_image=g,
            macs_per_image=int(g * 1e9), params=1000, tokens=16, global_batch=64, seed=0, total_steps=4000,
            config=recipe, model={}, data={}, status="finished", final_step=4000))
        for step in (1000, 2000, 4000):
            compute = schema.training_compute(g, 64, step)
            value = 10 + 400 * (speedup * compute) ** -0.3 * (1 + 0.1 * np.log(g + 1))
            schema.append_jsonl(run / schema.EVALUATIONS_FILE, schema.EvaluationRecord.of(
                step=step, metric="FD-FashionCNN-250", value=float(value), protocol=protocol, gflops_per_image=g,
                global_batch=64).to_json())
    return directory


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dit = write_family(root / "dit", "DiT", [0.5, 1.0, 2.0, 4.0, 8.0], speedup=1.0)
    new = write_family(root / "new", "New", [1.5, 3.0, 6.0], speedup=2.0)
    return dit, new


def test_compare_from_records_matches_compare_from_the_same_points_as_csv(two_families, tmp_path, capsys):
    from analysis.planning import compare_runs

    dit, new = two_families
    comparison = compare_runs(records.load(new), records.load(dit))
    assert len(comparison.table) == 9 and comparison.metric == "FD-FashionCNN-250"
    # Trained with half the compute per unit of quality, the new family needs about 2x less: DiT's multiplier.
    assert np.median(comparison.table["compute_multiplier"]) == pytest.approx(2.0, rel=0.35)
    points = comparison.points.rename(columns={"run": "name", "step": "steps", "value": "fd_fashioncnn"})[
        ["name", "gflops", "steps", "batch_size", "fd_fashioncnn"]]
    csv = tmp_path / "points.csv"
    points.to_csv(csv, index=False)
    outputs = []
    for source in (new, csv):
        assert main(["compare", str(source), "--against", str(dit), "--json"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    columns = ["gflops", "train_gflops_cumulative", "dit_compute", "dit_compute_lo", "dit_compute_hi",
               "compute_multiplier", "compute_multiplier_lo", "compute_multiplier_hi", "dit_at_same_compute",
               "dit_at_same_gflops", "extrapolated"]
    assert [[row[c] for c in columns] for row in outputs[0]] == [[row[c] for c in columns] for row in outputs[1]]
    assert sum(row["dit_at_same_gflops"] is not None for row in outputs[0]) == 3  # the points at the fit's step

    assert main(["compare", str(new), "--against", str(dit), "--figures", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert "multiplier" in out and "New-1.5" in out
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "compare_fig8_gflops.pdf", "compare_fig8_gflops.png", "compare_fig9_training_compute.pdf",
        "compare_fig9_training_compute.png"]


def test_compare_says_which_protocol_or_recipe_fields_differ(two_families, tmp_path):
    from analysis.planning import compare_runs

    dit, _ = two_families
    other_recipe = {**RECIPE, "train": {**RECIPE["train"], "learning_rate": 1e-3}}
    new = write_family(tmp_path / "lr", "New", [1.5, 3.0, 6.0], speedup=2.0, recipe=other_recipe)
    with pytest.raises(schema.RecordsError, match=r"(?s)another recipe.*train.learning_rate: new 0.001 vs DiT 0.003"):
        compare_runs(records.load(new), records.load(dit))
    fewer = write_family(tmp_path / "n", "New", [1.5, 3.0, 6.0], speedup=2.0,
                         protocol=dataclasses.replace(PROTOCOL, num_samples=250, sampling_steps=16))
    with pytest.raises(schema.RecordsError, match="another protocol"):
        compare_runs(records.load(fewer), records.load(dit))
