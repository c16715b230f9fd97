"""Result tables in the paper's layout from ``vpt-tune`` summaries: Markdown, CSV and a PNG chart.

Per task and tuning strategy: test top-1 mean ± std over seeds (last epoch) next to the paper's number (the
paper's backbone that the runs used: per-task numbers for ViT-B/16 ImageNet-21k, VTAB-1k group means for MAE,
MoCo v3, Swin-B, ConvNeXt-B and ResNet-50; ViT-B/16 ImageNet-21k for a backbone the paper lacks). VTAB-1k
group means, the mean of the three group means and the mean over the 19 tasks, and the FGVC mean are computed
only over complete sets: with a task missing, the mean is shown as ``incomplete (k/n)``, never averaged as zero
or over what happens to be there. Tasks outside the registry (e.g. mini-VTAB) get per-task rows only.

The table is built once (:func:`results_table`, a :class:`ResultsTable`) and written by :func:`to_markdown`,
:func:`to_csv` and :func:`to_png`; its columns follow the method registry's report order.
"""

from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..data.registry import TASKS, VTAB_GROUPS, fgvc_tasks, vtab_tasks
from ..methods import get_method, methods_in_report_order
from ..runs.atomic import atomic_path, write_text_atomic
from ..sharing.csv_files import csv_text, write_csv_atomic
from ..sharing.regular_files import RefusedFileError, read_json_file
from .paper import BACKBONES, DEFAULT_BACKBONE, METHODS, backbone_key, group_means, reference

SUMMARY_FILE = "summary.json"  # what vpt-tune writes per protocol folder and the report reads

MISSING = "—"


def collect(summaries: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[str], Dict[Tuple[str, str], Dict]]:
    """Tasks, tuning strategies, and ``(task, tuning) -> summary``.

    Tasks come in registry order, every task of a benchmark once any of its tasks is present (so that a missing
    task shows as a row), then tasks outside the registry by name. Two summaries of the same task and strategy
    (another backbone, or Partial-k with another k under one name) are an error naming both files.
    """
    cells: Dict[Tuple[str, str], Dict] = {}
    for summary in summaries:
        key = (summary["task_name"], summary["tuning"])
        if key in cells:
            raise ValueError(
                f"two results for task {key[0]!r} / tuning {key[1]!r}: {cells[key].get('path', '?')} and "
                f"{summary.get('path', '?')}; report them separately (vpt-report DIR --out OUT for each)"
            )
        cells[key] = summary
    present = {task for task, _ in cells}
    benchmarks = {TASKS[t].benchmark for t in present if t in TASKS}
    ordered = [name for name, info in TASKS.items() if info.benchmark in benchmarks] + sorted(present - set(TASKS))
    tunings = sorted({tuning for _, tuning in cells}, key=lambda t: (_order(method_name(t, cells)), t))
    return ordered, tunings, cells


def paper_method(tuning: str, cells: Dict[Tuple[str, str], Dict]) -> Optional[str]:
    """The paper's method key of a run label, through the tuning-method registry (``None`` if the paper has none).

    Summaries record their ``method`` (older ones only the label, which is then taken as the method's name).
    """
    try:
        return get_method(method_name(tuning, cells)).paper_method
    except ValueError:  # a label of no registered method (e.g. from a subclass of VPTModule)
        return None


def method_name(tuning: str, cells: Dict[Tuple[str, str], Dict]) -> str:
    """The tuning method of a run label (older summaries only carry the label, then taken as the method's name)."""
    return next((c.get("method", tuning) for (_, t), c in cells.items() if t == tuning), tuning)


def _order(method: str) -> int:
    """The column position of a method: the registry's report order; labels of no registered method last."""
    order = methods_in_report_order()
    return order.index(method) if method in order else len(order)


def set_mean(values: Dict[str, Optional[float]], names: Sequence[str]) -> Optional[float]:
    """Mean over ``names`` if every one has a value, else ``None``."""
    got = [values.get(n) for n in names]
    return statistics.fmean(got) if got and all(v is not None for v in got) else None


AggregateRow = Tuple[str, Optional[float], int, int]  # label, value (None: incomplete), present, total


def set_row(label: str, means: Dict[str, Optional[float]], names: Sequence[str]) -> AggregateRow:
    """The mean of ``names`` as an aggregate row (``None`` unless every one has a value)."""
    return label, set_mean(means, names), sum(means.get(n) is not None for n in names), len(names)


def aggregates(means: Dict[str, Optional[float]]) -> List[AggregateRow]:
    """Rows for the VTAB groups, the mean of the group means, the 19-task mean and the FGVC mean."""
    rows = [
        set_row(f"VTAB {group} (mean of {len(vtab_tasks(group))})", means, [t.config_name for t in vtab_tasks(group)])
        for group in VTAB_GROUPS
    ]
    complete = [value for _, value, _, _ in rows if value is not None]
    rows.append(
        ("VTAB mean of the 3 group means", statistics.fmean(complete) if len(complete) == 3 else None, len(complete), 3)
    )
    rows.append(set_row("VTAB mean over the 19 tasks", means, [t.config_name for t in vtab_tasks()]))
    rows.append(set_row("FGVC mean of 5", means, [t.config_name for t in fgvc_tasks()]))
    return rows


def group_aggregates(means: Dict[str, Optional[float]], groups: Dict[str, List[str]]) -> List[AggregateRow]:
    """Rows for groups of tasks outside the registry (``task_group`` of their runs)."""
    return [
        set_row(f"{group} (mean of {len(names)}: {', '.join(names)})", means, names)
        for group, names in sorted(groups.items())
    ]


def report_backbone(summaries: Sequence[Dict[str, Any]]) -> str:
    """The paper backbone (a key of :data:`~vpt_lightning.protocol.paper.BACKBONES`) whose numbers go beside the runs:
    the one every run used, else (mixed, or a backbone the paper lacks) the default ViT-B/16 ImageNet-21k."""
    keys = {backbone_key(s.get("backbone"), s.get("backbone_reference")) for s in summaries}
    return keys.pop() if len(keys) == 1 and None not in keys else DEFAULT_BACKBONE


def paper_key(tuning: str, cells: Dict[Tuple[str, str], Dict], backbone: str = DEFAULT_BACKBONE) -> Optional[str]:
    """What the paper's numbers of a run label are filed under: its method's paper key; for the group means of
    the other backbones, else the label itself (``partial_1``, ``mlp_3``, ``bias``, ``adapter``)."""
    method = paper_method(tuning, cells)
    return method if method is not None or backbone == DEFAULT_BACKBONE else tuning


def has_paper(key: Optional[str], backbone: str = DEFAULT_BACKBONE) -> bool:
    """Whether the paper reports ``key`` (a :func:`paper_key`) on ``backbone``."""
    if backbone == DEFAULT_BACKBONE and key in METHODS:
        return True
    return key is not None and group_means(backbone, key) is not None


def _paper(task: str, method: Optional[str], backbone: str = DEFAULT_BACKBONE) -> Optional[float]:
    ok = task in TASKS and method is not None and backbone == DEFAULT_BACKBONE
    return reference(task, method) if ok else None


def paper_aggregates(method: Optional[str], backbone: str = DEFAULT_BACKBONE) -> List[Optional[float]]:
    """The paper's aggregate values for its ``method`` on ``backbone``: computed from its per-task numbers like
    ours (default backbone), or its published VTAB-1k group means and their mean (the others)."""
    empty: List[Optional[float]] = [None] * len(aggregates({}))
    if not has_paper(method, backbone):
        return empty
    if backbone != DEFAULT_BACKBONE or method not in METHODS:  # group means, their mean, the 19-task mean implied
        means = group_means(backbone, method)
        sizes = [len(vtab_tasks(group)) for group in VTAB_GROUPS]
        over_tasks = sum(m * n for m, n in zip(means, sizes)) / sum(sizes)
        return [*means, statistics.fmean(means), over_tasks] + empty[5:]
    return [value for _, value, _, _ in aggregates({name: _paper(name, method) for name in TASKS})]


def _pct(value: Optional[float], digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class Aggregate:
    """One aggregate row: per run label, our mean (``None``: incomplete) with how many of how many tasks it has, and
    the paper's value for the labels with a paper column."""

    label: str
    ours: Dict[str, Tuple[Optional[float], int, int]]
    paper: Dict[str, Optional[float]]


@dataclass(frozen=True)
class ResultsTable:
    """What ``vpt-report`` shows of classification runs, built once by :func:`results_table` and written by
    :func:`to_markdown`, :func:`to_csv` and :func:`to_png`.

    Rows are tasks (registry order); columns are run labels (the method registry's report order), then the
    paper's number for the labels it reports.
    """

    tasks: List[str]
    tunings: List[str]
    paper_columns: List[str]
    cells: Dict[Tuple[str, str], Dict[str, Any]]  # (task, label) -> its vpt-tune summary
    paper: Dict[Tuple[str, str], Optional[float]]  # (task, label) -> the paper's per-task number
    aggregates: List[Aggregate]
    benchmark: bool  # some task is a benchmark task: paper columns and the benchmark's means
    backbone: str  # the paper backbone whose numbers are shown (a key of paper.BACKBONES)
    backbones: List[str]  # the backbones the runs used


def results_table(summaries: Sequence[Dict[str, Any]]) -> ResultsTable:
    """The report's table of ``vpt-tune`` summaries: per-task cells, the paper's numbers and the aggregates."""
    tasks, tunings, cells = collect(summaries)
    benchmark = any(task in TASKS for task in tasks)  # paper columns only beside the paper's tasks
    backbone = report_backbone(summaries)
    paper_of = {t: paper_key(t, cells, backbone) for t in tunings}
    with_paper = [t for t in tunings if has_paper(paper_of[t], backbone)] if benchmark else []
    paper = {(task, t): _paper(task, paper_of[t], backbone) for task in tasks for t in tunings}
    per_tuning = {
        t: {task: 100 * cells[task, t]["test_top1"]["mean"] for task in tasks if (task, t) in cells} for t in tunings
    }
    groups: Dict[str, List[str]] = {}  # tasks outside the registry, by the group their runs reported
    for summary in summaries:
        if summary["task_name"] not in TASKS and summary.get("task_group"):
            names = groups.setdefault(summary["task_group"], [])
            names += [summary["task_name"]] if summary["task_name"] not in names else []
    ours = {
        t: (aggregates(per_tuning[t]) if benchmark else []) + group_aggregates(per_tuning[t], groups) for t in tunings
    }
    paper_rows = {t: paper_aggregates(paper_of[t], backbone) + [None] * len(groups) for t in with_paper}
    rows = [
        Aggregate(label, {t: tuple(ours[t][i][1:]) for t in tunings}, {t: paper_rows[t][i] for t in with_paper})
        for i, (label, *_) in enumerate(ours[tunings[0]])
    ]
    backbones = sorted({name for name in map(summary_backbone, summaries) if name})
    return ResultsTable(tasks, tunings, with_paper, cells, paper, rows, benchmark, backbone, backbones)


def final_run_config(summary: Dict[str, Any]) -> Dict[str, Any]:
    """The config of a ``vpt-tune`` summary's final runs, as the first of their ``results.json`` records it (read
    as data: :func:`vpt_lightning.runs.integrity.read_results`); ``{}`` when the summary has no final run on disk."""
    from ..runs.integrity import read_results

    if not summary.get("path"):
        return {}
    for results in sorted((Path(summary["path"]).parent / "final").glob("*/seed*/results.json")):
        config = read_results(results).get("config")
        return config if isinstance(config, dict) else {}
    return {}


def summary_backbone(summary: Dict[str, Any]) -> Optional[str]:
    """The backbone of a summary's runs as :func:`vpt_lightning.sharing.model_card.backbone_description` names it (from
    its final runs' config), else the timm name the summary records."""
    from ..sharing.model_card import backbone_description

    backbone = final_run_config(summary).get("backbone")
    if isinstance(backbone, dict) and backbone.get("name"):
        return backbone_description(backbone)
    return str(summary["backbone"]) if summary.get("backbone") else None


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_cell(cell: Optional[Dict[str, Any]]) -> str:
    if cell is None:
        return MISSING
    test = cell["test_top1"]
    return f"{100 * test['mean']:.2f} ± {100 * test['std']:.2f} ({cell['trainable_percent']:.2f}% params)"


def to_markdown(table: ResultsTable) -> str:
    """The table in Markdown: per task ``mean ± std (trainable %)``, the paper's numbers, the aggregates, a note."""
    columns = [f"{t} (ours)" for t in table.tunings] + [f"{t} (paper)" for t in table.paper_columns]
    md = [_md_row(["task"] + columns), "|" + "---|" * (1 + len(columns))]
    for task in table.tasks:
        row = [task]
        row += [_md_cell(table.cells.get((task, tuning))) for tuning in table.tunings]
        row += [
            f"{value:.1f}" if value is not None else MISSING
            for value in (table.paper[task, t] for t in table.paper_columns)
        ]
        md.append(_md_row(row))
    if table.aggregates:
        md += ["", _md_row(["aggregate"] + columns), "|" + "---|" * (1 + len(columns))]
        for aggregate in table.aggregates:
            shown = [
                f"{value:.2f}" if value is not None else f"incomplete ({present}/{total})"
                for value, present, total in (aggregate.ours[t] for t in table.tunings)
            ]
            shown += [
                f"{aggregate.paper[t]:.2f}" if aggregate.paper[t] is not None else MISSING for t in table.paper_columns
            ]
            md.append(_md_row([aggregate.label] + shown))
    md.append("")
    md.append(
        "Test top-1 (%) at the last epoch, mean ± std over seeds; means only over complete sets."
        + (f" {paper_note(table.backbone)}" if table.benchmark else "")
        + (f" Backbone: {', '.join(table.backbones)}." if table.backbones else "")
    )
    return "\n".join(md) + "\n"


CSV_HEADER = [
    "task",
    "tuning",
    "test_top1_mean",
    "test_top1_std",
    "seeds",
    "trainable_params",
    "trainable_percent",
    "paper_top1",
]


def to_csv(table: ResultsTable) -> str:
    """The table in long CSV form: a line per (task, label), then per (aggregate, label); accuracies in percent,
    like the paper's. Task names and labels come from the summaries' files: text a spreadsheet would run as a
    formula starts with a single quote (:func:`vpt_lightning.sharing.csv_files.csv_text`)."""
    rows: List[List[Any]] = []
    for task in table.tasks:
        for tuning in table.tunings:
            cell, paper = table.cells.get((task, tuning)), _pct(table.paper[task, tuning], 1)
            if cell is None:
                rows.append([task, tuning, "", "", 0, "", "", paper])
                continue
            test = cell["test_top1"]
            rows.append(
                [
                    task,
                    tuning,
                    _pct(100 * test["mean"]),
                    _pct(100 * test["std"]),
                    len(cell["test_top1_per_seed"]),
                    cell["trainable_params"],
                    f"{cell['trainable_percent']:.4f}",
                    paper,
                ]
            )
    for aggregate in table.aggregates:
        for tuning in table.tunings:
            value = aggregate.ours[tuning][0]
            rows.append([aggregate.label, tuning, _pct(value), "", "", "", "", _pct(aggregate.paper.get(tuning))])
    return csv_text(CSV_HEADER, rows)


def build_report(summaries: Sequence[Dict[str, Any]]) -> Tuple[str, str]:
    """Markdown and CSV text of the report (CSV accuracies in percent, like the paper's)."""
    table = results_table(summaries)
    return to_markdown(table), to_csv(table)


def paper_note(backbone: str) -> str:
    """What the paper columns are, for the report's footnote."""
    label = BACKBONES[backbone].label
    if backbone == DEFAULT_BACKBONE:
        return f"Paper aggregates computed from its per-task numbers ({label})."
    return f"Paper: its VTAB-1k group means for {label} (no per-task numbers; paper Tables 2, 4, 5)."


@dataclass(frozen=True)
class ReportBar:
    """One bar of ``report.png``: a task's test top-1 (%) for a run label, ours (mean over ``seeds``, ``std`` over
    them when there are several, else ``None``) or the paper's; ``x`` is where it is drawn."""

    task: str
    label: str
    source: str  # "ours" or "paper"
    value: float
    std: Optional[float]
    seeds: int
    x: float


def report_bars(table: ResultsTable) -> List[ReportBar]:
    """The bars of ``report.png``: per task that has a run, a group; in it per run label our bar then the paper's
    (for the labels the paper reports, where it has a number for the task); a missing run leaves its slot empty."""
    slots = [(t, source) for t in table.tunings for source in ("ours", "paper")]
    slots = [(t, source) for t, source in slots if source == "ours" or t in table.paper_columns]
    width = bar_width(len(slots))
    bars: List[ReportBar] = []
    for k, task in enumerate(figure_tasks(table)):
        for i, (tuning, source) in enumerate(slots):
            x = k + width * (i - (len(slots) - 1) / 2)
            if source == "paper":
                value = table.paper[task, tuning]
                if value is not None:
                    bars.append(ReportBar(task, tuning, source, value, None, 0, x))
                continue
            cell = table.cells.get((task, tuning))
            if cell is not None:
                seeds = len(cell["test_top1_per_seed"])
                test = cell["test_top1"]
                std = 100 * test["std"] if seeds > 1 else None
                bars.append(ReportBar(task, tuning, source, 100 * test["mean"], std, seeds, x))
    return bars


def bar_width(slots: int) -> float:
    """The width of a bar of ``report.png`` when a task's group has ``slots`` of them (at most 0.8 for the group)."""
    return min(0.8 / slots, 0.25)


def figure_tasks(table: ResultsTable) -> List[str]:
    """The tasks ``report.png`` shows: those with a run (the table also lists the benchmark's missing ones)."""
    return [task for task in table.tasks if any((task, t) in table.cells for t in table.tunings)]


def _seeds_note(bars: Sequence[ReportBar]) -> str:
    counts = sorted({b.seeds for b in bars if b.source == "ours"})
    if counts == [1]:
        return "ours: 1 seed (no error bars)"
    seeds = f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} seeds"
    return f"ours: mean over {seeds}, error bars ± 1 std" + (" (of several seeds)" if counts[0] == 1 else "")


def report_figure(table: ResultsTable) -> Tuple[Any, List[ReportBar]]:
    """The table as a chart: test top-1 per task, grouped bars per run label (ours, then the paper's hatched beside
    it), the seeds' standard deviation as error bars, each bar's value on it, the legend beside the chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars, tasks = report_bars(table), figure_tasks(table)
    slots = len(table.tunings) + len(table.paper_columns)
    rotate = len(tasks) > 4 or max(map(len, tasks)) > 14
    figure, ax = plt.subplots(
        figsize=(min(24.0, max(6.5, 2.5 + len(tasks) * (0.35 * slots + 0.45))), 4.6), layout="constrained"
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = bar_width(slots)
    for i, tuning in enumerate(table.tunings):
        for source in ("ours", "paper"):
            mine = [b for b in bars if b.label == tuning and b.source == source]
            if not mine:
                continue
            drawn = ax.bar(
                [b.x for b in mine],
                [b.value for b in mine],
                width * 0.95,
                yerr=[b.std or 0.0 for b in mine] if any(b.std for b in mine) else None,
                capsize=3,
                color=colours[i % len(colours)],
                alpha=1.0 if source == "ours" else 0.45,
                hatch=None if source == "ours" else "//",
                edgecolor="black" if source == "paper" else None,
                linewidth=0.5,
                label=f"{tuning} ({source})",
            )
            ax.bar_label(drawn, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.6, len(tasks) - 0.4)
    ax.set_ylim(0, 108)
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("task")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
    lines = ["test top-1 (%) at the last epoch, per task and method", _seeds_note(bars)]
    if any(b.source == "paper" for b in bars):
        lines.append(f"hatched: the paper's number ({BACKBONES[table.backbone].label})")
    if table.backbones:
        lines.append(f"backbone: {', '.join(table.backbones)}")
    columns = int(figure.get_figwidth() * 15)  # characters of 9-pt text across the figure
    figure.suptitle("\n".join(textwrap.fill(line, columns) for line in lines), fontsize=9)
    return figure, bars


def to_png(table: ResultsTable, path: Path) -> None:
    """Write :func:`report_figure` as a PNG (atomically)."""
    import matplotlib.pyplot as plt

    figure, _ = report_figure(table)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    finally:
        plt.close(figure)


def write_report(
    summaries: Sequence[Dict[str, Any]], out_dir: Path, segmentation: Sequence[Dict[str, Any]] = ()
) -> Dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out_dir`` (classification summaries), with a
    segmentation section in ``report.md`` when ``segmentation`` results are given."""
    if not summaries and not segmentation:
        raise ValueError("no summary.json (vpt-tune) or segmentation results.json (vpt-train) found")
    paths = {"md": out_dir / "report.md"}
    markdown = ""
    if summaries:
        table = results_table(summaries)
        markdown = to_markdown(table)
        paths.update(csv=out_dir / "report.csv", png=out_dir / "report.png")
        write_csv_atomic(to_csv(table), paths["csv"])
        to_png(table, paths["png"])
    if segmentation:
        markdown += ("\n" if markdown else "") + segmentation_report(segmentation)
    write_text_atomic(markdown, paths["md"])
    return paths


def find_summaries(dirs: Sequence[Path]) -> List[Dict[str, Any]]:
    """Every ``summary.json`` below ``dirs`` (each a regular file of at most
    :data:`~vpt_lightning.sharing.regular_files.MAX_SMALL_FILE_BYTES` holding a JSON object; anything else is an error
    naming it, never read)."""
    found = []
    for root in dirs:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{str(root)!r} does not exist")
        for path in sorted(root.rglob(SUMMARY_FILE)):
            summary = read_json_file(path)
            if not isinstance(summary, dict):
                raise ValueError(f"{str(path)!r} holds a JSON {type(summary).__name__}, not a vpt-tune summary")
            found.append({**summary, "path": str(path)})
    return found


# ---- segmentation runs (vpt-train results of task_type=segmentation) beside the paper's Table 3 ------------------
def find_segmentation_results(dirs: Sequence[Path]) -> List[Dict[str, Any]]:
    """Every ``results.json`` below ``dirs`` written by a segmentation run (``task_type: segmentation``).

    Each is read only if it is a regular file of at most
    :data:`~vpt_lightning.sharing.regular_files.MAX_SMALL_FILE_BYTES`
    (a FIFO or a device is an error naming it, never read); one that is not JSON is passed over."""
    found = []
    for root in dirs:
        for path in sorted(Path(root).rglob("results.json")):
            try:
                results = read_json_file(path)
            except RefusedFileError:
                raise
            except ValueError:
                continue
            if isinstance(results, dict) and (results.get("config") or {}).get("task_type") == "segmentation":
                found.append({**results, "path": str(path)})
    return found


def _miou(value: Any) -> str:
    return MISSING if value is None else f"{100 * value:.2f}"


def segmentation_report(results: Sequence[Dict[str, Any]]) -> str:
    """Markdown: each segmentation run (test mIoU single / multi-scale, trainable parameters) beside the paper's
    Table 3 row of its method (for the ADE20K experiment), then Table 3 itself."""
    from .paper import SEGMENTATION, SEGMENTATION_TASK

    md = [
        "## Segmentation",
        "",
        "| task | tuning | mIoU SS (ours) | mIoU MS (ours) | trainable (M) | mIoU SS (paper) | mIoU MS (paper) "
        "| trainable (M, paper) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(results, key=lambda r: (r.get("task_name", ""), r.get("tuning", ""))):
        paper = SEGMENTATION.get(run.get("method"), {}) if run.get("task_name") == SEGMENTATION_TASK else {}
        shown = [f"{paper[k]:.2f}" if k in paper else MISSING for k in ("miou_ss", "miou_ms", "params_m")]
        miou = run.get("test/miou", run.get("val/miou"))
        params = run.get("trainable_params")
        md.append(
            f"| {run.get('task_name')} | {run.get('tuning')} | {_miou(miou)} | {_miou(run.get('test/miou_ms'))} | "
            f"{MISSING if params is None else f'{params / 1e6:.2f}'} | " + " | ".join(shown) + " |"
        )
    md += [
        "",
        "Paper, Table 3 (ADE20K val, SETR-PUP on ViT-L/16 ImageNet-21k):",
        "",
        "| method | mIoU SS | mIoU MS | tunable (M) |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {row['label']} | {row['miou_ss']:.2f} | {row['miou_ms']:.2f} | {row['params_m']:.2f} |"
        for row in SEGMENTATION.values()
    ]
    md += ["", "Ours: test mIoU (%) (val where the run has no test), last epoch; MS = multi-scale + flip."]
    return "\n".join(md) + "\n"
