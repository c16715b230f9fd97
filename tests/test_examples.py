"""Every script in examples/ runs as a user runs it (a subprocess, its documented commands) and ends above the
quickstart's linear probe trained in this session under the same budget (epochs and data sizes).

The linear probe is the quickstart's comparison run (``vpt-train +experiment=quickstart tuning=linear
optim.base_lr=1.0``), here on the examples' orientation data sizes and epochs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
# the custom-head example's budget (its defaults: the run a user gets), which the linear probe also gets
EPOCHS = 5
DATA = {"num_train": 2000, "num_val": 500, "num_test": 1000}  # the quickstart's own sizes


def run(args, cwd: Path, timeout: int = 3600) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_score(run_dir: Path) -> float:
    return 100 * json.loads((run_dir / "results.json").read_text())["test/top1"]


test_score.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def linear_probe_top1(tmp_path_factory) -> float:
    """Test top-1 (%) of the quickstart's linear probe under the examples' budget."""
    out = tmp_path_factory.mktemp("linear_probe")
    run(
        [
            BIN / "vpt-train",
            "+experiment=quickstart",
            "tuning=linear",
            "optim.base_lr=1.0",
            f"trainer.max_epochs={EPOCHS}",
            *(f"data.{k}={v}" for k, v in DATA.items()),
            f"paths.output_dir={out}",
            "run_name=probe",
            "trainer.enable_progress_bar=false",
        ],
        cwd=out,
    )
    top1 = test_score(out / "quickstart" / "probe")
    print(f"quickstart linear probe, {EPOCHS} epochs: test top-1 {top1:.1f}%")
    return top1


def test_every_example_has_a_test():
    tested = {"custom_head.py", "eurosat_like_tree.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_custom_head_example_learns_above_the_linear_probe(tmp_path, linear_probe_top1):
    # the example's own defaults: the run its docstring shows
    out = run([sys.executable, EXAMPLES / "custom_head.py"], cwd=tmp_path)
    top1 = float(re.search(r"test top-1 with a cosine head: ([\d.]+)%", out).group(1))
    print(f"custom_head.py: test top-1 {top1:.1f}% (linear probe {linear_probe_top1:.1f}%)")
    assert top1 > linear_probe_top1


def test_eurosat_like_tree_example_runs_the_vtab_route_above_the_linear_probe(tmp_path, linear_probe_top1):
    # the three commands of the example's docstring, as written there (2 epochs)
    tv, vtab = tmp_path / "tv", tmp_path / "vtab-1k"
    out = run([sys.executable, EXAMPLES / "eurosat_like_tree.py", tv], cwd=tmp_path)
    assert "wrote 1400 images" in out
    out = run([BIN / "vpt-prepare", "vtab", "--tasks", "eurosat", "--source", tv, "--out", vtab], cwd=tmp_path)
    assert "'train800': 800, 'val200': 200, 'test': 280" in out
    run(
        [
            BIN / "vpt-train",
            "+experiment=vtab_eurosat",
            f"data.root={vtab}",
            "backbone=quickstart_vit",
            "trainer.max_epochs=2",
            "data.split=final",
            f"paths.output_dir={tmp_path / 'outputs'}",
            "run_name=eurosat",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
    )
    top1 = test_score(next((tmp_path / "outputs").glob("*/eurosat")))
    print(f"eurosat_like_tree.py route: test top-1 {top1:.1f}% (linear probe {linear_probe_top1:.1f}%)")
    assert top1 > linear_probe_top1
