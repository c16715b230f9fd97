"""Result tables in the paper's layout from ``vpt-tune`` summaries: Markdown, CSV and a PNG chart.

Per task and tuning strategy: test top-1 mean ± std over seeds (last epoch) next to the paper's number. VTAB-1k
group means, the mean of the three group means and the mean over the 19 tasks, and the FGVC mean are computed
only over complete sets: with a task missing, the mean is shown as ``incomplete (k/n)``, never averaged as zero
or over what happens to be there. Tasks outside the registry (e.g. mini-VTAB) get per-task rows only.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .atomic import write_text_atomic
from .data.registry import METHODS, TASKS, VTAB_GROUPS, fgvc_tasks, vtab_tasks

MISSING = "—"


def collect(summaries: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[str], Dict[Tuple[str, str], Dict]]:
    """Tasks (registry order first, then others by name), tuning strategies, and ``(task, tuning) -> summary``."""
    cells = {(s["task_name"], s["tuning"]): s for s in summaries}
    present = {task for task, _ in cells}
    ordered = [name for name in TASKS if name in present] + sorted(present - set(TASKS))
    tunings = sorted({tuning for _, tuning in cells}, key=lambda t: (METHODS.index(t) if t in METHODS else 99, t))
    return ordered, tunings, cells


def set_mean(values: Dict[str, Optional[float]], names: Sequence[str]) -> Optional[float]:
    """Mean over ``names`` if every one has a value, else ``None``."""
    got = [values.get(n) for n in names]
    return statistics.fmean(got) if got and all(v is not None for v in got) else None


def aggregates(means: Dict[str, Optional[float]]) -> List[Tuple[str, Optional[float], int, int]]:
    """(label, value or None, present, total) for the VTAB groups, their mean, the 19-task mean and FGVC."""
    rows = []
    group_means = []
    for group in VTAB_GROUPS:
        names = [t.config_name for t in vtab_tasks(group)]
        value = set_mean(means, names)
        group_means.append(value)
        rows.append((f"VTAB {group} (mean of {len(names)})", value, sum(means.get(n) is not None for n in names), len(names)))
    complete = [v for v in group_means if v is not None]
    rows.append(("VTAB mean of the 3 group means", statistics.fmean(group_means) if len(complete) == 3 else None,
                 len(complete), 3))
    names = [t.config_name for t in vtab_tasks()]
    rows.append(("VTAB mean over the 19 tasks", set_mean(means, names), sum(means.get(n) is not None for n in names), 19))
    names = [t.config_name for t in fgvc_tasks()]
    rows.append(("FGVC mean of 5", set_mean(means, names), sum(means.get(n) is not None for n in names), 5))
    return rows


def _paper(task: str, tuning: str) -> Optional[float]:
    info = TASKS.get(task)
    return info.reference.get(tuning) if info else None


def build_report(summaries: Sequence[Dict[str, Any]]) -> Tuple[str, str]:
    """Markdown and CSV text of the report."""
    tasks, tunings, cells = collect(summaries)
    header = ["task"] + [f"{t} (ours)" for t in tunings] + [f"{t} (paper)" for t in tunings if t in METHODS]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["task", "tuning", "test_top1_mean", "test_top1_std", "seeds", "trainable_params",
                     "trainable_percent", "paper_top1"])
    for task in tasks:
        row = [task]
        for tuning in tunings:
            cell = cells.get((task, tuning))
            if cell is None:
                row.append(MISSING)
                continue
            test = cell["test_top1"]
            row.append(f"{100 * test['mean']:.2f} ± {100 * test['std']:.2f} ({cell['trainable_percent']:.2f}% params)")
            writer.writerow([task, tuning, test["mean"], test["std"], len(cell["test_top1_per_seed"]),
                             cell["trainable_params"], cell["trainable_percent"], _paper(task, tuning)])
        row += [f"{_paper(task, t):.1f}" if _paper(task, t) is not None else MISSING for t in tunings if t in METHODS]
        md.append("| " + " | ".join(row) + " |")
    per_tuning = {t: {task: 100 * cells[task, t]["test_top1"]["mean"] for task in tasks if (task, t) in cells}
                  for t in tunings}
    if any(task in TASKS for task in tasks):
        md += ["", "| aggregate | " + " | ".join(tunings) + " |", "|" + "---|" * (len(tunings) + 1)]
        labels = [label for label, *_ in aggregates({})]
        values = {t: aggregates(per_tuning[t]) for t in tunings}
        for i, label in enumerate(labels):
            shown = []
            for t in tunings:
                _, value, present, total = values[t][i]
                shown.append(f"{value:.2f}" if value is not None else f"incomplete ({present}/{total})")
            md.append(f"| {label} | " + " | ".join(shown) + " |")
    md.append("")
    md.append("Test top-1 (%) at the last epoch, mean ± std over seeds; means only over complete sets.")
    return "\n".join(md) + "\n", table.getvalue()


def plot(summaries: Sequence[Dict[str, Any]], path: Path) -> None:
    """Grouped bars: test top-1 per task, one bar per tuning strategy (error bars: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, tunings, cells = collect(summaries)
    width = 0.8 / max(1, len(tunings))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4))
    for i, tuning in enumerate(tunings):
        xs = [k + i * width for k, task in enumerate(tasks) if (task, tuning) in cells]
        ys = [100 * cells[task, tuning]["test_top1"]["mean"] for task in tasks if (task, tuning) in cells]
        err = [100 * cells[task, tuning]["test_top1"]["std"] for task in tasks if (task, tuning) in cells]
        ax.bar(xs, ys, width, yerr=err, label=tuning)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(summaries: Sequence[Dict[str, Any]], out_dir: Path) -> Dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out_dir``."""
    if not summaries:
        raise ValueError("no summary.json found: run vpt-tune first")
    markdown, table = build_report(summaries)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "png": out_dir / "report.png"}
    write_text_atomic(markdown, paths["md"])
    write_text_atomic(table, paths["csv"])
    plot(summaries, paths["png"])
    return paths
