"""The paper's findings, checked on a study's fits (`analysis.analyze`): each a number, the paper's claim and
whether it holds; `analyze(records).findings` checks them on a set of records.

- Model compute: Pearson r(log Gflops, log metric) at the final step, at most `MAX_PEARSON_R`.
- Ordering: bigger size at equal patch and smaller patch at equal size score better; of the 17 adjacent pairs of
  the 12-config grid, at least `MIN_ORDERED_PAIRS` in the right order at the final step.
- Compute efficiency: the training-compute frontier is owned by ever larger models as compute grows.
- Sampling compute: no smaller model sampled with more steps beats a larger one at no more sampling compute.
- Class conditioning: the samples of the `LARGEST_CONFIGS` configs with the most Gflops are classified as the
  class they were drawn for at least `MIN_CLASS_ACCURACY` of the time (where the metric records class_accuracy),
  with guidance where the records have guided evaluations (Fig. 7's setting), the unguided accuracy beside it.
- Noise: where the final step was evaluated with several noise seeds (`analysis.noise`), each ordering, frontier
  and sampling statement says which of its differences exceed the evaluation's noise.
- The instrument: the best config's metric at most `MAX_FLOOR_RATIO` times the metric's floor (what as many real
  held-out images score against the same reference, where the records hold it): differences far above the floor are
  the models', not the metric's.
- The held-out validation loss (a metric of family `VALIDATION_FAMILY`): its own model-compute correlation and
  frontier, and how well it predicts the sample metric (`proxy.loss_proxy`: rank correlation across configs, and
  the error of predicting a config left out of the fit).

Numbers are reported whether or not a finding holds; nothing here is tuned to the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.paper import PATCHES, SIZES
from analysis.style import dit_size_and_patch, with_dit_columns

MAX_PEARSON_R = -0.8
MIN_ORDERED_PAIRS = 14  # of the 17 adjacent (size, patch) pairs of the paper's 12 configs
MIN_CLASS_ACCURACY = 0.7  # of the largest configs' samples, where the metric records it
LARGEST_CONFIGS = 2
MAX_FLOOR_RATIO = 15.0  # the best config's metric over the floor, where the records hold one


@dataclass(frozen=True)
class Finding:
    name: str
    holds: bool | None  # None: not measurable on these records
    text: str


@dataclass
class Findings:
    metric: str
    step: int
    findings: list[Finding] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    noise: str | None = None  # what the evaluation's noise is, where the records measure it

    def markdown(self) -> list[str]:
        mark = {True: "holds", False: "**does not hold**", None: "not measured"}
        lines = [f"- The evaluation's noise: {self.noise}"] if self.noise else []
        return lines + [f"- {f.name}: {mark[f.holds]}. {f.text}" for f in self.findings]


def ordered_pairs(points: pd.DataFrame) -> pd.DataFrame:
    """The adjacent pairs of the size x patch grid among `points` (one value per run: columns size, patch, run,
    value; lower is better): bigger size at equal patch, and smaller patch at equal size, with `right` true where
    the bigger model scores better."""
    configs = ((dit_size_and_patch(row.size, row.patch), row) for row in with_dit_columns(points).itertuples())
    values = {config: (row.run, row.value) for config, row in configs if config[0] is not None}  # DiT configs only
    rows = []
    for kind, pairs in (
            ("size", [((a, p), (b, p)) for p in PATCHES for a, b in zip(SIZES, SIZES[1:], strict=False)]),
            ("patch", [((s, a), (s, b)) for s in SIZES for a, b in zip(PATCHES, PATCHES[1:], strict=False)])):
        for smaller, bigger in pairs:
            if smaller in values and bigger in values:
                rows.append({"kind": kind, "smaller": values[smaller][0], "bigger": values[bigger][0],
                             "value_smaller": values[smaller][1], "value_bigger": values[bigger][1],
                             "right": values[bigger][1] < values[smaller][1]})
    return pd.DataFrame(rows, columns=["kind", "smaller", "bigger", "value_smaller", "value_bigger", "right"])


def frontier_owners(frontier, runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that own the frontier, in order of compute, with their Gflops: run, gflops, x_start, x_end."""
    ranges = frontier.optimal_ranges()
    gflops = runs.drop_duplicates("run").set_index("run")["gflops"]
    return ranges.assign(gflops=ranges["run"].map(gflops))[["run", "gflops", "x_start", "x_end"]]


def paper_findings(analysis) -> Findings:
    """Check the paper's findings (see the module docstring) from the fits of an `analysis.analyze.Analysis`;
    RecordsError when the records support no model-compute fit or frontier of the sample metric."""
    model_compute = analysis.model_compute.get()
    fit = model_compute.fit
    metric = fit.metadata["metric"]
    final = model_compute.points.drop_duplicates("run")
    out = Findings(metric=metric, step=int(fit.metadata["step"]))
    r = fit.pearson_r
    out.numbers.update(pearson_r=r, slope=fit.slope, n_configs=fit.n_configs)
    out.findings.append(Finding(
        "FD falls with model Gflops", r <= MAX_PEARSON_R,
        f"Pearson r(log Gflops, log {metric}) = {r:.3f} over {fit.n_configs} configs at step {out.step} "
        f"(claim: at most {MAX_PEARSON_R}); slope {fit.slope:.3f}."))

    noise = analysis.noise.value if analysis.noise.ok else None
    if noise is not None:
        out.numbers.update(noise_sd_log=noise.sd_log, noise_relative=noise.relative)
        out.noise = (f"{metric} of the same checkpoints sampled with other noise moves by {noise.text()}; the "
                     "statements below say which of their differences exceed it.")
    out.findings.append(_ordering_finding(final, noise, out.numbers))
    out.findings.append(_class_finding(final, analysis.guided, out.numbers))

    training_compute = analysis.training_compute.get()
    owners = frontier_owners(training_compute.frontier, training_compute.points)
    growing = bool(np.all(np.diff(owners["gflops"].to_numpy()) > 0))
    out.numbers.update(frontier_owners=owners["run"].tolist(), frontier_growing=growing)
    out.findings.append(Finding(
        "Larger models are more compute-efficient", growing and len(owners) > 1,
        "The training-compute frontier is owned, as compute grows, by "
        + " -> ".join(f"{o.run} ({o.gflops:.3g} Gflops)" for o in owners.itertuples())
        + " (claim: ever larger models)" + _handovers_text(owners, training_compute.points, noise, out.numbers)
        + "."))

    out.findings.append(_sampling_finding(analysis.sampling, metric, noise, out.numbers))
    if "floor" in final.columns and final["floor"].notna().any():
        out.findings.append(_floor_finding(final, metric, out.numbers))
    if analysis.held_out_loss:
        out.findings.append(_held_out_loss_finding(analysis, metric, out.numbers))
    return out


def _ordering_finding(final: pd.DataFrame, noise, numbers: dict) -> Finding:
    pairs = ordered_pairs(final)
    right = int(pairs["right"].sum())
    numbers.update(pairs_right=right, pairs=len(pairs))
    wrong = pairs[~pairs["right"]]
    text = f"{right} of {len(pairs)} adjacent pairs in the right order (claim: at least {MIN_ORDERED_PAIRS} of 17)"
    if noise is not None and len(pairs):
        resolved = noise.resolved(pairs["value_smaller"], pairs["value_bigger"])
        right_resolved = int((pairs["right"] & resolved).sum())
        wrong_resolved = int((~pairs["right"] & resolved).sum())
        numbers.update(pairs_right_resolved=right_resolved, pairs_wrong_resolved=wrong_resolved)
        text += f"; {right_resolved} of them resolved beyond the noise, {wrong_resolved} out of order beyond it"
    if len(wrong):
        text += "; out of order: " + ", ".join(
            f"{w.bigger} {w.value_bigger:.1f} vs {w.smaller} {w.value_smaller:.1f}" for w in wrong.itertuples())
    return Finding("Bigger size and smaller patch score better",
                   right >= MIN_ORDERED_PAIRS if len(pairs) == 17 else None, text + ".")


def _class_finding(final: pd.DataFrame, guided, numbers: dict) -> Finding:
    """Class accuracy of the largest configs' samples: guided (the Fig. 7 setting) where the records have it, with
    the unguided beside it."""
    name = "The largest configs' samples are class-conditional"
    if "class_accuracy" not in final.columns or final["class_accuracy"].isna().all():
        return Finding(name, None, "the metric records no class accuracy.")
    largest = final.sort_values("gflops", ascending=False).head(LARGEST_CONFIGS)
    unguided = dict(zip(largest["run"], largest["class_accuracy"].astype(float), strict=True))
    numbers.update(class_accuracy=unguided)
    claim = f" (claim: at least {MIN_CLASS_ACCURACY}; chance is 1 / the number of classes)."
    if not guided.ok:
        return Finding(name, min(unguided.values()) >= MIN_CLASS_ACCURACY,
                       "class accuracy of the samples by the feature network: " + ", ".join(
                           f"{run} {value:.2f}" for run, value in unguided.items()) + claim)
    by_run = guided.value.set_index("run")
    scale = float(guided.value["guidance_scale"].iloc[0])
    accuracy = {run: float(by_run.loc[run, "class_accuracy"]) for run in unguided if run in by_run.index}
    numbers.update(guided_class_accuracy=accuracy, guidance_scale=scale)
    holds = min(accuracy.values()) >= MIN_CLASS_ACCURACY if len(accuracy) == len(unguided) else None
    return Finding(name, holds, f"class accuracy of the samples by the feature network with guidance {scale:g} "
                   "(Fig. 7's setting): " + ", ".join(f"{run} {value:.2f} (unguided {unguided[run]:.2f})"
                                                       for run, value in accuracy.items()) + claim)


def _handovers_text(owners: pd.DataFrame, points: pd.DataFrame, noise, numbers: dict) -> str:
    """Whether each handover of the frontier is beyond the noise: the new owner's best value below the previous
    owner's best by more than the noise (it reaches what the smaller model never does in the study)."""
    if noise is None or len(owners) < 2:
        return ""
    best = points.groupby("run")["value"].min()
    runs = owners["run"].tolist()
    resolved = [bool(best[b] < best[a] and noise.resolved(best[a], best[b]))
                for a, b in zip(runs[:-1], runs[1:], strict=True)]
    numbers.update(frontier_handovers_resolved=sum(resolved), frontier_handovers=len(resolved))
    return (f"; {sum(resolved)} of {len(resolved)} handovers beyond the noise (the new owner's best below the "
            "previous owner's best by more than it)")


def _floor_finding(final: pd.DataFrame, metric: str, numbers: dict) -> Finding:
    best = final.loc[final["value"].idxmin()]
    floor = float(final["floor"].median())  # one value per study: the same real images and reference
    ratio = float(best["value"]) / floor
    numbers.update(floor=floor, floor_ratio=ratio)
    return Finding(
        "The best samples are near what real images score", ratio <= MAX_FLOOR_RATIO,
        f"The best config, {best['run']}, scores {best['value']:.3g}: {ratio:.1f} times the floor {floor:.3g} "
        f"(real held-out images, as many as samples, against the same reference; claim: at most "
        f"{MAX_FLOOR_RATIO:g} times).")


def _sampling_finding(sampling, metric: str, noise, numbers: dict) -> Finding:
    """From the Analysis's Fitted sampling trade-off: the paper's comparison (a smaller model sampled with more steps
    against a larger one with fewer, at no more sampling compute), made where sampling has saturated: at the step
    counts from which the best config's metric stays within the noise of its value at the largest count. A larger
    model sampled with fewer steps than that is far from what it can do (the paper's Fig. 10 runs to 1000 steps);
    cases there are named beside the verdict. It holds when no case at saturation is beyond the noise; without a
    noise estimate every count and every case counts."""
    name = "More sampling steps do not make up for less model compute"
    if not sampling.ok:
        return Finding(name, None, sampling.reason)
    tradeoff = sampling.value
    beats = tradeoff.smaller_beats_larger
    cheap = beats[beats["at_most_the_compute"].astype(bool)] if len(beats) else beats
    numbers.update(smaller_beats_larger_at_no_more_compute=len(cheap))
    counts = tradeoff.saturated_counts(noise.resolved) if noise is not None else []
    below = tradeoff.below_saturation(counts)[cheap.index]
    at_saturation, unsaturated = cheap[~below], cheap[below]
    where = ""
    if len(counts) >= 2:
        numbers.update(smaller_beats_larger_at_saturation=len(at_saturation))
        where = (f" (the larger one sampled with {' or '.join(f'{c:g}' for c in counts)} steps, where sampling has "
                 "saturated)")
    pairs_evaluated = tradeoff.points.groupby(["run", "sampling_steps"]).ngroups
    # Fig. 10 takes another metric when the sample metric was evaluated with one sampling-step count only.
    of_metric = "" if tradeoff.metadata["metric"] == metric else f" of {tradeoff.metadata['metric']}"
    text = (f"over {pairs_evaluated} (model, sampling steps) pairs{of_metric} at step {tradeoff.metadata['step']}, "
            + (f"{len(at_saturation)} case(s) of a smaller model sampled with more steps beating a larger one at no "
               f"more sampling compute{where}: {_cases(at_saturation)}" if len(at_saturation) else
               f"no smaller model sampled with more steps beats a larger one at no more sampling compute{where}")
            + " (Fig. 10).")
    beyond_noise = len(at_saturation)
    if noise is not None:
        if len(at_saturation):
            beyond_noise = int(noise.resolved(at_saturation["value_smaller"], at_saturation["value_larger"]).sum())
            numbers.update(smaller_beats_larger_resolved=beyond_noise)
            text += f" {beyond_noise} of those case(s) beyond the noise."
        text += " " + _saturation_text(tradeoff, noise, numbers)
        if len(unsaturated):
            text += (f" Against a larger model sampled with fewer steps, far from its saturation, "
                     f"{len(unsaturated)} case(s): {_cases(unsaturated)}.")
    # As with the ordered pairs, a case within the noise is no evidence against the paper.
    return Finding(name, beyond_noise == 0, text)


def _cases(cases: pd.DataFrame, shown: int = 3) -> str:
    listed = ", ".join(f"{c.model_smaller}@{c.sampling_steps_smaller:g} {c.value_smaller:.1f} vs "
                       f"{c.model_larger}@{c.sampling_steps_larger:g} {c.value_larger:.1f}"
                       for c in cases.head(shown).itertuples())
    return listed + (f" and {len(cases) - shown} more" if len(cases) > shown else "")


def _saturation_text(tradeoff, noise, numbers: dict) -> str:
    """Whether the best config (most Gflops) has saturated in sampling steps: its metric at the two largest step
    counts within the noise."""
    largest = tradeoff.best_config_by_steps()
    if len(largest) < 2:
        return ""
    (steps_a, value_a), (steps_b, value_b) = largest[["sampling_steps", "value"]].tail(2).itertuples(index=False)
    saturated = not bool(noise.resolved(value_a, value_b))
    numbers.update(sampling_saturated=saturated)
    return (f"{largest['run'].iloc[0]} scores {value_a:.3g} with {steps_a:g} steps and {value_b:.3g} with "
            f"{steps_b:g}: sampling has " + ("saturated (within the noise)." if saturated
                                             else "not saturated (beyond the noise); evaluate more steps."))


def _held_out_loss_finding(analysis, metric: str, numbers: dict) -> Finding:
    name = "The held-out validation loss scales the same way"
    loss = analysis.held_out_loss
    if not analysis.loss_model_compute.ok or not analysis.loss_training_compute.ok:
        return Finding(name, None, f"{loss}: " + (analysis.loss_model_compute.reason
                                                  or analysis.loss_training_compute.reason))
    loss_fit = analysis.loss_model_compute.value.fit
    loss_training = analysis.loss_training_compute.value
    loss_owners = frontier_owners(loss_training.frontier, loss_training.points)
    numbers.update(proxy=loss, proxy_pearson_r=loss_fit.pearson_r, proxy_frontier_owners=loss_owners["run"].tolist())
    text = (f"Pearson r(log Gflops, log {loss}) = {loss_fit.pearson_r:.3f} at step "
            f"{loss_fit.metadata['step']}; its frontier is owned by " + " -> ".join(loss_owners["run"]) + ".")
    if analysis.loss_proxy.ok:
        mapping = analysis.loss_proxy.value
        best = mapping.best
        numbers.update(proxy_rank_r=mapping.rank_correlation, proxy_form=best.form.name,
                       proxy_typical_error=best.typical_error)
        text += (f" As a predictor of {metric}: Spearman ρ {mapping.rank_correlation:.3f} across the configs at "
                 f"step {mapping.rank_step}; {best.form.formula} predicts a config left out of its fit within "
                 f"{best.typical_error:.0%} typically ({len(mapping.pairs)} (run, step) pairs).")
    else:
        text += f" As a predictor of {metric}: {analysis.loss_proxy.reason}"
    return Finding(name, loss_fit.pearson_r <= MAX_PEARSON_R, text)
