"""`grid --launcher xpk`: one `xpk workload create` per unfinished run, its slices and memory setting the dry run's,
its workdir on gs:// (here the local GCS emulator)."""

import shlex

import pytest
from etils import epath
from records_factory import a_manifest

from analysis import schema
from scaling import xpk
from scaling.cli import main
from scaling.cost import run_cost

XPK = ["--launcher", "xpk", "--xpk-cluster", "dit-cluster", "--docker-image", "gcr.io/p/dit:1"]


def _dry_run_settings(models, chip, chips, slices) -> dict:
    """What the dry run finds fits for each model (scaling.cost.run_cost, its rows)."""
    from scaling.grid import load_grid_configs

    configs = load_grid_configs("imagenet256", models, ["train.steps=1000"], validate=False)
    return {m: run_cost(c, chip=chip, chips=chips, utilization=0.4, slices=slices)["fits"] for m, c in configs.items()}


def test_each_unfinished_run_is_one_workload_as_the_dry_run_plans_it(gcs, capsys):
    runs = epath.Path(gcs.path("xpk-runs"))
    schema.write_manifest(runs / "DiT-S-8", a_manifest(total_steps=400_000, final_step=400_000))
    models = "S/8,B/4,XL/2"
    fits = _dry_run_settings(models.split(","), "v5e", 16, 2)
    assert fits["S/8"] == "replicated" and fits["XL/2"].startswith("fsdp")  # both paths taken
    assert main(["grid", "--config", "imagenet256", "--workdir", str(runs), "--models", models, *XPK,
                 "--chip", "v5e", "--chips", "16", "--slices", "2", "--config.train.steps=1000"]) == 0
    out = capsys.readouterr().out
    assert "# finished already, left out: S/8" not in out  # 1000 steps: S/8's 400K-step run is another run's length
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("xpk ")]
    assert len(commands) == 3
    for command in commands:
        option = {command[i]: command[i + 1] for i in range(3, len(command) - 1, 2)}
        assert command[:3] == ["xpk", "workload", "create"]
        assert (option["--cluster"], option["--docker-image"]) == ("dit-cluster", "gcr.io/p/dit:1")
        assert (option["--tpu-type"], option["--num-slices"]) == ("v5litepod-8", "2")  # 16 chips in 2 slices
        train = shlex.split(option["--command"])
        model = train[train.index("--config") + 1].split(":")[1]
        workdir = train[train.index("--workdir") + 1]
        assert workdir == str(runs / ("DiT-" + model.replace("/", "-"))) and workdir.startswith("gs://")
        assert option["--workload"] == "dit-" + model.lower().replace("/", "-")
        assert "--distributed" in train and "--config.train.steps=1000" in train
        assert "--config.train.slices=2" in train
        setting = fits[model]  # the dry run's choice, as overrides
        assert ("--config.train.param_sharding=fsdp" in train) == setting.startswith("fsdp")
        assert ("--config.model.remat=true" in train) == setting.endswith("remat")


def test_finished_runs_are_left_out(gcs, capsys):
    runs = epath.Path(gcs.path("xpk-finished"))
    assert main(["grid", "--config", "imagenet256", "--workdir", str(runs), "--models", "S/8", *XPK,
                 "--config.train.steps=10"]) == 0
    assert sum(line.startswith("xpk ") for line in capsys.readouterr().out.splitlines()) == 1
    schema.write_manifest(runs / "DiT-S-8", a_manifest(total_steps=10, final_step=10))
    assert main(["grid", "--config", "imagenet256", "--workdir", str(runs), "--models", "S/8", *XPK,
                 "--config.train.steps=10"]) == 0
    out = capsys.readouterr().out
    assert "# finished already, left out: S/8" in out and "xpk " not in out


@pytest.mark.parametrize("extra, message", [
    (["--chip", "H100"], "for GPU clusters use --launcher slurm"),
    (["--workdir", "/local/runs"], "give --workdir gs://BUCKET/runs"),
    (["--slices", "3"], "must divide --chips"),
])
def test_what_xpk_cannot_run_is_named(capsys, extra, message):
    argv = ["grid", "--config", "imagenet256", "--workdir", "gs://unused/runs", "--models", "S/8", *XPK]
    if "--workdir" in extra:
        argv[argv.index("--workdir") + 1] = extra[1]
        extra = []
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_tpu_types_and_workload_names():
    assert [xpk.tpu_type(chip, 8) for chip in ("v4", "v5p", "v5e", "v6e")] == ["v4-16", "v5p-16", "v5litepod-8",
                                                                             "v6e-8"]
    assert xpk.workload_name("DiT-XL-2-in-context") == "dit-xl-2-in-context"
    assert xpk.workload_name("2x_Net") == "run-2x-net"
