"""Package layout: no import cycle anywhere in the package; data/ holds DataModules and catalogues without CLI code;
protocol/paper.py is a leaf."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import vpt_lightning

PACKAGE = Path(vpt_lightning.__file__).parent


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(path: Path) -> list:
    """The import statements of ``path`` at any nesting level, but those for type checkers only (under
    ``if TYPE_CHECKING:``), which never run and so make no cycle."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and _is_type_checking(block.test)
        for stmt in block.body
        for n in ast.walk(stmt)
    }
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
            found |= {n[len("vpt_lightning.") :] for n in names if n and n.startswith("vpt_lightning.")}
    return found


def _graph(folder: str) -> dict:
    modules = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in (PACKAGE / folder).rglob("*.py")}
    return {
        m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items() if not m.endswith("__init__")
    }


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
    assert not [
        p.name
        for p in (PACKAGE / "data").glob("*.py")
        if p.stem  # nothing left at the old place
        in {"prepare", "sources", "tfds_order", "tfrecord", "source_split", "official_splits"}
    ]


def test_paper_numbers_are_a_leaf_module():
    assert _imports(PACKAGE / "protocol" / "paper.py") == set()


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
                source = node.module[len("vpt_lightning") :].lstrip(".")
            else:
                continue
            found += [(source, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (a.name[len("vpt_lightning.") :], None) for a in node.names if a.name.startswith("vpt_lightning.")
            ]
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
            found.append(stack[stack.index(node) :] + [node])
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
    assert {"sharing.checkpoint", "backbones.identity", "backbones.loading", "task_model", "serving.multitask"} <= set(
        graph
    )
    assert "backbones.loading" in graph["task_model"]  # BackboneConfig, imported through backbones/__init__
    assert _cycles(graph) == []
    # the backbone identity lives with the backbones: checkpoint.py uses it, backbones/ never imports checkpoint.py
    assert not any(t == "checkpoint" for m, ts in graph.items() if m.startswith("backbones") for t in ts)


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


# ---- the layout page's section against the tree --------------------------------------------------------------
ROOT = PACKAGE.parents[1]
NAMED_FILE = re.compile(r"[\w/]+\.(?:py|safetensors|yaml)\b")


LAYOUT_PAGE = ROOT / "docs" / "layout.md"


def _layout_section() -> list:
    """The lines of the layout page's block (the fenced block that starts with ``src/vpt_lightning/``)."""
    lines = LAYOUT_PAGE.read_text().splitlines()
    start = lines.index("src/vpt_lightning/")
    assert lines[start - 1] == "```", "the layout section is a fenced block starting with src/vpt_lightning/"
    return lines[start + 1 : lines.index("```", start)]


def _layout_entries(lines: list) -> dict:
    """Path (relative to the package; a folder ends with ``/``) -> the paths its entry names. An entry is a line
    indented by 2 (the package) or 4 (inside the folder above); its text goes on over the more indented lines below.
    A file named in a folder's entry is in that folder; in a module's entry, beside it."""
    entries, folder, current = {}, "", None
    for line in lines:
        head = re.match(r"^( +)(\S+)", line)
        indent = len(head.group(1)) if head else 0
        if head and indent in (2, 4):
            assert indent == 2 or folder, f"a nested entry needs a folder above it: {line!r}"
            name = (folder if indent == 4 else "") + head.group(2)
            folder = name if indent == 2 and name.endswith("/") else (folder if indent == 4 else "")
            current, text = name, line[len(head.group(0)) :]
            entries[current] = set()
        else:
            assert current is not None and indent > 4, f"not an entry nor a continuation: {line!r}"
            text = line
        base = current if current.endswith("/") else current.rpartition("/")[0] + "/" * ("/" in current)
        entries[current] |= {base + name for name in NAMED_FILE.findall(text)}
    return entries


def _scripts() -> list:
    import tomllib

    return sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def test_the_readme_layout_section_matches_the_tree():
    lines = _layout_section()
    entries = _layout_entries(lines)
    named = set(entries) | {path for paths in entries.values() for path in paths}
    missing = [path for path in sorted(named) if not (PACKAGE / path).exists()]
    assert not missing, f"the layout page's section names paths that do not exist: {missing}"
    packages = {str(p.parent.relative_to(PACKAGE)) + "/" for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    missing_packages = packages - set(entries)
    assert not missing_packages, f"subpackages missing from the layout page's section: {missing_packages}"
    modules = {p.name for p in PACKAGE.glob("*.py")} | {
        f"{folder}/{p.name}"
        for folder in ("methods", "backbones", "runs", "protocol", "sharing")
        for p in (PACKAGE / folder).glob("*.py")
    }
    modules = {m for m in modules if not m.endswith("__init__.py")}
    assert not modules - named, f"modules missing from the layout page's section: {sorted(modules - named)}"
    text = "\n".join(lines)
    commands = [name for name in _scripts() if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]
    assert not commands, f"console scripts missing from the layout page's section: {commands}"


def test_the_layout_check_finds_what_is_wrong():
    entries = _layout_entries(
        [
            "  methods/        a.py, b.py;",
            "                  c.py",
            "  data/           x.py",
            "    vtab_prep/    y.py",
            "  module.py       VPTModule;  atomic.py  writes",
        ]
    )
    assert entries == {
        "methods/": {"methods/a.py", "methods/b.py", "methods/c.py"},
        "data/": {"data/x.py"},
        "data/vtab_prep/": {"data/vtab_prep/y.py"},
        "module.py": {"atomic.py"},
    }
    with pytest.raises(AssertionError, match="not an entry nor a continuation"):
        _layout_entries(["  methods/  a.py", "   b.py"])


# ---- what the docstrings and comments cite ----------------------------------------------------------------------
# Documents users do not have (notes kept outside the repository); cite the paper (Jia et al., ECCV 2022: "paper
# §4.2", "Table 5", "Appendix A") or the official code's file (KMnP/vpt: ``src/models/vit_prompt/vit.py``) instead.
OUTSIDE_DOCUMENTS = re.compile(
    "|".join(
        [
            r"\bspec\s+§",
            r"\bspec\s+extensions",
            r"\bextensions\s+spec",
            "VPT_" + "SPEC",
            "VPT_" + "EXTENSIONS",
            r"\bDESIGN\.md",
            r"\bENVIRONMENT\.md",
            "/work/" + "shared",
        ]
    )
)


def _cited_outside(paths) -> list:
    """``path:line`` of every reference to a document outside the repository in ``paths``."""
    found = []
    for path in paths:
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        for match in OUTSIDE_DOCUMENTS.finditer(text):
            where = next((path.relative_to(base) for base in (PACKAGE, ROOT) if path.is_relative_to(base)), path)
            found.append(f"{where.as_posix()}:{lines[text.count(chr(10), 0, match.start())]}")
    return found


def test_docstrings_and_comments_cite_the_paper_and_the_official_code_only():
    files = [
        p
        for folder in (PACKAGE, ROOT / "examples", ROOT / "benchmarks", ROOT / "tests", ROOT / "docs")
        for p in folder.rglob("*")
        if p.suffix in (".py", ".yaml", ".yml", ".md", ".toml", ".txt")
        and p.is_file()
        and p.name != Path(__file__).name
    ]
    files += [ROOT / "README.md", ROOT / "pyproject.toml"]
    assert len(files) > 100 and any(p.suffix == ".yaml" for p in files)
    assert _cited_outside(files) == []


def test_the_citation_check_finds_an_outside_document(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(
        '"""Prompts (spec\n§1).""" # see DESIGN.md\n# paper §4.2, Table 2; official src/models/vit_prompt/vit.py\n'
    )
    assert _cited_outside([path]) == [
        f'{path.as_posix()}:"""Prompts (spec',
        f'{path.as_posix()}:§1).""" # see DESIGN.md',
    ]


# ---- the concept subpackages, their reference pages and the old module paths --------------------------------------
ROOT_MODULES = {
    "__init__.py", "module.py", "task_model.py", "heads.py", "prompt.py", "optim.py", "schedule.py", "config.py",
    "schemas.py", "dataclass_config.py", "renamed.py",
}  # fmt: skip


def test_the_package_root_keeps_the_public_api_and_the_configs_only():
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES


@pytest.mark.parametrize("package", ["runs", "protocol", "sharing", "serving", "backbones", "methods"])
def test_the_api_reference_page_of_a_subpackage_shows_each_of_its_public_modules(package):
    page = (ROOT / "docs" / "reference" / f"{package}.md").read_text()
    shown = set(re.findall(r"^::: vpt_lightning\.([\w.]+)", page, re.M))
    assert package in shown, f"docs/reference/{package}.md does not show the subpackage itself"
    if package in ("runs", "protocol", "sharing"):  # the new ones: every module has its section
        modules = {f"{package}.{p.stem}" for p in (PACKAGE / package).glob("*.py") if p.stem != "__init__"}
        assert modules <= {m for m in shown}, f"modules without a reference section: {sorted(modules - shown)}"


def test_a_moved_module_imports_from_its_old_path_as_the_same_module_with_a_warning():
    import importlib
    import sys

    from vpt_lightning.renamed import MOVED_MODULES

    assert len(MOVED_MODULES) >= 20
    for old, new in MOVED_MODULES.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=rf"{re.escape(old)} is now {re.escape(new)}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert not (PACKAGE / (old.split(".", 1)[1].replace(".", "/") + ".py")).exists(), old
    with pytest.warns(DeprecationWarning, match="vpt_lightning.protocol.run_protocol is now"):
        from vpt_lightning.protocol import run_protocol
    from vpt_lightning.protocol.task_protocol import run_protocol as moved

    assert run_protocol is moved
    with pytest.raises(AttributeError):
        import vpt_lightning.protocol as package

        package.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    "statement, old",
    [
        ("from vpt_lightning.protocol import run_protocol", "vpt_lightning.protocol.run_protocol"),
        ("from vpt_lightning.backbones import family_for", "vpt_lightning.backbones.family_for"),
    ],
)
def test_an_old_name_imported_with_from_warns_once_at_the_users_line(statement, old):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(statement, "user_code.py", "exec"), {})
    assert [(str(w.message).split(" is now")[0], w.filename) for w in caught] == [(old, "user_code.py")]


def test_every_folder_of_modules_is_a_regular_package_that_git_keeps():
    """A folder of modules without ``__init__.py`` still imports (a namespace package) but has no docstring, no API
    reference and no place in a wheel's package list; and a file ``.gitignore`` matches is missing from every clone."""
    import shutil
    import subprocess

    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert not [f for f in folders if not (f / "__init__.py").is_file()]
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert ignored == [], f"package files .gitignore leaves out of every clone: {ignored}"


def test_serving_imports_no_lightning_and_the_public_api_loads_on_first_use():
    """vpt-serve's processes (the server and its inference worker), ``load_task`` and vpt-report import torch and timm
    but not Lightning (and what it imports: torchmetrics, which imports transformers and scipy when installed), about
    1 s of start-up per process; the package root's and ``vpt_lightning.data``'s names are imported when first used."""
    import subprocess
    import sys

    code = """
import sys
import vpt_lightning, vpt_lightning.data
import vpt_lightning.cli.export, vpt_lightning.cli.serve, vpt_lightning.serving.server, vpt_lightning.task_model
import vpt_lightning.cli.report
from vpt_lightning import load_task
from vpt_lightning.data.transforms import build_transform
from vpt_lightning.cli.console import is_user_error
is_user_error(ValueError("a refused task"))  # how vpt-serve reports an error
print(sorted(m for m in ("pytorch_lightning", "lightning_fabric", "torchmetrics") if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["[]"], result.stdout
    import vpt_lightning.data

    assert {"VPTModule", "TaskModel", "PromptedViT", "load_task", "register_head"} <= set(dir(vpt_lightning))
    assert vpt_lightning.VPTModule.__module__ == "vpt_lightning.module"
    assert "VTABDataModule" in dir(vpt_lightning.data)
    assert vpt_lightning.data.VTABDataModule.__module__ == "vpt_lightning.data.vtab"
    with pytest.raises(AttributeError, match="no_such_name"):
        vpt_lightning.no_such_name  # noqa: B018
