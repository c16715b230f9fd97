"""MkDocs hooks (``mkdocs.yml``: ``hooks:``): parts of pages generated from the package at build time, so they
cannot drift from it.

- ``<!-- cli-help: vpt-predict -->`` (or ``vpt-prepare vtab``): the command's ``--help``, run in-process through
  its console-script entry point (``[project.scripts]`` of ``pyproject.toml``), at most :data:`HELP_COLUMNS` wide
  and in plain text (no reStructuredText markup of the module docstrings);
- ``<!-- config-options: backbone -->``: a table of the YAML files of a config group (``conf/<group>``) with the
  first comment line of each; the option names are ``<code class="option-name">``, which ``stylesheets/extra.css``
  keeps on one line.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

from vpt_lightning.cli.console import plain_text

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the docs extra brings tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "src" / "vpt_lightning" / "conf"
MARKER = re.compile(r"<!-- (cli-help|config-options): ([^>]+?) -->")
# the columns of a code block of mkdocs-material at its default font (13.6 px monospace, 8.18 px a character): 80 in
# the 656 px of a page with both sidebars (Chromium at 1280 and 1440 px; 88 at 1024 px, where the toc folds away)
HELP_COLUMNS = 80


def console_scripts() -> Dict[str, str]:
    """Console-script name -> ``module:function`` from ``pyproject.toml``."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"]["scripts"])


def cli_help(command: str) -> str:
    """``COMMAND [SUBCOMMAND] --help`` as printed by the installed entry point, run in this process."""
    prog, *args = command.split()
    scripts = console_scripts()
    if prog not in scripts:
        raise ValueError(f"cli-help: {prog!r} is not a console script of pyproject.toml ({sorted(scripts)})")
    module, function = scripts[prog].split(":")
    main = getattr(importlib.import_module(module), function)
    out = io.StringIO()
    argv, columns = sys.argv, os.environ.get("COLUMNS")
    sys.argv = [prog, *args, "--help"]
    os.environ["COLUMNS"] = str(HELP_COLUMNS)  # argparse wraps to it; Hydra's help and raw descriptions do not
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main()
    finally:
        sys.argv = argv
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    text = out.getvalue().rstrip()
    if not text:
        raise RuntimeError(f"cli-help: {command} --help printed nothing")
    return f"```text\n$ {command} --help\n{wrap_lines(plain_text(text), HELP_COLUMNS)}\n```"


def wrap_lines(text: str, width: int) -> str:
    """Lines longer than ``width`` wrapped at spaces (what argparse does not wrap: Hydra's lists of a group's options,
    the lines of a raw description); the continuations of a command or of a ``group: options`` line are indented
    four columns deeper, those of prose as deep as its line."""
    lines: List[str] = []
    for line in text.splitlines():
        depth = len(line) - len(line.lstrip())
        hanging = re.match(r"\s*(vpt-[\w-]+ |[\w/]+: )", line) is not None
        indent = " " * (depth + 4 * hanging)
        lines += textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False) if line else [line]
    return "\n".join(lines)


def header_comment(path: Path, limit: int = 260) -> str:
    """The leading comment block of a YAML file (Hydra's ``@package`` line left out), joined into one line and cut
    at a sentence or clause end near ``limit`` characters."""
    lines: List[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        if "@package" not in stripped:
            lines.append(stripped.lstrip("#").strip())
    text = " ".join(x for x in lines if x)
    if len(text) > limit:
        cut = max(text.rfind(sep, 0, limit) for sep in (". ", "; ", ": ", ", "))
        text = (text[:cut] if cut > 0 else text[:limit]).rstrip(" .;:,") + " …"
    return text


def config_options(group: str) -> str:
    """A Markdown table of the options (YAML files) of ``conf/<group>``."""
    folder = CONF / group
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise ValueError(f"config-options: no YAML files in {folder}")
    rows: List[str] = ["| option | what it is |", "|---|---|"]
    for path in files:
        text = header_comment(path).replace("|", "\\|")
        rows.append(f'| <code class="option-name">{path.stem}</code> | {text} |')
    return "\n".join(rows)


def expand(markdown: str) -> str:
    def replace(match: re.Match) -> str:
        kind, arg = match.group(1), match.group(2).strip()
        return cli_help(arg) if kind == "cli-help" else config_options(arg)

    return MARKER.sub(replace, markdown)


def on_page_markdown(markdown: str, **kwargs) -> str:  # MkDocs event
    return expand(markdown)
