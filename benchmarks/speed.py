"""Training-step speed and memory of VPT against full fine-tuning, through VPTModule and a hand-written loop.

    python benchmarks/speed.py                                   # ViT-S/16, ViT-B/16, ConvNeXt-B, Swin-B, batch 8
    python benchmarks/speed.py --models vit_small_patch16_224 --steps 6
    python benchmarks/speed.py --models convnext_base             # VPT's pixel border (p = 10 px) vs full
    python benchmarks/speed.py --models swin_tiny_patch4_window7_224   # VPT on Swin: prompts in every window
    python benchmarks/speed.py --profile vit_small_patch16_224 vpt_deep bf16   # torch profiler's op table of a step

Each configuration (model x mode x precision) runs in a fresh process, so that its peak RSS is its own. In it, a
Lightning ``Trainer`` fits ``VPTModule`` and, after every Lightning step, a minimal hand-written PyTorch step
(zero_grad, autocast forward, loss, backward, optimizer step) runs on the same module with the same optimizer:
the two alternate step by step, so that the machine's load drifts hit both alike. Random init, no download.

Attention: timm's fused kernel (``TIMM_FUSED_ATTN=1``) for fp32 and its plain matmul path (``TIMM_FUSED_ATTN=0``)
for bf16, the faster of the two on this CPU for each precision (ViT-B VPT-Deep bf16: 1.86 against 2.15 s/step; fp32:
3.42 fused against 3.56); set ``TIMM_FUSED_ATTN`` to force one for all rows.

Printed per configuration: the median s/step of each runner (after warm-up), img/s, the Lightning / hand ratio,
both step times relative to full fine-tuning in fp32, the RSS when training starts (runtime, model, data), the
peak RSS during training (the peak is reset when ``trainer.fit`` starts, through Linux's ``/proc/self/clear_refs``,
so that building the model does not count; elsewhere the process's peak) and the activation memory saved for the
backward pass (bytes of the tensors autograd keeps, not counting parameters: a deterministic figure, unlike RSS).
Then, per ViT model, the goals of issue 29 met or not (VPT-Deep bf16 <= 0.38x full fine-tuning fp32, fp32 <=
0.70x, peak RSS <= 0.75x full fine-tuning's), and last one JSON line with every row, the goals, the torch, timm and
Lightning versions, the CPU capability torch uses and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

# mode -> prompt, tuning, backbone_eval; on a ConvNet num_tokens is the border's width in pixels (224 -> 244 px)
MODES = {
    "full": ({"num_tokens": 0}, {"method": "full"}, False),
    "linear": ({"num_tokens": 0}, {"method": "linear"}, True),
    "vpt_shallow": ({"num_tokens": 10, "deep": False}, {"method": "vpt_shallow"}, True),
    "vpt_deep": ({"num_tokens": 10, "deep": True}, {"method": "vpt_deep"}, True),
}
PRECISIONS = ("fp32", "bf16")
# issue 29: VPT-Deep's step against full fine-tuning's in fp32, and its peak RSS against full fine-tuning's
GOALS = {"bf16_vs_full_fp32": 0.38, "fp32_vs_full_fp32": 0.70, "rss_vs_full": 0.75}


def configs(model: str) -> List[Tuple[str, str]]:
    """(mode, precision) pairs for ``model``; ConvNets take prompts only at the input, so VPT-Deep is VPT-Shallow."""
    from vpt_lightning.backbones.convnet import PromptedConvNet
    from vpt_lightning.backbones.loading import family_class_of_config

    modes = [m for m in MODES if not (m == "vpt_deep" and family_class_of_config({"name": model}) is PromptedConvNet)]
    return [(mode, precision) for mode in modes for precision in PRECISIONS]


def _module(model: str, mode: str, num_classes: int = 100):
    from vpt_lightning import VPTModule

    prompt, tuning, backbone_eval = MODES[mode]
    return VPTModule(
        num_classes,
        {"name": model, "pretrained": False},
        prompt,
        {"base_lr": 0.1, "warmup_epochs": 0},
        tuning=tuning,
        backbone_eval=backbone_eval,
    )


def saved_activation_mb(module, images, labels, precision: str) -> float:
    """MB of the tensors autograd saves for backward in one training forward (parameters not counted)."""
    return saved_activation_bytes(module, images, labels, precision) / 2**20


def saved_activation_bytes(module, images, labels, precision: str) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (unique storages, parameters not
    counted)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = module.criterion(module(images), labels)
    del loss
    return sum(storages.values())


def rss_mb(field: str = "VmRSS") -> float:
    """The process's resident memory in MB (``VmHWM``: its peak since :func:`reset_peak_rss`); where
    ``/proc/self/status`` does not exist, the process's peak RSS (``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start the peak RSS (``VmHWM``) again from the current RSS (Linux); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def versions() -> Dict[str, str]:
    """torch, timm and Lightning versions, and the CPU instruction set torch's kernels use."""
    import pytorch_lightning as pl
    import timm
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return {"torch": torch.__version__, "timm": timm.__version__, "lightning": pl.__version__, "cpu": capability}


def timed_step(module, optimizer, images, labels, precision: str) -> float:
    """One hand-written training step (zero_grad, autocast forward, loss, backward, the optimizer's step); its
    seconds. The benchmark's hand runner and ``--profile`` run this same step."""
    import torch

    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = module.criterion(module(images), labels)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def run_one(model: str, mode: str, precision: str, batch: int, steps: int, warmup: int) -> Dict:
    """Alternate Lightning and hand-written steps in this process; return their median times and memory."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    module = _module(model, mode)
    images = torch.randn(batch * (steps + warmup), 3, 224, 224)
    labels = torch.randint(0, 100, (len(images),))
    times: Dict[str, List[float]] = {"lightning": [], "hand": []}

    def hand_step(trainer, index: int) -> None:
        optimizer = trainer.optimizers[0]  # the same optimizer (and state) as the Lightning step
        x, y = images[index * batch : (index + 1) * batch], labels[index * batch : (index + 1) * batch]
        times["hand"].append(timed_step(module, optimizer, x, y, precision))

    class Alternate(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times["lightning"].append(time.perf_counter() - self.start)
            hand_step(trainer, batch_idx)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        callbacks=[Alternate()],
        limit_val_batches=0,
    )
    start_rss = rss_mb()
    reset = reset_peak_rss()
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=batch))
    peak_rss = rss_mb("VmHWM")  # read before the activation count below allocates again
    trainer.optimizers[0].zero_grad(set_to_none=True)
    module.train()
    attentions = [m for m in module.backbone.modules() if hasattr(m, "fused_attn")]
    paths = getattr(module.backbone, "block_paths", lambda: [])()
    return {
        **{f"{runner}_s": statistics.median(t[warmup:]) for runner, t in times.items()},
        "start_rss_mb": start_rss,
        "peak_rss_mb": peak_rss,
        "peak_rss_reset": reset,
        "activations_mb": saved_activation_mb(module, images[:batch], labels[:batch], precision),
        "fused_attn": sorted({bool(m.fused_attn) for m in attentions}),
        "kv_blocks": paths.count("kv"),
        **versions(),
    }


def profile(model: str, mode: str, precision: str, batch: int, kv_only: str, rows: int = 15) -> None:
    """Print the torch profiler's op table (self CPU time per step) of hand-written training steps of one
    configuration: 4 steps unprofiled, then 3 profiled; ``kv_only='false'`` runs VPT's blocks over the whole
    sequence."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    module = _module(model, mode).train()
    module.backbone.prompt_config.kv_only = kv_only
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 100, (batch,))

    def step() -> float:
        return timed_step(module, optimizer, images, labels, precision)

    times = [step() for _ in range(4)]
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(
        f"{model} {mode} {precision}, kv_only={kv_only}, TIMM_FUSED_ATTN={os.environ['TIMM_FUSED_ATTN']}, "
        f"block paths {sorted(set(getattr(module.backbone, 'block_paths', lambda: [])()))}; unprofiled steps "
        f"{', '.join(f'{t:.3f}' for t in times)} s (the first sets up kernels); load {os.getloadavg()[0]:.2f}"
    )
    print("self CPU times below are the sum of 3 steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def measure(model: str, mode: str, precision: str, args: argparse.Namespace, forced: str) -> Dict:
    """One configuration in a fresh process (its own peak RSS), with the attention kernel of its precision."""
    cmd = [sys.executable, __file__, "--one", model, mode, precision]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "TIMM_FUSED_ATTN": forced or ("0" if precision == "bf16" else "1")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def goals(rows: Dict[Tuple[str, str], Dict]) -> Dict[str, Dict]:
    """Issue 29's goals for one model, from its rows: each with the measured ratio(s) and whether it is met (the
    step ratios by both runners, the RSS ratio in fp32 and, beside it, bf16 against full fine-tuning in bf16)."""
    if ("vpt_deep", "fp32") not in rows:
        return {}
    base, deep = rows["full", "fp32"], rows["vpt_deep", "fp32"]
    results = {}
    for name, row in (("bf16_vs_full_fp32", rows["vpt_deep", "bf16"]), ("fp32_vs_full_fp32", deep)):
        ratios = [row[f"{r}_s"] / base[f"{r}_s"] for r in ("lightning", "hand")]
        results[name] = {"lightning": ratios[0], "hand": ratios[1], "met": max(ratios) <= GOALS[name]}
    rss = deep["peak_rss_mb"] / base["peak_rss_mb"]
    rss_bf16 = rows["vpt_deep", "bf16"]["peak_rss_mb"] / rows["full", "bf16"]["peak_rss_mb"]
    results["rss_vs_full"] = {"fp32": rss, "bf16": rss_bf16, "met": rss <= GOALS["rss_vs_full"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["vit_small_patch16_224", "vit_base_patch16_224", "convnext_base", "swin_base_patch4_window7_224"],
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each runner")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "MODE", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile", nargs=3, metavar=("MODEL", "MODE", "PRECISION"), help="the torch profiler's op table of a step"
    )
    parser.add_argument("--kv-only", choices=("auto", "false"), default="auto", help="prompt.kv_only for --profile")
    args = parser.parse_args()
    if args.profile:  # timm reads TIMM_FUSED_ATTN when it is first imported: the benchmark's choice, unless set
        os.environ.setdefault("TIMM_FUSED_ATTN", "0" if args.profile[2] == "bf16" else "1")
        profile(*args.profile, batch=args.batch, kv_only=args.kv_only)
        return
    if args.one:
        print(json.dumps(run_one(*args.one, batch=args.batch, steps=args.steps, warmup=args.warmup)))
        return
    forced = os.environ.get("TIMM_FUSED_ATTN", "")
    started, load = time.time(), os.getloadavg()
    print(
        f"batch {args.batch}, 224 px, median of {args.steps} steps per runner after {args.warmup} warm-up, "
        f"alternating; {os.cpu_count()} CPUs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"TIMM_FUSED_ATTN={forced or '1 for fp32, 0 for bf16'}",
        flush=True,
    )
    print(
        "| model | mode | precision | Lightning s/step | img/s | hand s/step | Lightning / hand | "
        "vs full fp32 (Lightning) | vs full fp32 (hand) | RSS at start MB | peak RSS MB | RSS vs full | "
        "activations MB | act. vs full |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary: Dict = {"rows": [], "goals": {}, "minutes": {}}
    goal_lines = []
    for model in args.models:
        model_start = time.time()
        rows = {(mode, precision): measure(model, mode, precision, args, forced) for mode, precision in configs(model)}
        base = rows["full", "fp32"]
        for (mode, precision), r in rows.items():
            print(
                f"| {model} | {mode} | {precision} | {r['lightning_s']:.3f} | {args.batch / r['lightning_s']:.1f} | "
                f"{r['hand_s']:.3f} | {r['lightning_s'] / r['hand_s']:.2f} | "
                f"{r['lightning_s'] / base['lightning_s']:.2f} | {r['hand_s'] / base['hand_s']:.2f} | "
                f"{r['start_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | "
                f"{r['activations_mb']:.0f} | {r['activations_mb'] / base['activations_mb']:.2f} |",
                flush=True,
            )
            summary["rows"].append({"model": model, "mode": mode, "precision": precision, **r})
        summary["minutes"][model] = round((time.time() - model_start) / 60, 2)
        model_goals = summary["goals"][model] = goals(rows)
        for name, goal in model_goals.items():
            verdict = "met" if goal["met"] else "NOT met"
            measured = ", ".join(f"{key} {value:.2f}x" for key, value in goal.items() if key != "met")
            goal_lines.append(f"{model}: VPT-Deep {name} {measured}; goal <= {GOALS[name]}x: {verdict}")
    first = summary["rows"][0]
    summary.update({key: first[key] for key in ("torch", "timm", "lightning", "cpu")})
    summary.update(load_start=load, load_end=os.getloadavg(), timm_fused_attn=forced or "1 fp32, 0 bf16")
    print("\ngoals (issue 29; RSS: the fp32 ratio decides, bf16 against full fine-tuning in bf16 beside it):")
    print("\n".join(goal_lines))
    minutes = ", ".join(f"{model} {m:.1f} min" for model, m in summary["minutes"].items())
    print(
        f"\ntorch {summary['torch']}, timm {summary['timm']}, Lightning {summary['lightning']}, CPU {summary['cpu']}; "
        f"wall time {(time.time() - started) / 60:.1f} min ({minutes}); load average now {os.getloadavg()[0]:.2f}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
