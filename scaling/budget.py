"""A training budget planned with the parametric law: which DiT, trained how long, on which chips, to what metric.

`plan --budget B --chip H100` turns B chip-hours into compute (analysis.chips' peak at a stated utilisation), fits the
law L(N, D) = E + A / N^alpha + B / D^beta to the records (analysis.law), takes the evaluation's cost off the budget
and splits the rest into a compute-optimal size and images (analysis.planning.plan_with_law). The sizes it offers:
the trained config nearest to the optimum, and where none is within SIZE_TOLERANCE of it, a DiT of the records'
family at the optimum, named by depth and width (the family's shapes interpolated in log Gflops, so a size between
L and XL grows as they do). Each comes with its steps at the records' batch and whether that batch fits the chip's
memory (the dry run's estimate, scaling.cost.training_memory).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from etils import epath

from analysis import schema
from analysis.law import law_of_points, law_points
from analysis.planning import LawPlan, ModelSize, plan_with_law, to_paper_units
from analysis.records import Records
from analysis.schema import RecordsError
from models.dit import LATENT_DOWNSAMPLE, DiTConfig, dit_config
from models.flops import dit_macs_analytic
from scaling.configs.common import base_config
from scaling.cost import abstract_state, training_memory

SIZE_TOLERANCE = 0.1  # a trained config within 10% of the optimal Gflops is the plan; else a size at the optimum too


def trained_shapes(records: Records) -> dict[str, DiTConfig]:
    """The DiT architecture of each run the records can name one for: its manifest's model where the run is a
    directory, else the paper's config of its name at its resolution (latents 8x smaller). Runs of other
    architectures, and table rows that give neither, are left out."""
    shapes = {}
    for row in records.runs.itertuples():
        source = epath.Path(row.source) if isinstance(row.source, str) else None
        if source is not None and (source / schema.MANIFEST_FILE).is_file():
            manifest = schema.read_manifest(source)
            if manifest.size is not None:
                fields = {f.name for f in dataclasses.fields(DiTConfig)}
                shapes[row.run] = DiTConfig(**{k: v for k, v in manifest.model.items() if k in fields})
        elif isinstance(row.size, str) and not (isinstance(row.resolution, float) and math.isnan(row.resolution)):
            try:
                shapes[row.run] = dit_config(str(row.model), input_size=int(row.resolution) // LATENT_DOWNSAMPLE)
            except ValueError:
                continue
    return shapes


def _gflops(model: DiTConfig) -> float:
    return dit_macs_analytic(model) / 1e9


def size_at(shapes: list[DiTConfig], gflops: float) -> DiTConfig:
    """A DiT of the family `shapes` (one patch size) with forward Gflops near `gflops`: depth and width interpolated
    in log Gflops between the two nearest shapes (past the ends, along the end segment), width a multiple of the
    nearest shape's head dimension, then the nearest in Gflops of the neighbouring depths and widths."""
    ordered = sorted(shapes, key=_gflops)
    if len({_gflops(s) for s in ordered}) < 2:
        nearest = ordered[0]
        low = high = nearest
    else:
        position = int(np.clip(np.searchsorted([_gflops(s) for s in ordered], gflops), 1, len(ordered) - 1))
        low, high = ordered[position - 1], ordered[position]
        nearest = min(ordered, key=lambda s: abs(math.log(_gflops(s) / gflops)))
    if low is high:
        depth, width = float(low.depth), float(low.hidden_size)
        width *= math.sqrt(gflops / _gflops(low))
    else:
        t = math.log(gflops / _gflops(low)) / math.log(_gflops(high) / _gflops(low))
        depth = math.exp((1 - t) * math.log(low.depth) + t * math.log(high.depth))
        width = math.exp((1 - t) * math.log(low.hidden_size) + t * math.log(high.hidden_size))
    head = nearest.hidden_size // nearest.num_heads
    candidates = [dataclasses.replace(nearest, depth=d, hidden_size=h * head, num_heads=h)
                  for d in range(max(1, round(depth) - 2), round(depth) + 3)
                  for h in range(max(1, round(width / head) - 2), round(width / head) + 3)]
    return min(candidates, key=lambda s: (abs(math.log(_gflops(s) / gflops)), s.depth))


def shape_name(model: DiTConfig) -> str:
    return (f"DiT of depth {model.depth}, width {model.hidden_size} ({model.num_heads} heads), patch "
            f"{model.patch_size}")


@dataclasses.dataclass(frozen=True)
class BudgetResult:
    """The law's plan and, per choice, the memory of a step at the batch on the chips (None without a shape)."""

    plan: LawPlan
    memory: list[dict | None]
    chip: str | None
    chips: int
    utilization: float | None
    budget: float


def plan_budget_with_law(records: Records, budget: float, *, chip: str | None = None, chips: int = 1,
                         utilization: float | None = None, metric: str | None = None, batch_size: int | None = None,
                         evaluations: int = 1, n_bootstrap: int = 200, **where) -> BudgetResult:
    """`budget` chip-hours of `chip` (or paper-unit Gflops without a chip) planned by the law of the records."""
    compute = to_paper_units(budget, "accelerator-hours", chip=chip, utilization=utilization) if chip \
        else to_paper_units(budget)
    points, selection = law_points(records, metric=metric, size="gflops", **where)
    fit = law_of_points(points, selection, n_bootstrap=n_bootstrap)
    batches = points["batch_size"].dropna().astype(int).unique()
    if batch_size is None:
        if len(batches) != 1:
            raise RecordsError(f"the records train at batch sizes {sorted(batches.tolist())}: give --batch-size.")
        batch_size = int(batches[0])
    trained = points.drop_duplicates("run")
    shapes = trained_shapes(records)
    models: dict[str, DiTConfig | None] = {}  # each offered size's architecture, for its memory

    def offer_sizes(optimum: float) -> list[ModelSize]:
        nearest = trained.iloc[int(np.argmin(np.abs(np.log(trained["gflops"].astype(float) / optimum))))]
        size = ModelSize(name=f"{nearest['model']} (trained)", gflops=float(nearest["gflops"]), trained=True,
                         params=None if math.isnan(nearest["params_m"]) else float(nearest["params_m"]) * 1e6)
        models[size.name] = shapes.get(nearest["run"])
        family = [shapes[r] for r in trained["run"] if r in shapes]
        if abs(math.log(size.gflops / optimum)) <= math.log1p(SIZE_TOLERANCE) or not family:
            return [size]
        patch = min(s.patch_size for s in family)
        between = size_at([s for s in family if s.patch_size == patch], optimum)
        at_optimum = ModelSize(name=shape_name(between), gflops=_gflops(between), trained=False,
                               shape={"depth": between.depth, "width": between.hidden_size,
                                      "heads": between.num_heads, "patch": between.patch_size})
        models[at_optimum.name] = between
        return [size, at_optimum]

    plan = plan_with_law(fit, points, compute, offer_sizes, batch_size=batch_size, evaluations=evaluations)
    memory = [_memory(models[c.size.name], batch_size, chip, chips) for c in plan.choices]
    return BudgetResult(plan=plan, memory=memory, chip=chip, chips=chips, utilization=utilization, budget=budget)


def _memory(model: DiTConfig | None, batch: int, chip: str | None, chips: int) -> dict | None:
    """The dry run's memory of a training step on `chips` chips, and the fewest chips (dividing the batch) on
    which it fits; None without a chip or a shape."""
    if chip is None or model is None:
        return None
    config = base_config()
    abstract = abstract_state(model, config)
    row = training_memory(model, config, batch, chip=chip, chips=chips, abstract=abstract)
    least = next((c for c in range(1, batch + 1) if batch % c == 0
                  and training_memory(model, config, batch, chip=chip, chips=c, abstract=abstract)["fits"] != "no"),
                 None)
    return {**row, "least_chips": least}
