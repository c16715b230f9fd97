"""The README and the documentation site as a new user's door: their code runs as written, offline, and the site
builds with ``mkdocs build --strict``.

Fenced blocks of README.md and of the pages of ``mkdocs.yml``'s nav (in nav order) are run:

- ````python`` blocks are executed, the blocks of one document in one namespace, in order, as a user pastes them;
- ````bash`` / ``sh`` / ``console`` / ``shell`` blocks must hold console-script commands only (``vpt-*`` of
  ``pyproject.toml``, chained with ``&&`` or ``;``); each runs through its entry point with the arguments as
  written. ``<!-- run-with: ARGS -->`` before the fence appends ARGS (e.g. ``+debug=fast``) to every
  ``vpt-train`` / ``vpt-tune`` command of the block, and the page's text says so;
- ``<!-- not-run: REASON -->`` before the fence skips a block that cannot run offline (a dataset, pretrained
  weights, a GPU, the network, a server); the skipped blocks are listed and counted, and the ``vpt-train`` /
  ``vpt-tune`` commands in them are still composed with Hydra, so every group option and key they use exists;
- other fences (no language, ``text``, ``yaml``...) show outputs, file trees or config files and are not run.

The docs pages run in one working folder, so later pages use the smoke run that "Getting started" makes; the
README runs in a folder of its own.
"""

from __future__ import annotations

import importlib
import logging
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import yaml
from conftest import chdir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the docs extra brings tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "console", "shell"}
COMPOSED = {"vpt-train": "train", "vpt-tune": "tune"}  # console script -> its Hydra config name
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!-- (not-run|run-with): (.+?) -->$")
PLACEHOLDER = re.compile(r"\.\.\.|<[a-z_ ]+>")  # an elided command (`vpt-tune ... x=1`, `<run>`) cannot be composed


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    marker: Optional[Tuple[str, str]] = None  # ("not-run", reason) or ("run-with", args)

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{path}:{self.line}"


def extract_blocks(path: Path) -> List[Block]:
    """The fenced code blocks of a Markdown file (fences at the start of a line), with the marker before each."""
    blocks: List[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, lang = i, match.group(1).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path}:{i + 1}: unclosed code fence")
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        blocks.append(
            Block(
                path,
                start + 1,
                lang,
                "\n".join(lines[start + 1 : end]),
                (marker.group(1), marker.group(2).strip()) if marker else None,
            )
        )
        i = end + 1
    return blocks


def logical_lines(code: str) -> List[str]:
    """Shell lines with backslash continuations joined; blank and comment-only lines dropped."""
    joined = code.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def commands(code: str) -> List[List[str]]:
    """The commands of a shell block as argument lists (comments dropped, ``&&`` / ``;`` chains split)."""
    result: List[List[str]] = []
    for line in logical_lines(code):
        for part in re.split(r"&&|;", line):
            argv = shlex.split(part, comments=True)
            if argv:
                result.append(argv)
    return result


def console_scripts() -> Dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"]["scripts"])


def run_console_script(argv: List[str]) -> None:
    """Run a console script through its ``[project.scripts]`` entry point with ``argv`` (as a shell would)."""
    module, function = console_scripts()[argv[0]].split(":")
    main = getattr(importlib.import_module(module), function)
    saved = sys.argv
    sys.argv = list(argv)
    try:
        code = main()
    except SystemExit as exit:
        code = exit.code
    finally:
        sys.argv = saved
    if code not in (None, 0) and not isinstance(code, float):
        raise AssertionError(f"`{shlex.join(argv)}` exited with {code!r}")


def composable(code: str) -> List[List[str]]:
    """The ``vpt-train`` / ``vpt-tune`` commands of a block that can be composed (no elided arguments)."""
    found: List[List[str]] = []
    for line in logical_lines(code):
        for part in re.split(r"&&|;|\|", line):
            words = part.split()
            if not words or words[0] not in COMPOSED or PLACEHOLDER.search(part):
                continue
            found.append(shlex.split(part, comments=True))
    return found


def compose_command(argv: List[str]) -> None:
    """Compose a ``vpt-train`` / ``vpt-tune`` command's config as Hydra would, without running it; a multirun
    (``-m``) is composed at the first value of each sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from vpt_lightning.config import compose

    args = [a for a in argv[1:] if a not in ("-m", "--multirun", "--force")]
    if "--cfg" in args:
        args = args[: args.index("--cfg")]
    overrides = []
    for override in OverridesParser.create().parse_overrides(args):
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            overrides.append(f"{override.get_key_element()}={first}")
        else:
            overrides.append(override.input_line)
    compose(overrides, config_name=COMPOSED[argv[0]])


def check_files_sent(block: Block, workdir: Path) -> None:
    """A block that is not run may still send a file the pages made (``curl --data-binary @images/x.png``): that file
    must exist when the block comes, written by a block before it."""
    for argv in commands(block.code):
        for word in argv:
            if word.startswith("@") and len(word) > 1:
                assert (workdir / word[1:]).is_file(), (
                    f"{block.where}: `{word}` sends {word[1:]!r}, which no block before it writes (in this folder: "
                    f"{sorted(str(p.relative_to(workdir)) for p in (workdir / word[1:]).parent.glob('*'))[:8]})"
                )


@dataclass
class Tally:
    python: int = 0
    shell: int = 0
    commands: int = 0
    composed: int = 0
    not_run: List[str] = field(default_factory=list)
    seconds: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # wall and CPU time of each block run


def run_document(path: Path, workdir: Path, tally: Tally, namespace: Dict) -> None:
    """Run the code blocks of one Markdown file in ``workdir`` (see the module docstring)."""
    scripts = console_scripts()
    for block in extract_blocks(path):
        if block.lang != "python" and block.lang not in SHELL:
            continue
        kind, value = block.marker or ("run", "")
        if kind == "not-run":
            assert len(value) > 10, f"{block.where}: a not-run marker needs its reason"
            tally.not_run.append(f"{block.where}: {value}")
            if block.lang in SHELL:
                for argv in composable(block.code):
                    compose_command(argv)
                    tally.composed += 1
                check_files_sent(block, workdir)
            continue
        started = time.perf_counter(), time.process_time()
        with chdir(workdir):
            if block.lang == "python":
                exec(compile(block.code, block.where, "exec"), namespace)
                tally.python += 1
                tally.seconds[block.where] = (time.perf_counter() - started[0], time.process_time() - started[1])
                continue
            extra = shlex.split(value) if kind == "run-with" else []
            for argv in commands(block.code):
                assert argv[0] in scripts, (
                    f"{block.where}: `{shlex.join(argv)}` is not a console script of this package; make the block "
                    "runnable (vpt-* commands only) or put <!-- not-run: REASON --> before it"
                )
                run_console_script(argv + extra if argv[0] in COMPOSED else argv)
                tally.commands += 1
            tally.shell += 1
            tally.seconds[block.where] = (time.perf_counter() - started[0], time.process_time() - started[1])


def nav_pages() -> List[Path]:
    """The pages of ``mkdocs.yml``'s nav, in order."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    pages: List[str] = []

    def walk(node):
        if isinstance(node, str):
            pages.append(node)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(config["nav"])
    return [ROOT / "docs" / page for page in pages]


def report(name: str, tally: Tally) -> str:
    slowest = sorted(tally.seconds.items(), key=lambda item: -item[1][1])[:5]
    wall, cpu = (sum(times[i] for times in tally.seconds.values()) for i in (0, 1))
    lines = [
        f"{name}: ran {tally.python} python and {tally.shell} shell blocks ({tally.commands} commands) in "
        f"{wall:.0f} s ({cpu:.0f} s CPU); {len(tally.not_run)} blocks not run ({tally.composed} of their "
        "commands composed):"
    ]
    lines += [f"  not run: {item}" for item in tally.not_run]
    return "\n".join(lines + [f"  slowest: {where} {w:.1f} s ({c:.1f} s CPU)" for where, (w, c) in slowest])


@pytest.fixture
def offline(monkeypatch):
    """No network (the Hub and timm read their caches only, W&B stays offline); afterwards the registries that the
    pages extend (a backbone family, a tuning method, a head) and the root logger's handlers are restored, so no
    other test sees the pages' classes or writes into their run folders' logs."""
    for var, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(var, value)
    import vpt_lightning.backbones.registry
    import vpt_lightning.heads
    import vpt_lightning.methods.registry

    saved = [
        (module, name, dict(value))
        for module in (vpt_lightning.backbones.registry, vpt_lightning.methods.registry, vpt_lightning.heads)
        for name, value in vars(module).items()
        if isinstance(value, dict) and name.startswith("_")
    ]
    root_handlers, root_level = logging.root.handlers[:], logging.root.level  # Hydra's runs add handlers
    yield
    for module, name, value in saved:
        registry = getattr(module, name)
        registry.clear()
        registry.update(value)
    for handler in logging.root.handlers[:]:
        if handler not in root_handlers and not type(handler).__module__.startswith("_pytest"):
            logging.root.removeHandler(handler)
            handler.close()
    logging.root.setLevel(root_level)


def test_readme_code_runs_as_written(tmp_path, offline, capsys):
    tally = Tally()
    run_document(ROOT / "README.md", tmp_path, tally, {"__name__": "__main__"})
    summary = report("README.md", tally)
    with capsys.disabled():
        print("\n" + summary)
    assert tally.not_run and tally.composed >= 1, summary  # the set-up commands; the quickstart's is composed


def test_readme_is_short_and_its_test_command_is_cis():
    """The README is the door (at most 250 lines; everything else lives once on the docs site), and its test command
    is the one CI runs (``.ci/run``'s last line)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move the detail to a page of docs/"
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in [block.code for block in extract_blocks(ROOT / "README.md")]


def test_docs_code_runs_as_written(tmp_path, offline, capsys):
    """Every page, in nav order, in one folder (a user following the site)."""
    tally = Tally()
    for page in nav_pages():
        run_document(page, tmp_path, tally, {"__name__": "__main__"})
        if page.name == "getting-started.md":  # before other pages add to the run folder (vpt-viz's viz/)
            check_run_folder_described(tmp_path / "outputs" / "orientation" / "smoke")
    summary = report("docs/", tally)
    with capsys.disabled():
        print("\n" + summary)
    assert (tmp_path / "outputs" / "orientation" / "smoke" / "task" / "config.json").is_file()
    # skipping stays the exception: most blocks of the site run
    assert len(tally.not_run) < tally.python + tally.shell, summary


RUN_HOUSEKEEPING = {".lock", "train.log"}  # the run's lock file and Hydra's job log: not what a user opens


def check_run_folder_described(run_dir: Path) -> None:
    """What a run leaves (the smoke run of "Getting started") is what the README and "Getting started" say it leaves:
    each entry of the run folder is named in the README's paragraph on the run folder and in the page's table."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if p.name not in RUN_HOUSEKEEPING)
    readme = next(
        paragraph for paragraph in (ROOT / "README.md").read_text().split("\n\n") if "leaves a run folder" in paragraph
    )
    page = (ROOT / "docs" / "getting-started.md").read_text()
    for entry in entries:  # `csv/metrics.csv` names csv/, `task/` names task/
        assert f"`{entry}" in readme, f"the README's run folder paragraph does not name {entry!r} (the run: {entries})"
        assert f"`{entry}" in page, f"getting-started.md does not name {entry!r} (the run: {entries})"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as ``mkdocs build --strict`` writes it."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    site = tmp_path_factory.mktemp("docs") / "site"
    with chdir(ROOT):
        build(load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(site)))
    return site


def test_mkdocs_build_strict(site):
    """``mkdocs build --strict``: every page in the nav, every link and anchor resolves, the API reference renders
    from the docstrings, the generated ``--help`` and option tables build; offline (no fonts or plugins that
    download)."""
    assert (site / "index.html").is_file()
    page = (site / "commands" / "vpt-predict" / "index.html").read_text()
    assert "--max-image-pixels" in page  # the generated --help
    reference = (site / "reference" / "module" / "index.html").read_text()
    assert "build_head" in reference  # rendered from VPTModule's docstrings
    assert "fonts.googleapis.com" not in (site / "index.html").read_text()


def test_docs_cover_every_command_and_config_group():
    """A page per console script, with its generated --help; the config-groups page covers every group of conf/."""
    pages = {page.stem: page.read_text() for page in nav_pages()}
    for script in console_scripts():
        assert script in pages, f"no docs/commands/{script}.md in mkdocs.yml's nav"
        assert f"<!-- cli-help: {script} -->" in pages[script]
    conf = ROOT / "src" / "vpt_lightning" / "conf"
    groups = sorted({str(p.parent.relative_to(conf)) for p in conf.rglob("*.yaml") if p.parent != conf})
    listed = set(re.findall(r"<!-- config-options: (\S+) -->", pages["config-groups"]))
    assert set(groups) == listed, f"config groups of conf/ {groups} vs the page's {sorted(listed)}"


def test_block_runner_refuses_what_it_cannot_run(tmp_path):
    """The runner fails on a shell command that is not ours, a not-run without reason and a failing command,
    skips marked blocks, and composes their commands (a misspelt option fails)."""
    doc = tmp_path / "doc.md"

    def run(text: str) -> Tally:
        doc.write_text(text)
        tally = Tally()
        run_document(doc, tmp_path, tally, {})
        return tally

    with pytest.raises(AssertionError, match="not a console script"):
        run("```bash\ncurl -s http://127.0.0.1:8000/tasks\n```\n")
    with pytest.raises(AssertionError, match="needs its reason"):
        run("<!-- not-run: x -->\n```bash\nvpt-train\n```\n")
    with pytest.raises(AssertionError, match="exited with 2"):
        run("```bash\nvpt-report --no-such-option\n```\n")
    with pytest.raises(AssertionError, match="sends 'images/a.png', which no block before it writes"):
        run("<!-- not-run: starts a server in the background -->\n```bash\ncurl --data-binary @images/a.png URL\n```\n")
    with pytest.raises(AssertionError, match="prompt.no_such_key=1` exited"):  # run-with adds its arguments
        run("<!-- run-with: prompt.no_such_key=1 -->\n```bash\nvpt-train +experiment=quickstart --cfg job\n```\n")
    tally = run(
        "text\n\n<!-- not-run: needs a GPU and VTAB-1k -->\n```bash\n"
        "vpt-train +experiment=vtab_cifar100 data.root=DIR trainer=gpu  # comment\n"
        "vpt-tune -m +experiment=vtab_cifar100,vtab_svhn tuning=vpt_deep,linear\n"
        "vpt-tune ... protocol.search=optuna\n```\n\n```text\nnot code\n```\n"
        "```python\nx = 1 + 1\n```\n"
    )
    assert (tally.python, tally.shell, tally.composed, len(tally.not_run)) == (1, 0, 2, 1)
    with pytest.raises(Exception, match="tuning"):
        run(
            "<!-- not-run: needs a GPU and VTAB-1k -->\n"
            "```bash\nvpt-train +experiment=quickstart tuning=vpt_deeep\n```\n"
        )


# ---- what the generated parts of the pages look like -----------------------------------------------------------------
def _hooks():
    """docs/hooks.py, the MkDocs hooks that generate the --help blocks and the option tables."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_help_fits_the_code_block_and_is_plain_text():
    """Every ``--help`` of the pages fits a code block of mkdocs-material without scrolling sideways (80 columns:
    measured in Chromium, see docs/hooks.py) and shows no reStructuredText markup of the module docstrings."""
    hooks = _hooks()
    pages = "\n".join(page.read_text() for page in nav_pages())
    commands_ = re.findall(r"<!-- cli-help: ([^>]+?) -->", pages)
    assert len(commands_) >= 12
    for command in commands_:
        fence, *lines, end = hooks.cli_help(command).splitlines()
        assert (fence, end) == ("```text", "```")
        too_long = [line for line in lines if len(line) > hooks.HELP_COLUMNS]
        assert not too_long, f"{command} --help: {len(too_long)} lines over {hooks.HELP_COLUMNS}: {too_long[:2]}"
        text = "\n".join(lines)
        assert "``" not in text and not re.search(r":[a-z]+:`", text), f"{command} --help shows RST markup"
    assert hooks.HELP_COLUMNS <= 80


def test_the_option_tables_never_break_an_option_name():
    """The config-options tables show each option name whole (a `<code>` that CSS keeps on one line), and the CSS
    file that does it is one of the site's stylesheets."""
    hooks = _hooks()
    table = hooks.config_options("backbone")
    assert '<code class="option-name">swin_base_patch4_window7_224_in22k</code>' in table
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    (css,) = [ROOT / "docs" / path for path in config["extra_css"]]
    assert re.search(r"code\.option-name\s*\{[^}]*white-space:\s*nowrap", css.read_text())


# what a reader sees of a page, measured in the browser: the generated --help blocks (`$ vpt-... --help`) and those
# wider than their box, the option names on more than one line, each image's shown and natural width and the content's
_MEASURE = """() => {
  const blocks = [...document.querySelectorAll('.md-typeset pre > code')].filter(b => b.textContent.startsWith('$ '));
  const names = [...document.querySelectorAll('.md-typeset code.option-name')];
  const images = [...document.querySelectorAll('.md-typeset img')];
  const content = document.querySelector('.md-content .md-typeset').clientWidth;
  return {
    scrolling: blocks.filter(b => b.scrollWidth > b.clientWidth + 1).map(b => b.textContent.split('\\n')[0]),
    broken: names.filter(n => n.getClientRects().length > 1).map(n => n.textContent),
    helps: blocks.length,
    names: names.length,
    images: images.map(i => [i.getAttribute('src'), i.clientWidth, i.naturalWidth, content]),
  };
}"""


def test_the_site_reads_without_scrolling_or_broken_names_in_a_browser(site):
    """In a real browser (headless Chromium, 1280 px wide): no generated --help block scrolls sideways, no option
    name of the config-groups tables is broken across lines, and the vpt-viz figures are shown one per row at
    their full size or the content's width (not as thumbnails)."""
    from conftest import CHROMIUM_ARGS, chromium
    from playwright.sync_api import sync_playwright

    executable = chromium()
    pages = [f"commands/{script}" for script in console_scripts()] + ["config-groups"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            seen = {}
            for name in pages:
                page.goto((site / name / "index.html").as_uri())
                seen[name] = page.evaluate(_MEASURE)
        finally:
            browser.close()
    assert all(seen[name]["helps"] >= 1 for name in pages[:-1])
    scrolling = {name: got["scrolling"] for name, got in seen.items() if got["scrolling"]}
    assert not scrolling, f"--help blocks that scroll sideways: {scrolling}"
    assert seen["config-groups"]["names"] > 50 and not seen["config-groups"]["broken"], seen["config-groups"]["broken"]
    figures = seen["commands/vpt-viz"]["images"]
    assert len(figures) == 4
    for src, shown, natural, content in figures:
        assert shown == min(natural, content), f"{src}: shown {shown} px wide of its {natural} (content: {content})"


def test_every_code_fence_of_the_readme_and_the_site_is_closed():
    """An unclosed ``` turns the rest of its page into one code block (mkdocs builds it without a warning)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    odd = [str(p.relative_to(ROOT)) for p in pages if len(re.findall(r"^\s*```", p.read_text(), re.M)) % 2]
    assert len(pages) > 20 and odd == []
