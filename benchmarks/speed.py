"""Training-step speed and peak memory of VPT against full fine-tuning, through VPTModule and a plain loop.

    python benchmarks/speed.py                                   # ViT-S/16 and ViT-B/16, batch 8, 224 px
    python benchmarks/speed.py --models vit_small_patch16_224 --steps 5

Each configuration runs in a fresh process (so that the peak RSS is its own): a Lightning ``Trainer`` step of
``VPTModule`` and, for reference, a hand-written PyTorch loop over the same model (same optimizer, same
autocast). Random init, no download. Prints img/s, peak RSS, and the ratios of each step time to full
fine-tuning in fp32 and of the Lightning step to the hand-written one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

MODES = {
    "full": ({"num_tokens": 0}, {"name": "full", "backbone": "full"}, False),
    "linear": ({"num_tokens": 0}, {"name": "linear"}, True),
    "vpt_shallow": ({"num_tokens": 10, "deep": False}, {"name": "vpt_shallow"}, True),
    "vpt_deep": ({"num_tokens": 10, "deep": True}, {"name": "vpt_deep"}, True),
}
CONFIGS = [("full", "fp32"), ("full", "bf16"), ("linear", "fp32"), ("vpt_shallow", "fp32"), ("vpt_deep", "fp32"),
           ("vpt_deep", "bf16")]


def _module(model: str, mode: str, num_classes: int = 100):
    from vpt_lightning import VPTModule

    prompt, tuning, backbone_eval = MODES[mode]
    return VPTModule(num_classes, {"name": model, "pretrained": False}, prompt, {"base_lr": 0.1, "warmup_epochs": 0},
                     tuning=tuning, backbone_eval=backbone_eval)


def run_one(model: str, mode: str, precision: str, runner: str, batch: int, steps: int, warmup: int) -> Dict:
    """Time ``steps`` training steps (after ``warmup``) in this process; returns seconds per step and peak RSS."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    module = _module(model, mode)
    images = torch.randn(batch * (steps + warmup), 3, 224, 224)
    labels = torch.randint(0, 100, (len(images),))
    times: List[float] = []
    if runner == "lightning":
        class Timer(pl.Callback):
            def on_train_batch_start(self, *args):
                self.start = time.perf_counter()

            def on_train_batch_end(self, *args):
                times.append(time.perf_counter() - self.start)

        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps + warmup, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             precision="bf16-mixed" if precision == "bf16" else "32-true", callbacks=[Timer()],
                             limit_val_batches=0)
        trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=batch))
    else:
        module.train()
        optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.01, momentum=0.9)
        criterion = torch.nn.CrossEntropyLoss()
        for i in range(steps + warmup):
            x, y = images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = criterion(module(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    timed = sorted(times[warmup:])
    return {"s_per_step": timed[len(timed) // 2], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "MODE", "PRECISION", "RUNNER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, batch=args.batch, steps=args.steps, warmup=args.warmup)))
        return
    env = {**os.environ, "TIMM_FUSED_ATTN": os.environ.get("TIMM_FUSED_ATTN", "1")}
    print(f"batch {args.batch}, 224 px, median of {args.steps} steps after {args.warmup} warm-up; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print("| model | mode | precision | Lightning s/step | img/s | hand-written s/step | Lightning / hand | "
          "vs full fp32 (Lightning) | vs full fp32 (hand) | peak RSS MB (Lightning) | RSS vs full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        rows = {}
        for mode, precision in CONFIGS:
            for runner in ("lightning", "hand"):
                cmd = [sys.executable, __file__, "--one", model, mode, precision, runner, "--batch", str(args.batch),
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                rows[mode, precision, runner] = json.loads(out.strip().splitlines()[-1])
        base_l, base_h = rows["full", "fp32", "lightning"], rows["full", "fp32", "hand"]
        for mode, precision in CONFIGS:
            lit, hand = rows[mode, precision, "lightning"], rows[mode, precision, "hand"]
            print(f"| {model} | {mode} | {precision} | {lit['s_per_step']:.3f} | {args.batch / lit['s_per_step']:.1f} | "
                  f"{hand['s_per_step']:.3f} | {lit['s_per_step'] / hand['s_per_step']:.2f} | "
                  f"{lit['s_per_step'] / base_l['s_per_step']:.2f} | {hand['s_per_step'] / base_h['s_per_step']:.2f} | "
                  f"{lit['peak_rss_mb']:.0f} | {lit['peak_rss_mb'] / base_l['peak_rss_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
