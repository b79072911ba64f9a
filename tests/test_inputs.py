"""Bad input to every command: a named error (the argument, the value, what it takes), exit 2, nothing written."""

import json
import math

import ml_collections
import pytest
from etils import epath
from records_factory import a_manifest

from analysis import fits, planning, schema
from analysis.schema import RecordsError
from scaling.cli import main
from scaling.config import apply_override, load_config, validate

FRACTION = "in (0, 1]"
CONFIDENCE = "in (0, 1)"
POSITIVE = "> 0"
INTEGER = ">= 1"
NON_NEGATIVE = ">= 0"

# (command line before the bad argument, the argument, the value, the accepted range the message names)
BAD_ARGUMENTS = [
    (["flops"], "--resolution", "0", INTEGER),
    (["flops"], "--resolution", "abc", INTEGER),
    (["flops", "--jax", "m.py:build"], "--input-size", "-1", INTEGER),
    (["flops", "--jax", "m.py:build"], "--channels", "0", INTEGER),
    (["flops", "--jax", "m.py:build"], "--classes", "nan", INTEGER),
    (["flops", "--jax", "m.py:build"], "--learn-sigma", "maybe", "true or false"),
    (["train", "--config", "fmnist:S/8,smoke", "--workdir", "run"], "--num-processes", "0", INTEGER),
    (["train", "--config", "fmnist:S/8,smoke", "--workdir", "run"], "--process-id", "-1", NON_NEGATIVE),
    (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--dry-run"], "--chips", "0", INTEGER),
    (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--dry-run"], "--slices", "0", INTEGER),
    (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--dry-run"], "--utilization", "1.5", FRACTION),
    (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--dry-run"], "--utilization", "nan", FRACTION),
    (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--dry-run"], "--utilization", "0", FRACTION),
    (["grid", "--config", "fmnist:smoke", "--workdir", "runs"], "--plan-shards", "0", INTEGER),
    (["grid", "--config", "fmnist:smoke", "--workdir", "runs"], "--workers", "inf", INTEGER),
    (["study", "--workdir", "study"], "--seed", "-1", NON_NEGATIVE),
    (["study", "--workdir", "study"], "--workers", "0", INTEGER),
    (["evaluate", "samples.npz", "--ref", "ref.npz", "--run", "run"], "--step", "-1", NON_NEGATIVE),
    (["evaluate", "samples.npz", "--ref", "ref.npz", "--run", "run"], "--sampling-steps", "0", INTEGER),
    (["evaluate", "samples.npz", "--ref", "ref.npz", "--run", "run"], "--guidance-scale", "0.5", ">= 1"),
    (["evaluate", "samples.npz", "--ref", "ref.npz", "--run", "run"], "--guidance-scale", "inf", ">= 1"),
    (["evaluate", "samples.npz", "--ref", "ref.npz", "--run", "run"], "--guidance-channels", "-1", NON_NEGATIVE),
    (["evaluate", "samples.npz", "--ref", "ref.npz", "--run", "run"], "--seed", "1.5", NON_NEGATIVE),
    (["evaluate", "samples.npz", "--ref", "ref.npz"], "--batch-size", "0", INTEGER),
    (["reference", "images", "ref.npz"], "--batch-size", "-8", INTEGER),
    (["sample", "run", "--out", "s.npz"], "--num", "0", INTEGER),
    (["sample", "run", "--out", "s.npz"], "--step", "-5", NON_NEGATIVE),
    (["sample", "run", "--out", "s.npz"], "--num-heads", "0", INTEGER),
    (["sample", "run", "--out", "s.npz"], "--sampling-steps", "nan", INTEGER),
    (["sample", "run", "--out", "s.npz"], "--guidance-scale", "nan", ">= 1"),
    (["sample", "run", "--out", "s.npz"], "--chunk-batches", "0", INTEGER),
    (["sweep", "run", "--ref", "ref.npz"], "--steps", "100,abc", NON_NEGATIVE),
    (["sweep", "run", "--ref", "ref.npz"], "--sampling-steps", "25,0", INTEGER),
    (["sweep", "run", "--ref", "ref.npz"], "--inception-batch-size", "0", INTEGER),
    (["extract-latents", "images", "latents", "--autoencoder", "vae"], "--resolution", "0", INTEGER),
    (["extract-latents", "images", "latents", "--autoencoder", "vae", "--resolution", "256"], "--shard-size", "-1",
     INTEGER),
    (["fit", "runs/paper", "--x", "gflops", "--y", "fid"], "--confidence", "1", CONFIDENCE),
    (["fit", "runs/paper", "--x", "gflops", "--y", "fid"], "--confidence", "nan", CONFIDENCE),
    (["fit", "runs/paper", "--x", "gflops", "--y", "fid"], "--where", "step", "COLUMN=VALUE"),
    (["fit", "runs/paper", "--x", "gflops", "--y", "fid"], "--where", "step=nan", "finite"),
    (["plan"], "--compute", "inf", POSITIVE),
    (["plan"], "--compute", "nan", POSITIVE),
    (["plan"], "--compute", "-1", POSITIVE),
    (["plan"], "--compute", "0", POSITIVE),
    (["plan"], "--target", "inf", POSITIVE),
    (["plan", "--compute", "10", "--unit", "accelerator-hours", "--chip-peak-tflops", "989"], "--utilization", "2",
     FRACTION),
    (["plan", "--compute", "10", "--unit", "accelerator-hours", "--utilization", "0.4"], "--chip-peak-tflops",
     "inf", POSITIVE),
    (["plan", "--compute", "10"], "--chips", "0", INTEGER),
    (["plan", "--compute", "10"], "--where", "resolution=inf", "finite"),
    (["isoflop"], "--budgets", "0", INTEGER),
    (["isoflop"], "--confidence", "0", CONFIDENCE),
    (["loss-proxy"], "--loss", "-0.1", POSITIVE),
    (["loss-proxy"], "--loss", "inf", POSITIVE),
    (["loss-proxy"], "--confidence", "1.5", CONFIDENCE),
    (["compare", "points.csv"], "--batch-size", "0", INTEGER),
]


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("before", "argument", "value", "accepted"), BAD_ARGUMENTS,
                         ids=[f"{b[0]} {a}={v}" for b, a, v, _ in BAD_ARGUMENTS])
def test_a_bad_number_is_refused_naming_the_argument_the_value_and_the_range(before, argument, value, accepted,
                                                                             capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, [*before, f"{argument}={value}"])
    bad_part = "abc" if value == "100,abc" else "0" if value == "25,0" else value
    assert code == 2 and not out
    assert f"argument {argument}: " in err and repr(bad_part) in err and accepted in err, err
    assert not list(tmp_path.iterdir())  # refused before anything was read or written


def test_every_numeric_argument_has_a_checked_type():
    """No command parses a number with a bare int or float: each goes through analysis.cli's types."""
    from scaling.cli import build_parser

    def actions(parser):
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):  # the subcommands
                for subparser in action.choices.values():
                    yield from actions(subparser)
            else:
                yield action

    bare = [action.option_strings for action in actions(build_parser()) if action.type in (int, float)]
    assert not bare


def test_checks_in_the_handlers_name_the_value(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, expected in [
        (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--dry-run", "--chips", "8", "--slices", "3"],
         "--slices 3: give a positive number of slices that divides --chips 8"),
        (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--shard", "2/2"], "--shard 2/2"),
        (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--shard", "one/2"], "'one/2'"),
        (["plan", "--compute", "10", "--unit", "accelerator-hours"], "accelerator-hours need --chip"),
    ]:
        code, _, err = _run(capsys, argv)
        assert code == 2 and expected in err, err
    assert not list(tmp_path.iterdir())


# -- the Python functions the commands call ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, 0.0])
def test_plans_refuse_a_compute_or_target_that_is_not_a_positive_finite_number(value):
    with pytest.raises(RecordsError, match=r"compute must be a finite number > 0, got"):
        planning.to_paper_units(value)
    with pytest.raises(RecordsError, match=r"compute must be a finite number > 0, got"):
        planning.plan_budget(None, None, value)  # refused before the fit is looked at
    with pytest.raises(RecordsError, match=r"target must be a finite number > 0, got"):
        planning.plan_target(None, None, value)


def test_accelerator_hours_refuse_out_of_range_rates():
    hours = dict(unit="accelerator-hours", utilization=0.4, chip_peak_tflops=989.0, chips=8)
    for change, message in [({"utilization": 1.5}, r"utilization .* in \(0, 1\]; got 1.5"),
                            ({"utilization": math.nan}, "utilization must be a finite number > 0, got nan"),
                            ({"chip_peak_tflops": math.inf}, "chip_peak_tflops must be a finite number > 0, got inf"),
                            ({"chips": 0}, "chips must be an integer >= 1, got 0")]:
        with pytest.raises(RecordsError, match=message):
            planning.to_paper_units(10.0, **{**hours, **change})


def test_fits_refuse_a_confidence_outside_0_1_and_no_bootstrap():
    x, y = [1.0, 2.0, 4.0, 8.0], [8.0, 4.0, 2.0, 1.0]
    for confidence in (math.nan, 1.0, 0.0, 95):
        with pytest.raises(RecordsError, match=rf"confidence must be a fraction in \(0, 1\).*got {confidence}"):
            fits.fit_loglog(x, y, confidence=confidence)
    with pytest.raises(RecordsError, match="n_bootstrap must be an integer >= 1, got 0"):
        fits.fit_loglog(x, y, n_bootstrap=0)
    with pytest.raises(RecordsError, match="n_bootstrap must be an integer >= 1, got 0"):
        fits.fit_frontier(["a"] * 4, x, y, n_bootstrap=0)


# -- status --------------------------------------------------------------------------------------------------------


def _a_run(runs_dir, name: str, steps: int):
    workdir = runs_dir / name
    schema.write_manifest(workdir, a_manifest(status="running", final_step=None))
    for step in range(1, steps + 1):
        schema.append_jsonl(workdir / schema.STEPS_FILE, schema.StepRecord.of(
            step=step, global_batch=32, gflops_per_image=0.00055, loss=1.0 / step, mse=0.5 / step, vb=None,
            grad_norm=1.0, wall_time=float(step), time=1e9 + step, step_time=1.0, flops_per_step=1e6,
            peak_flops=1e9).to_json())
    return workdir


@pytest.mark.parametrize("storage", ["local", "gs"])
def test_status_of_a_run_directory_is_its_row_under_the_parent(capsys, tmp_path, request, storage):
    runs = epath.Path(tmp_path) if storage == "local" else epath.Path(request.getfixturevalue("gcs").path("status"))
    run = _a_run(runs, "DiT-S-8", 3)
    _a_run(runs, "DiT-B-8", 2)
    code, out, _ = _run(capsys, ["status", str(runs), "--json"])
    assert code == 0
    under_parent = {row["run"]: row for row in json.loads(out)}
    assert sorted(under_parent) == ["DiT-B-8", "DiT-S-8"]
    code, out, _ = _run(capsys, ["status", str(run), "--json"])
    assert code == 0 and json.loads(out) == [under_parent["DiT-S-8"]]
    code, out, _ = _run(capsys, ["status", str(run)])
    assert code == 0 and "DiT-S-8" in out and "3/1200" in out and "DiT-B-8" not in out


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_status_of_a_directory_without_runs_is_an_error(capsys, tmp_path, where):
    path = tmp_path / where
    if where == "empty":
        path.mkdir()
    code, out, err = _run(capsys, ["status", str(path)])
    assert code == 2 and not out
    assert f"{path} holds no run: it is neither a run directory" in err


# -- config overrides ----------------------------------------------------------------------------------------------


@pytest.fixture
def config():
    return load_config("fmnist:S/8,smoke")


@pytest.mark.parametrize(("override", "message"), [
    ("eval.sampling_steps=abc", "eval.sampling_steps: expected a tuple of ints such as (8,) or 8,16, got 'abc'"),
    ("eval.sampling_steps=8,x", "eval.sampling_steps: expected a tuple of ints such as (8,) or 8,16, got '8,x'"),
    ("eval.sampling_steps=8.5", "eval.sampling_steps: expected a tuple of ints such as (8,) or 8,16, got '8.5'"),
    ("eval.final_sampling_steps=(8,", "eval.final_sampling_steps: expected a tuple such as (8,) or 8,16, got '(8,'"),
    ("train.steps=abc", "train.steps: expected an int such as 1000 or 1e3, got 'abc'"),
    ("train.steps=1.5", "train.steps: expected an int such as 1000 or 1e3, got '1.5'"),
    ("train.steps=1e400", "train.steps: expected an int such as 1000 or 1e3, got '1e400'"),
    ("train.steps=inf", "train.steps: expected an int such as 1000 or 1e3, got 'inf'"),
    ("train.learning_rate=fast", "train.learning_rate: expected a float such as 0.5 or 1e-4, got 'fast'"),
    ("data.flip=maybe", "data.flip: expected true or false (also yes/no, 1/0), got 'maybe'"),
    ("model=small", "model: expected a dict such as {'depth': 12}"),
    ("train.stesp=3", "config has no field 'train.stesp'; fields here: ["),
    ("trian.steps=3", "the config has no section 'trian'; its sections: ["),
    ("train.steps.x=3", "train has no section 'steps'"),
])
def test_an_override_of_the_wrong_shape_names_the_field_the_value_and_the_type(config, override, message):
    with pytest.raises(ValueError) as error:
        apply_override(config, override)
    assert message in str(error.value)


def test_an_unknown_name_suggests_the_closest(config):
    with pytest.raises(ValueError, match="Did you mean 'steps'"):
        apply_override(config, "train.stesp=3")
    with pytest.raises(ValueError, match="Did you mean 'train'"):
        apply_override(config, "trian.steps=3")


def test_overrides_parse_each_type(config):
    for override in ("eval.sampling_steps=8,16", "eval.final_sampling_steps=32", "train.steps=1e3",
                     "train.learning_rate=2e-3", "data.flip=yes", "model.dtype=float32"):
        apply_override(config, override)
    assert tuple(config.eval.sampling_steps) == (8, 16) and tuple(config.eval.final_sampling_steps) == (32,)
    assert (config.train.steps, config.train.learning_rate, config.data.flip) == (1000, 2e-3, True)
    assert config.model.dtype == "float32"
    apply_override(config, "eval.final_sampling_steps=")
    assert tuple(config.eval.final_sampling_steps) == ()
    validate(config)


def test_a_field_that_may_be_none_takes_none_its_type_or_a_literal():
    config = ml_collections.ConfigDict({"steps": ml_collections.config_dict.placeholder(int), "none": None,
                                        "literal": None, "text": None})
    with pytest.raises(ValueError, match="steps: expected an int such as 1000 or 1e3, got 'forty'"):
        apply_override(config, "steps=forty")
    apply_override(config, "steps=None")
    assert config.steps is None
    apply_override(config, "steps=40")
    assert config.steps == 40
    for override in ("none=none", "literal=(1, 2)", "text=some text"):
        apply_override(config, override)
    assert (config.none, config.literal, config.text) == (None, (1, 2), "some text")


@pytest.mark.parametrize(("field", "value"), [("train.learning_rate", "nan"), ("train.learning_rate", "inf"),
                                              ("train.ema_decay", "nan"), ("eval.guidance_scale", "inf"),
                                              ("model.class_dropout_prob", "-inf")])
def test_a_number_that_is_not_finite_fails_validation_naming_the_field(config, field, value):
    apply_override(config, f"{field}={value}")
    with pytest.raises(ValueError, match=rf"{field} = {value}: every number of a config must be finite"):
        validate(config)


@pytest.mark.parametrize(("override", "message"), [("train.b2=1.5", "train.b1 and train.b2"),
                                                   ("train.eps=0", "train.eps must be positive"),
                                                   ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
                                                   ("train.seed=-1", "train.seed and eval.seed must be >= 0"),
                                                   ("model.class_dropout_prob=1", "model.class_dropout_prob")])
def test_out_of_range_recipe_numbers_fail_validation(config, override, message):
    apply_override(config, override)
    with pytest.raises(ValueError, match=message):
        validate(config)


@pytest.mark.parametrize(("command", "override", "message"), [
    (["train", "--config", "fmnist:S/8,smoke", "--workdir", "run"], "--config.eval.sampling_steps=abc",
     "eval.sampling_steps: expected a tuple of ints such as (8,) or 8,16, got 'abc'"),
    (["train", "--config", "fmnist:S/8,smoke", "--workdir", "run"], "--config.train.learning_rate=inf",
     "train.learning_rate = inf"),
    (["grid", "--config", "fmnist:smoke", "--workdir", "runs", "--only", "S/8"], "--config.train.steps=nan",
     "train.steps: expected an int such as 1000 or 1e3, got 'nan'"),
    (["study", "--preset", "tiny", "--workdir", "study", "--models", "S/8"], "--config.train.b1=nan",
     "train.b1 = nan"),
])
def test_a_command_given_a_bad_override_says_so_and_writes_nothing(capsys, tmp_path, monkeypatch, command,
                                                                   override, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, [*command, override])
    assert code == 2 and message in err, err
    assert not list(tmp_path.iterdir())
