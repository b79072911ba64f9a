"""Everything at once: every figure the records support, Table 4 and a one-page Markdown report of the fits."""

from __future__ import annotations

from etils import epath

from analysis import figures, isoflop, study, tables
from analysis.fits import describe_extrapolation
from analysis.records import Records
from analysis.schema import RecordsError
from analysis.style import format_steps, save_figure

REPORT_TABLE_ROWS = 24  # a longer Table 4 is linked from the report, not copied into it

CAPTIONS = {
    "fig2_bubble": "Fig. 2: the metric vs model Gflops; bubble area is proportional to Gflops.",
    "fig5_conditioning": "Fig. 5: conditioning blocks of one model.",
    "fig6_curves": "Fig. 6: the metric over training, by patch size (top) and by model size (bottom).",
    "fig6_curves_one_panel": "Fig. 6: the metric over training, one curve per run (not grouped by patch and size: "
                             "fewer than two runs with curves are DiT configs).",
    "fig8_gflops_fit": "Fig. 8: the metric vs model Gflops, log-log fit with confidence band and prediction interval.",
    "fig9_training_compute": "Fig. 9: the metric vs training compute, with the compute frontier and its power law.",
    "fig10_sampling_compute": "Fig. 10: the metric vs sampling compute per image.",
    "fig13_loss": "Fig. 13: training loss.",
    "isoflop_profiles": "isoFLOP profiles (Chinchilla's Fig. 3): the metric of every config at equal training "
                        "compute, the parabola's minimum, and the compute-optimal size and images against compute.",
    "isoflop_profiles_loss": "isoFLOP profiles of the held-out loss (evaluated more densely than the samples).",
    "loss_to_metric": "The sample metric against the held-out loss at the same run and step, with the best "
                      "form's prediction interval.",
}


def render_all(records: Records, out_dir: str | epath.Path, *, metric: str | None = None
               ) -> tuple[list[epath.Path], dict[str, str]]:
    """Write every figure the records support (NAME.png and NAME.pdf), table4.md, table4.tex and report.md into
    out_dir. Returns the written paths and {figure name: why it was skipped}. The points are `study.select`'s
    (configs of one block and resolution, one metric, default: the sample metric with the most points, and its
    most common protocol), the fits study's; the report lists what was left out."""
    out_dir = epath.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_evaluations = not records.evaluations.empty
    notes: list[str] = []
    protocol, candidates = None, []
    if has_evaluations:
        selection = study.select(records, metric=metric)
        family, protocol, notes = selection.family, selection.protocol, [*selection.notes]
        if family:
            notes.append("Fig. 5 and Table 4 show every conditioning block and resolution.")
        candidates = [metric] if metric else [selection.metric] + [
            m for m in study.metrics_by_count(records) if m != selection.metric]
        metric = selection.metric
    else:
        family = study.scaling_family(records.runs, notes=notes)
        notes.append("The records hold no evaluations: only the training loss can be drawn.")
    written: list[epath.Path] = []
    skipped: dict[str, str] = {}
    fits: dict[str, object] = {}
    captions = dict(CAPTIONS)

    def fig6():
        fig = figures.fig6_curves(records, metric=metric)
        if len(fig.axes) == 1:  # the single panel of runs that are not DiT configs
            captions["fig6_curves"] = CAPTIONS["fig6_curves_one_panel"]
        return fig

    def fig8():
        fig, fits["fig8"] = figures._fig8(records, metric=metric)
        return fig

    def fig9():
        fig, fit, unfitted = figures._fig9(records, metric=metric, n_bootstrap=study.FRONTIER_N_BOOTSTRAP)
        fits["fig9"] = (fit, unfitted)
        return fig

    def isoflop_figure(loss: bool):
        chosen = held_out_loss() if loss else metric
        fig, fits["isoflop_loss" if loss else "isoflop"] = figures._isoflop_figure(records, metric=chosen)
        return fig

    def held_out_loss() -> str:
        losses = study.held_out_losses(records)
        if not losses:
            raise RecordsError("the records hold no held-out loss (train with eval.validation_examples > 0).")
        return losses[0]

    def loss_to_metric():
        fig, fits["proxy"] = figures._loss_to_metric(records, metric=metric, loss_metric=held_out_loss())
        return fig

    def fig10():
        # The chosen metric's points if they vary the sampling steps, else the first metric's that do.
        for candidate in candidates:
            try:
                fig, fits["fig10"] = figures._fig10(records, metric=candidate)
                return fig
            except RecordsError as e:
                reason = e
        if len(candidates) == 1:
            raise reason
        raise RecordsError(f"no metric ({', '.join(candidates)}) was evaluated with several sampling-step counts "
                           "under one protocol; evaluate the same checkpoints with several step counts "
                           "(--config.eval.sampling_steps).")

    renderers = {
        "fig2_bubble": lambda: figures.fig2_bubble(records, metric=metric),
        "fig5_conditioning": lambda: figures.fig5_conditioning(records, metric=metric, protocol=protocol),
        "fig6_curves": fig6,
        "fig8_gflops_fit": fig8,
        "fig9_training_compute": fig9,
        "fig10_sampling_compute": fig10,
        "fig13_loss": lambda: figures.fig13_loss(records.where(**family)),
        "isoflop_profiles": lambda: isoflop_figure(loss=False),
        "isoflop_profiles_loss": lambda: isoflop_figure(loss=True),
        "loss_to_metric": loss_to_metric,
    }
    for name in figures.FIGURES:
        render = renderers[name]
        if not has_evaluations and name != "fig13_loss":
            skipped[name] = "the records hold no evaluations (metric values per run and step)"
            continue
        try:
            written += save_figure(render(), out_dir, name)
        except RecordsError as e:
            skipped[name] = str(e)

    table_markdown = None
    if has_evaluations:
        try:
            table_markdown = tables.table4_markdown(records, metric=metric)
            (out_dir / "table4.md").write_text(table_markdown)
            (out_dir / "table4.tex").write_text(tables.table4_latex(records, metric=metric))
            written += [out_dir / "table4.md", out_dir / "table4.tex"]
        except RecordsError as e:
            skipped["table4"] = str(e)
    else:
        skipped["table4"] = "the records hold no evaluations"

    report = out_dir / "report.md"
    report.write_text(_report(records, notes, fits, table_markdown, written, skipped, captions))
    written.append(report)
    return written, skipped


def _report(records, notes: list[str], fits: dict, table_markdown, written, skipped, captions: dict) -> str:
    lines = ["# Scaling report", "",
             f"{records.runs['run'].nunique()} runs, {len(records.evaluations)} evaluation points, "
             f"{len(records.steps)} training-step records.", ""]
    lines += [f"- {note}" for note in notes]
    if "fig10" in fits:
        points = fits["fig10"].points
        lines.append(f"- Fig. 10 uses {points['metric'].iloc[0]} at sampling steps "
                     f"{sorted(int(s) for s in points['sampling_steps'].unique())}.")
    lines.append("")

    if "fig8" in fits:
        fit = fits["fig8"]
        lo, hi = fit.slope_ci
        lines += ["## Model compute (Fig. 8)", "",
                  f"log10 {fit.metadata['metric']} = {fit.intercept:.3f} {'-' if fit.slope < 0 else '+'} "
                  f"{abs(fit.slope):.3f} log10 Gflops at {format_steps(fit.metadata['step'])} steps: slope "
                  f"{fit.slope:.3f} ({fit.confidence:.0%} CI {lo:.3f} to {hi:.3f}, bootstrap over {fit.n_configs} "
                  f"configs), Pearson r = {fit.pearson_r:.3f} "
                  f"(p = {fit.pearson_p:.2g}), Spearman r = {fit.spearman_r:.3f} (p = {fit.spearman_p:.2g}), "
                  f"residual scatter {fit.residual_std:.3f} in log10.", ""]
        lines += [f"Leave-largest-out check: {describe_extrapolation(fit.leave_largest_out)}.", ""]
    if "fig9" in fits:
        fit, unfitted = fits["fig9"]
        lines += ["## Training compute (Fig. 9)", ""]
        if fit is None:
            lines += [f"The offset power law was not fitted: {unfitted}", ""]
        else:
            summary = fit.summary()
            law, convergence = fit.law, fit.convergence

            def interval(name):
                lo, hi = summary[f"{name}_ci"]
                return f"{lo:.3g} to {hi:.3g}"

            lines += [f"{fit.metadata['metric']} = floor + scale (C / {law.x_ref:.3g})^-exponent on the "
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
    if "fig10" in fits:
        lines += _sampling_lines(fits["fig10"])
    isoflops = [fits[name] for name in ("isoflop", "isoflop_loss") if name in fits]
    if isoflops:
        lines += ["## Compute-optimal size (isoFLOP profiles)", ""] + [line for analysis in isoflops
                                                                      for line in isoflop_lines(analysis)]
    if "proxy" in fits:
        lines += proxy_lines(fits["proxy"])
    if table_markdown:
        rows = table_markdown.count("\n") - 2
        lines += ["## Table 4", ""] + ([table_markdown] if rows <= REPORT_TABLE_ROWS else
                                       [f"{rows} rows: see [table4.md](table4.md).", ""])
    figures = [p.stem for p in written if p.suffix == ".png"]
    if figures:
        lines += ["## Figures", ""]
        for name in figures:
            lines += [f"![{captions[name]}]({name}.png)", "", f"*{captions[name]}*", ""]
    if skipped:
        lines += ["## Not drawn", ""]
        lines += [f"- {name}: {reason}".replace("\n", " ") for name, reason in skipped.items()]
        lines.append("")
    return "\n".join(lines)


SAMPLING_EXAMPLES = 3  # cases of a smaller model beating a larger one that the report spells out


def _sampling_lines(tradeoff) -> list[str]:
    """The report's answer to the paper's sampling question from `study.sampling_tradeoff`: the best (model,
    sampling steps) pair in each range of sampling compute, and whether a smaller model sampled with more steps
    beats a larger one sampled with fewer (at no more sampling compute). Reads only the `pair`, `winners` and
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
    cheap = beats[beats["at_most_the_compute"].astype(bool)]
    if len(cheap):
        answer = (f"Yes: in {len(beats)} case(s) a smaller model sampled with more steps beats a larger model "
                  f"sampled with fewer, {len(cheap)} of them at no more sampling compute per image")
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
                     + ("" if row.at_most_the_compute else ", with more sampling compute") + ".")
    lines.append("")
    return lines


def isoflop_lines(analysis) -> list[str]:
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


def proxy_lines(analysis) -> list[str]:
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
