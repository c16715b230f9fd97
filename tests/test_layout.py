"""Package layout: no import cycle anywhere in the package; data/ holds DataModules and catalogues without CLI code;
paper.py is a leaf."""

from __future__ import annotations

import ast
from pathlib import Path

import vpt_lightning

PACKAGE = Path(vpt_lightning.__file__).parent


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(path: Path) -> list:
    """The import statements of ``path`` at any nesting level, but those for type checkers only (under
    ``if TYPE_CHECKING:``), which never run and so make no cycle."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only]


def _imports(path: Path) -> set:
    """Modules of the package that ``path`` imports (dotted names relative to the package), any nesting level."""
    module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in _import_nodes(path):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found |= {n[len("vpt_lightning."):] for n in names if n and n.startswith("vpt_lightning.")}
    return found


def _graph(folder: str) -> dict:
    modules = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in (PACKAGE / folder).rglob("*.py")}
    return {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items() if not m.endswith("__init__")}


def test_data_modules_import_no_cycle_and_no_cli():
    graph = _graph("data")
    assert "data.vtab_prep.prepare" in graph and "data.vtab" in graph
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
    for path in (PACKAGE / "data").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "argparse" not in names and not any("cli" in t for t in _imports(path)), path.name


def test_the_vtab_preparation_is_apart_from_the_datamodules():
    """data/vtab_prep/ (the offline builder behind ``vpt-prepare vtab``) is used by the prepare CLI; of the
    DataModules only data/vtab.py reads it, and only its source catalogue (for the hint of a missing folder)."""
    graph = _package_graph()
    prep = {m for m in graph if m.startswith("data.vtab_prep.")}
    assert {"data.vtab_prep.prepare", "data.vtab_prep.sources", "data.vtab_prep.tfds_order"} <= prep
    users = {m: {t for t in ts if t in prep} for m, ts in graph.items() if m not in prep and not m.startswith("cli.")}
    assert {m: ts for m, ts in users.items() if ts} == {"data.vtab": {"data.vtab_prep.sources"}}
    assert not [p.name for p in (PACKAGE / "data").glob("*.py") if p.stem in  # nothing left at the old place
                {"prepare", "sources", "tfds_order", "tfrecord", "source_split", "official_splits"}]


def test_paper_numbers_are_a_leaf_module():
    assert _imports(PACKAGE / "paper.py") == set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: Path) -> list:
    """``(module, name)`` of every import in ``path`` at any nesting level (so an import deferred into a function
    to dodge a cycle still counts); ``name`` is ``None`` for ``import x``. Modules are relative to the package."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _import_nodes(path):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("vpt_lightning"):
                source = node.module[len("vpt_lightning"):].lstrip(".")
            else:
                continue
            found += [(source, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name[len("vpt_lightning."):], None) for a in node.names if a.name.startswith("vpt_lightning.")]
    return found


def _package_graph() -> dict:
    """Every module of the package -> the package modules it imports. A name imported from a package's
    ``__init__`` counts as an import of the module the ``__init__`` re-exports it from."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    exported = {}  # (package, name) -> the module the package's __init__ takes it from
    for module, path in modules.items():
        if path.name == "__init__.py":
            for source, name in _imported_names(path):
                if name and source in modules:
                    exported[(module, name)] = source
    graph = {}
    for module, path in modules.items():
        targets = set()
        for source, name in _imported_names(path):
            if name and f"{source}.{name}".strip(".") in modules:  # from .pkg import submodule
                target = f"{source}.{name}".strip(".")
            else:
                target = exported.get((source, name), source)
            if target in modules and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict) -> list:
    """Import cycles (as paths) in ``graph``."""
    found, done, stack = [], set(), []

    def visit(node):
        if node in stack:
            found.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    return found


def test_the_whole_package_has_no_import_cycle():
    graph = _package_graph()
    assert {"checkpoint", "backbones.identity", "backbones.loading", "task_model", "serving.multitask"} <= set(graph)
    assert "backbones.loading" in graph["task_model"]  # BackboneConfig, imported through backbones/__init__
    assert _cycles(graph) == []
    # the backbone identity lives with the backbones: checkpoint.py uses it, backbones/ never imports checkpoint.py
    assert not any(t == "checkpoint" for m, ts in graph.items() if m.startswith("backbones") for t in ts)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
