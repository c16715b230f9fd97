"""Many tasks on one backbone: a task store of N packages, loaded on demand (issue: ten thousand tasks).

    python benchmarks/task_store.py --tasks 10000 --distinct 1000 --requests 2048
    python benchmarks/task_store.py --tasks 10000 --distinct 1000 --requests 2048 --cache-bytes 34MB
    python benchmarks/task_store.py --tasks 10000 --distinct 1000 --requests 2048 --serve --storm 1000

Writes ``--tasks`` random-tensor packages (``--model``, VPT-Deep ``--p`` prompts, ``--classes`` classes, random
backbone weights: no download) once, into ``--cache-dir``/``<model>-p<P>-c<C>`` (kept between runs; a larger N
adds to it), then in one process prints one JSON object per line:

- ``tasks``, ``cache_bytes`` (the budget; ``null``: unbounded);
- ``startup_s``: indexing the folder (after the backbone is built), ``rss_start_mb`` after it;
- ``cold_ms_p50``/``cold_ms_p99``: a task's first use (read, checked, bound), over ``--cold`` tasks never used;
- ``single_ips``: images/s of a stream of one task, ``mixed_ips``: of a warm stream over ``--distinct`` tasks
  drawn by Zipf (s=1.1), both at batch ``--batch`` (32), ``--requests`` images each;
- ``rss_end_mb`` after the streams; ``logits_maxdiff``: the largest difference of a sample's logits against its
  task's own ``TaskModel``.

RSS is the process's whole resident memory (the imports of torch, timm and vpt-lightning alone take several
hundred MB: printed on stderr, with the goals).

``--serve`` sends the same streams to a real ``vpt-serve --tasks DIR`` (``--clients`` concurrent HTTP clients,
raw PNG bodies, batches of ``--batch``): ``startup_s`` is then the time until the server answers (imports and
backbone included), RSS the sum of its processes' PSS, ``cold_ms`` a task's first request's latency less its
second's, and ``logits_maxdiff`` the largest difference of log-probabilities (the server answers probabilities).
``--storm M`` (with ``--serve``) then replaces M tasks in the folder (each a new version written beside it and
swapped in) while ``--storm-requests`` requests run from ``--clients`` clients, and prints a second line: failed
requests and answers whose version is none of the written ones (a half-written task).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import psutil
import torch


def rss_mb(pids: Sequence[int] = ()) -> float:
    """This process's RSS; for several processes, the sum of their PSS (shared pages, such as torch's libraries in
    every process of a server, counted once)."""
    if not pids:
        return psutil.Process().memory_info().rss / 2**20
    return sum(psutil.Process(pid).memory_full_info().pss for pid in pids) / 2**20


def cache_dir(args: argparse.Namespace) -> Path:
    base = (
        Path(args.cache_dir).expanduser()
        if args.cache_dir
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vpt-lightning" / "task_store_benchmark"
    )
    return base / f"{args.model}-p{args.p}-c{args.classes}"


def backbone_config(args: argparse.Namespace) -> Dict[str, Any]:
    return {"name": args.model, "pretrained": False, "init_seed": 0}


def random_tensors(shapes: Dict[str, Sequence[int]], seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=generator) * 0.3 for k, shape in sorted(shapes.items())}


class PackageWriter:
    """Packages of one task shape with random tensors: ``config.json`` and ``README.md`` of a template task,
    ``model.safetensors`` drawn from a seed per task and version."""

    def __init__(self, args: argparse.Namespace) -> None:
        from vpt_lightning.task_model import TaskSpec, build_task_model

        spec = TaskSpec(
            num_classes=args.classes,
            backbone=backbone_config(args),
            prompt={"num_tokens": args.p},
            tuning={"method": "vpt_deep"},
        )
        template = build_task_model(spec)
        self.config = template.package_config()
        self.card = str(template.generate_model_card())
        self.shapes = {k: tuple(v.shape) for k, v in template.trained_state_dict().items()}

    def files(self, name: str, seed: int) -> Dict[str, bytes]:
        from safetensors.torch import save

        config = {**self.config, "task_name": name}
        return {
            "config.json": json.dumps(config, indent=1).encode(),
            "model.safetensors": save(random_tensors(self.shapes, seed), metadata={"format": "pt"}),
            "README.md": self.card.encode(),
        }

    def write(self, folder: Path, name: str, seed: int) -> None:
        """A new package folder written beside and renamed in (no fsync: a benchmark's cache)."""
        staged = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.new-"))
        for file_name, data in self.files(name, seed).items():
            (staged / file_name).write_bytes(data)
        os.rename(staged, folder / name)


def task_name(i: int) -> str:
    return f"t{i:05d}"


def ensure_packages(args: argparse.Namespace) -> Path:
    folder = cache_dir(args)
    folder.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    missing = [i for i in range(args.tasks) if task_name(i) not in have]
    if missing:
        writer = PackageWriter(args)
        start = time.perf_counter()
        for count, i in enumerate(missing, 1):
            writer.write(folder, task_name(i), i)
            if count % 1000 == 0:
                log(f"wrote {count}/{len(missing)} packages ({time.perf_counter() - start:.0f} s)")
        log(f"wrote {len(missing)} packages into {folder} in {time.perf_counter() - start:.1f} s")
    extra = sorted(have - {task_name(i) for i in range(args.tasks)})
    if extra:  # a folder made for a larger N: serve the first N only
        raise SystemExit(f"{folder} holds {len(have)} packages; use --tasks {len(have)} or another --cache-dir")
    return folder


def log(message: str) -> None:
    print(f"[task_store] {message}", file=sys.stderr, flush=True)


def zipf_stream(args: argparse.Namespace, rng: np.random.Generator) -> List[str]:
    """``--requests`` task names drawn by Zipf (s=1.1) over ``--distinct`` tasks picked at random."""
    chosen = rng.choice(args.tasks, size=args.distinct, replace=False)
    weights = 1.0 / np.arange(1, args.distinct + 1) ** 1.1
    picks = rng.choice(args.distinct, size=args.requests, p=weights / weights.sum())
    return [task_name(int(chosen[k])) for k in picks]


def percentile(values: Sequence[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# ---- in one process ---------------------------------------------------------------------------------------------
def result_row(
    tasks: int,
    cache_bytes: Optional[int],
    startup: float,
    rss_start: float,
    rss_end: float,
    cold: Sequence[float],
    single: Sequence[float],
    mixed: Sequence[float],
    maxdiff: float,
) -> Dict[str, Any]:
    """The benchmark's JSON line (the keys the issue names), rounded."""
    return {
        "tasks": tasks,
        "cache_bytes": cache_bytes,
        "startup_s": round(startup, 3),
        "rss_start_mb": round(rss_start, 1),
        "cold_ms_p50": round(percentile(cold, 0.5), 2),
        "cold_ms_p99": round(percentile(cold, 0.99), 2),
        "single_ips": round(statistics.median(single), 2),
        "mixed_ips": round(statistics.median(mixed), 2),
        "rss_end_mb": round(rss_end, 1),
        "logits_maxdiff": float(f"{maxdiff:.3g}"),
    }


def run_in_process(args: argparse.Namespace, folder: Path) -> Dict[str, Any]:
    from vpt_lightning.serving.task_store import TaskStore
    from vpt_lightning.serving.task_tensors import TaskLayout
    from vpt_lightning.task_model import load_package

    rss_imports = rss_mb()
    store = TaskStore(backbone_config(args), [folder], cache_bytes=args.cache_bytes)
    log(f"RSS after imports {rss_imports:.0f} MB; backbone built in {store.timings['backbone_s']:.1f} s")
    startup, rss_start = store.timings["index_s"], rss_mb()
    backbone_mb = sum(t.numel() * t.element_size() for t in store.backbone.state_dict().values()) / 2**20
    rng = np.random.default_rng(args.seed)
    stream = zipf_stream(args, rng)
    streamed = set(stream)
    cold_names = [task_name(int(i)) for i in rng.permutation(args.tasks) if task_name(int(i)) not in streamed]
    first = store.entry(stream[0])
    store.layout(first.spec, first.config_origin)  # the layout of this task shape, built once
    cold = []
    for name in cold_names[: args.cold]:
        start = time.perf_counter()
        handle = store.open(name)
        cold.append(1000 * (time.perf_counter() - start))
        store.release([handle])
    task_bytes = handle.tensors.nbytes
    size = store.backbone.data_config()["input_size"]
    images = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(0))

    def run(names: Sequence[str]) -> float:
        start = time.perf_counter()
        for at in range(0, len(names), args.batch):
            batch = names[at : at + args.batch]
            handles = [store.open(n) for n in batch]
            try:
                with torch.inference_mode():
                    store.classify(images[: len(batch)], handles)
            finally:
                store.release(handles)
        return len(names) / (time.perf_counter() - start)

    single_name = stream[0]
    run([single_name] * args.batch)  # warm-up
    for name in dict.fromkeys(stream):  # warm: every task of the stream opened once (as far as the cache holds)
        store.release([store.open(name)])
    single, mixed = [], []
    for _ in range(args.repeats):  # alternated, so that a neighbour's load falls on both
        single.append(run([single_name] * args.requests))
        mixed.append(run(stream))
    rss_end = rss_mb()
    # a sample's logits against its task's own TaskModel
    maxdiff = 0.0
    sample = stream[: args.batch]
    handles = [store.open(n) for n in sample]
    with torch.inference_mode():
        logits = store.classify(images[: len(sample)], handles)
    store.release(handles)
    for name in list(dict.fromkeys(sample))[: args.check]:
        rows = [i for i, n in enumerate(sample) if n == name]
        own = load_package(folder / name, model=store._shared_copy(), identity=store.identity)
        with torch.inference_mode():  # the same images in one batch: float32 sums in the same order
            expected = own(images[: len(sample)])[rows]
        maxdiff = max(maxdiff, (logits[rows, : args.classes] - expected).abs().max().item())
    log(
        f"backbone {backbone_mb:.0f} MB, a task {task_bytes / 1e6:.3f} MB in memory; cache evictions "
        f"{store.cache.evictions}; layouts built {len(store._layouts)} ({TaskLayout.__name__})"
    )
    held_mb = (args.cache_bytes if args.cache_bytes else store.cache.used) / 2**20
    check_goals(args, startup, rss_start, rss_end, rss_imports, backbone_mb, held_mb, cold, single, mixed, maxdiff)
    return result_row(len(store), args.cache_bytes, startup, rss_start, rss_end, cold, single, mixed, maxdiff)


def check_goals(args, startup, rss_start, rss_end, rss_imports, backbone_mb, budget_mb, cold, single, mixed, maxdiff):
    """The issue's goals against these figures, on stderr (``budget_mb``: the cache's budget, or the bytes it held
    when unbounded)."""
    ratio = statistics.median(mixed) / statistics.median(single)
    goals = [
        ("startup <= 15 s", startup <= 15, f"{startup:.2f} s"),
        (
            "RSS growth <= backbone + cache + 400 MB",
            rss_end - rss_imports <= backbone_mb + budget_mb + 400,
            f"{rss_end - rss_imports:.0f} MB over the {rss_imports:.0f} MB of the imports "
            f"(backbone {backbone_mb:.0f} MB, cache {budget_mb:.0f} MB)"
            + ("" if args.cache_bytes else ": unbounded, the bytes of every task used"),
        ),
        ("cold p50 <= 20 ms", percentile(cold, 0.5) <= 20, f"{percentile(cold, 0.5):.1f} ms"),
        ("cold p99 <= 60 ms", percentile(cold, 0.99) <= 60, f"{percentile(cold, 0.99):.1f} ms"),
        (
            f"mixed/single >= {0.85 if args.cache_bytes else 0.9}",
            ratio >= (0.85 if args.cache_bytes else 0.9),
            f"{ratio:.3f} (single {single}, mixed {mixed})",
        ),
        ("logits within 1e-5", maxdiff <= 1e-5, f"{maxdiff:.2g}"),
    ]
    load = os.getloadavg()
    log(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    for goal, met, figure in goals:
        log(f"{'met ' if met else 'MISSED'} {goal}: {figure}")


# ---- through a real server --------------------------------------------------------------------------------------
def png(seed: int, size: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def run_served(args: argparse.Namespace, folder: Path) -> List[Dict[str, Any]]:
    import httpx

    from vpt_lightning.serving.launch import running_server

    key = "task-store-benchmark"
    env = {**os.environ, "LIT_SERVER_API_KEY": key}
    options = ["--tasks", str(folder), "--backbone", str(write_backbone_yaml(args)), "--accelerator", "cpu"]
    options += ["--max-batch-size", str(args.batch), "--batch-timeout", "0.05", "--log-level", "error"]
    if args.cache_bytes:
        options += ["--cache-bytes", str(args.cache_bytes)]
    rng = np.random.default_rng(args.seed)
    stream = zipf_stream(args, rng)
    size = args.img_size
    image = png(0, size)
    start = time.perf_counter()
    with running_server([], options, startup_timeout=900, env=env, log=folder.parent / "serve.log") as url:
        startup = time.perf_counter() - start
        server = psutil.Process(find_server_pid(url))
        pids = [server.pid] + [c.pid for c in server.children(recursive=True)]
        rss_start = rss_mb(pids)
        headers = {"X-API-Key": key, "Content-Type": "image/png"}
        client = httpx.Client(base_url=url, headers=headers, timeout=300)

        def ask(name: str, top_k: int = 5) -> Dict[str, Any]:
            response = client.post("/predict", params={"task": name, "top_k": top_k}, content=image)
            response.raise_for_status()
            return response.json()

        warm_name = stream[0]
        for _ in range(3):
            ask(warm_name)
        warm = []
        for _ in range(10):
            t = time.perf_counter()
            ask(warm_name)
            warm.append(1000 * (time.perf_counter() - t))
        streamed = set(stream)
        cold = []
        for i in rng.permutation(args.tasks)[: args.cold * 3]:
            name = task_name(int(i))
            if name in streamed or len(cold) >= args.cold:
                continue
            t = time.perf_counter()
            ask(name)
            first = time.perf_counter() - t
            t = time.perf_counter()
            ask(name)  # the same task now warm, right after: the difference is its first use
            cold.append(1000 * (first - (time.perf_counter() - t)))

        def run(names: Sequence[str]) -> float:  # as many clients as a batch holds, so that batches fill
            t = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.batch) as pool:
                list(
                    pool.map(
                        lambda n: httpx.post(
                            url + "/predict", params={"task": n}, content=image, headers=headers, timeout=300
                        ).raise_for_status(),
                        names,
                    )
                )
            return len(names) / (time.perf_counter() - t)

        for name in dict.fromkeys(stream):  # warm
            ask(name)
        single, mixed = [], []
        for _ in range(args.repeats):
            single.append(run([warm_name] * args.requests))
            mixed.append(run(stream))
        rss_end = rss_mb(pids)
        maxdiff = served_maxdiff(args, folder, ask, stream)
        lines = [result_row(args.tasks, args.cache_bytes, startup, rss_start, rss_end, cold, single, mixed, maxdiff)]
        started = [line for line in (folder.parent / "serve.log").read_text().splitlines() if "backbone built" in line]
        log(f"served: {len(pids)} processes; warm request {statistics.median(warm):.1f} ms; {started[-1:]}")
        if args.storm:
            lines.append(storm(args, folder, url, headers, image, rng, statistics.median(mixed)))
    return lines


def write_backbone_yaml(args: argparse.Namespace) -> Path:
    path = cache_dir(args).parent / f"{args.model}-backbone.json"
    path.write_text(json.dumps(backbone_config(args)))
    return path


def find_server_pid(url: str) -> int:
    port = int(url.rsplit(":", 1)[1])
    for connection in psutil.net_connections(kind="tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
            process = psutil.Process(connection.pid)
            while process.parent() is not None and "vpt_lightning.cli.serve" in " ".join(process.parent().cmdline()):
                process = process.parent()
            return process.pid
    raise RuntimeError(f"no process listens on {url}")


def served_maxdiff(args: argparse.Namespace, folder: Path, ask, stream: Sequence[str]) -> float:
    """Largest difference of log-probabilities between the server's answer and the task's own TaskModel on the
    same prepared image."""
    from PIL import Image

    from vpt_lightning.serving.images import eval_transform
    from vpt_lightning.serving.task_index import ServedTask
    from vpt_lightning.serving.task_store import TaskStore
    from vpt_lightning.task_model import load_package

    store = TaskStore(backbone_config(args), [])
    worst = 0.0
    for name in list(dict.fromkeys(stream))[: args.check]:
        answer = ask(name, top_k=args.classes)
        got = torch.full((args.classes,), float("nan"))
        for p in answer["predictions"]:
            got[p["index"]] = p["probability"]
        own = load_package(folder / name, model=store._shared_copy(), identity=store.identity)
        info = ServedTask(name, own.class_names, own.method_name, folder / name, own.eval_transform)
        x = eval_transform(info, store)(Image.open(io.BytesIO(png(0, args.img_size))).convert("RGB"))[None]
        with torch.inference_mode():
            want = own(x).log_softmax(-1)[0]
        shown = got > 1e-6  # the classes whose log-probability float32 resolves
        worst = max(worst, (got[shown].log() - want[shown]).abs().max().item())
    return worst


def storm(args, folder: Path, url: str, headers: Dict[str, str], image: bytes, rng, ips: float) -> Dict[str, Any]:
    """``--storm`` replacements of tasks in the folder, spread over the time ``--storm-requests`` requests take
    at ``ips`` images/s, while they run from ``--clients`` clients."""
    import httpx

    from vpt_lightning.serving.package_io import content_version, install_package

    writer = PackageWriter(args)
    names = [task_name(int(i)) for i in rng.choice(args.tasks, size=min(args.storm, args.tasks), replace=False)]
    versions: Dict[str, set] = {}
    for name in names:  # the version each has now
        files = (folder / name / "config.json").read_bytes(), (folder / name / "model.safetensors").read_bytes()
        versions[name] = {content_version(*files)}
    lock = threading.Lock()
    done = threading.Event()

    pace = 0.8 * args.storm_requests / max(ips, 1e-3) / len(names)  # seconds between two replacements

    def replace() -> None:
        for k, name in enumerate(names):
            time.sleep(pace)
            files = writer.files(name, 10_000_000 + k)
            with lock:
                versions[name].add(content_version(files["config.json"], files["model.safetensors"]))
            staged = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.new-"))
            for file_name, data in files.items():
                (staged / file_name).write_bytes(data)
            install_package(staged, folder / name)
        done.set()

    requests = [names[int(i)] for i in rng.integers(0, len(names), size=args.storm_requests)]
    answers: List[Any] = []

    def send(name: str) -> None:
        try:
            response = httpx.post(url + "/predict", params={"task": name}, content=image, headers=headers, timeout=300)
            answers.append((name, response.status_code, response.json().get("version")))
        except Exception as err:  # no HTTP answer
            answers.append((name, None, repr(err)))

    start = time.perf_counter()
    writer_thread = threading.Thread(target=replace)
    writer_thread.start()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        list(pool.map(send, requests))
    writer_thread.join()
    seconds = time.perf_counter() - start
    failed = [a for a in answers if a[1] != 200]
    with lock:
        half = [a for a in answers if a[1] == 200 and a[2] not in versions[a[0]]]
    log(f"storm: {len(failed)} failed {failed[:3]}, {len(half)} of no written version; {seconds:.1f} s")
    return {
        "storm_replaced": len(names),
        "storm_requests": len(requests),
        "storm_clients": args.clients,
        "storm_failed": len(failed),
        "storm_half_written": len(half),
        "storm_s": round(seconds, 1),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--p", type=int, default=10, help="VPT-Deep prompts per block")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--distinct", type=int, default=1000, help="distinct tasks of the mixed stream")
    parser.add_argument("--requests", type=int, default=1024, help="images per stream")
    parser.add_argument("--cache-bytes", default=None, help="the store's budget, e.g. 34MB (default: unbounded)")
    parser.add_argument("--serve", action="store_true", help="through a real vpt-serve --tasks")
    parser.add_argument("--storm", type=int, default=0, help="with --serve: tasks replaced while requests run")
    parser.add_argument("--storm-requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (--serve)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cold", type=int, default=200, help="tasks whose first use is timed")
    parser.add_argument("--check", type=int, default=4, help="tasks whose logits are compared with their TaskModel")
    parser.add_argument("--repeats", type=int, default=1, help="alternated runs of each stream (median)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="where the packages are kept (default ~/.cache/...)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.distinct > args.tasks:
        parser.error("--distinct must be <= --tasks")
    if args.cache_bytes is not None:
        from vpt_lightning.serving.task_cache import parse_bytes

        args.cache_bytes = parse_bytes(args.cache_bytes)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = ensure_packages(args)
    lines = run_served(args, folder) if args.serve else [run_in_process(args, folder)]
    for line in lines:
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
