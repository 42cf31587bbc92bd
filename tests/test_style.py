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


def _imports(path: Path) -> set[str]:
    """Sibling scratchdet modules ``path`` imports anywhere (top level or inside a function)."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .model import x
                names.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import distributed
                names.update(a.name for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("scratchdet."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("scratchdet."))
    return names


def test_no_import_cycles_among_scratchdet_modules():
    # A lazy import inside a function still makes a circle (cascade <-> model was one): every import counts.
    pkg = ROOT / "scratchdet"
    graph = {p.stem: _imports(p) & {q.stem for q in pkg.glob("*.py")} for p in pkg.glob("*.py")}
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
