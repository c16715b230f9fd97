"""Package layout: data/ holds DataModules and catalogues without import cycles or CLI code; paper.py is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

import vpt_lightning

PACKAGE = Path(vpt_lightning.__file__).parent


def _imports(path: Path) -> set:
    """Modules of the package that ``path`` imports (dotted names relative to the package), any nesting level."""
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found |= {n[len("vpt_lightning."):] for n in names if n and n.startswith("vpt_lightning.")}
    return found


def _graph(folder: str) -> dict:
    modules = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in (PACKAGE / folder).glob("*.py")}
    return {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items() if not m.endswith("__init__")}


def test_data_modules_import_no_cycle_and_no_cli():
    graph = _graph("data")
    assert "data.prepare" in graph and "data.vtab" in graph
    done, stack = set(), []

    def visit(node):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        if node in done:
            return
        stack.append(node)
        for nxt in graph[node]:
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in graph:
        visit(node)
    for path in (PACKAGE / "data").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "argparse" not in names and not any("cli" in t for t in _imports(path)), path.name


def test_paper_numbers_are_a_leaf_module():
    assert _imports(PACKAGE / "paper.py") == set()
