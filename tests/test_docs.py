"""The documentation: the README is a short front page whose index links every docs/ page, and every repository path
named in the README, in docs/, or in a docstring or comment exists."""

import ast
import io
import os
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 200
INDEX_HEADING = "Documentation"
# A repository path starts with one of the repository's top-level folders. The look-behind keeps out what only
# ends like one: gs://bucket/runs, /shared/runs, WORKDIR/runs, ~/.cache/..., $DIR/...
TOP_LEVEL = ("models", "scaling", "analysis", "runs", "notebooks", "tests", "docs", ".ci")
REPO_PATH = re.compile(r"(?<![\w./:@$~\-])((?:" + "|".join(re.escape(d) for d in TOP_LEVEL) + r")/[\w.\-/]*)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`([^`]+)`")  # a span may wrap onto the next line


def _paths_in(text: str) -> set[str]:
    """Repository paths in prose: trailing punctuation dropped, and so is a `:NAME` suffix (a factory, a variant)."""
    return {match.rstrip(".") for match in REPO_PATH.findall(text)}


def _named_files(text: str) -> set[str]:
    """Repository paths in a command line that name a file to read (its last part has a suffix); the other paths of
    a command are what it writes, or examples of a workdir."""
    return {path for path in _paths_in(text) if "." in path.rstrip("/").rpartition("/")[2]}


def _markdown_references(text: str, folder: Path) -> set[str]:
    """Paths (relative to the repository) that Markdown in `folder` names: its relative links and images, the paths
    in its prose and in code spans of one word, and the files read by its command lines."""
    commands = FENCE.findall(text)
    prose = FENCE.sub("", text)
    commands += [span for span in CODE_SPAN.findall(prose) if " " in span]
    prose = CODE_SPAN.sub(lambda m: "" if " " in m.group(1) else m.group(1), prose)
    found = _paths_in(MARKDOWN_LINK.sub("", prose)) | {p for block in commands for p in _named_files(block)}
    for target in MARKDOWN_LINK.findall(text):
        target = target.partition("#")[0]
        if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # not https:, gs:, mailto:
            found.add(os.path.relpath(folder / target, REPO))
    return found


def _python_comments_and_docstrings(path: Path) -> str:
    source = path.read_text()
    texts = [token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            texts.append(ast.get_docstring(node, clean=False) or "")
    return "\n".join(texts)


def _hash_comments(path: Path) -> str:
    return "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))


def _references() -> dict[Path, set[str]]:
    """Every file that names repository paths, with the paths it names."""
    found = {path: _markdown_references(path.read_text(), path.parent) for path in [README, *DOCS.glob("*.md")]}
    for folder in ("models", "scaling", "analysis", "tests", ".ci"):
        for path in sorted((REPO / folder).rglob("*.py")):
            found[path] = _paths_in(_python_comments_and_docstrings(path))
    scripts = [path for path in sorted((REPO / ".ci").iterdir()) if path.is_file() and path.suffix != ".py"]
    for path in (REPO / "Makefile", REPO / "pyproject.toml", *scripts):
        found[path] = _paths_in(_hash_comments(path))
    return found


def _ignored(paths: list[str]) -> set[str]:
    """The paths git ignores: outputs a command writes (runs/paper/figures/), not files of the repository."""
    result = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, input="\n".join(paths),
                            capture_output=True, text=True)
    return {line.strip() for line in result.stdout.splitlines()}


def test_every_named_repository_path_exists():
    references = _references()
    missing = {(source, path) for source, paths in references.items() for path in paths if not (REPO / path).exists()}
    outputs = _ignored(sorted({path for _, path in missing}))
    missing = {(source, path) for source, path in missing if path not in outputs}
    lines = sorted(f"{source.relative_to(REPO)}: {path}" for source, path in missing)
    assert lines == [], "paths named but not in the repository:\n" + "\n".join(lines)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_markdown_link_anchor_exists():
    pages = [README, *DOCS.glob("*.md")]
    anchors = {page.resolve(): {_anchor(h) for h in re.findall(r"^#+ (.*)$", FENCE.sub("", page.read_text()),
                                                                  flags=re.MULTILINE)} for page in pages}
    broken = []
    for page in pages:
        for target in MARKDOWN_LINK.findall(page.read_text()):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page.resolve()
            if anchor and linked in anchors and anchor not in anchors[linked]:
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == [], "links to headings that do not exist:\n" + "\n".join(broken)


def test_the_path_finder_skips_urls_examples_and_placeholders():
    text = ("See docs/pod.md, `scaling/configs/fmnist.py:VARIANT` and [the GPU](benchmarks.md#on-a-gpu); "
            "![a figure](../runs/fmnist-default/figures/fig8_gflops_fit.png). Not paths here: gs://bucket/runs/x, "
            "/path/to/models/x.py, WORKDIR/runs/y, ~/.cache/runs, https://example.com/docs/a.md.\n"
            "```\ndit-scaling train --workdir runs/demo --config scaling/configs/other.py:S/8\n```\n"
            "`dit-scaling status runs/study`\n")
    assert _markdown_references(text, DOCS) == {
        "docs/pod.md", "scaling/configs/fmnist.py", "docs/benchmarks.md",
        "runs/fmnist-default/figures/fig8_gflops_fit.png", "scaling/configs/other.py"}


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_readme_index_links_every_docs_page():
    text = README.read_text()
    match = re.search(rf"^## {INDEX_HEADING}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {INDEX_HEADING}' section"
    linked = {target.partition("#")[0] for target in MARKDOWN_LINK.findall(match.group(1))}
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages - linked == set(), f"docs pages missing from the README's index: {sorted(pages - linked)}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_docs_page_has_a_title(page):
    assert (DOCS / page).read_text().startswith("# ")
