"""The grid as xpk workloads on a GKE TPU cluster: `dit-scaling grid ... --launcher xpk` prints one `xpk workload
create` per unfinished run, for the user to run (xpk needs the cluster's credentials and a container image, which
this toolkit does not manage).

Each workload runs the same `dit-scaling train ... --distributed` on every worker of its slices (JobSet starts it on
each; jax.distributed finds the others on TPU VMs), with the workdir on gs://, where every worker and a restarted
workload see the same run. The slice type and count are the dry run's: `--chip`, `--chips` and `--slices`, and the
memory setting the dry run finds that fits (fsdp, remat) is passed as config overrides.
"""

from __future__ import annotations

import re
import shlex

from analysis import storage
from scaling.cost import run_cost

# The TPU types xpk takes, by chip: the name's prefix and how many it counts per chip (v4 and v5p count
# TensorCores, two per chip; v5e and v6e count chips).
TPU_TYPES = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5litepod", 1), "v6e": ("v6e", 1)}
SETTING_OVERRIDES = {"replicated": [], "fsdp": ["--config.train.param_sharding=fsdp"],
                     "fsdp+remat": ["--config.train.param_sharding=fsdp", "--config.model.remat=true"]}


class XpkError(ValueError):
    """The grid cannot be written as xpk workloads (a chip xpk cannot take, a workdir off gs://)."""


def tpu_type(chip: str, chips_per_slice: int) -> str:
    """The `--tpu-type` of a slice of `chips_per_slice` chips of kind `chip`, e.g. v5p-16 for 8 v5p chips."""
    if chip not in TPU_TYPES:
        raise XpkError(f"--launcher xpk runs on TPU slices ({', '.join(TPU_TYPES)}); {chip} is not one: for GPU "
                       "clusters use --launcher slurm.")
    prefix, per_chip = TPU_TYPES[chip]
    return f"{prefix}-{chips_per_slice * per_chip}"


def workload_name(run: str) -> str:
    """A workload name xpk accepts (lowercase letters, digits and dashes, starting with a letter): DiT-XL-2 ->
    dit-xl-2."""
    name = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")
    return name if name[:1].isalpha() else f"run-{name}"


def workload_commands(configs: dict, workdirs: dict, config_name: str, overrides: list[str], *, cluster: str,
                      docker_image: str, chip: str, chips: int, slices: int, utilization: float) -> list[dict]:
    """One {model, setting, hours, tpu_type, command} per run of `configs` ({model: config}), its `xpk workload create`
    training the run into workdirs[model] on `slices` slices of chips / slices chips each."""
    if chips % slices:
        raise XpkError(f"--slices {slices} must divide --chips {chips}.")
    base, _, options = config_name.partition(":")
    slice_type = tpu_type(chip, chips // slices)
    workloads = []
    for model, config in configs.items():
        workdir = str(workdirs[model])
        if not storage.is_url(workdir) or not workdir.startswith("gs://"):
            raise XpkError(f"--launcher xpk: the runs go to gs:// (every worker and a restarted workload must see "
                           f"them), not {workdir}: give --workdir gs://BUCKET/runs.")
        cost = run_cost(config, chip=chip, chips=chips, utilization=utilization, slices=slices)
        setting = cost["fits"]
        if setting not in SETTING_OVERRIDES:
            workloads.append({"model": model, "setting": setting, "hours": cost["hours"], "tpu_type": slice_type,
                              "command": None})
            continue
        variant = model + (f",{options}" if options else "")
        train = ["dit-scaling", "train", "--config", f"{base}:{variant}", "--workdir", workdir, "--distributed",
                 *(f"--config.{o}" for o in overrides), *SETTING_OVERRIDES[setting]]
        if slices > 1:
            train.append(f"--config.train.slices={slices}")
        command = ["xpk", "workload", "create", "--cluster", cluster, "--workload",
                   workload_name(workdirs[model].name), "--tpu-type", slice_type,
                   "--num-slices", str(slices), "--docker-image", docker_image, "--command", shlex.join(train)]
        workloads.append({"model": model, "setting": setting, "hours": cost["hours"], "tpu_type": slice_type,
                          "command": shlex.join(command)})
    return workloads
