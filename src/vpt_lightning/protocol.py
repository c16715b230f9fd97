"""The paper's protocol for one task and one tuning strategy: sweep on val, select, final runs over seeds.

Selection takes the best validation top-1 **at the last epoch** (ties: the smaller learning rate, then the
smaller weight decay); the final runs train on train+val and report the test top-1 **at the last epoch**,
averaged over seeds. Every run has its own folder; a run with ``results.json`` is never repeated, and one that
stopped half-way resumes from its ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from .atomic import write_json_atomic, write_text_atomic
from .training import RESULTS_FILE, train

SUMMARY_FILE = "summary.json"


def grid_points(protocol: DictConfig, tunes_backbone: bool) -> List[Dict[str, Any]]:
    """The sweep's points: base lr x weight decay (x prompt length when ``protocol.num_tokens`` is a list)."""
    lrs = protocol.base_lr_tuned_backbone if tunes_backbone else protocol.base_lr
    lengths = list(protocol.num_tokens) if protocol.get("num_tokens") else [None]
    return [
        {"base_lr": float(lr), "weight_decay": float(wd), "num_tokens": p}
        for p, lr, wd in itertools.product(lengths, lrs, protocol.weight_decay)
    ]


def point_name(point: Dict[str, Any]) -> str:
    name = f"lr{point['base_lr']:g}_wd{point['weight_decay']:g}"
    return name if point.get("num_tokens") is None else f"{name}_p{point['num_tokens']}"


def select_best(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The run with the highest last-epoch ``val/top1``; ties go to the smaller lr, then the smaller wd."""
    if not runs:
        raise ValueError("no sweep runs to select from")
    return min(runs, key=lambda r: (-r["val/top1"], r["point"]["base_lr"], r["point"]["weight_decay"]))


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _run(cfg: DictConfig, run_dir: Path, overrides: Dict[str, Any], train_fn: Callable) -> Dict[str, Any]:
    """Run one job in ``run_dir`` unless it already finished; resume it if it stopped half-way."""
    done = run_dir / RESULTS_FILE
    if done.is_file():
        return json.loads(done.read_text())
    job = copy.deepcopy(cfg)
    with open_dict(job):
        for key, value in {**overrides, "run_dir": str(run_dir)}.items():
            OmegaConf.update(job, key, value, merge=False)
        last = run_dir / "checkpoints" / "last.ckpt"
        job.ckpt_path = str(last) if last.is_file() else None
    return train_fn(job)


def run_protocol(cfg: DictConfig, out_dir: Path, train_fn: Callable = train) -> Dict[str, Any]:
    """Sweep, select and run the final seeds for the task of ``cfg``; write ``summary.json`` and ``summary.md``."""
    protocol = cfg.protocol
    tunes_backbone = cfg.tuning.backbone != "frozen"
    sweep = []
    for point in grid_points(protocol, tunes_backbone):
        overrides = {"optim.base_lr": point["base_lr"], "optim.weight_decay": point["weight_decay"], "data.split": "tune"}
        if point["num_tokens"] is not None:
            overrides["recipe.num_tokens"] = point["num_tokens"]
        result = _run(cfg, out_dir / "sweep" / point_name(point), overrides, train_fn)
        sweep.append({"point": point, "val/top1": float(result["val/top1"])})
    best = select_best(sweep)
    finals: Dict[str, Dict[str, Any]] = {}
    for seed in protocol.seeds:
        overrides = {"optim.base_lr": best["point"]["base_lr"], "optim.weight_decay": best["point"]["weight_decay"],
                     "data.split": "final", "seed": int(seed)}
        if best["point"]["num_tokens"] is not None:
            overrides["recipe.num_tokens"] = best["point"]["num_tokens"]
        finals[str(seed)] = _run(cfg, out_dir / "final" / f"seed{seed}", overrides, train_fn)
    tests = [float(r["test/top1"]) for r in finals.values()]
    any_final = next(iter(finals.values()))
    summary = {
        "task_name": cfg.task_name,
        "tuning": cfg.tuning.name,
        "selected": {**best["point"], "val/top1": best["val/top1"]},
        "sweep": sweep,
        "test_top1_per_seed": {seed: float(r["test/top1"]) for seed, r in finals.items()},
        "test_top1": mean_std(tests),
        "trainable_params": any_final["trainable_params"],
        "trainable_percent": any_final["trainable_percent"],
        "note": "val/test top-1 of the last epoch (never the best epoch on test)",
    }
    write_json_atomic(summary, out_dir / SUMMARY_FILE)
    write_text_atomic(summary_markdown(summary), out_dir / "summary.md")
    return summary


def summary_markdown(summary: Dict[str, Any]) -> str:
    sel = summary["selected"]
    seeds = ", ".join(f"{s}: {100 * v:.2f}" for s, v in summary["test_top1_per_seed"].items())
    test = summary["test_top1"]
    return (
        f"# {summary['task_name']} / {summary['tuning']}\n\n"
        f"- selected on val (last epoch): base_lr {sel['base_lr']:g}, weight_decay {sel['weight_decay']:g}"
        + (f", num_tokens {sel['num_tokens']}" if sel.get("num_tokens") is not None else "")
        + f" (val top-1 {100 * sel['val/top1']:.2f}%)\n"
        f"- test top-1 at the last epoch: {100 * test['mean']:.2f} ± {100 * test['std']:.2f}% (seeds {seeds})\n"
        f"- trainable parameters: {summary['trainable_params']:,} ({summary['trainable_percent']:.3f}% of the backbone)\n"
    )


def find_summaries(dirs: Sequence[Path]) -> List[Dict[str, Any]]:
    """Every ``summary.json`` below ``dirs``."""
    found = []
    for root in dirs:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{str(root)!r} does not exist")
        found += [json.loads(p.read_text()) for p in sorted(root.rglob(SUMMARY_FILE))]
    return found

