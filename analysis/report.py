"""Everything at once: every figure the records support, Table 4 and a one-page Markdown report of the fits, all
from one `analysis.analyze` pass; `report_markdown` is the one writer of a report (the fit report here, the study's
report in `scaling.study`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from etils import epath
from matplotlib.figure import Figure

from analysis import figures, isoflop, sample_figures, tables
from analysis.analyze import Analysis, analyze
from analysis.fits import describe_extrapolation
from analysis.records import Records
from analysis.schema import RecordsError
from analysis.study import MODEL_SIZES
from analysis.style import format_steps, save_figure

REPORT_TABLE_ROWS = 24  # a longer Table 4 is linked from the report, not copied into it

CAPTIONS = {
    "fig2_bubble": "Fig. 2: the metric vs model Gflops; bubble area is proportional to Gflops.",
    "fig5_conditioning": "Fig. 5: conditioning blocks of one model.",
    "fig6_curves": "Fig. 6: the metric over training, by patch size (top) and by model size (bottom).",
    "fig6_curves_one_panel": "Fig. 6: the metric over training, one curve per run (not grouped by patch and size: "
                             "fewer than two runs with curves are DiT configs).",
    "fig7_samples": "Fig. 7: the same noise and class labels sampled from every config, with guidance.",
    "class_grids": "Each config's samples by class (one row per class), unguided, as the metric scores them.",
    "fig8_gflops_fit": "Fig. 8: the metric vs model Gflops, log-log fit with confidence band and prediction interval.",
    "fig9_training_compute": "Fig. 9: the metric vs training compute, with the compute frontier and its power law.",
    "fig10_sampling_compute": "Fig. 10: the metric vs sampling compute per image.",
    "fig13_loss": "Fig. 13: training loss.",
    "isoflop_profiles": "isoFLOP profiles (Chinchilla's Fig. 3): the metric of every config at equal training "
                        "compute, the parabola's minimum, and the compute-optimal size and images against compute.",
    "isoflop_profiles_loss": "isoFLOP profiles of the held-out loss (evaluated more densely than the samples).",
    "loss_to_metric": "The sample metric against the held-out loss at the same run and step, with the best "
                      "form's prediction interval.",
    "fig9_validation_loss": "The held-out validation loss vs training compute, with its compute frontier (the "
                            "proxy of sample quality, beside the sample metric's Fig. 9).",
}
# The sections of the fit report, in order (see SECTIONS).
FIT_REPORT_SECTIONS = ("notes", "model_compute", "training_compute", "sampling", "isoflop", "law", "loss_proxy",
                       "table4")


@dataclass
class Rendering:
    """The files written into `out_dir`, the caption of each figure drawn (in order) and, for each figure the
    records could not support, why."""

    out_dir: epath.Path
    written: list[epath.Path] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def draw(self, name: str, draw: Callable[[], Figure]) -> None:
        """Save the figure `draw` returns as NAME.png and NAME.pdf, or record why it could not be drawn."""
        try:
            fig = draw()
        except RecordsError as e:
            self.skipped[name] = str(e)
            return
        self.written += save_figure(fig, self.out_dir, name)
        one_panel = name == "fig6_curves" and len(fig.axes) == 1  # runs that are not DiT configs
        self.captions[name] = CAPTIONS["fig6_curves_one_panel" if one_panel else name]


def render_all(records: Records, out_dir: str | epath.Path, *, metric: str | None = None
               ) -> tuple[list[epath.Path], dict[str, str]]:
    """Write every figure the records support (NAME.png and NAME.pdf), table4.md, table4.tex and report.md into
    out_dir. Returns the written paths and {figure name: why it was skipped}. The points are `study.select`'s
    (configs of one block and resolution, one metric, default: the sample metric with the most points, and its
    most common protocol), the fits `analyze`'s; the report lists what was left out."""
    rendering = render_analysis(analyze(records, metric=metric), out_dir)
    return rendering.written, rendering.skipped


def render_analysis(analysis: Analysis, out_dir: str | epath.Path) -> Rendering:
    """`render_all` for fits already computed."""
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, metric = analysis.records, analysis.metric
    rendering = Rendering(out_dir)
    drawings = {
        "fig2_bubble": lambda: figures.fig2_bubble(records, metric=metric),
        "fig5_conditioning": lambda: figures.fig5_conditioning(records, metric=metric,
                                                               protocol=analysis.selection.get().protocol),
        "fig6_curves": lambda: figures.fig6_curves(records, metric=metric),
        "fig7_samples": lambda: sample_figures.fig7_samples(analysis.guided.get()),
        "class_grids": lambda: sample_figures.class_grids(analysis.model_compute.get().points),
        "fig8_gflops_fit": lambda: figures.draw_fig8_gflops_fit(analysis.model_compute.get()),
        "fig9_training_compute": lambda: figures.draw_fig9_training_compute(analysis.training_compute.get()),
        "fig10_sampling_compute": lambda: figures.draw_fig10_sampling_compute(analysis.sampling.get()),
        "fig13_loss": lambda: figures.fig13_loss(records.where(**analysis.family)),
        "isoflop_profiles": lambda: figures.draw_isoflop_profiles(analysis.isoflop.get()),
        "isoflop_profiles_loss": lambda: figures.draw_isoflop_profiles(analysis.loss_isoflop.get()),
        "loss_to_metric": lambda: figures.draw_loss_to_metric(analysis.loss_proxy.get(), records),
    }
    for name in figures.FIGURES:
        if not analysis.selection.ok and name != "fig13_loss":
            rendering.skipped[name] = analysis.selection.reason
            continue
        rendering.draw(name, drawings[name])

    table_markdown = None
    if analysis.selection.ok:
        try:
            table_markdown = tables.table4_markdown(records, metric=metric)
            (out_dir / "table4.md").write_text(table_markdown)
            (out_dir / "table4.tex").write_text(tables.table4_latex(records, metric=metric))
            rendering.written += [out_dir / "table4.md", out_dir / "table4.tex"]
        except RecordsError as e:
            rendering.skipped["table4"] = str(e)
    else:
        rendering.skipped["table4"] = analysis.selection.reason

    report = out_dir / "report.md"
    report.write_text(report_markdown(
        analysis, heading=["# Scaling report", "",
                           f"{records.runs['run'].nunique()} runs, {len(records.evaluations)} evaluation points, "
                           f"{len(records.steps)} training-step records.", ""],
        sections=FIT_REPORT_SECTIONS, figure_captions=rendering.captions, skipped=rendering.skipped,
        table_markdown=table_markdown))
    rendering.written.append(report)
    return rendering


def report_markdown(analysis: Analysis, *, heading: Sequence[str], sections: Sequence[str],
                    figure_captions: dict[str, str], skipped: dict[str, str], figures_title: str = "Figures",
                    figures_dir: str = "", footer: Sequence[str] = (), table_markdown: str | None = None) -> str:
    """A report of `analysis`: the `heading` lines, the named `sections` (see SECTIONS; "table4" copies
    `table_markdown`), the figures ({name: caption}, PNGs in `figures_dir`) under `figures_title`, the `footer`
    lines, and the figures not drawn with why (`skipped`)."""
    lines = list(heading)
    for section in sections:
        lines += _table4_lines(table_markdown) if section == "table4" else SECTIONS[section](analysis)
    if figure_captions:
        lines += [f"## {figures_title}", ""]
        for name, caption in figure_captions.items():
            lines += [f"![{caption}]({figures_dir}{name}.png)", "", f"*{caption}*", ""]
    lines += list(footer)
    if skipped:
        lines += ["## Not drawn", ""]
        lines += [f"- {name}: {reason}".replace("\n", " ") for name, reason in skipped.items()]
        lines.append("")
    return "\n".join(lines)


def _table4_lines(table_markdown: str | None) -> list[str]:
    if not table_markdown:
        return []
    rows = table_markdown.count("\n") - 2
    return ["## Table 4", ""] + ([table_markdown] if rows <= REPORT_TABLE_ROWS else
                                 [f"{rows} rows: see [table4.md](table4.md).", ""])


def _notes_lines(analysis: Analysis) -> list[str]:
    lines = [f"- {note}" for note in analysis.notes]
    if analysis.sampling.ok:
        points = analysis.sampling.value.points
        lines.append(f"- Fig. 10 uses {points['metric'].iloc[0]} at sampling steps "
                     f"{sorted(int(s) for s in points['sampling_steps'].unique())}.")
    return [*lines, ""]


def _findings_lines(analysis: Analysis) -> list[str]:
    if not analysis.findings.ok:
        return [f"The findings could not be checked: {analysis.findings.reason}", ""]
    findings = analysis.findings.value
    return [f"## The paper's findings ({findings.metric} at step {findings.step})", "", *findings.markdown(), ""]


def _model_compute_lines(model_compute) -> list[str]:
    fit = model_compute.fit
    lo, hi = fit.slope_ci
    return ["## Model compute (Fig. 8)", "",
            f"log10 {fit.metadata['metric']} = {fit.intercept:.3f} {'-' if fit.slope < 0 else '+'} "
            f"{abs(fit.slope):.3f} log10 Gflops at {format_steps(fit.metadata['step'])} steps: slope "
            f"{fit.slope:.3f} ({fit.confidence:.0%} CI {lo:.3f} to {hi:.3f}, bootstrap over {fit.n_configs} "
            f"configs), Pearson r = {fit.pearson_r:.3f} "
            f"(p = {fit.pearson_p:.2g}), Spearman r = {fit.spearman_r:.3f} (p = {fit.spearman_p:.2g}), "
            f"residual scatter {fit.residual_std:.3f} in log10.", "",
            f"Leave-largest-out check: {describe_extrapolation(fit.leave_largest_out)}.", ""]


def _training_compute_lines(training_compute) -> list[str]:
    lines = ["## Training compute (Fig. 9)", ""]
    fit = training_compute.fit
    if fit is None:
        return [*lines, f"The offset power law was not fitted: {training_compute.unfitted}", ""]
    summary = fit.summary()
    law, convergence = fit.law, fit.convergence

    def interval(name):
        lo, hi = summary[f"{name}_ci"]
        return f"{lo:.3g} to {hi:.3g}"

    return [*lines,
            f"{fit.metadata['metric']} = floor + scale (C / {law.x_ref:.3g})^-exponent on the "
            f"frontier's {len(fit.data)} points ({summary['n_configs']} runs): floor "
            f"{'≈0' if 'floor=0' in convergence['at_bound'] else f'{law.floor:.3g}'} "
            f"({interval('floor')}), scale {law.scale:.3g} ({interval('scale')}), exponent "
            f"{law.exponent:.3f} ({interval('exponent')}); {fit.confidence:.0%} bootstrap intervals over "
            f"runs ({summary['n_bootstrap']} replicates).", "",
            f"Convergence: {'converged' if convergence['converged'] else 'NOT converged'}, "
            f"{convergence['starts_at_best']} of {convergence['starts']} starts reached the best fit"
            + (f"; parameters at their bounds: {', '.join(convergence['at_bound'])}"
               if convergence["at_bound"] else "") + ".", "",
            f"Leave-largest-out check: {describe_extrapolation(fit.leave_largest_out)}.", "",
            "Compute-optimal run by range of training compute: "
            + "; ".join(f"{r.run} ({r.x_start:.2g} to {r.x_end:.2g})"
                        for r in fit.frontier.optimal_ranges().itertuples()) + ".", ""]


def _isoflop_section(analysis: Analysis) -> list[str]:
    """The isoFLOP profiles of the sample metric and of the held-out loss (where the records hold one)."""
    if not analysis.selection.ok:
        return []
    lines = ["## Compute-optimal size (isoFLOP profiles)", ""]
    for metric, fitted in ((analysis.metric, analysis.isoflop), (analysis.held_out_loss, analysis.loss_isoflop)):
        if metric is not None:
            lines += _isoflop_lines(fitted.value) if fitted.ok else [
                f"{metric}: no isoFLOP profiles ({fitted.reason})", ""]
    return lines


def _law_section(analysis: Analysis) -> list[str]:
    """The parametric law over every point (approach 3) beside the isoFLOP estimate, and whether Gflops or
    parameters explain the metric better (the error of each law on the largest runs, fitted without them)."""
    if not analysis.selection.ok:
        return []
    lines = ["## The parametric law (every point at once)", ""]
    if not analysis.law.ok:
        return lines + [f"Not fitted: {analysis.law.reason}", ""]
    fit = analysis.law.value

    def value(name: str) -> str:
        lo, hi = fit.intervals[name]
        return f"{fit.values[name]:.3g} [{lo:.3g}, {hi:.3g}]"

    lines.append(f"{fit.metric} = E + A / N^alpha + B / D^beta over {fit.n_points} (run, step) points of {fit.n_runs} "
                 f"runs (N: {MODEL_SIZES[fit.size]}, D: images seen; {fit.confidence:.0%} intervals from "
                 f"{fit.n_bootstrap} bootstrap fits over runs): E = {value('E')}, A = {value('A')}, "
                 f"B = {value('B')}, alpha = {value('alpha')}, beta = {value('beta')}. The compute-optimal size grows "
                 f"as C^a with a = {value('a')}" + (
                     f" (isoFLOP profiles: {analysis.isoflop.value.size_law.exponent:.3g})"
                     if analysis.isoflop.ok and analysis.isoflop.value.size_law else
                     " (the isoFLOP profiles give no estimate)") + ". "
                 + (" ".join(f"{flag[0].upper()}{flag[1:]}." for flag in fit.flags()) or "Converged, no parameter at "
                                                                                      "a bound."))
    lines.append("")
    errors = [(f, f.held_out_error) for f in (fit, analysis.law_params.value if analysis.law_params.ok else None)
              if f is not None and f.held_out_error is not None]
    if errors:
        lines.append("Fitted without the largest runs, each law's median error on them: " + "; ".join(
            f"N in {MODEL_SIZES[f.size]} {error:.0%} ({', '.join(f.held_out_runs)})" for f, error in errors) + ".")
        if len(errors) == 2:
            best = min(errors, key=lambda pair: pair[1])[0]
            lines[-1] += f" The law over {MODEL_SIZES[best.size]} extrapolates better."
        lines.append("")
    return lines


SAMPLING_EXAMPLES = 3  # cases of a smaller model beating a larger one that the report spells out


def _sampling_lines(tradeoff, saturated: list[float], noise=None) -> list[str]:
    """The report's answer to the paper's sampling question from `study.sampling_tradeoff`: the best (model,
    sampling steps) pair in each range of sampling compute, and whether a smaller model sampled with more steps
    beats a larger one sampled with fewer (at no more sampling compute), told apart where the larger one was
    sampled below the `saturated` step counts (none: every count counts), with how many cases exceed the
    evaluation's `noise` (an EvaluationNoise, when known). Reads only the `pair`, `winners` and
    `smaller_beats_larger` columns, whatever names the pairs carry (models or runs)."""
    metadata = tradeoff.metadata
    n_pairs = tradeoff.points.groupby(["run", "sampling_steps"]).ngroups
    lines = ["## Sampling compute (Fig. 10)", "",
             f"{metadata['metric']} at {format_steps(metadata['step'])} training steps, {n_pairs} (model, sampling "
             "steps) pairs. Best pair by sampling compute per image (Gflops: forward Gflops × sampling steps, × 2 "
             "with guidance):", ""]
    lines += [f"- {row.pair}: " + (f"{row.budget_from:.3g} to {row.budget_to:.3g}" if row.budget_to > row.budget_from
                                   else f"at {row.budget_from:.3g} (the largest budget evaluated)")
              for row in tradeoff.winners.itertuples()]
    lines.append("")
    beats = tradeoff.smaller_beats_larger
    if beats.empty:
        lines += ["Can sampling compute make up for model compute? No: no smaller model sampled with more steps "
                  f"scores better ({metadata['metric']}, lower is better) than a larger model sampled with fewer.",
                  ""]
        return lines
    below = tradeoff.below_saturation(saturated)
    cheap = beats[beats["at_most_the_compute"].astype(bool)]
    cheap_saturated = cheap[~below[cheap.index]]
    counts = " or ".join(f"{c:g}" for c in saturated)
    if len(cheap_saturated):
        answer = (f"Yes: in {len(beats)} case(s) a smaller model sampled with more steps beats a larger model "
                  f"sampled with fewer, {len(cheap_saturated)} of them at no more sampling compute per image"
                  + (f" with the larger one sampled with {counts} steps, where sampling has saturated"
                     if len(saturated) >= 2 else ""))
        if noise is not None:
            beyond = int(noise.resolved(cheap_saturated["value_smaller"], cheap_saturated["value_larger"]).sum())
            answer += f" ({beyond} of those beyond the evaluation's noise)"
    elif len(cheap):
        answer = (f"Not where sampling has saturated: no smaller model sampled with more steps beats a larger one "
                  f"sampled with {counts} steps at no more sampling compute per image; {len(cheap)} case(s) do "
                  "against a larger model sampled with fewer steps, far from what it reaches with more")
    else:
        answer = (f"Only with more sampling compute: in {len(beats)} case(s) a smaller model sampled with more steps "
                  "beats a larger model sampled with fewer, but never at no more sampling compute per image")
    examples = cheap if len(cheap) else beats
    examples = examples.assign(margin=examples["value_larger"] - examples["value_smaller"]).sort_values(
        "margin", ascending=False).head(SAMPLING_EXAMPLES)
    lines += [f"Can sampling compute make up for model compute? {answer}. "
              f"{'The clearest' if len(examples) > 1 else 'The'} ({metadata['metric']}, lower is better):", ""]
    for row in examples.itertuples():
        lines.append(f"- {row.model_smaller} with {row.sampling_steps_smaller:g} steps ({row.value_smaller:.2f}) "
                     f"beats {row.model_larger} with {row.sampling_steps_larger:g} steps ({row.value_larger:.2f})"
                     + ("" if row.at_most_the_compute else ", with more sampling compute")
                     + (", below saturation" if below[row.Index] else "") + ".")
    lines.append("")
    return lines


def _sampling_section(analysis: Analysis) -> list[str]:
    """Fig. 10's section: the trade-off, with the step counts where sampling has saturated when the noise is known."""
    def lines(tradeoff) -> list[str]:
        noise = analysis.noise.value if analysis.noise.ok else None
        return _sampling_lines(tradeoff, tradeoff.saturated_counts(noise.resolved) if noise else [], noise)
    return _section("Sampling compute (Fig. 10)", lines, "sampling")(analysis)


def _isoflop_lines(analysis) -> list[str]:
    """What the profiles of one metric say: the two laws with their intervals, or why there are none."""
    if analysis.size_law is None:
        return [f"{analysis.metric} ({analysis.n_configs} configs): {analysis.note}. {isoflop.PROFILES_NEED}", ""]
    head = (f"{analysis.metric}: {len(analysis.fitted)} of {len(analysis.profiles)} budgets have an interior "
            f"minimum ({analysis.n_configs} configs)")
    low, high = analysis.fitted_range
    laws = []
    for law, name in ((analysis.size_law, "N_opt"), (analysis.images_law, "D_opt (images seen)")):
        lo, hi = law.exponent_ci
        laws.append(f"{name} ∝ C^{law.exponent:.2f} ({law.confidence:.0%} interval {lo:.2f} to {hi:.2f})")
    return [f"{head}, from {low:.3g} to {high:.3g} Gflops of training compute: " + "; ".join(laws)
            + f" (bootstrap over configs: {len(analysis.size_law.bootstrap)} of {analysis.metadata['n_bootstrap']} "
            "resamples kept 2 fitted budgets).", ""]


def _proxy_lines(analysis) -> list[str]:
    best = analysis.best
    others = ", ".join(f"{fit.form.name} {fit.typical_error:.0%}" for fit in analysis.fits.values()
                       if fit is not best)
    return ["## The held-out loss as a predictor", "",
            f"{analysis.metric} from {analysis.loss_metric} over {len(analysis.pairs)} (config, step) pairs of "
            f"{analysis.pairs['run'].nunique()} configs: best form {best.form.formula} (parameters "
            + ", ".join(f"{p:.4g}" for p in best.parameters) + f"), typical error {best.typical_error:.0%} when "
            f"each config is predicted by a fit without it (others: {others}); {best.confidence:.0%} of those "
            f"predictions lie within ×/÷ {best.interval_factor:.2f}. Spearman ρ between the two across configs at "
            f"step {format_steps(analysis.rank_step)}: {analysis.rank_correlation:.2f}.", ""]


def _section(title: str, lines_of: Callable[[object], list[str]], entry: str) -> Callable[[Analysis], list[str]]:
    """The section of the Analysis entry `entry`: its lines, or why it could not be computed; nothing when the
    records hold no evaluations (the notes say so)."""
    def lines(analysis: Analysis) -> list[str]:
        if not analysis.selection.ok:
            return []
        fitted = getattr(analysis, entry)
        return lines_of(fitted.value) if fitted.ok else [f"## {title}", "", f"Not computed: {fitted.reason}", ""]
    return lines


# Each section of a report, by name: the lines it writes from an Analysis.
SECTIONS: dict[str, Callable[[Analysis], list[str]]] = {
    "notes": _notes_lines,
    "findings": _findings_lines,
    "model_compute": _section("Model compute (Fig. 8)", _model_compute_lines, "model_compute"),
    "training_compute": _section("Training compute (Fig. 9)", _training_compute_lines, "training_compute"),
    "sampling": _sampling_section,
    "isoflop": _isoflop_section,
    "law": _law_section,
    "loss_proxy": _section("The held-out loss as a predictor", _proxy_lines, "loss_proxy"),
}
