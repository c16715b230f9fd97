"""Serving many tasks on one frozen backbone: mixed-task throughput, memory per task, and an HTTP load test.

    python benchmarks/serve.py                                   # ~3-5 min on 2 CPU cores, random init, no download
    python benchmarks/serve.py --checkpoints outputs/orientation/r1/checkpoints/last.ckpt outputs/count/r1/...

1. Throughput (``MultiTaskClassifier`` forward on ``--model``, batch ``--batch``, fp32, no autograd): a
   batch of one task, against the same batch spread over 8 tasks (a) of the same prompt length (only the gathering of
   prompts differs) and (b) of prompt lengths 1..50 (each task's prompts enter its own samples' attention as keys and
   values: no padding), and against running each task's rows separately (one prompt set per pass, the batch split
   8 ways). Medians of alternated repeats.
1b. Prompt lengths (``--lengths``, default 1,10,50,100,200, VPT-Deep tasks, batch ``--length-batch``): each task's
   batch alone against the batch spread evenly over all of them, and over them plus a LoRA and an Adapter task;
   ``mixed/single`` is the time of the batch had each sample cost its own task's single-task batch (the mean of the
   single-task times) over the mixed batch's time.
2. Memory for N tasks (``--model-memory``, VPT-Deep 50 tokens, 100 classes): the shared backbone's bytes, each
   task's own bytes (prompts + head), and the bytes of the distinct tensors the model holds (a shared tensor once).
3. Load test: ``vpt-serve`` in a subprocess on localhost with the given task checkpoints (default: two random tasks
   on the quickstart backbone), ``--requests`` POSTs (default 2,000) from ``--clients`` (16) concurrent clients
   mixing the tasks, every ``--bad-every``-th (10th) a malformed one: requests/s, p50/p99 latency of the good
   requests and of all, lost requests, 5xx answers and wrong answers (all three must be 0).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from vpt_lightning import VPTModule
from vpt_lightning.serving.launch import bad_requests, running_server
from vpt_lightning.serving.launch import load_test as launch_load_test
from vpt_lightning.serving.multitask import MultiTaskClassifier
from vpt_lightning.sharing.checkpoint import TaskCheckpoint, trainable_state_dict

NUM_TASKS = 8


def quickstart_backbone() -> Dict[str, Any]:
    """The ``backbone`` config of the quickstart (the packaged pretrained mini ViT)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from vpt_lightning.config import register_resolvers

    register_resolvers()
    with initialize_config_module("vpt_lightning.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("train").backbone, resolve=True)


def backbone_config(model: str) -> Dict[str, Any]:
    """``quickstart`` (the packaged mini ViT) or a timm model name (random init, no download)."""
    return quickstart_backbone() if model == "quickstart" else {"name": model}


def task_checkpoint(
    backbone: Dict[str, Any], num_tokens: int, num_classes: int, seed: int, tuning: Any = None
) -> TaskCheckpoint:
    """An in-memory task checkpoint (random prompts and head) of VPT-Deep on ``backbone`` (or of ``tuning``)."""
    torch.manual_seed(seed)
    module = VPTModule(num_classes, backbone, prompt={"num_tokens": num_tokens}, tuning=tuning)
    state = trainable_state_dict(module, module.backbone.model)
    return TaskCheckpoint(Path(f"task{seed}.ckpt"), state, dict(module.hparams), dict(module.backbone_identity))


def clone(checkpoint: TaskCheckpoint, seed: int) -> TaskCheckpoint:
    """The same task layout with new random tensors (cheap: no backbone is built)."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in checkpoint.state_dict.items()}
    return TaskCheckpoint(Path(f"task{seed}.ckpt"), state, checkpoint.hparams, checkpoint.identity)


def timed(fn, repeats: int) -> float:
    with torch.inference_mode():
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(model_name: str, batch: int, repeats: int) -> Dict[str, float]:
    lengths = [1, 5, 10, 20, 30, 40, 45, 50]
    backbone = backbone_config(model_name)
    template = {p: task_checkpoint(backbone, p, 10, seed=p) for p in lengths}
    varied = MultiTaskClassifier(template[50].hparams["backbone"])
    same = varied  # the same backbone: tasks of equal length are added under other names
    for i, p in enumerate(lengths):
        varied.add_task(clone(template[p], 100 + i), f"len{p}")
        same.add_task(clone(template[50], 200 + i), f"same{i}")
    images = torch.randn(batch, *same.backbone.data_config()["input_size"])
    names = same.task_names

    def index(prefix: str, spread: bool) -> torch.Tensor:
        tasks = [n for n in names if n.startswith(prefix)]
        return same.task_index([tasks[i % len(tasks)] if spread else tasks[-1] for i in range(batch)])

    one, mixed_same, mixed_varied = index("same", False), index("same", True), index("len", True)
    runs = {
        "one task (p=50)": lambda: same(images, one),
        "8 tasks, all p=50": lambda: same(images, mixed_same),
        "8 tasks, p=1..50": lambda: same(images, mixed_varied),
        "8 tasks, one pass per task": lambda: [
            same(images[mixed_same == t], mixed_same[mixed_same == t]) for t in mixed_same.unique()
        ],
    }
    results: Dict[str, List[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # alternate the configurations so that load drifts hit them alike
        for name, fn in runs.items():
            results[name].append(timed(fn, 1))
    return {name: batch / statistics.median(times) for name, times in results.items()}


def length_mix(model_name: str, batch: int, lengths: Sequence[int], repeats: int) -> List[Dict[str, Any]]:
    """Throughput of each VPT-Deep task of ``lengths`` alone and of batches mixing them (and a LoRA and an Adapter
    task), alternated; rows of ``{"run", "img_s", "mixed_over_single"}``."""
    backbone = backbone_config(model_name)
    model = MultiTaskClassifier(backbone)
    for p in lengths:
        model.add_task(task_checkpoint(backbone, p, 10, seed=p), f"p{p}")
    others = {"lora": {"method": "lora", "rank": 8}, "adapter": {"method": "adapter", "reduction": 8}}
    for name, tuning in others.items():
        checkpoint = task_checkpoint(backbone, 0, 10, seed=1, tuning=tuning)
        model.add_task(clone(checkpoint, 7), name)  # random LoRA B and adapter up-projections, not zeros
    images = torch.randn(batch, *model.backbone.data_config()["input_size"])
    prompted = [f"p{p}" for p in lengths]
    runs = {f"p={p} alone": model.task_index([f"p{p}"] * batch) for p in lengths}
    runs[f"mixed p={','.join(map(str, lengths))}"] = model.task_index(
        [prompted[i % len(prompted)] for i in range(batch)]
    )
    every = prompted + list(others)
    runs["mixed, + LoRA + Adapter"] = model.task_index([every[i % len(every)] for i in range(batch)])
    times: Dict[str, List[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for index in runs.values():  # warm-up
            model(images, index)
        for _ in range(repeats):  # alternate, so that load drifts on the shared machine hit every run alike
            for name, index in runs.items():
                start = time.perf_counter()
                model(images, index)
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    single = statistics.mean(median[f"p={p} alone"] for p in lengths)
    rows = [
        {"run": name, "img_s": batch / t, "mixed_over_single": single / t if name.startswith("mixed") else None}
        for name, t in median.items()
    ]
    return rows


def unique_tensor_bytes(model: MultiTaskClassifier) -> int:
    """Bytes of the distinct tensor storages the model holds: its backbone's and its tasks' tensors (a tensor held
    by several counts once)."""
    tensors = [*model.parameters(), *model.buffers()]
    for _, task in model.cache.items():
        tensors += [*task.state.values(), *task.prompts.values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def memory(model_name: str, counts: Sequence[int]) -> List[Dict[str, float]]:
    template = task_checkpoint(backbone_config(model_name), 50, 100, seed=0)
    model = MultiTaskClassifier(template.hparams["backbone"])
    rows, added = [], 0
    for n in counts:
        while added < n:
            model.add_task(clone(template, added), f"t{added}")
            added += 1
        sizes = model.memory_bytes()
        per_task = [v for k, v in sizes.items() if k.startswith("task:")]
        rows.append(
            {
                "tasks": n,
                "backbone_mb": sizes["backbone"] / 2**20,
                "per_task_mb": statistics.mean(per_task) / 2**20,
                "expected_mb": (sizes["backbone"] + sum(per_task)) / 2**20,
                "held_mb": unique_tensor_bytes(model) / 2**20,
            }
        )
    return rows


# ---- load test ----------------------------------------------------------------------------------------------
def save_random_tasks(root: Path) -> List[Path]:
    """Two task checkpoints (random prompts and heads, 8 and 5 classes) on the quickstart backbone, as files."""
    import pytorch_lightning as pl

    backbone = quickstart_backbone()
    paths = []
    for name, classes, tokens in (("orientation", 8, 10), ("count", 5, 5)):
        module = VPTModule(classes, backbone, prompt={"num_tokens": tokens}, task_name=name)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(module)
        paths.append(root / f"{name}.ckpt")
        trainer.save_checkpoint(paths[-1])
    return paths


def load_test(
    checkpoints: Sequence[Path], requests: int, clients: int, max_batch_size: int, bad_every: int
) -> Dict[str, Any]:
    """``requests`` POSTs from ``clients`` threads, mixing the tasks and raw/JSON uploads; every ``bad_every``-th
    request is a malformed one (launch.bad_requests: broken image, unknown or non-string task, nested JSON, a
    64 M-pixel PNG bomb...)."""
    from PIL import Image

    from vpt_lightning.data.synthetic import SyntheticDataset

    options = ["--max-batch-size", str(max_batch_size), "--accelerator", "cpu"]
    with running_server(checkpoints, options, startup_timeout=600) as url:
        with urllib.request.urlopen(url + "/tasks", timeout=60) as response:
            tasks = [t["name"] for t in json.loads(response.read())["tasks"]]
        good = []
        for i in range(16):  # quickstart-like images as PNG files: raw bytes, or base64 in JSON
            array, _ = SyntheticDataset("orientation", 16, seed=9).sample(i)
            buffer = io.BytesIO()
            Image.fromarray((array * 255).astype("uint8")).save(buffer, format="PNG")
            if i % 2:
                good.append((buffer.getvalue(), "image/png"))
            else:
                encoded = base64.b64encode(buffer.getvalue()).decode()
                good.append(
                    (json.dumps({"task": tasks[i % len(tasks)], "image": encoded}).encode(), "application/json")
                )
        bad = bad_requests(tasks[0])
        launch_load_test(url, good[:4], bad, tasks[-1], requests=2 * clients, clients=clients, bad_every=0)  # warm-up
        return launch_load_test(url, good, bad, tasks[-1], requests=requests, clients=clients, bad_every=bad_every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="quickstart", help="backbone of the throughput test: quickstart or a timm name"
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default="1,10,50,100,200", help="prompt lengths of the prompt-length mix")
    parser.add_argument("--length-model", default="vit_small_patch16_224", help="backbone of the prompt-length mix")
    parser.add_argument("--length-batch", type=int, default=20)
    parser.add_argument("--model-memory", default="vit_base_patch16_224", help="backbone of the memory test")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--checkpoints", type=Path, nargs="*", help="task checkpoints served in the load test")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bad-every", type=int, default=10, help="every N-th request is malformed (0: none)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "lengths", "memory", "load"])
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if "throughput" not in args.skip:
        rates = throughput(args.model, args.batch, args.repeats)
        base = rates["one task (p=50)"]
        print(f"\n| {args.model}, batch {args.batch}, fp32 | img/s | vs one task |\n|---|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
    if "lengths" not in args.skip:
        lengths = [int(v) for v in args.lengths.split(",")]
        header = f"{args.length_model}, batch {args.length_batch}, fp32, no autograd"
        print(f"\n| {header} | img/s | mixed/single |\n|---|---|---|")
        for row in length_mix(args.length_model, args.length_batch, lengths, args.repeats):
            ratio = "" if row["mixed_over_single"] is None else f"{row['mixed_over_single']:.2f}x"
            print(f"| {row['run']} | {row['img_s']:.1f} | {ratio} |")
    if "memory" not in args.skip:
        print(
            f"\n| {args.model_memory}, VPT-Deep p=50, 100 classes | backbone MB | per task MB | backbone + N x task MB "
            "| tensors the model holds MB |\n|---|---|---|---|---|"
        )
        for row in memory(args.model_memory, args.tasks):
            print(
                f"| {row['tasks']} task(s) | {row['backbone_mb']:.1f} | {row['per_task_mb']:.2f} | "
                f"{row['expected_mb']:.1f} | {row['held_mb']:.1f} |"
            )
    if "load" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = args.checkpoints or save_random_tasks(Path(tmp))
            result = load_test(checkpoints, args.requests, args.clients, args.max_batch_size, args.bad_every)
        print(
            f"\n| load test: {result['requests']} requests ({result['bad']} malformed), {result['clients']} clients, "
            f"{len(checkpoints)} tasks mixed | value |\n|---|---|"
        )
        for key in ("requests_per_s", "p50_ms", "p99_ms", "p50_all_ms", "p99_all_ms", "lost", "server_errors"):
            value = result[key]
            print(f"| {key} | {value:.1f} |" if isinstance(value, float) else f"| {key} | {value} |")
        print(f"| wrong answers (a good request not 200, a bad one not its 4xx) | {len(result['wrong'])} |")
        if result["wrong"]:
            print("wrong answers (first 10):", result["wrong"][:10])


if __name__ == "__main__":
    main()
