"""Records as tidy tables: the loader for every source of scaling data.

Three tables, one row each:
- runs: one training run (a config): run, model, size, patch, block, resolution, gflops, params_m, batch_size,
  source, status.
- steps: one logged training step of a run (`schema.StepRecord`): run, step, images_seen, loss, mse, vb,
  train_gflops_cumulative, wall_time, ...
- evaluations: one sample-quality measurement of a run at a step (`schema.EvaluationRecord`, or a CSV row): the
  run's columns, step, train_gflops_cumulative, metric (e.g. "FID-50K"), value, the protocol columns (sampler,
  sampling_steps, guidance_scale, guidance_channels, num_samples, reference, feature_network, decoder),
  sampling_gflops_per_image, protocol (one string naming all of them) and a column named after the metric's
  family holding the value again ("fid" for FID-*, "fd_fashioncnn" for FD-FashionCNN-*), so `--y fid` works.

Sources: a directory of runs (each as `analysis.schema` defines it), one run directory, a JSONL file of evaluation
records, or a CSV in the evaluation schema (a user's own runs: run or model, a compute column, metric, value,
step, and batch_size or train_gflops_cumulative; optionally size and patch for DiT configs, block, resolution,
params_m and the protocol columns). Compute given as `gmacs` (the same as gflops), `macs` (raw
multiply-accumulates) or `flops` (true FLOPs, 2 per multiply-add) is converted to gflops. `load()` accepts any of
these, or a list of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from etils import epath

from analysis import schema
from analysis.schema import RecordsError, metric_column, training_compute

RUN_COLUMNS = ["run", "model", "size", "patch", "block", "resolution", "gflops", "params_m", "batch_size", "source"]
PROTOCOL_COLUMNS = ["metric", "sampler", "sampling_steps", "guidance_scale", "guidance_channels", "num_samples",
                    "seed", "reference", "feature_network", "decoder"]
EVALUATION_COLUMNS = [*RUN_COLUMNS, "step", "train_gflops_cumulative", "metric", "value", *PROTOCOL_COLUMNS[1:],
                      "sampling_gflops_per_image", "protocol"]
STEP_COLUMNS = ["run", "step", "images_seen", "loss", "train_gflops_cumulative"]
TRAINING_LOSS_METRIC = "train-loss"  # a table row of this metric is a logged training step, not an evaluation
# Columns of a user's table that must hold numbers where they are given.
NUMERIC_COLUMNS = ["value", "step", "batch_size", "train_gflops_cumulative", "params_m", "resolution",
                   "sampling_steps", "guidance_scale", "num_samples", "gflops", "gmacs", "macs", "flops"]

# Compute columns a CSV may use, with the factor that turns them into paper Gflops (GMACs per image).
COMPUTE_UNITS = {"gflops": 1.0, "gmacs": 1.0, "macs": 1e-9, "flops": 1e-9 / schema.FLOPS_PER_MAC}
_GFLOPS_PLAUSIBLE_MAX = 1e7  # no image model needs 10 PMACs per image: larger "gflops" are raw counts

@dataclass(frozen=True)
class Records:
    """Tidy tables of one or more sources (see the module docstring for the columns)."""

    runs: pd.DataFrame
    steps: pd.DataFrame
    evaluations: pd.DataFrame

    def where(self, **conditions) -> Records:
        """Rows whose columns equal the given values, in every table that has those columns; the steps and
        evaluations kept are those of the runs kept (a condition on a run column, such as block, applies to its
        steps too). A column no table has is an error."""
        tables = (self.runs, self.steps, self.evaluations)
        unknown = [c for c in conditions if not any(c in t.columns for t in tables)]
        if unknown:
            raise RecordsError(f"no column {unknown} in the records; columns: "
                               f"{sorted(set().union(*(t.columns for t in tables)))}.")
        runs = _filter(self.runs, conditions)

        def of_kept_runs(table: pd.DataFrame) -> pd.DataFrame:
            table = _filter(table, conditions)
            return table[table["run"].isin(runs["run"])].reset_index(drop=True)

        return Records(runs, of_kept_runs(self.steps), of_kept_runs(self.evaluations))


def load(*sources: str | epath.Path | pd.DataFrame) -> Records:
    """Load and validate records from runs directories, run directories, JSONL or CSV files, or DataFrames in
    the evaluation schema; several sources are concatenated (run names must not collide)."""
    if not sources:
        raise RecordsError("load() needs at least one source (a runs directory, a run directory, .jsonl or .csv).")
    records = _concat([_load_one(source) for source in sources])
    duplicated = records.runs["run"][records.runs["run"].duplicated()].unique().tolist()
    if duplicated:
        raise RecordsError(f"run names occur in more than one source: {duplicated}; rename the runs or load the "
                           "sources separately.")
    return records


def _concat(parts: list[Records]) -> Records:
    """One Records of several; a table empty in every part keeps the schema's columns."""
    def table(name: str, columns: list[str]) -> pd.DataFrame:
        filled = [getattr(p, name) for p in parts if len(getattr(p, name))]
        return pd.concat(filled, ignore_index=True) if filled else _empty(columns)

    return Records(table("runs", RUN_COLUMNS), table("steps", STEP_COLUMNS), table("evaluations", EVALUATION_COLUMNS))


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=float if c not in ("run", "size", "metric", "protocol") else object)
                         for c in columns})


def _equals(column: pd.Series, value) -> np.ndarray:
    """column == value, numerically for a numeric column (256 matches 256.0) and as text otherwise ("1" and 1)."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RecordsError(f"column {column.name!r} holds numbers; {value!r} is not one.") from None
        return column.to_numpy(dtype=float) == number
    return column.astype(str).to_numpy() == str(value)


def _filter(table: pd.DataFrame, conditions: dict) -> pd.DataFrame:
    mask = np.ones(len(table), dtype=bool)
    for column, value in conditions.items():
        if column in table.columns:
            mask &= _equals(table[column], value)
    return table[mask].reset_index(drop=True)


def filter_rows(table: pd.DataFrame, conditions: dict, what: str = "the records") -> pd.DataFrame:
    """The rows of `table` whose columns equal the given values; an unknown column, or a condition no row meets,
    is an error that lists what there is."""
    for column, value in conditions.items():
        if column not in table.columns:
            raise RecordsError(f"{what} have no column {column!r}; columns: {sorted(table.columns)}.")
        kept = table[_equals(table[column], value)]
        if kept.empty:
            values = sorted({str(v) for v in table[column].dropna().unique()})
            raise RecordsError(f"no rows of {what} have {column} == {value!r}"
                               + (f" (after {', '.join(f'{k}={v}' for k, v in conditions.items() if k != column)})"
                                  if len(conditions) > 1 else "")
                               + f"; its values: {', '.join(values[:12])}{' ...' if len(values) > 12 else ''}.")
        table = kept
    return table.reset_index(drop=True)


def _load_one(source) -> Records:
    if isinstance(source, pd.DataFrame):
        return from_evaluation_table(source, origin="DataFrame")
    path = epath.Path(source)
    if not path.exists():
        raise RecordsError(f"records source {path} does not exist; give a runs directory, a run directory "
                           "(with manifest.json), a .jsonl or a .csv file.")
    if path.is_dir():
        if (path / schema.MANIFEST_FILE).is_file():
            return _load_run_dir(path)
        run_dirs = sorted(p.parent for p in path.glob(f"*/{schema.MANIFEST_FILE}"))
        tables = sorted(path.glob("*.csv"))
        if not run_dirs and not tables:
            raise RecordsError(f"{path} holds no runs (no */manifest.json) and no .csv records; point at a "
                               "directory that `dit-scaling train` or `grid` wrote, or at a records file.")
        parts = [_load_run_dir(d) for d in run_dirs] + [_load_csv(t) for t in tables if _is_evaluation_csv(t)]
        if not parts:
            raise RecordsError(f"{path}: none of its CSV files is in the evaluation schema (columns run or model, "
                               "gflops, metric, value).")
        return _concat(parts)
    if path.suffix == ".csv":
        return _load_csv(path)
    if path.suffix in (".jsonl", ".json"):
        return _load_jsonl(path)
    raise RecordsError(f"{path}: unknown records format {path.suffix!r}; use .jsonl, .csv or a run directory.")


def _is_evaluation_csv(path: epath.Path) -> bool:
    columns = set(pd.read_csv(path, nrows=0).columns)
    return {"metric", "value"} <= columns and bool(columns & {"run", "model"})


def _load_run_dir(workdir: epath.Path) -> Records:
    """A run as `analysis.schema` defines it: manifest.json, records.jsonl, evaluations.jsonl."""
    manifest = schema.read_manifest(workdir)
    run = {
        "run": workdir.name, "model": manifest.model_name, "size": manifest.size, "patch": manifest.patch,
        "block": manifest.block, "resolution": manifest.resolution, "gflops": manifest.gflops_per_image,
        "params_m": manifest.params / 1e6, "batch_size": manifest.global_batch, "source": str(workdir),
        "status": manifest.status,
    }
    steps = pd.DataFrame([record.to_json() for record in schema.read_steps(workdir)])
    if steps.empty:
        steps = _empty(STEP_COLUMNS)
    else:
        steps.insert(0, "run", run["run"])
    evaluations = [{**run, **_flat_evaluation(record)} for record in schema.read_evaluations(workdir)]
    runs = pd.DataFrame([run])
    table = pd.DataFrame(evaluations) if evaluations else None
    return Records(_validate_runs(runs, workdir), _validate_steps(steps, run, workdir),
                   _validate_evaluations(table, workdir) if table is not None else _empty(EVALUATION_COLUMNS))


def _flat_evaluation(record: schema.EvaluationRecord) -> dict:
    """One evaluation as a table row: its fields, its details and its protocol's fields side by side."""
    row = record.to_json()
    protocol = row.pop("protocol")
    return {**row, **{k: protocol[k] for k in PROTOCOL_COLUMNS[1:]}}


def _load_jsonl(path: epath.Path) -> Records:
    rows = schema.read_jsonl(path)
    if not rows:
        raise RecordsError(f"{path} holds no records.")
    if not all(isinstance(row, dict) and "metric" in row for row in rows):
        raise RecordsError(f"{path} holds step records without their run's manifest; load the run directory "
                           f"({path.parent}) instead, or give evaluation records (with metric and value).")
    if all("protocol" in row for row in rows):  # evaluation records as a run writes them: checked by the schema
        rows = [_flat_evaluation(schema.EvaluationRecord.from_json(row, f"{path}:{i + 1}"))
                for i, row in enumerate(rows)]
    return from_evaluation_table(pd.DataFrame(rows), origin=str(path))


def _load_csv(path: epath.Path) -> Records:
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise RecordsError(f"{path} is not a readable CSV file ({e}).") from e
    return from_evaluation_table(table, origin=str(path))


def from_evaluation_table(table: pd.DataFrame, origin: str = "table") -> Records:
    """Records from a flat table (one row per measurement): the CSV schema users write for their own runs. Needs
    run or model, a compute column (gflops, gmacs, macs or flops), metric and value; step and batch_size are needed
    for training compute unless train_gflops_cumulative is given. Rows of metric TRAINING_LOSS_METRIC are logged
    training steps (their value the training loss: Fig. 13), the rest evaluations. A bad cell is named by its line
    in a CSV (its row in other tables) and its column."""
    table = table.copy()
    if "run" not in table.columns and "model" not in table.columns:
        raise RecordsError(f"{origin}: missing column 'run' (or 'model'): every row must name its run.")
    if "run" not in table.columns:
        table["run"] = table["model"]
    if "model" not in table.columns:
        table["model"] = table["run"]
    if "source" not in table.columns:
        table["source"] = origin
    for column in NUMERIC_COLUMNS:
        if column in table.columns:
            numbers = pd.to_numeric(table[column], errors="coerce")
            _refuse(table, numbers.isna() & table[column].notna(), origin, column, "is not a number")
            table[column] = numbers
    table = convert_compute(table, origin)
    conflicting = table.groupby("run")["gflops"].nunique()
    if (conflicting > 1).any():
        raise RecordsError(f"{origin}: runs {conflicting[conflicting > 1].index.tolist()} have more than one gflops "
                           "value; one run is one model, so split them into runs with distinct names.")
    runs = table.drop_duplicates("run")[[c for c in RUN_COLUMNS if c in table.columns]].reset_index(drop=True)
    is_loss = table["metric"] == TRAINING_LOSS_METRIC if "metric" in table.columns else np.zeros(len(table), bool)
    steps = _loss_rows(table[is_loss], origin)
    evaluations = table[~is_loss]
    evaluations = _validate_evaluations(evaluations, origin) if len(evaluations) or not len(steps) \
        else _empty(EVALUATION_COLUMNS)
    return Records(_validate_runs(runs, origin), steps, evaluations)


def _row_names(index, origin) -> str:
    """Rows as a user finds them: lines of a CSV file (its header is line 1), else positions in the table."""
    names = [f"line {i + 2}" if str(origin).endswith(".csv") else f"row {i}" for i in index[:3]]
    return ", ".join(names) + (f" and {len(index) - 3} more" if len(index) > 3 else "")


def _refuse(table: pd.DataFrame, bad, origin, column: str, problem: str, fix: str = "") -> None:
    """A RecordsError naming the rows (lines) where `bad` holds and the column, when any does."""
    index = table.index[np.asarray(bad, dtype=bool)]
    if len(index):
        raise RecordsError(f"{origin}: {_row_names(index, origin)}, column {column!r}: {problem}"
                           + (f"; {fix}" if fix else "") + ".")


def _loss_rows(rows: pd.DataFrame, origin) -> pd.DataFrame:
    """Training-loss rows of a table as step records: run, step, loss, images_seen, train_gflops_cumulative."""
    if rows.empty:
        return _empty(STEP_COLUMNS)
    _refuse(rows, ~np.isfinite(rows["value"].to_numpy(dtype=float)), origin, "value",
            "a training loss that is missing, NaN or infinite", "remove the row or give the logged loss")
    if "step" not in rows.columns:
        raise RecordsError(f"{origin}: training-loss rows need a 'step' column.")
    _refuse(rows, rows["step"].isna(), origin, "step", "a training-loss row without its step")
    batch = rows["batch_size"] if "batch_size" in rows.columns else np.nan
    steps = pd.DataFrame({"run": rows["run"], "step": rows["step"].astype(int), "loss": rows["value"],
                          "images_seen": rows["step"] * batch,
                          "train_gflops_cumulative": training_compute(rows["gflops"], batch, rows["step"])})
    if "train_gflops_cumulative" in rows.columns:
        steps["train_gflops_cumulative"] = rows["train_gflops_cumulative"].fillna(steps["train_gflops_cumulative"])
    return steps.sort_values(["run", "step"]).reset_index(drop=True)


def convert_compute(table: pd.DataFrame, origin: str) -> pd.DataFrame:
    """The table with its compute column (gflops, gmacs, macs or flops) as `gflops`, in GMACs per image."""
    given = [c for c in COMPUTE_UNITS if c in table.columns]
    if not given:
        raise RecordsError(f"{origin}: missing column 'gflops' (forward GMACs per image, the paper's Gflops); "
                           "'gmacs', 'macs' or 'flops' (true FLOPs, 2 per multiply-add) are accepted too.")
    if len(given) > 1:
        raise RecordsError(f"{origin}: compute given twice ({given}); keep one column, e.g. 'gflops'.")
    column = given[0]
    table["gflops"] = pd.to_numeric(table.pop(column), errors="coerce") * COMPUTE_UNITS[column]
    _require_positive_gflops(table, origin)
    return table


def _require_positive_gflops(table: pd.DataFrame, origin) -> None:
    bad = ~(pd.to_numeric(table["gflops"], errors="coerce") > 0)
    runs = table.loc[bad, "run"].tolist() if "run" in table.columns else []
    _refuse(table, bad, origin, "gflops", "non-positive or missing" + (f" (runs {runs[:5]})" if runs else ""),
            "every point needs its forward GMACs per image (`dit-scaling flops` counts DiTs, `--torch` PyTorch "
            "models)")


def _validate_runs(runs: pd.DataFrame, origin) -> pd.DataFrame:
    for column in RUN_COLUMNS:
        if column not in runs.columns:
            runs[column] = np.nan
    _require_positive_gflops(runs, origin)
    gflops = pd.to_numeric(runs["gflops"], errors="coerce")
    huge = runs.loc[gflops > _GFLOPS_PLAUSIBLE_MAX, "run"].tolist()
    if huge:
        raise RecordsError(f"{origin}: gflops above {_GFLOPS_PLAUSIBLE_MAX:.0e} for runs {huge}: these look like "
                           "raw counts; name the column 'macs' (multiply-adds) or 'flops' (true FLOPs) instead.")
    return runs[RUN_COLUMNS + [c for c in runs.columns if c not in RUN_COLUMNS]].reset_index(drop=True)


def _validate_steps(steps: pd.DataFrame, run: dict, origin) -> pd.DataFrame:
    if steps.empty:
        return steps
    for column in ("step", "loss"):
        if column not in steps.columns:
            raise RecordsError(f"{origin}: step records lack {column!r}.")
    if "train_gflops_cumulative" not in steps.columns:
        steps["train_gflops_cumulative"] = training_compute(run["gflops"], run["batch_size"], steps["step"])
    return steps.reset_index(drop=True)


def _validate_evaluations(table: pd.DataFrame, origin) -> pd.DataFrame:
    for column in ("metric", "value"):
        if column not in table.columns:
            raise RecordsError(f"{origin}: missing column {column!r}; evaluation rows need metric (e.g. 'FID-50K') "
                               "and value.")
    for column in EVALUATION_COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    _refuse(table, ~table["metric"].map(lambda m: isinstance(m, str) and bool(m)), origin, "metric",
            "no metric name", "name each measurement, e.g. 'FID-50K'")
    table["value"] = pd.to_numeric(table["value"], errors="coerce")
    _refuse(table, ~np.isfinite(table["value"].to_numpy(dtype=float)), origin, "value",
            "an evaluation value that is missing, NaN or infinite",
            "a diverged or failed evaluation must be removed (or re-run), not fitted")
    _refuse(table, table["step"].isna(), origin, "step", "an evaluation without its training step",
            "give the step each point was measured at")
    _refuse(table, pd.to_numeric(table["step"], errors="coerce") < 0, origin, "step", "a negative step")
    derived = training_compute(table["gflops"], table["batch_size"], table["step"])
    table["train_gflops_cumulative"] = table["train_gflops_cumulative"].fillna(derived)
    _refuse(table, table["train_gflops_cumulative"].to_numpy(dtype=float) < 0, origin, "train_gflops_cumulative",
            "negative", "training compute is 3 x gflops x batch x steps in paper units")
    derived = [schema.sampling_compute(g, s, scale) for g, s, scale in
               zip(table["gflops"], table["sampling_steps"], table["guidance_scale"], strict=True)]
    table["sampling_gflops_per_image"] = table["sampling_gflops_per_image"].fillna(pd.Series(derived,
                                                                                             index=table.index))
    table["protocol"] = [protocol_string(row) for row in table[PROTOCOL_COLUMNS].to_dict("records")]
    for metric in table["metric"].unique():
        table.loc[table["metric"] == metric, metric_column(metric)] = table.loc[table["metric"] == metric, "value"]
    ordered = EVALUATION_COLUMNS + [c for c in table.columns if c not in EVALUATION_COLUMNS]
    return table[ordered].reset_index(drop=True)


def protocol_string(fields: dict, ignore: tuple[str, ...] = ()) -> str:
    """One readable string naming a protocol; two points compare only when their strings are equal."""
    def given(key):
        value = fields.get(key)
        return value is not None and not (isinstance(value, float) and math.isnan(value))

    parts = []
    for key in PROTOCOL_COLUMNS:
        if key in ignore or not given(key):
            continue
        value = fields[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        parts.append(str(value) if key == "metric" else f"{key}={value}")
    return " ".join(parts)


def require_one_protocol(evaluations: pd.DataFrame, vary: tuple[str, ...] = ()) -> str:
    """The protocol shared by every row (ignoring the columns in `vary`), or a RecordsError naming the mix."""
    if evaluations.empty:
        raise RecordsError("no evaluation points to fit; check the filters (e.g. --where) and the metric.")
    protocols = {protocol_string(row, ignore=vary) for row in evaluations[PROTOCOL_COLUMNS].to_dict("records")}
    if len(protocols) > 1:
        listing = "\n  ".join(sorted(protocols))
        raise RecordsError(f"the points mix {len(protocols)} evaluation protocols, which do not compare:\n  "
                           f"{listing}\nselect one, e.g. with --where metric=FID-50K or where(sampling_steps=250).")
    return protocols.pop()
