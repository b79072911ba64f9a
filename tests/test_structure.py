"""The package structure: imports point one way (models <- scaling -> analysis), no module imports itself back
through others, the analysis commands run without JAX, and the two descriptions of the DiT family agree."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "scaling", "analysis")
# Which packages each package may import (besides itself).
ALLOWED = {"models": set(), "analysis": set(), "scaling": {"models", "analysis"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports anywhere in it (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_imports_point_one_way():
    wrong = sorted(f"{module} imports {imported}" for module, imported_set in _graph().items()
                   for imported in imported_set
                   if (source := module.split(".")[0]) != (target := imported.split(".")[0])
                   and target not in ALLOWED[source])
    assert wrong == [], "imports against the data's direction (models <- scaling -> analysis):\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {module: {i for i in imports if not module.startswith(i + ".")} for module, imports in _graph().items()}
    # A package's __init__ that a submodule lives under is not an edge back (importing a.b imports a first).
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join([*path[path.index(imported):], imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path):
    # The two checks above must be able to fail: an import inside a function counts.
    (tmp_path / "lazy.py").write_text("def f():\n    from scaling.train import train\n")
    assert _imports(tmp_path / "lazy.py", _modules()) == {"scaling.train"}


def test_the_analysis_commands_leave_jax_out(tmp_path):
    # Small records of five runs keep the fits quick; what is checked is which modules the commands import.
    records = tmp_path / "runs.csv"
    records.write_text("run,gflops,batch_size,step,metric,value\n" + "".join(
        f"net-{g},{g},64,{s},FID-10K,{10 + 80 * (s / 1000) ** -0.5 * g ** -0.3}\n"
        for g in (0.5, 1.0, 2.0, 4.0, 8.0) for s in (1000, 2000, 4000)))
    points = tmp_path / "points.csv"
    points.write_text("name,gflops,fid,steps,batch_size\nnet,3.0,40.0,2000,64\n")
    script = f"""
import sys
from scaling.cli import main
records = {str(records)!r}
for argv in (["fit", records, "--x", "gflops", "--y", "fid", "--where", "step=4000"],
             ["plan", "--compute", "1e6", "--records", records], ["compare", {str(points)!r}, "--against", records],
             ["isoflop", "--records", records], ["loss-proxy", "--records", {str(REPO / "runs" / "fmnist-default")!r}],
             ["figures", records, "--out", {str(tmp_path / "figures")!r}]):
    assert main(argv) == 0, argv
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax", "torch"))
print("HEAVY", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert (tmp_path / "figures" / "report.md").is_file()


def test_models_and_the_paper_describe_one_family():
    from analysis import paper
    from models import dit

    assert tuple(dit.DIT_SIZES) == paper.SIZES and dit.PATCH_SIZES == paper.PATCHES
    assert dit.BLOCKS == paper.BLOCKS


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_has_a_docstring(package):
    missing = [name for name, path in _modules().items() if name.startswith(package)
               and not ast.get_docstring(ast.parse(path.read_text())) and path.stat().st_size]
    assert missing == []
