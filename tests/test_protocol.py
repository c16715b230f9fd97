"""vpt-tune's protocol (sweep -> select -> final seeds, resume) and vpt-report's tables."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from vpt_lightning.config import compose
from vpt_lightning.data.registry import vtab_tasks
from vpt_lightning.protocol import grid_points, mean_std, run_protocol, select_best
from vpt_lightning.report import build_report, write_report
from vpt_lightning.training import train

TINY = ["backbone=vit_tiny_random", "+debug=fast", "data.num_train=32", "data.num_val=16", "data.num_test=16",
        "data.batch_size=16", "protocol.base_lr=[0.5,2]", "protocol.weight_decay=[0,0.001]", "protocol.seeds=[1,2]"]


def test_selection_takes_best_last_epoch_val_and_breaks_ties_by_smaller_lr():
    runs = [
        {"point": {"base_lr": 5.0, "weight_decay": 0.0}, "val/top1": 0.7},
        {"point": {"base_lr": 1.0, "weight_decay": 0.01}, "val/top1": 0.7},
        {"point": {"base_lr": 1.0, "weight_decay": 0.001}, "val/top1": 0.7},
        {"point": {"base_lr": 0.1, "weight_decay": 0.0}, "val/top1": 0.6},
    ]
    assert select_best(runs)["point"] == {"base_lr": 1.0, "weight_decay": 0.001}
    with pytest.raises(ValueError):
        select_best([])


def test_mean_std_against_statistics():
    values = [0.61, 0.64, 0.58]
    assert mean_std(values) == {"mean": pytest.approx(sum(values) / 3), "std": pytest.approx(statistics.stdev(values))}
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0}


def test_grid_uses_the_lower_grid_for_tuned_backbones():
    cfg = compose(["protocol.num_tokens=[5,10]"], config_name="tune")
    points = grid_points(cfg.protocol, tunes_backbone=False)
    assert len(points) == 2 * 10 * 4 and {p["num_tokens"] for p in points} == {5, 10}
    assert {p["base_lr"] for p in grid_points(cfg.protocol, tunes_backbone=True)} == {0.005, 0.001, 0.0005, 0.0001}


def test_protocol_sweeps_selects_runs_seeds_and_resumes(tmp_path):
    cfg = compose(TINY, config_name="tune")
    calls = []

    def counting_train(job):
        calls.append((job.run_dir, job.ckpt_path, job.optim.base_lr, job.data.split, job.seed))
        return train(job)

    summary = run_protocol(cfg, tmp_path, counting_train)
    sweep_dirs = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert sweep_dirs == ["lr0.5_wd0", "lr0.5_wd0.001", "lr2_wd0", "lr2_wd0.001"] and len(calls) == 6
    vals = {(r["point"]["base_lr"], r["point"]["weight_decay"]): r["val/top1"] for r in summary["sweep"]}
    best = max(vals.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
    assert (summary["selected"]["base_lr"], summary["selected"]["weight_decay"]) == best
    finals = [c for c in calls if c[3] == "final"]
    assert [c[4] for c in finals] == [1, 2] and all(c[2] == best[0] for c in finals)
    per_seed = [json.loads((tmp_path / "final" / f"seed{s}" / "results.json").read_text())["test/top1"] for s in (1, 2)]
    assert summary["test_top1"]["mean"] == pytest.approx(sum(per_seed) / 2)
    # finished runs are not repeated; a run that stopped half-way resumes from its last checkpoint
    (tmp_path / "final" / "seed2" / "results.json").unlink()
    calls.clear()
    again = run_protocol(cfg, tmp_path, counting_train)
    assert [(Path(c[0]).name, Path(c[1]).name if c[1] else None) for c in calls] == [("seed2", "last.ckpt")]
    assert again["selected"] == summary["selected"]
    assert (tmp_path / "summary.md").read_text().startswith("# train / vpt_deep")


def test_vpt_tune_command_writes_a_summary(tmp_path):
    exe = Path(sys.executable).parent / "vpt-tune"
    proc = subprocess.run([str(exe), *TINY, "protocol.seeds=[3]", "task_name=demo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "outputs" / "demo" / "protocol" / "vpt_deep" / "summary.json").read_text())
    assert list(summary["test_top1_per_seed"]) == ["3"] and "test top-1 at the last epoch" in proc.stdout


def _summary(task, tuning, tests, percent=0.5):
    return {"task_name": task, "tuning": tuning, "test_top1_per_seed": {str(i): t for i, t in enumerate(tests)},
            "test_top1": mean_std(tests), "trainable_params": 10, "trainable_percent": percent}


def test_report_means_only_over_complete_sets_and_shows_missing(tmp_path):
    natural = [t.config_name for t in vtab_tasks("natural")]
    summaries = [_summary(task, "vpt_deep", [0.5 + 0.01 * i, 0.52 + 0.01 * i]) for i, task in enumerate(natural)]
    summaries.append(_summary("vtab_eurosat", "vpt_deep", [0.9]))
    summaries.append(_summary("vtab_cifar100", "linear", [0.4]))
    markdown, table = build_report(summaries)
    expected_natural = statistics.fmean(100 * (0.51 + 0.01 * i) for i in range(7))
    # columns follow the paper's order of methods: linear before vpt_deep
    assert f"| VTAB natural (mean of 7) | incomplete (1/7) | {expected_natural:.2f} |" in markdown
    assert "| VTAB specialized (mean of 4) | incomplete (0/4) | incomplete (1/4) |" in markdown
    assert "| VTAB mean of the 3 group means | incomplete (0/3) | incomplete (1/3) |" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| vtab_eurosat"))
    assert "90.00 ± 0.00" in row and "—" in row and "96.1" in row  # ours, missing linear, the paper's VPT-Deep
    assert "| vtab_cifar100 | 40.00 ± 0.00 (0.50% params) | 51.00 ± 1.41 (0.50% params) | 63.4 | 78.8 |" in markdown
    rows = list(csv.DictReader(table.splitlines()))
    assert len(rows) == 9 and {r["tuning"] for r in rows} == {"vpt_deep", "linear"}
    paths = write_report(summaries, tmp_path)
    assert paths["png"].stat().st_size > 1000 and paths["csv"].read_text() == table
