"""Grid vs Optuna on the quickstart: the selected point's test top-1 and the wall time of the protocol.

    python benchmarks/search.py [--epochs 3] [--train 200] [--lrs 0.1,0.3,1] [--wds 0,0.001] [--seeds 42] [--out DIR]

VPT-Deep on the quickstart task (``+experiment=quickstart``: the packaged mini ViT, the synthetic ``orientation``
task, by default 200 train / 100 val / 500 test images) through ``vpt-tune``'s protocol three times, each in a fresh
folder and study:

- ``grid``: every lr x wd point (``protocol.search=grid``, today's default);
- ``grid + pruning``: the same points in an Optuna study, ``GridSampler`` with median pruning on the per-epoch val
  top-1 (``protocol.search=optuna``);
- ``TPE, 1/3``: Optuna's TPE over the same values with a third of the grid's trials, no pruning.

Each protocol = sweep on the tune split, selection on val top-1 at the last epoch, final run(s) on train+val, test
top-1 at the last epoch. Prints a Markdown table and writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

from vpt_lightning.config import compose
from vpt_lightning.protocol.task_protocol import run_protocol


def protocol(out: Path, search: list, epochs: int, lrs: str, wds: str, seeds: str, train: int) -> dict:
    overrides = [
        "+experiment=quickstart",
        f"data.num_train={train}",
        f"data.num_val={train // 2}",
        "data.num_test=500",
        f"trainer.max_epochs={epochs}",
        f"protocol.base_lr=[{lrs}]",
        f"protocol.weight_decay=[{wds}]",
        f"protocol.seeds=[{seeds}]",
        f"paths.output_dir={out}",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "task_name=search_benchmark",
        *search,
    ]
    cfg = compose(overrides, config_name="tune")
    begun = time.time()
    summary = run_protocol(cfg, out)
    seconds = time.time() - begun
    sweep = summary["sweep"]
    return {
        "seconds": round(seconds, 1),
        "sweep_runs": len(sweep),
        "pruned": sum(1 for e in sweep if e.get("pruned")),
        "epochs_trained": sum(json.loads(p.read_text())["epochs"] for p in out.glob("sweep/*/results.json")),
        "selected": summary["selected"],
        "test_top1": summary["test_top1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train", type=int, default=200, help="training images (val: half as many; test: 500)")
    parser.add_argument("--lrs", default="0.1,0.3,1")
    parser.add_argument("--wds", default="0,0.001")
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--out", type=Path, default=Path("outputs/search_benchmark"))
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    points = len(args.lrs.split(",")) * len(args.wds.split(","))
    modes = {
        "grid": ["protocol.search=grid"],
        "grid + pruning (Optuna)": ["protocol.search=optuna", "protocol.sampler=grid", "protocol.pruning=true"],
        f"TPE, {math.ceil(points / 3)} of {points} trials": [
            "protocol.search=optuna",
            "protocol.sampler=tpe",
            f"protocol.n_trials={math.ceil(points / 3)}",
            "protocol.pruning=false",
        ],
    }
    results = {}
    for name, search in modes.items():
        folder = args.out / ("tpe" if "TPE" in name else "grid_pruned" if "pruning" in name else "grid")
        shutil.rmtree(folder, ignore_errors=True)
        results[name] = protocol(folder, search, args.epochs, args.lrs, args.wds, args.seeds, args.train)
        print(name, json.dumps(results[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    print("\n| search | sweep runs (pruned) | sweep epochs | selected lr, wd | val top-1 | test top-1 | wall time |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        sel = r["selected"]
        print(
            f"| {name} | {r['sweep_runs']} ({r['pruned']}) | {r['epochs_trained']} | {sel['base_lr']:g}, "
            f"{sel['weight_decay']:g} | {100 * sel['val/top1']:.1f}% | {100 * r['test_top1']['mean']:.1f}% | "
            f"{r['seconds'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main()
