"""The paper's Table 4 from records: model, resolution, block, Gflops, params, training steps and the metric, as
Markdown and as a LaTeX tabular."""

from __future__ import annotations

import pandas as pd

from analysis import study
from analysis.paper import BLOCKS
from analysis.records import Records
from analysis.style import config_order, format_gflops, format_params, format_table_steps, with_dit_columns


def _table4(records: Records | pd.DataFrame, metric: str | None, where: dict) -> tuple[str, pd.DataFrame]:
    """Rows: model, resolution, block, Gflops, params, steps, metric; in the paper's order."""
    # Every block and resolution; the table shows each row's resolution, so points whose protocols differ only in
    # the reference set combine.
    points = study.select_protocol(records, metric=metric, vary=("reference", "block", "resolution"), **where)
    metric = points["metric"].iloc[0]
    rows = with_dit_columns(points).groupby(["run", "step"], as_index=False).agg(
        model=("model", "first"), size=("size", "first"), patch=("patch", "first"),
        resolution=("resolution", "first"), block=("block", "first"),
        gflops=("gflops", "first"), params_m=("params_m", "first"), value=("value", "mean"))
    # The block of the most runs first; runs that name no block (a CSV without a block column) count as one block.
    block_counts = rows.drop_duplicates("run")["block"].value_counts(dropna=False)
    common_block = block_counts.index[0]

    def is_common(block) -> bool:
        return bool(pd.isna(block)) if pd.isna(common_block) else block == common_block

    rows["order"] = [
        (not is_common(block), BLOCKS.index(block) if block in BLOCKS else len(BLOCKS),
         -1 if pd.isna(resolution) else resolution, config_order(model, size, patch, gflops), step)
        for block, resolution, model, size, patch, gflops, step in zip(
            rows["block"], rows["resolution"], rows["model"], rows["size"], rows["patch"], rows["gflops"],
            rows["step"], strict=True)]
    rows = rows.sort_values("order").drop(columns="order").reset_index(drop=True)
    table = pd.DataFrame({
        "Model": rows["model"].astype(str),
        "Res.": rows["resolution"].map(lambda r: "" if pd.isna(r) else f"{int(r)}"),
        "Block": rows["block"].map(lambda b: "" if pd.isna(b) else str(b)),
        "Gflops": rows["gflops"].map(format_gflops),
        "Params (M)": rows["params_m"].map(lambda p: "" if pd.isna(p) else format_params(p)),
        "Steps": rows["step"].map(format_table_steps),
        metric: rows["value"].map(lambda v: f"{v:.2f}"),
    })
    # Records that never give a resolution, block or parameter count (e.g. a user's CSV) leave those columns out.
    empty = [column for column in ("Res.", "Block", "Params (M)") if (table[column] == "").all()]
    return metric, table.drop(columns=empty)


def table4_markdown(records: Records | pd.DataFrame, *, metric: str | None = None, **where) -> str:
    """Table 4 as a Markdown table: model, resolution, block, Gflops, params, training steps, metric."""
    _, table = _table4(records, metric, where)
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" if c in ("Model", "Block") else "---:" for c in table.columns) + "|"
    body = ["| " + " | ".join(row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def table4_latex(records: Records | pd.DataFrame, *, metric: str | None = None, **where) -> str:
    """Table 4 as a LaTeX tabular (booktabs rules)."""
    metric, table = _table4(records, metric, where)
    align = "".join("l" if c in ("Model", "Block") else "r" for c in table.columns)
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule",
             " & ".join(_latex_escape(c) for c in table.columns) + r" \\", "\\midrule"]
    lines += [" & ".join(_latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
