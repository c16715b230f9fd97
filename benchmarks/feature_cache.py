"""The linear-probe protocol with and without the feature cache: wall time, selected point, test top-1.

    python benchmarks/feature_cache.py [--epochs 100] [--lrs all] [--seeds 42,44,82] [--modes cached,uncached]

One 1,000-image task as VTAB-1k's (800 train + 200 val; 1,000 test images), the synthetic ``orientation`` task on
the packaged mini ViT (``+experiment=quickstart``), ``tuning=linear``. ``vpt-tune``'s protocol runs twice in this
process, once with ``feature_cache.enabled=false`` and once with it on (the cache starts empty, so computing the
features is part of the cached time): the sweep over the lr x wd grid on the tune split, the selection, and the
final runs over the seeds. Prints both wall times, the speed-up, both selected points and test top-1s, and each
mode's per-run wall times (the first run of each split with the cache also computes its features).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from vpt_lightning.config import compose
from vpt_lightning.protocol.task_protocol import run_protocol
from vpt_lightning.runs.training import train

PAPER_LRS = "50,25,10,5,2.5,1,0.5,0.25,0.1,0.05"


def protocol(out: Path, epochs: int, lrs: str, wds: str, seeds: str, cache: bool) -> dict:
    overrides = [
        "+experiment=quickstart",
        "tuning=linear",
        "data.num_train=800",
        "data.num_val=200",
        "data.num_test=1000",
        f"trainer.max_epochs={epochs}",
        f"protocol.base_lr=[{lrs}]",
        f"protocol.weight_decay=[{wds}]",
        f"protocol.seeds=[{seeds}]",
        f"paths.output_dir={out}",
        f"feature_cache.enabled={str(cache).lower()}",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "task_name=feature_cache_benchmark",
    ]
    cfg = compose(overrides, config_name="tune")
    runs = []

    def timed_train(job):
        begun = time.time()
        result = train(job)
        runs.append({"split": job.data.split, "seconds": round(time.time() - begun, 2)})
        return result

    started = time.time()
    summary = run_protocol(cfg, out / "protocol", timed_train)
    return {
        "seconds": time.time() - started,
        "selected": summary["selected"],
        "test_top1": summary["test_top1"],
        "runs": runs,
        "per_run": per_run(runs),
    }


def per_run(runs: list) -> dict:
    """Per split: the number of runs, the first run's wall time and the mean of the others."""
    table = {}
    for split in ("tune", "final"):
        times = [r["seconds"] for r in runs if r["split"] == split]
        if times:
            rest = times[1:] or times
            table[split] = {"runs": len(times), "first_s": times[0], "others_mean_s": round(sum(rest) / len(rest), 2)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/feature_cache"))
    parser.add_argument("--epochs", type=int, default=100, help="epochs per run (the paper: 100)")
    parser.add_argument("--lrs", default=PAPER_LRS, help=f"comma-separated base lrs (default the paper's: {PAPER_LRS})")
    parser.add_argument("--wds", default="0.01,0.001,0.0001,0.0", help="comma-separated weight decays (the paper's)")
    parser.add_argument("--seeds", default="42,44,82", help="final-run seeds (default 42,44,82)")
    parser.add_argument("--modes", default="cached,uncached", help="which protocols to run (default both)")
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    results = {}
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"cached", "uncached"})
    if unknown or not modes:
        parser.error(f"--modes {args.modes!r}: each must be one of 'cached', 'uncached'")
    for name in modes:
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        results[name] = protocol(out, args.epochs, args.lrs, args.wds, args.seeds, name == "cached")
        print(f"{name}: {results[name]['seconds']:.1f} s; per run: {json.dumps(results[name]['per_run'])}", flush=True)
    if {"cached", "uncached"} <= set(results):
        cached, plain = results["cached"], results["uncached"]
        results["speedup"] = plain["seconds"] / cached["seconds"]
        results["same_selection"] = cached["selected"] == plain["selected"]
        results["test_top1_difference_points"] = 100 * abs(cached["test_top1"]["mean"] - plain["test_top1"]["mean"])
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {k: v for k, v in results.items() if k not in ("cached", "uncached")}
            | {m: {k: v for k, v in results[m].items() if k != "runs"} for m in modes},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
