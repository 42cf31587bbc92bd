import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    if importlib.util.find_spec("ruff") is not None:
        ruff = [sys.executable, "-m", "ruff"]
    elif shutil.which("ruff"):
        ruff = [shutil.which("ruff")]
    else:
        pytest.skip("ruff is not installed (it comes with `pip install '.[test]'`)")
    paths = [p for p in ("scratchdet", "tests", "tools", "benchmarks") if (ROOT / p).is_dir()]
    result = subprocess.run([*ruff, "check", *paths], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _module_name(pkg: Path, path: Path) -> str:
    """``path``'s module name below ``scratchdet``: ``engine``, ``analysis.study``, ``analysis`` (its __init__)."""
    parts = list(path.relative_to(pkg).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(pkg: Path, path: Path) -> set[str]:
    """scratchdet modules ``path`` imports anywhere (top level or inside a function), named as ``_module_name``
    names them; a name that is not a module (``from .model import build_model``'s ``model.build_model``) is
    dropped by the caller."""
    import ast

    parts = list(path.relative_to(pkg).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import in ``path`` starts from
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .model import x, from . import distributed, from ..config import y
                module = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("scratchdet."):
                module = node.module.split(".")[1:]
            else:
                continue
            if module:
                names.add(".".join(module))
            names.update(".".join(module + [a.name]) for a in node.names)  # the names may be submodules
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("scratchdet."))
    return names


def test_no_import_cycles_among_scratchdet_modules():
    # A lazy import inside a function still makes a circle (cascade <-> model was one): every import counts.
    pkg = ROOT / "scratchdet"
    paths = {_module_name(pkg, p): p for p in pkg.rglob("*.py")}
    graph = {name: _imports(pkg, p) & set(paths) for name, p in paths.items()}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in stack:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# ---- the layout a newcomer can carry on: each rule fails on the code it guards (checked by breaking it) ----------


def _package_files() -> list[Path]:
    return sorted((ROOT / "scratchdet").rglob("*.py"))


def test_no_function_over_120_lines():
    # A loop that reads top to bottom fits on a few screens (torchvision's train_one_epoch ~45 lines, detectron2's
    # TrainerBase.train 27); engine.train holds the detection loop in at most 120, pretrain's in at most 80.
    import ast

    long = []
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                limit = 80 if (path.name, node.name) == ("pretrain.py", "pretrain") else 120
                if n > limit:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines (at most {limit})")
    assert not long, long


def test_no_module_imports_another_modules_private_names():
    import ast

    found = []
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("scratchdet")):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_training_imports_nothing_of_the_analysis_layer():
    # Analysis (studies, reports, findings, bootstrap, curve fits) reads run directories; training never needs
    # it.  Only the command line, and the analysis package itself, import it.
    pkg = ROOT / "scratchdet"
    offenders = [f"{p.relative_to(ROOT)}: {sorted(d for d in _imports(pkg, p) if d.startswith('analysis'))}"
                 for p in _package_files() if "analysis" not in p.parts and p.name != "cli.py"
                 and any(d.startswith("analysis") for d in _imports(pkg, p))]
    assert not offenders, offenders


def test_no_comment_or_docstring_cites_an_issue_number():
    # Comments give the reason (the paper, the bug), which outlives the tracker's numbering.
    import re

    pattern = re.compile(r"\bissues? #?\d+|\(issue\b", re.IGNORECASE)
    paths = _package_files() + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")) \
        + sorted((ROOT / "tools").glob("*.py"))
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in paths if p != Path(__file__)
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_readme_is_a_door_and_architecture_names_every_module():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 300, f"README.md has {len(readme)} lines; the rest belongs in docs/"
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    pkg = ROOT / "scratchdet"
    missing = [str(p.relative_to(pkg)) for p in _package_files()
               if p.name != "__init__.py" and f"`{p.relative_to(pkg)}`" not in architecture]
    assert not missing, f"docs/architecture.md does not list {missing}"
    named = {m.replace("`", "") for m in __import__("re").findall(r"^\| `([\w/]+\.py)` \|", architecture, flags=8)}
    gone = sorted(m for m in named if not (pkg / m).is_file())
    assert not gone, f"docs/architecture.md lists modules that do not exist: {gone}"


def test_each_module_imports_only_its_own_layer_or_those_below_as_architecture_says():
    import re

    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Layers"):text.index("## One line per module")]
    layers = [re.findall(r"`([\w/]+)`", row.split("|")[2]) for row in table.splitlines() if row.startswith("| ")
              and not row.startswith("| layer") and not row.startswith("| ---")]
    rank = {m.replace("/", "."): i for i, mods in enumerate(layers) for m in mods if not m.startswith("get_")}
    pkg = ROOT / "scratchdet"
    paths = {_module_name(pkg, p): p for p in pkg.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert set(paths) <= set(rank), f"modules in no layer of docs/architecture.md: {sorted(set(paths) - set(rank))}"
    upward = [f"{m} ({rank[m]}) imports {d} ({rank[d]})" for m, p in paths.items()
              for d in sorted(_imports(pkg, p) & set(rank)) if rank[d] > rank[m]]
    assert not upward, upward
