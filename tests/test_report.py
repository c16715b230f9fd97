"""vpt-report's figure (report.png) and how the report names the backbone: checked through the numbers it plots and
matplotlib's objects (bars, error bars, title, legend placement)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from vpt_lightning.protocol.paper import reference
from vpt_lightning.protocol.report import find_summaries, report_figure, results_table, to_markdown, write_report
from vpt_lightning.protocol.task_protocol import mean_std

QUICKSTART_BACKBONE = "quickstart_vit (vit_tiny_patch16_224: depth 6, width 96, 3 heads, 32 px, patch 4)"


def _summary(task, tuning, tests, backbone="vit_base_patch16_224.orig_in21k"):
    return {
        "task_name": task,
        "tuning": tuning,
        "method": tuning,
        "backbone": backbone,
        "test_top1_per_seed": {str(i): t for i, t in enumerate(tests)},
        "test_top1": mean_std(tests),
        "trainable_params": 10,
        "trainable_percent": 0.5,
    }


def _bars(figure):
    """``(label, x, height, error bar or None)`` of every bar of the figure's one chart."""
    (ax,) = [ax for ax in figure.axes if ax.containers]
    found = []
    for container in ax.containers:
        if not hasattr(container, "patches"):
            continue
        segments = container.errorbar.lines[2][0].get_segments() if container.errorbar is not None else None
        for k, patch in enumerate(container.patches):
            error = None
            if segments is not None:
                (_, low), (_, high) = segments[k]
                error = (high - low) / 2
            found.append((container.get_label(), patch.get_x() + patch.get_width() / 2, patch.get_height(), error))
    return ax, found


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_report_png_groups_bars_per_task_with_seed_error_bars_and_the_papers_beside(tmp_path):
    seeds = {("vtab_cifar100", "vpt_deep"): [0.70, 0.74, 0.75], ("vtab_dtd", "vpt_deep"): [0.6, 0.64]}
    summaries = [_summary(task, tuning, tests) for (task, tuning), tests in seeds.items()]
    summaries.append(_summary("vtab_cifar100", "linear", [0.5]))
    table = results_table(summaries)
    figure, bars = report_figure(table)
    ax, drawn = _bars(figure)
    # one bar per (task, label) run and one per paper number of those labels on those tasks, where it is known
    ours = {(b.task, b.label): b for b in bars if b.source == "ours"}
    paper = {(b.task, b.label): b for b in bars if b.source == "paper"}
    assert set(ours) == {("vtab_cifar100", "vpt_deep"), ("vtab_dtd", "vpt_deep"), ("vtab_cifar100", "linear")}
    assert set(paper) == set(ours) | {("vtab_dtd", "linear")}  # the paper's number even where we have no run
    for (task, tuning), bar in paper.items():
        assert bar.value == pytest.approx(reference(task, tuning))
    for key, tests in seeds.items():
        assert ours[key].value == pytest.approx(100 * statistics.fmean(tests))
        assert ours[key].std == pytest.approx(100 * statistics.stdev(tests))
    assert ours["vtab_cifar100", "linear"].std is None  # one seed: no error bar
    # what matplotlib drew: the same heights, error bars of the std where there are several seeds
    assert len(drawn) == len(bars) == 7
    heights = sorted((round(h, 6), None if e is None else round(e, 6)) for _, _, h, e in drawn)
    expected = sorted((round(b.value, 6), None if b.std is None else round(b.std, 6)) for b in bars)
    for (h, e), (v, s) in zip(heights, expected):
        assert h == pytest.approx(v) and (e == pytest.approx(s) if s else not e)
    labels = {label for label, *_ in drawn}
    assert labels == {"vpt_deep (ours)", "vpt_deep (paper)", "linear (ours)", "linear (paper)"}
    # grouped: every bar of a task sits around that task's tick
    ticks = dict(zip([t.get_text() for t in ax.get_xticklabels()], ax.get_xticks()))
    assert set(ticks) == {"vtab_cifar100", "vtab_dtd"}
    for bar in bars:
        assert abs(bar.x - ticks[bar.task]) < 0.5
    # readable: a title, axis labels, a legend outside the bars
    assert "test top-1" in figure.get_suptitle() and "3 seeds" in figure.get_suptitle()
    assert ax.get_ylabel() == "test top-1 (%)" and ax.get_xlabel() == "task"
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(_overlaps(legend, patch.get_window_extent(renderer)) for patch in ax.patches)
    assert not _overlaps(legend, ax.get_window_extent(renderer))
    import matplotlib.pyplot as plt

    plt.close(figure)


def test_report_png_of_one_quickstart_protocol_is_one_labelled_bar(tmp_path):
    """A task outside the paper (the quickstart), one method, one seed: one bar, its value on it, no error bar, and
    a title that says one seed and names the backbone."""
    summaries = [_summary("quickstart", "vpt_deep", [0.618], backbone="vit_tiny_patch16_224")]
    table = results_table(summaries)
    figure, bars = report_figure(table)
    ax, drawn = _bars(figure)
    assert [(b.source, b.value, b.std) for b in bars] == [("ours", pytest.approx(61.8), None)]
    assert len(drawn) == 1 and drawn[0][3] is None
    assert [t.get_text() for t in ax.texts] == ["61.8"]
    assert "1 seed" in figure.get_suptitle()
    import matplotlib.pyplot as plt

    plt.close(figure)
    paths = write_report(summaries, tmp_path)
    assert paths["png"].stat().st_size > 5000


def _protocol_folder(root: Path, backbone: dict) -> Path:
    """A vpt-tune protocol folder: summary.json and its final run's results.json (which records the config)."""
    final = root / "quickstart" / "protocol" / "vpt_deep" / "final" / "lr1_wd0" / "seed42"
    final.mkdir(parents=True)
    (final / "results.json").write_text(json.dumps({"config": {"backbone": backbone}, "test/top1": 0.6}))
    summary = _summary("quickstart", "vpt_deep", [0.6], backbone=backbone["name"])
    (final.parents[2] / "summary.json").write_text(json.dumps(summary))
    return root


def test_report_names_the_backbone_by_what_it_is(tmp_path):
    """The quickstart's backbone is the packaged quickstart_vit (6 blocks, width 96, 32 px), not the timm model whose
    name it borrows; a summary whose runs are gone is named by the summary's timm name."""
    from vpt_lightning.backbones.pin import backbone_pin

    quickstart = backbone_pin("quickstart_vit").to_dict()
    summaries = find_summaries([_protocol_folder(tmp_path / "a", quickstart)])
    table = results_table(summaries)
    assert table.backbones == [QUICKSTART_BACKBONE]
    assert f"Backbone: {QUICKSTART_BACKBONE}." in to_markdown(table)
    figure, _ = report_figure(table)
    assert QUICKSTART_BACKBONE in " ".join(figure.get_suptitle().split())
    import matplotlib.pyplot as plt

    plt.close(figure)
    gone = [{**summaries[0], "path": str(tmp_path / "nowhere" / "summary.json")}]
    assert results_table(gone).backbones == ["vit_tiny_patch16_224"]
    assert np.isfinite(table.cells["quickstart", "vpt_deep"]["test_top1"]["mean"])
