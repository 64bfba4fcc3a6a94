"""The import rules of the layout, read from the source (ast): the library (`eopd_ray/`) never imports the
actors (`actors/`); nothing imports `examples/`; and tests reach the examples as users do, as subprocesses,
never by loading their files or putting examples/ on sys.path (a test that imports a recipe passes while the
recipe, as run, breaks)."""

from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# calls that load a module from a file path or run one in this process
LOADERS = {"spec_from_file_location", "SourceFileLoader", "exec_module", "run_path", "run_module", "load_source"}


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported(tree: ast.AST) -> list[str]:
    """Every module an import statement names (absolute imports; the project uses no relative ones)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def called(tree: ast.AST) -> set[str]:
    """The names of every function called (`f(...)` and `x.f(...)` both give f)."""
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(tree) if isinstance(n, ast.Call)}


def examples_on_sys_path(tree: ast.AST) -> list[str]:
    """`sys.path.insert(...)` / `.append(...)` calls that put a folder of examples/ on the import path."""
    return [ast.unparse(n) for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("insert", "append")
            and ast.unparse(n.func.value) == "sys.path" and "examples" in ast.unparse(n)]


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_the_scanned_folders_are_the_projects():
    # a moved folder would make the rules below pass on nothing
    for folder, known in (("eopd_ray", "tracking.py"), ("actors", "driver/loop.py"), ("tests", "test_layout.py"),
                          ("examples", "train_eopd.py")):
        assert (ROOT / folder / known) in sources(folder), (folder, known)


def offenders(folders, bad) -> list[str]:
    """`path: what` for each source file of `folders` where bad(tree) names something."""
    return [f"{path.relative_to(ROOT)}: {found}" for folder in folders for path in sources(folder)
            if (found := bad(parse(path)))]


def test_library_never_imports_the_actors():
    bad = offenders(["eopd_ray"], lambda t: [m for m in imported(t) if m == "actors" or m.startswith("actors.")])
    assert not bad, f"eopd_ray/ must run without the actors: {bad}"


def test_nothing_imports_examples():
    bad = offenders(["eopd_ray", "actors", "tests", "examples"],
                    lambda t: [m for m in imported(t) if m == "examples" or m.startswith("examples.")])
    assert not bad, f"examples are recipes to run, not modules: {bad}"


def test_tests_load_no_module_by_path():
    bad = offenders(["tests"], lambda t: sorted(called(t) & LOADERS) + examples_on_sys_path(t))
    assert not bad, ("run an example as a subprocess (python examples/...), or call the library's driver "
                     f"(actors/driver/, eopd_ray/): {bad}")


# a repository path in a docstring or comment: actors/..., eopd_ray/..., tests/..., examples/..., cluster/...
# (not a path inside another tree, such as /workspace/eopd-ray/examples/... in a pod)
REPO_PATH = re.compile(r"(?<![\w/.-])((?:actors|eopd_ray|tests|examples|cluster)/[\w/.-]*\w\.(?:py|yaml|md|sh))\b")


# files that name missing paths on purpose: this one, and the docs check's self-test of its own path check
QUOTES_MISSING = {Path(__file__).resolve(), (ROOT / "tests" / "test_docs.py").resolve()}


def test_paths_named_in_the_sources_exist():
    """A file named by its repository path in the code exists (the package split left such names behind)."""
    files = [p for folder in ("eopd_ray", "actors", "tests", "examples", "cluster")
             for p in sorted((ROOT / folder).rglob("*")) if p.suffix in (".py", ".yaml", ".md") and p.is_file()
             and p.resolve() not in QUOTES_MISSING]
    stale = [f"{path.relative_to(ROOT)}: {name}" for path in files
             for name in REPO_PATH.findall(path.read_text(encoding="utf-8")) if not (ROOT / name).exists()]
    assert not stale, f"paths that name no file: {sorted(stale)}"
