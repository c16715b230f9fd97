"""The tree is clean under ruff (lint and format, configured in ``pyproject.toml``), so CI's test command checks
the style too."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_check_finds_nothing():
    result = _ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    result = _ruff("format", "--no-cache", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_reads_the_project_settings(tmp_path):
    # a line over pyproject.toml's 120 columns is reported, one at 120 is not: the settings are the project's
    long_line = tmp_path / "long.py"
    long_line.write_text("x = " + "1 + " * 40 + "1\n")
    fine = tmp_path / "fine.py"
    fine.write_text("x = '" + "a" * 114 + "'\n")
    assert len(fine.read_text().rstrip("\n")) == 120
    config = str(ROOT / "pyproject.toml")
    assert _ruff("check", "--no-cache", "--config", config, "--select", "E501", str(long_line)).returncode == 1
    assert _ruff("check", "--no-cache", "--config", config, "--select", "E501", str(fine)).returncode == 0
