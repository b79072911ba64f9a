"""The grid: one training run per config of a study, resumable and splittable across machines."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import jax

from analysis import schema
from models.dit import PAPER_MODELS, canonical_name, short_name
from scaling import config as config_lib
from scaling.train import train

log = logging.getLogger("dit_scaling.grid")


def run_dir_name(model: str) -> str:
    """Directory name of a model's run: "S/8" or "DiT-S/8" -> "DiT-S-8"."""
    return schema.run_dir_name(canonical_name(model))


def select_models(models: list[str], only: list[str] | None, shard: str | None) -> list[str]:
    """Filter by --only, then take this machine's share (--shard i/n: every n-th config from the i-th)."""
    if only:
        known = {canonical_name(m) for m in models}
        unknown = [m for m in only if canonical_name(m) not in known]
        if unknown:
            raise ValueError(f"--only names configs outside the study: {unknown}; the study has {models}.")
        wanted = {canonical_name(m) for m in only}
        models = [m for m in models if canonical_name(m) in wanted]
    if shard:
        try:
            index, count = (int(x) for x in shard.split("/"))
        except ValueError as e:
            raise ValueError(f"--shard must be i/n (e.g. 0/4), got {shard!r}.") from e
        if not 0 <= index < count:
            raise ValueError(f"--shard {shard}: need 0 <= i < n.")
        models = models[index::count]
    return models


def run_grid(config_name: str, runs_dir: str | Path, *, models: list[str] | None = None,
             only: list[str] | None = None, shard: str | None = None, overrides: list[str] = ()) -> dict[str, str]:
    """Train every selected config into runs_dir/<run>; skip finished runs, resume the rest, keep going on
    failures. Returns {model: "finished" | "skipped" | "failed: ..."}."""
    base, _, options = config_name.partition(":")
    selected = select_models([short_name(m) for m in (models or PAPER_MODELS)], only, shard)
    runs_dir = Path(runs_dir)
    # Every config is loaded and checked before any run starts: a bad override or variant stops the grid at once,
    # not hours later when its turn comes.
    configs = {}
    for model in selected:
        variant = model + (f",{options}" if options else "")
        try:
            configs[model] = config_lib.load_config(f"{base}:{variant}", overrides)
            config_lib.validate(configs[model])
        except Exception as e:
            raise ValueError(f"The config of {model} ({base}:{variant}) is not usable: {e}") from e
    outcome = {}
    for i, (model, config) in enumerate(configs.items()):
        workdir = runs_dir / run_dir_name(model)
        manifest = schema.read_manifest(workdir)
        if manifest and manifest.status == "finished" and manifest.final_step == config.train.steps:
            outcome[model] = "skipped"
            log.info("[%d/%d] %s: finished already, skipped.", i + 1, len(selected), model)
            continue
        log.info("[%d/%d] %s -> %s", i + 1, len(selected), model, workdir)
        try:
            train(config, workdir)
            outcome[model] = "finished"
        except Exception as e:  # one failed run must not stop the grid
            outcome[model] = f"failed: {type(e).__name__}: {e}"
            log.error("%s failed:\n%s", model, traceback.format_exc())
            manifest = schema.read_manifest(workdir)
            if jax.process_index() == 0 and manifest is not None:
                schema.write_manifest(workdir, manifest.with_changes(status="failed", error=f"{type(e).__name__}: {e}"))
    return outcome


def run_status(runs_dir: str | Path) -> list[dict]:
    """One row per run under runs_dir: model, status, progress, compute spent, last loss, latest evaluation."""
    rows = []
    for manifest_path in sorted(Path(runs_dir).glob(f"*/{schema.MANIFEST_FILE}")):
        workdir = manifest_path.parent
        manifest = schema.read_manifest(workdir)
        steps = schema.read_steps(workdir)
        evaluations = schema.read_evaluations(workdir)
        last = steps[-1] if steps else None
        rows.append({
            "run": workdir.name, "model": manifest.model_name, "status": manifest.status,
            "step": last.step if last else 0, "total_steps": manifest.total_steps,
            "images_seen": last.images_seen if last else 0,
            "train_gflops_cumulative": last.train_gflops_cumulative if last else 0.0,
            "loss": last.loss if last else None, "wall_time": last.wall_time if last else None,
            "latest_evaluation": evaluations[-1].to_json() if evaluations else None,
            "error": manifest.error,
        })
    return rows
