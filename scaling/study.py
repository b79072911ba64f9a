"""`dit-scaling study`: the paper's scaling study in miniature, in one command.

It trains the 12 miniature configs of `scaling.configs.fmnist` (S, B, L, XL x patch 8, 4, 2) with one recipe (the
preset's) through the grid, two runs at once on a 2-core CPU; each run records compute at every step and is
evaluated at several steps (FD-FashionCNN and the held-out validation loss) and, at its last step, at several
sampling-step counts. Then it fits everything once (`analysis.analyze`) and renders: WORKDIR/<run>/ holds each
run's records, WORKDIR/figures/ every figure and the fit report, WORKDIR/report.md the paper's findings checked on
these runs (`analysis.findings`), the fits beyond the paper and the key figures, written by the same report writer.

Interrupted (Ctrl-C, SIGKILL, a preemption's SIGTERM), the same command resumes: finished runs are kept,
unfinished ones continue from their newest checkpoint. A finished study only re-renders (seconds).
WORKDIR/study.json names the preset, seed, configs and overrides; a workdir holds one study.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from etils import epath

from analysis import schema
from models.dit import PAPER_MODELS, short_name
from scaling import grid
from scaling.config import run_name
from scaling.configs import fmnist
from scaling.cost import predicted_seconds
from scaling.host import cpu_model
from scaling.preemption import Interrupted, Preempted
from scaling.train import code_revision, format_duration

log = logging.getLogger("dit_scaling.study")

PRESETS = tuple(fmnist.PRESETS)  # each preset is the fmnist config's option of the same name
ALL_MODELS = [short_name(m) for m in PAPER_MODELS]
STUDY_FILE = "study.json"
FIGURES_DIR = "figures"
REPORT_FILE = "report.md"
KEY_FIGURES = ("fig6_curves", "fig7_samples", "class_grids", "fig8_gflops_fit", "fig9_training_compute",
               "fig10_sampling_compute", "fig9_validation_loss", "isoflop_profiles", "isoflop_profiles_loss",
               "loss_to_metric")


@dataclasses.dataclass
class StudyResult:
    workdir: epath.Path
    outcome: dict[str, str]
    findings: object | None  # analysis.findings.Findings, None when too few runs finished to fit
    report: epath.Path
    figures: list[epath.Path]
    seconds: float

    @property
    def failed(self) -> list[str]:
        return [m for m, o in self.outcome.items() if o.startswith("failed")]


def default_workdir(preset: str, seed: int) -> epath.Path:
    """studies/fmnist-PRESET (and -seedN for other seeds than 0), under the current directory."""
    return epath.Path("studies") / (f"fmnist-{preset}" + (f"-seed{seed}" if seed else ""))


def _claim_workdir(workdir: epath.Path, settings: dict) -> None:
    """Write study.json, or check that the workdir's study is this one (same preset, seed, configs and
    overrides)."""
    path = workdir / STUDY_FILE
    if path.is_file():
        previous = {"models": ALL_MODELS, **json.loads(path.read_text())}  # written before --models existed
        differing = [k for k in settings if previous.get(k) != settings[k]]
        if differing:
            held = ", ".join(f"{k} {previous.get(k)!r}" for k in differing)
            wanted = ", ".join(f"{k} {settings[k]!r}" for k in differing)
            raise ValueError(f"{workdir} holds another study ({held}; this one has {wanted}). Use another --workdir, "
                             "or the same settings to resume it.")
        return
    workdir.mkdir(parents=True, exist_ok=True)
    schema.write_json_atomic(path, {**settings, "code_revision": code_revision(), "cpu": cpu_model(),
                                    "cores": len(os.sched_getaffinity(0))})


class _Progress:
    """The study's own progress lines: runs done, elapsed time and the ETA. Before any run has finished the ETA
    is the CPU cost model's (scaling.cost.predicted_seconds); afterwards the model is rescaled by how long the
    finished runs took."""

    def __init__(self, workdir: epath.Path, configs: dict, pending: list[str], workers: int):
        self.workdir, self.configs, self.workers = workdir, configs, workers
        self.predicted = {m: predicted_seconds(configs[m]) for m in pending}
        self.remaining = set(pending)
        self.done = {}  # model -> seconds it took
        self.start = time.perf_counter()

    def eta(self) -> float:
        scale = 1.0
        if self.done:
            scale = sum(self.done.values()) / sum(self.predicted[m] for m in self.done)
        remaining = sum(self.predicted[m] for m in self.remaining) * scale
        return remaining / min(self.workers, max(1, len(self.remaining)))

    def started(self) -> None:
        total = len(self.configs)
        if not self.remaining:
            print(f"[study] {total}/{total} runs finished already: fitting and rendering", flush=True)
            return
        print(f"[study] {total - len(self.remaining)}/{total} runs finished already; {len(self.remaining)} to "
              f"train ({self.workers} at once); ETA {format_duration(self.eta())} (from a cost model measured on "
              "a 2-core AMD EPYC)", flush=True)

    def finished(self, model: str, outcome: str) -> None:
        """The line of a run that ended: its result, or how it stopped (preempted and interrupted runs are still to
        do; a failed one is done, with its cause)."""
        if outcome == "preempted":  # checkpointed, still to do
            print(f"[study] {short_name(model)} preempted: checkpointed", flush=True)
            return
        if outcome == "interrupted":  # resumes from its newest checkpoint
            print(f"[study] {short_name(model)} interrupted (Ctrl-C)", flush=True)
            return
        run_dir = self.workdir / run_name(self.configs[model])
        steps = schema.read_steps(run_dir)
        manifest = schema.read_manifest(run_dir)
        # This start's seconds, from its start to the end of its last evaluation.
        self.done[model] = time.time() - manifest.starts[-1]["time"] if manifest and manifest.starts \
            else self.predicted[model]
        self.remaining.discard(model)
        elapsed = time.perf_counter() - self.start
        main = [r for r in schema.read_evaluations(run_dir) if r.metric.startswith(
            "FD") and r.step == (steps[-1].step if steps else -1)]
        result = outcome
        if outcome == "finished" and main:
            first = main[0]
            accuracy = first.details.get("class_accuracy")
            result = (f"{first.metric} {first.value:.1f}" + (f", class accuracy {accuracy:.2f}" if accuracy is not None
                                                              else "") + f", loss {steps[-1].loss:.4f}")
        total = len(self.configs)
        print(f"[study] {short_name(model)} {result} ({format_duration(self.done[model])}); "
              f"{total - len(self.remaining)}/{total} runs done, {format_duration(elapsed)} elapsed, "
              f"ETA {format_duration(self.eta())}", flush=True)


def run_study(preset: str = "default", workdir: str | os.PathLike | None = None, *, seed: int = 0,
              models: list[str] | None = None, overrides: list[str] = (), workers: int | None = None) -> StudyResult:
    """Run (or resume, or re-render) the miniature study of `models` (default: all 12); see the module
    docstring."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: use one of {', '.join(PRESETS)}.")
    start = time.perf_counter()
    workdir = epath.Path(workdir) if workdir is not None else default_workdir(preset, seed)
    models = grid.grid_models("fmnist", ALL_MODELS, models)
    all_overrides = [f"train.seed={seed}", *overrides]
    config_name = f"fmnist:{preset}"
    configs = grid.load_grid_configs(config_name, models, all_overrides)  # a bad override claims no workdir
    _claim_workdir(workdir, {"preset": preset, "seed": seed, "models": models, "overrides": list(overrides)})
    pending = [m for m in models if not grid.is_finished(workdir / run_name(configs[m]), configs[m])]
    workers = min(workers or len(os.sched_getaffinity(0)), max(1, len(pending)))
    progress = _Progress(workdir, configs, pending, workers)
    outcome = {m: "skipped" for m in models if m not in pending}
    progress.started()
    if pending:
        if workers > 1 and any(configs[m].eval.every for m in pending):
            _prepare_feature_network(configs[pending[0]])
        outcome.update(grid.run_grid(config_name, workdir, models=pending, overrides=all_overrides,
                                     workers=workers, on_finish=progress.finished))
        if "preempted" in outcome.values():  # the grace period is short: render when the study resumes
            raise Preempted(workdir)
        if "interrupted" in outcome.values():
            raise Interrupted(workdir)
    findings, figures = _render(workdir, preset, seed, models)
    return StudyResult(workdir=workdir, outcome={m: outcome[m] for m in models}, findings=findings,
                       report=workdir / REPORT_FILE, figures=figures, seconds=time.perf_counter() - start)


def _prepare_feature_network(config) -> None:
    """Train (or load) the evaluation's FashionCNN once, before the workers start: else each would train it."""
    from scaling import data as data_lib
    from scaling.evaluation.in_training import prepare_feature_network

    prepare_feature_network(config, data_lib.open_source(config))


def _render(workdir: epath.Path, preset: str, seed: int, models: list[str]):
    """Fit everything once and render what the finished runs support: the fit report and every figure in
    figures/, and the study's report (its header, the paper's findings, the fits beyond the paper and the key
    figures) on top."""
    from analysis import figures as figures_lib
    from analysis import records as records_lib
    from analysis.analyze import analyze
    from analysis.report import render_analysis, report_markdown

    records = records_lib.load(workdir)
    analysis = analyze(records)
    rendering = render_analysis(analysis, workdir / FIGURES_DIR)
    if analysis.held_out_loss:
        rendering.draw("fig9_validation_loss",
                       lambda: figures_lib.draw_fig9_training_compute(analysis.loss_training_compute.get()))
    settings = json.loads((workdir / STUDY_FILE).read_text())
    heading = [f"# Miniature scaling study: preset {preset}, seed {seed}", "",
               f"{len(models)} DiT configs on Fashion-MNIST ({records.runs['run'].nunique()} runs recorded), trained "
               f"by `dit-scaling study --preset {preset}" + (f" --seed {seed}" if seed else "")
               + (f" --models {','.join(models)}" if models != ALL_MODELS else "") + "` at code revision "
               f"{settings.get('code_revision')} on {settings.get('cpu')} ({settings.get('cores')} cores).", ""]
    key_figures = {name: rendering.captions[name] for name in KEY_FIGURES if name in rendering.captions}
    (workdir / REPORT_FILE).write_text(report_markdown(
        analysis, heading=heading, sections=("findings", "isoflop", "law", "loss_proxy"), figure_captions=key_figures,
        figures_title="Key figures", figures_dir=f"{FIGURES_DIR}/", skipped=rendering.skipped,
        footer=[f"Every fit with its intervals, Table 4 and every figure: [{FIGURES_DIR}/report.md]"
                f"({FIGURES_DIR}/report.md).", ""]))
    return analysis.findings.value, rendering.written
