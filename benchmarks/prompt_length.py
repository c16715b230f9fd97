"""VPT-Deep's cost against the prompt length: prompts as keys and values (``prompt.kv_only=auto``) against the full
path over ``[prefix, prompts, patches]`` (``kv_only=false``, the official code's way), and full fine-tuning.

    python benchmarks/prompt_length.py --model vit_small_patch16_224 --lengths 10,50,100,200 --steps 3
    python benchmarks/prompt_length.py --model vit_base_patch16_224 --steps 3 --rss 200
    python benchmarks/prompt_length.py --model swin_base_patch4_window7_224 --lengths 10 --pool image

Random-init timm model (``pretrained=False``, nothing downloaded), built through ``VPTModule`` (``tuning=vpt_deep``,
no prompt dropout, so that both paths see the same prompts; ``full``: every weight trains, backbone in train
mode). For each prompt length p, in one process, the three steps (zero_grad, forward, cross-entropy, backward, SGD
step) alternate, so that the machine's load drifts hit all alike; the key/value and full VPT paths run on the same
module (same prompts and weights), switching ``kv_only``.

One JSON object per line and p: ``kv_s``, ``concat_s``, ``full_s`` (median s/step after ``--warmup`` steps),
``kv_speedup`` (concat_s / kv_s), ``kv_over_full``, ``logits_maxdiff`` (max |logit difference| of the two paths,
eval mode, one batch), ``grad_reldiff`` (||g_kv - g_concat|| / ||g_concat|| over the prompt gradients),
``act_bytes_kv`` / ``act_bytes_concat`` / ``act_bytes_full`` (bytes of the tensors autograd keeps for backward,
parameters left out: unique storages seen by ``saved_tensors_hooks``), ``kv_blocks`` (blocks that ran the
key/value path), ``fused_attn`` (timm's attention choice, ``TIMM_FUSED_ATTN``, which both paths follow) and the
``torch``, ``timm`` and ``lightning`` versions. ``--rss P,...``: for those lengths, the peak RSS of one training
step of each path (the peak reset after the model is built), with and without gradient checkpointing, each in a
fresh process (``rss_mb_{kv,concat,full}[_ckpt]``). The goals of
issue 19 are printed to stderr at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from speed import reset_peak_rss, rss_mb, saved_activation_bytes, versions  # the speed table's own measures

NUM_CLASSES = 100


def build(model: str, mode: str, p: int, pool: Optional[str]):
    """``VPTModule`` of ``mode`` (``vpt``: VPT-Deep with p prompts; ``full``: full fine-tuning), in train mode."""
    import torch

    from vpt_lightning import VPTModule

    torch.manual_seed(0)
    if mode == "full":
        prompt, tuning, backbone_eval = {"num_tokens": 0}, {"method": "full"}, False
    else:
        prompt = {"num_tokens": p, "deep": True, "dropout": 0.0, "pool": pool}
        tuning, backbone_eval = {"method": "vpt_deep"}, True
    module = VPTModule(
        NUM_CLASSES,
        {"name": model, "pretrained": False},
        prompt,
        {"base_lr": 0.1, "warmup_epochs": 0},
        tuning=tuning,
        backbone_eval=backbone_eval,
    )
    return module.train()


def autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(module, optimizer, images, labels, precision: str) -> float:
    """One step; returns its wall time in seconds."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with autocast(precision):
        loss = module.criterion(module(images), labels)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def set_kv(module, kv: bool) -> None:
    module.backbone.prompt_config.kv_only = "auto" if kv else "false"


def compare(module, images, labels) -> Dict[str, float]:
    """Logits (eval mode) and prompt gradients of the two VPT paths on one batch, in float32."""
    import torch

    results = {}
    for kv in (True, False):
        set_kv(module, kv)
        module.eval()
        module.zero_grad(set_to_none=True)
        logits = module(images)
        module.criterion(logits, labels).backward()
        grads = torch.cat([p.grad.flatten() for p in module.backbone.prompt_parameters().values()])
        results[kv] = (logits.detach(), grads)
    module.train()
    (logits_kv, grads_kv), (logits_cat, grads_cat) = results[True], results[False]
    return {
        "logits_maxdiff": float((logits_kv - logits_cat).abs().max()),
        "grad_reldiff": float((grads_kv - grads_cat).norm() / grads_cat.norm()),
    }


def peak_rss(args: argparse.Namespace, p: int, path: str, checkpointing: bool) -> float:
    """Peak RSS (MB) of a fresh process that builds ``path``'s module and runs one training step."""
    cmd = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--precision",
        args.precision,
        "--rss-child",
        f"{path},{p},{int(checkpointing)}",
    ] + (["--pool", args.pool] if args.pool else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def rss_child(args: argparse.Namespace) -> None:
    import torch

    path, p, checkpointing = args.rss_child.split(",")
    module = build(args.model, "full" if path == "full" else "vpt", int(p), args.pool)
    if path != "full":
        set_kv(module, path == "kv")
    module.backbone.set_grad_checkpointing(checkpointing == "1")
    optimizer = torch.optim.SGD([q for q in module.parameters() if q.requires_grad], lr=0.01)
    images = torch.randn(args.batch, 3, 224, 224)
    reset_peak_rss()  # the step's peak, not the model's construction
    train_step(module, optimizer, images, torch.randint(0, NUM_CLASSES, (args.batch,)), args.precision)
    print(rss_mb("VmHWM"))


def run_length(args: argparse.Namespace, p: int, full, full_optimizer) -> Dict[str, Any]:
    import torch

    vpt = build(args.model, "vpt", p, args.pool)
    optimizer = torch.optim.SGD([q for q in vpt.parameters() if q.requires_grad], lr=0.01)
    torch.manual_seed(1)
    images = torch.randn(args.batch, 3, 224, 224)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,))
    row: Dict[str, Any] = {"p": p, "model": args.model, "batch": args.batch, "precision": args.precision}
    row.update(versions(), fused_attn=sorted({m.fused_attn for m in vpt.modules() if hasattr(m, "fused_attn")}))
    row.update(compare(vpt, images, labels))
    set_kv(vpt, True)
    row["kv_blocks"] = vpt.backbone.block_paths().count("kv")
    times: Dict[str, List[float]] = {"kv": [], "concat": [], "full": []}
    names = list(times)
    for step in range(args.warmup + args.steps):
        # the order rotates: no path always follows full fine-tuning's large allocations
        for name in names[step % 3 :] + names[: step % 3]:
            if name == "full":
                seconds = train_step(full, full_optimizer, images, labels, args.precision)
            else:
                set_kv(vpt, name == "kv")
                seconds = train_step(vpt, optimizer, images, labels, args.precision)
            if step >= args.warmup:
                times[name].append(seconds)
    for name, values in times.items():
        row[f"{name}_s"] = round(statistics.median(values), 4)
    row["kv_speedup"] = round(row["concat_s"] / row["kv_s"], 3)
    row["kv_over_full"] = round(row["kv_s"] / row["full_s"], 3)
    for name in ("kv", "concat"):
        set_kv(vpt, name == "kv")
        row[f"act_bytes_{name}"] = saved_activation_bytes(vpt, images, labels, args.precision)
    row["act_bytes_full"] = saved_activation_bytes(full, images, labels, args.precision)
    row["act_ratio"] = round(row["act_bytes_kv"] / row["act_bytes_concat"], 3)
    if p in args.rss:
        for checkpointing in (False, True):
            suffix = "_ckpt" if checkpointing else ""
            for name in ("kv", "concat", "full"):
                row[f"rss_mb_{name}{suffix}"] = round(peak_rss(args, p, name, checkpointing), 1)
    return row


def goals(rows: List[Dict[str, Any]], swin: bool) -> List[str]:
    """Issue 19's goals, met or not, from the measured rows."""
    by_p = {row["p"]: row for row in rows}
    lines = []
    for row in rows:
        exact = row["logits_maxdiff"] <= 1e-5 and row["grad_reldiff"] <= 1e-5
        lines.append(
            f"p={row['p']}: logits within 1e-5 and prompt grads within 1e-5 relative: {'met' if exact else 'NOT met'}"
            f" ({row['logits_maxdiff']:.2g}, {row['grad_reldiff']:.2g})"
        )
    for p, target in ((10, 0.97), (100, 1.3), (200, 1.6)):
        if p in by_p:
            speedup = by_p[p]["kv_speedup"]
            want = f">= {target}x" if p > 10 else "within 3% (>= 0.97x)"
            lines.append(
                f"p={p}: key/value vs concatenation {speedup:.2f}x, goal {want}: "
                f"{'met' if speedup >= target else 'NOT met'}"
            )
    if 200 in by_p:
        ratio = by_p[200]["act_ratio"]
        lines.append(
            f"p=200: activation bytes {ratio:.2f}x the concatenation's, goal <= 0.6x: "
            f"{'met' if ratio <= 0.6 else 'NOT met'}"
        )
    if swin and 10 in by_p:
        ratio = by_p[10]["kv_over_full"]
        lines.append(
            f"p=10: VPT-Deep {ratio:.2f}x full fine-tuning, goal <= 0.70x: {'met' if ratio <= 0.70 else 'NOT met'}"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="a timm ViT or Swin name (random init)")
    parser.add_argument("--lengths", default="10,50,100,200", help="comma-separated prompt lengths")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path and length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--pool",
        default=None,
        help="prompt.pool (Swin: 'image' leaves the prompts out of the "
        "pooled feature, so its last block also takes the key/value path)",
    )
    parser.add_argument("--rss", default="", help="comma-separated lengths at which to measure peak RSS")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
        args.rss = {int(v) for v in args.rss.split(",") if v.strip()}
    except ValueError:
        parser.error(f"--lengths {args.lengths!r} / --rss {args.rss!r} must be comma-separated integers, e.g. 10,50")
    if not args.lengths or min(args.lengths) < 1 or args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--lengths must be >= 1, --steps >= 1, --warmup >= 0, --batch >= 1")
    if args.rss_child:
        rss_child(args)
        return 0
    import torch

    try:
        full = build(args.model, "full", 0, None)
    except (ValueError, RuntimeError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    full_optimizer = torch.optim.SGD([q for q in full.parameters() if q.requires_grad], lr=0.01)
    rows = []
    for p in args.lengths:
        row = run_length(args, p, full, full_optimizer)
        rows.append(row)
        print(json.dumps(row), flush=True)
    swin = "swin" in type(full.backbone).__name__.lower()
    print("\n".join(["goals (issue 19):", *goals(rows, swin)]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
