"""The analysis commands of `dit-scaling` (fit, plan, isoflop, loss-proxy, compare, figures): registered by
`add_commands` with the one entry point (scaling.cli), they import analysis/ only, so they run without JAX."""

from __future__ import annotations

import argparse
import json
import math
import sys

from etils import epath

from analysis.chips import CHIPS, DEFAULT_UTILIZATION


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print rows as an aligned text table; columns are (key, header)."""

    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    table = [[header for _, header in columns]] + [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(text.rjust(width) if i else text.ljust(width)
                        for i, (text, width) in enumerate(zip(line, widths, strict=True))))


# ----------------------------------------------------------------------------------------------------------------
# argument types: every numeric argument of every command is parsed by one of these, so that a value out of range
# stops the command before it reads or writes anything, with argparse's "argument --NAME: ..." before the message.
# ----------------------------------------------------------------------------------------------------------------


def number(kind: type, *, above: float | None = None, at_least: float | None = None, below: float | None = None,
           at_most: float | None = None):
    """An argparse type: the text as `kind` (int or float), finite and within the bounds given; an error names the
    value and the accepted range."""
    low = ("(", above) if above is not None else ("[", at_least) if at_least is not None else None
    high = (")", below) if below is not None else ("]", at_most) if at_most is not None else None
    if low and high:
        accepted = f" in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    elif low:
        accepted = f" {'>' if low[0] == '(' else '>='} {low[1]:g}"
    elif high:
        accepted = f" {'<' if high[0] == ')' else '<='} {high[1]:g}"
    else:
        accepted = ""
    what = f"{'an integer' if kind is int else 'a finite number'}{accepted}"

    def within(value) -> bool:
        return ((above is None or value > above) and (at_least is None or value >= at_least)
                and (below is None or value < below) and (at_most is None or value <= at_most))

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and within(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = number(int, at_least=1)
non_negative_int = number(int, at_least=0)  # steps, seeds, indices
positive_float = number(float, above=0)
fraction = number(float, above=0, at_most=1)  # of a whole, e.g. of a chip's peak FLOP/s
confidence_level = number(float, above=0, below=1)


def comma_separated(item):
    """An argparse type: comma-separated values, each parsed by the type `item`."""

    def parse(text: str) -> list:
        return [item(part) for part in text.split(",")]

    return parse


def boolean(text: str) -> bool:
    """An argparse type: true or false (also 1/0, yes/no)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def where_condition(text: str) -> tuple[str, str]:
    """An argparse type: COLUMN=VALUE, a filter of records. A number that is not finite equals no value, so it is
    refused here rather than found in no row."""
    column, sep, value = text.partition("=")
    if not sep or not column or not value:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE such as step=400000, got {text!r}")
    try:
        finite = math.isfinite(float(value))
    except ValueError:
        finite = True  # text: compared as text
    if not finite:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE with a finite number or text as VALUE, got {text!r}")
    return column, value


def _where(conditions: list[tuple[str, str]] | None) -> dict:
    return dict(conditions or [])


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _dumps(value) -> str:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(json.loads(json.dumps(value, default=_json_default))), indent=2)


def _print_pairs(pairs: list[tuple[str, object]]) -> None:
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"{name.ljust(width)}  {value}")


PER_MODEL_COLUMNS = ("gflops", "params_m")  # compared across configs at one training step


def _fit_table(paths: list[epath.Path], where: dict, x: str):
    """The rows to fit and notes on how they were chosen. CSV files without metric/value columns are used as they
    are (concatenated, filtered by --where). Records (one source or several) go through `analysis.study.select`:
    one metric, configs of one block and resolution, and, for a per-model x such as gflops, one training step;
    several protocols are an error."""
    import pandas as pd

    from analysis import study
    from analysis.records import filter_rows, load
    from analysis.schema import RecordsError

    plain = [p.suffix == ".csv" and not {"metric", "value"} <= set(pd.read_csv(p, nrows=0).columns) for p in paths]
    if any(plain):
        if not all(plain):
            raise RecordsError("fit takes plain CSV tables or records, not both: "
                               + ", ".join(f"{p} ({'table' if t else 'records'})" for p, t in zip(paths, plain,
                                                                                                  strict=True)))
        return filter_rows(pd.concat([pd.read_csv(p) for p in paths], ignore_index=True), where,
                           ", ".join(map(str, paths))), []
    where = dict(where)
    selection = study.select(load(*paths), metric=where.pop("metric", None), one_protocol=True, **where)
    points, notes = selection.points, list(selection.notes)
    if x in PER_MODEL_COLUMNS and points["step"].nunique() > 1:
        step = study.default_step(points)
        points = study.at_step(points, step)
        notes.append(f"Step {step} (the step most runs were evaluated at; --where step=N for another).")
    return points, notes


def cmd_fit(args: argparse.Namespace) -> int:
    from analysis.fits import describe_extrapolation, fit_frontier, fit_loglog
    from analysis.records import require_one_protocol
    from analysis.schema import RecordsError

    table, notes = _fit_table(args.files, _where(args.where), args.x)
    sources = ", ".join(map(str, args.files))
    for column in (args.x, args.y):
        if column not in table.columns:
            raise RecordsError(f"{sources} has no column {column!r}; columns: {sorted(table.columns)}.")
    table = table.dropna(subset=[args.y]) if "metric" in table.columns else table
    protocol = require_one_protocol(table) if "protocol" in table.columns else None
    groups = table["run"] if "run" in table.columns else table["model"] if "model" in table.columns else None
    metadata = {"file": sources, "where": _where(args.where), "protocol": protocol, "notes": notes}
    if args.frontier:
        if groups is None:
            raise RecordsError("--frontier needs a run (or model) column naming each point's curve.")
        fit = fit_frontier(groups, table[args.x], table[args.y], x_name=args.x, y_name=args.y,
                           confidence=args.confidence, metadata=metadata)
        summary = fit.summary()
        if args.json:
            print(_dumps(summary))
            return 0
        c = summary["convergence"]
        _print_pairs([
            ("fit", f"{args.y} = floor + scale * ({args.x} / x_ref) ** -exponent on the frontier"),
            ("floor", f"{fit.law.floor:.4g}  [{summary['floor_ci'][0]:.4g}, {summary['floor_ci'][1]:.4g}]"),
            ("scale", f"{fit.law.scale:.4g}  [{summary['scale_ci'][0]:.4g}, {summary['scale_ci'][1]:.4g}]"),
            ("exponent", f"{fit.law.exponent:.4g}  [{summary['exponent_ci'][0]:.4g}, {summary['exponent_ci'][1]:.4g}]"),
            ("x_ref", fit.law.x_ref), ("points", f"{summary['n']} on the frontier of {summary['n_configs']} runs"),
            ("convergence", f"{'converged' if c['converged'] else 'NOT converged'}; {c['starts_at_best']} of "
                            f"{c['starts']} starts reach the best fit" + (f"; at bound: {', '.join(c['at_bound'])}"
                                                                          if c["at_bound"] else "")),
            ("leave-largest-out", describe_extrapolation(fit.leave_largest_out)),
        ])
        print("optimal runs along the frontier:")
        for r in summary["optimal_ranges"]:
            print(f"  {r['x_start']:.3g} .. {r['x_end']:.3g}  {r['run']}")
        _print_notes(notes)
        return 0
    fit = fit_loglog(table[args.x], table[args.y], groups=groups, x_name=args.x, y_name=args.y,
                     confidence=args.confidence, metadata=metadata)
    summary = fit.summary()
    if args.json:
        print(_dumps(summary))
        return 0
    lo, hi = fit.slope_ci
    _print_pairs([
        ("fit", f"log10 {args.y} = intercept + slope * log10 {args.x}"),
        ("slope", f"{fit.slope:.4f}  [{lo:.4f}, {hi:.4f}] ({fit.confidence:.0%} CI, bootstrap over configs)"),
        ("intercept", f"{fit.intercept:.4f}"),
        ("pearson_r", f"{fit.pearson_r:.4f} (p={fit.pearson_p:.2g}, log-log)"),
        ("spearman_r", f"{fit.spearman_r:.4f} (p={fit.spearman_p:.2g})"),
        ("n", f"{fit.n} points, {fit.n_configs} configs"),
        ("residual sd", f"{fit.residual_std:.4f} (log10)"),
        ("leave-largest-out", describe_extrapolation(fit.leave_largest_out)),
    ])
    _print_notes(notes)
    return 0


def _print_notes(notes: list[str]) -> None:
    """How the points were chosen (metric, protocol, configs and steps left out)."""
    for note in notes:
        print(f"note: {note}")


def _load_records(sources: list[epath.Path]):
    from analysis.paper import PAPER_RUNS_DIR
    from analysis.records import load

    return load(*(sources or [PAPER_RUNS_DIR]))


def cmd_plan(args: argparse.Namespace) -> int:
    from analysis.isoflop import isoflop_analysis
    from analysis.planning import plan_budget, plan_target, to_paper_units
    from analysis.schema import RecordsError
    from analysis.study import training_compute_fit

    if args.budget is not None:
        return args.budget_planner(args)
    # The budget is converted, and its unit's arguments checked, before the records are fitted.
    unit = args.unit or ("accelerator-hours" if args.chip else "gflops")
    if args.chip and unit != "accelerator-hours":
        raise RecordsError(f"--chip {args.chip} prices --compute in accelerator-hours, not --unit {unit}.")
    compute = None if args.compute is None else to_paper_units(
        args.compute, unit, utilization=args.utilization, chip_peak_tflops=args.chip_peak_tflops, chips=args.chips,
        chip=args.chip)
    records = _load_records(args.records)
    where = _where(args.where)
    fit = training_compute_fit(records, metric=args.metric, **where)
    isoflop = isoflop_analysis(records, metric=fit.metadata["metric"], **where)
    if args.target is not None:
        result = plan_target(fit, records.runs, args.target, isoflop)
        if args.json:
            print(_dumps(result.summary()))
            return 0
        lo, hi = result.compute_interval
        rows = [("target", f"{result.metric} {result.target:g}"),
                ("least compute", f"{result.compute:.4g} Gflops (paper units)  [{lo:.3g}, {hi:.3g}]"),
                ("unreachable", f"in {result.unreachable_fraction:.0%} of bootstrap fits (their floor is above "
                                "the target)")]
        rows += _plan_rows(result.plan) if result.plan else [("no plan", result.note)]
        _print_pairs(rows)
        _print_notes(fit.metadata["notes"])
        return 0
    plan = plan_budget(fit, records.runs, compute, isoflop)
    if args.json:
        print(_dumps(plan.summary()))
        return 0
    _print_pairs([("budget", f"{compute:.4g} Gflops (paper units: 3 x GMACs/image x images)"), *_plan_rows(plan)])
    _print_notes(fit.metadata["notes"])
    return 0


def _plan_rows(plan) -> list[tuple[str, str]]:
    rows = [("best config", f"{plan.model} ({plan.config}), {plan.gflops_per_image:g} Gflops/image")]
    if plan.optimal_gflops is not None:
        low, high = plan.optimal_gflops_interval
        rows.append(("optimal size", f"{plan.optimal_gflops:.3g} Gflops/image (interval {low:.3g} to {high:.3g})"))
    rows.append(("chosen by", f"{plan.basis}: {plan.reason}"))
    lo, hi = plan.confidence_interval
    plo, phi = plan.prediction_interval
    return rows + [
        ("training", f"{plan.steps:,} steps at batch {plan.batch_size}" if plan.steps is not None else
                     "steps unknown: the records give no batch size for this config"),
        ("predicted", f"{plan.metric} {plan.predicted:.4g}  (confidence [{lo:.4g}, {hi:.4g}], prediction "
                      f"[{plo:.4g}, {phi:.4g}])"),
        ("extrapolated", "yes: beyond the evaluated compute" if plan.extrapolated else
                         "yes: the config trains past its own last evaluation" if plan.beyond_config_evaluations
                         else "no"),
    ]


def cmd_isoflop(args: argparse.Namespace) -> int:
    from analysis.isoflop import PROFILES_NEED, isoflop_analysis

    budgets = {"n_budgets": args.budgets} if args.budgets else {}
    analysis = isoflop_analysis(_load_records(args.records), metric=args.metric, size=args.size,
                                confidence=args.confidence, **budgets, **_where(args.where))
    if args.json:
        print(_dumps(analysis.summary()))
        return 0
    size = f"optimal_{analysis.size}"
    rows = [{**row, "budget": f"{row['budget']:.3g}", size: _short(row[size]),
             "optimal_images": _short(row["optimal_images"])} for row in analysis.table().to_dict("records")]
    value = next(column for column in analysis.table().columns if column.startswith("optimal_")
                 and column not in (size, "optimal_images"))
    print_table(rows, [("budget", "budget C"), ("configs", "configs"), (size, f"N_opt ({analysis.size})"),
                       ("optimal_images", "D_opt (images)"), (value, analysis.metric), ("flag", "flag")])
    print()
    if analysis.size_law is None:
        print(f"no law of the optimum: {analysis.note}. {PROFILES_NEED}")
    for law, name in ((analysis.size_law, "N_opt"), (analysis.images_law, "D_opt")):
        if law is not None:
            lo, hi = law.exponent_ci
            print(f"{name} = {law.coefficient:.3g} C^{law.exponent:.3f}  ({law.confidence:.0%} interval of the "
                  f"exponent: {lo:.3f} to {hi:.3f}; {law.n_budgets} budgets, bootstrap over {law.n_configs} configs)")
    _print_notes(analysis.metadata["notes"])
    return 0


def cmd_law(args: argparse.Namespace) -> int:
    from analysis.isoflop import isoflop_analysis
    from analysis.law import PARAMETERS, law
    from analysis.study import MODEL_SIZES

    records = _load_records(args.sources)
    where = _where(args.where)
    fit = law(records, metric=args.metric, size=args.size, n_bootstrap=args.bootstrap,
              confidence=args.confidence, **where)
    isoflop = isoflop_analysis(records, metric=fit.metric, size=args.size, confidence=args.confidence, **where)
    isoflop_a = isoflop.size_law.summary() if isoflop.size_law else None
    if args.json:
        print(_dumps({**fit.summary(), "isoflop_a": isoflop_a and isoflop_a["exponent"],
                      "isoflop_a_interval": isoflop_a and isoflop_a["exponent_ci"]}))
        return 0
    level = f"{fit.confidence:.0%}"

    def row(name: str) -> tuple[str, str]:
        lo, hi = fit.intervals[name]
        return name, f"{fit.values[name]:.4g}  [{lo:.4g}, {hi:.4g}]"

    rows = [("law", f"{fit.metric} = E + A / N^alpha + B / D^beta  (N: {MODEL_SIZES[fit.size]}, D: images seen)"),
            *(row(name) for name in PARAMETERS),
            (*row("a")[:1], row("a")[1] + "  (N_opt ~ C^a)"), (*row("b")[:1], row("b")[1] + "  (D_opt ~ C^b)"),
            ("isoFLOP a", f"{isoflop_a['exponent']:.3g}  [{isoflop_a['exponent_ci'][0]:.3g}, "
                          f"{isoflop_a['exponent_ci'][1]:.3g}]  (approach 2)" if isoflop_a
                          else f"none: {isoflop.note}"),
            ("points", f"{fit.n_points} (run, step) points of {fit.n_runs} runs; {level} intervals from "
                       f"{fit.n_bootstrap} bootstrap fits over runs"),
            ("fit", "; ".join(fit.flags()) or "converged, no parameter at a bound"),
            ("held out", f"median error {fit.held_out_error:.1%} on {', '.join(fit.held_out_runs)}, fitted "
                         "without them" if fit.held_out_error is not None else "too few runs to leave any out")]
    _print_pairs(rows)
    _print_notes(fit.metadata["notes"])
    return 0


def _short(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def cmd_loss_proxy(args: argparse.Namespace) -> int:
    from analysis.proxy import loss_proxy

    analysis = loss_proxy(_load_records(args.records), metric=args.metric, loss_metric=args.loss_metric,
                          confidence=args.confidence, **_where(args.where))
    predictions = analysis.predict(args.loss) if args.loss else None
    if args.json:
        summary = analysis.summary()
        if predictions is not None:
            summary["predictions"] = predictions.to_dict("records")
        print(_dumps(summary))
        return 0
    print(f"{analysis.metric} from {analysis.loss_metric}: {len(analysis.pairs)} (config, step) pairs of "
          f"{analysis.pairs['run'].nunique()} configs; held-out error: each config predicted by a fit without it")
    print_table(analysis.table().to_dict("records"),
                [("form", "form"), ("formula", "formula"), ("in_sample_rmse_log10", "in-sample rmse (log10)"),
                 ("held_out_rmse_log10", "held-out rmse (log10)"), ("typical_error", "typical error"),
                 ("interval_factor", f"{analysis.best.confidence:.0%} within x/÷")])
    print(f"Spearman rho across configs at step {analysis.rank_step}: {analysis.rank_correlation:.3f}")
    if predictions is not None:
        print()
        for row in predictions.itertuples():
            print(f"{analysis.loss_metric} {row.loss:g} -> {analysis.metric} {row.predicted:.4g} "
                  f"[{row.low:.4g}, {row.high:.4g}]" + ("  (outside the fitted losses)" if row.extrapolated else ""))
    _print_notes(analysis.metadata["notes"])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import pandas as pd

    from analysis.planning import compare_architecture, compare_runs
    from analysis.records import load
    from analysis.study import model_compute_fit, training_compute_fit

    records = _load_records(args.records)
    where = _where(args.where)
    if args.points.suffix == ".csv" and not {"metric", "value"} <= set(pd.read_csv(args.points, nrows=0).columns):
        frontier = training_compute_fit(records, metric=args.metric, **where)
        gflops_fit = model_compute_fit(records, metric=frontier.metadata["metric"], **where)
        table = compare_architecture(pd.read_csv(args.points), frontier, gflops_fit, batch_size=args.batch_size)
        names = table["name"] if "name" in table.columns else pd.Series([f"point {i}" for i in range(len(table))])
        y = frontier.y_name if frontier.y_name in table.columns else "value"
        overlay = pd.DataFrame({"run": names, "model": names, "gflops": table["gflops"], "value": table[y],
                                "step": table["steps"] if "steps" in table.columns else math.nan,
                                "train_gflops_cumulative": table["train_gflops_cumulative"],
                                "family": args.points.stem})
    else:  # records of runs: their points of DiT's metric, protocol and recipe, or an error saying what differs
        comparison = compare_runs(load(args.points), records, metric=args.metric, **where)
        table, frontier, gflops_fit = comparison.table, comparison.frontier_fit, comparison.gflops_fit
        overlay = comparison.points
    if args.figures:
        from analysis.figures import comparison_figures

        written, skipped = comparison_figures(overlay, records, args.figures, metric=frontier.metadata["metric"],
                                              step=gflops_fit.metadata["step"], **where)
        progress = sys.stderr if args.json else sys.stdout  # --json keeps stdout for the JSON
        for path in written:
            print(f"wrote {path}", file=progress)
        for name, reason in skipped.items():
            print(f"skipped {name}: {reason}", file=progress)
    if args.json:
        print(_dumps(table.to_dict("records")))
        return 0
    y = frontier.y_name if frontier.y_name in table.columns else "value"
    table["name"] = table["name"] if "name" in table.columns else [f"point {i}" for i in range(len(table))]
    interval = lambda lo, hi: f"[{lo:.3g}, {hi:.3g}]"  # noqa: E731
    rows = [{**row, "dit": f"{row['dit_compute']:.3g} " + interval(row["dit_compute_lo"], row["dit_compute_hi"])
             if math.isfinite(row["dit_compute"]) else "unreachable",
             "multiplier": f"{row['compute_multiplier']:.2f} " + interval(row["compute_multiplier_lo"],
                                                                          row["compute_multiplier_hi"]),
             "same_gflops": f"{row['dit_at_same_gflops']:.3g} " + interval(row["dit_at_same_gflops_lo"],
                                                                           row["dit_at_same_gflops_hi"])
             if math.isfinite(row["dit_at_same_gflops"]) else "- (other steps)",
             "compute": f"{row['train_gflops_cumulative']:.3g}"}
            for row in table.to_dict("records")]
    runs = frontier.frontier.curves["run"].nunique()
    print(f"Against the {frontier.metadata['metric']} frontier of {runs} DiT runs ({frontier.confidence:.0%} "
          "intervals). multiplier = DiT's training compute for the same metric / the point's (> 1: more "
          f"efficient than DiT); the last column is DiT at the same Gflops per image (step "
          f"{gflops_fit.metadata['step']}).")
    print_table(rows, [("name", "point"), ("gflops", "Gflops/img"), (y, y), ("compute", "train Gflops"),
                       ("dit", "DiT needs"), ("multiplier", "multiplier"), ("dit_at_same_compute", "DiT same compute"),
                       ("same_gflops", "DiT same Gflops")])
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from analysis.report import render_all

    source = epath.Path(args.sources[0])
    default = source / "figures" if source.is_dir() else source.parent / f"{source.stem}_figures"
    if len(args.sources) > 1 and not args.out:
        raise ValueError("figures of several sources need --out DIR (where to write them).")
    out = epath.Path(args.out) if args.out else default
    written, skipped = render_all(_load_records(args.sources), out, metric=args.metric)
    for path in written:
        print(f"wrote {path}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    return 0


def add_commands(commands, budget_planner=None) -> None:
    """The analysis commands on `commands`; `budget_planner(args)` carries out `plan --budget` (it needs the
    models' shapes and memory, which analysis/ does not import)."""
    fit = commands.add_parser(
        "fit", help="Log-log fit (or frontier power law) of two columns of a records or CSV file.",
        description="Fit log10 Y = intercept + slope log10 X over the rows of FILE (a CSV, records JSONL or run "
                    "directory), with Pearson/Spearman correlation and a bootstrap-over-configs CI.")
    fit.add_argument("files", type=epath.Path, nargs="+", metavar="FILE",
                     help="records (runs directory, run, .jsonl, .csv; several are combined) or plain CSV tables")
    fit.add_argument("--x", required=True, help="column, e.g. gflops or train_gflops_cumulative")
    fit.add_argument("--y", required=True, help="column, e.g. fid (records: the metric family, or value)")
    fit.add_argument("--where", type=where_condition, action="append", metavar="COLUMN=VALUE",
                     help="keep rows with COLUMN == VALUE")
    fit.add_argument("--frontier", action="store_true",
                     help="fit Y = floor + scale X^-exponent to the frontier of each run's curve instead")
    fit.add_argument("--confidence", type=confidence_level, default=0.95, help="of the intervals, in (0, 1)")
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(handler=cmd_fit)

    def add_records_arguments(parser, flag="--records"):
        parser.add_argument(flag, dest="records", type=epath.Path, action="append",
                            help="DiT records (runs directory, run, .jsonl or .csv); default: runs/paper")
        parser.add_argument("--metric", help="metric to use (default: the sample metric with the most points)")
        parser.add_argument("--where", type=where_condition, action="append", metavar="COLUMN=VALUE",
                            help="filter the DiT records")
        parser.add_argument("--json", action="store_true")

    plan = commands.add_parser(
        "plan", help="What a training budget buys (config, steps, predicted metric), or the least compute for a "
                     "target.", description="Plan from the frontier fit of the DiT records (default: runs/paper).")
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--compute", type=positive_float, help="training compute in --unit")
    target.add_argument("--target", type=positive_float, help="target metric value (e.g. FID 10)")
    target.add_argument("--budget", type=positive_float,
                        help="plan with the parametric law (sizes nobody trained included): chip-hours of --chip, "
                             "or paper-unit Gflops without --chip; the evaluation's cost comes off it")
    plan.add_argument("--unit", choices=("gflops", "flops", "accelerator-hours"),
                      help="of --compute: gflops: paper units (3 x GMACs x images; the default); flops: true "
                           "FLOPs; accelerator-hours (the default with --chip)")
    plan.add_argument("--chip", choices=tuple(CHIPS), help="the accelerator (its published peak and memory)")
    plan.add_argument("--utilization", type=fraction,
                      help=f"fraction of the chip's peak reached, in (0, 1] (default with --chip: "
                           f"{DEFAULT_UTILIZATION})")
    plan.add_argument("--chip-peak-tflops", type=positive_float,
                      help="accelerator-hours of a chip not in --chip's table: dense peak per chip (TFLOP/s)")
    plan.add_argument("--chips", type=positive_int, default=1,
                      help="chips: of --compute's accelerator-hours (hours on this many chips); of --budget, the "
                           "chips one run trains on (its memory per chip and wall time)")
    plan.add_argument("--batch-size", type=positive_int, help="--budget: the batch (default: the records')")
    plan.add_argument("--evaluations", type=number(int, at_least=0), default=1,
                      help="--budget: evaluations under the records' protocol paid from the budget (default 1)")
    plan.add_argument("--bootstrap", type=number(int, at_least=0), default=200,
                      help="--budget: bootstrap fits of the law over runs, for the intervals")
    add_records_arguments(plan)
    plan.set_defaults(handler=cmd_plan, budget_planner=budget_planner)

    isoflop = commands.add_parser(
        "isoflop", help="Compute-optimal model size from isoFLOP profiles of the training curves (N_opt(C), "
                        "D_opt(C) with bootstrap intervals).",
        description="For budgets of training compute, every config's metric at that compute (interpolated along "
                    "its own curve), a parabola in log size and its minimum; then N_opt and D_opt as power laws of "
                    "the compute. Budgets whose minimum lies at an edge of the grid are flagged, not fitted.")
    isoflop.add_argument("--size", default="gflops", choices=("gflops", "params"), help="the size to profile over")
    isoflop.add_argument("--budgets", type=positive_int,
                         help="budgets, log-spaced over the compute that at least 3 curves span (default: "
                              "analysis.isoflop.DEFAULT_BUDGETS)")
    isoflop.add_argument("--confidence", type=confidence_level, default=0.95, help="of the intervals, in (0, 1)")
    add_records_arguments(isoflop)
    isoflop.set_defaults(handler=cmd_isoflop)

    law_parser = commands.add_parser(
        "law", help="The parametric law L(N, D) = E + A / N^alpha + B / D^beta over every (run, step) point "
                    "(Chinchilla's approach 3), with bootstrap intervals and the compute-optimal exponents.",
        description="Fits the law in log space (Huber loss, L-BFGS-B from a grid of starts) to the points of one "
                    "metric and protocol, N the model size (forward Gflops per image, or parameters), D the images "
                    "seen; intervals from a bootstrap over runs; the isoFLOP estimate of a beside it; the error of "
                    "the law fitted without the largest runs, on them.")
    law_parser.add_argument("sources", type=epath.Path, nargs="*", metavar="SOURCE",
                            help="records: runs directories, runs, .jsonl or .csv files (default: runs/paper)")
    law_parser.add_argument("--metric", help="metric to fit (default: the sample metric with the most points)")
    law_parser.add_argument("--size", default="gflops", choices=("gflops", "params"), help="what N is")
    law_parser.add_argument("--where", type=where_condition, action="append", metavar="COLUMN=VALUE",
                            help="keep the records with COLUMN == VALUE")
    law_parser.add_argument("--bootstrap", type=number(int, at_least=0), default=200,
                            help="bootstrap fits over runs for the intervals")
    law_parser.add_argument("--confidence", type=confidence_level, default=0.95, help="of the intervals, in (0, 1)")
    law_parser.add_argument("--json", action="store_true",
                            help="one object: E, A, B, alpha, beta, a, b and their intervals, and more")
    law_parser.set_defaults(handler=cmd_law)

    proxy = commands.add_parser(
        "loss-proxy", help="The held-out loss as a predictor of a sample metric: fitted forms, their "
                           "leave-one-config-out error, predictions with intervals.",
        description="Pairs each run's held-out loss (val-loss) with its sample metric at the same step and fits "
                    "metric vs loss in several forms, each judged by predicting every config from a fit without "
                    "it.")
    proxy.add_argument("--loss-metric", help="the held-out loss metric (default: the val-loss with most points)")
    proxy.add_argument("--loss", type=positive_float, action="append",
                       help="predict the metric at this loss (repeatable)")
    proxy.add_argument("--confidence", type=confidence_level, default=0.95, help="of the intervals, in (0, 1)")
    add_records_arguments(proxy)
    proxy.set_defaults(handler=cmd_loss_proxy)

    compare = commands.add_parser(
        "compare", help="Place a new architecture's points against the DiT curves (compute multiplier).",
        description="POINTS: records of the new architecture's runs (a runs directory from `grid`: same metric, "
                    "protocol and recipe as the DiT records, or an error says what differs); or a CSV with gflops "
                    "(forward GMACs per image; or gmacs/macs/flops), the metric (e.g. fid), steps with batch_size "
                    "(or --batch-size) or train_gflops_cumulative, and optionally name.")
    compare.add_argument("points", type=epath.Path, metavar="POINTS")
    compare.add_argument("--batch-size", type=positive_int,
                         help="batch size of the points, when POINTS has no batch_size")
    compare.add_argument("--figures", type=epath.Path, metavar="DIR",
                         help="records POINTS: draw them over DiT's Fig. 8 and Fig. 9 into DIR")
    add_records_arguments(compare, flag="--against")
    compare.set_defaults(handler=cmd_compare)

    figures = commands.add_parser("figures", help="Render the paper's figures, Table 4 and a report from records.")
    figures.add_argument("sources", type=epath.Path, nargs="+", metavar="RECORDS",
                         help="a runs directory, a run, or a records .jsonl/.csv file; several are combined")
    figures.add_argument("--out", help="output directory (default with one source: RECORDS/figures, or "
                                       "RECORDS_figures beside a file; needed with several)")
    figures.add_argument("--metric", help="metric to plot (default: the sample metric with the most points)")
    figures.set_defaults(handler=cmd_figures)
