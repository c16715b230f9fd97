"""Shared fixtures: tiny timm ViTs that run in milliseconds on a CPU."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Optional, Sequence

import numpy as np
import pytest
import timm
import torch
from PIL import Image

# keep the suite predictable on 2 cores: at most 2 threads, shared by the pytest-xdist workers (pyproject's addopts;
# each test file on one worker), so that workers computing at once do not oversubscribe the cores
# (vpt_lightning.runs.threads says why that costs); the console scripts the tests start pick their own count
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))

# a two-batch run on 32/16/16 images: what the command-line tests add to a vpt-train / vpt-tune command
SMOKE_RUN = ["+debug=fast", "data.num_train=32", "data.num_val=16", "data.num_test=16", "data.batch_size=16"]
TINY_RUN = ["backbone=vit_tiny_random", *SMOKE_RUN]  # the same on a random tiny ViT

TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2}
TINY_BACKBONE = {"name": "vit_tiny_patch16_224", "kwargs": TINY, "init_seed": 0}


# how the browser tests (test_demo.py, test_docs.py) start the headless Chromium
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-first-run",
    "--mute-audio",
]


def chromium(*modules: str) -> str:
    """The system Chromium (Debian's package), for a test in a real headless browser driven by Playwright (and
    ``modules`` it needs besides); in CI their absence is a failure, elsewhere a skip saying why."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    reasons = []
    if not path:
        reasons.append("no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chromium)")
    for name in ("playwright", *modules):
        try:
            importlib.import_module(name)
        except ImportError:
            reasons.append(f"{name} is not installed (pip install -e '.[dev]')")
    if reasons:
        if os.environ.get("CI"):
            pytest.fail("the browser test must run in CI: " + "; ".join(reasons))
        pytest.skip("; ".join(reasons))
    return path


def make_vit(seed: int = 0, num_classes: int = 0, **overrides) -> torch.nn.Module:
    """A tiny randomly initialised timm ViT (32 px, patch 4 -> 64 patches, width 32, 4 blocks)."""
    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **kwargs)
    # timm inits some tokens to zeros / tiny values; randomise everything so that tests see real numbers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 0 and ("token" in name or "pos_embed" in name):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(3, 3, 32, 32)


def write_image(path: Path, seed: int, size=8, fmt: str = "PNG") -> np.ndarray:
    """A random RGB image of ``size`` (an int for a square, else ``(height, width)``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = (size, size) if isinstance(size, int) else size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def quiet_trainer(tmp_path: Optional[Path] = None, **trainer_kwargs):
    """A Lightning ``Trainer`` on the CPU without logger, progress bar or model summary (its files under
    ``tmp_path``); ``trainer_kwargs`` add to or replace those options."""
    import pytorch_lightning as pl

    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    if tmp_path is not None:
        options["default_root_dir"] = tmp_path
    return pl.Trainer(**{**options, **trainer_kwargs})


def fit_briefly(module, tmp_path: Path, save_to: str = "task.ckpt", **trainer_kwargs) -> Path:
    """Fit ``module`` for a few steps on the synthetic ``count`` task (16 images, batch 8) on the CPU, without
    validation or logging, and save a checkpoint; returns its path."""
    from vpt_lightning.data.synthetic import SyntheticDataModule

    data = SyntheticDataModule(
        task="count", num_train=trainer_kwargs.pop("num_train", 16), num_val=8, num_test=8, batch_size=8, num_workers=0
    )
    trainer = quiet_trainer(tmp_path, **{"max_steps": 1, "limit_val_batches": 0, **trainer_kwargs})
    trainer.fit(module, datamodule=data)
    path = tmp_path / save_to
    trainer.save_checkpoint(path)
    return path


def save_task_checkpoint(path: Path, num_classes: int = 3, backbone=None, **module_kwargs) -> Path:
    """A task checkpoint as ``vpt-train`` writes it (Lightning's file, hooks and identity), without training:
    the prompts and head keep their random init, which every test of the file's use needs."""
    from vpt_lightning import VPTModule

    module = VPTModule(num_classes=num_classes, backbone=backbone or TINY_BACKBONE, **module_kwargs)
    trainer = quiet_trainer()
    trainer.strategy.connect(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


def task_probabilities(checkpoint: Path, image_path: Path) -> torch.Tensor:
    """Class probabilities of a task's own ``VPTModule`` on an image file prepared as evaluation prepares it when
    the checkpoint records no transform: resize to 32 px (bicubic), ImageNet mean/std."""
    from torchvision import transforms as T

    from vpt_lightning import VPTModule

    module = VPTModule.load_from_checkpoint(checkpoint).eval()
    prepare = T.Compose(
        [
            T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    with torch.no_grad():
        return module(prepare(Image.open(image_path).convert("RGB"))[None]).softmax(-1)[0]


def read_wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): W&B's LevelDB-log framing (a 7-byte file header, 32 KiB
    blocks of chunks with a 7-byte header: crc32, length, type full/first/middle/last) around its protobuf
    ``Record`` messages (``wandb.proto.wandb_internal_pb2``)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, pending = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too small for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    """``contextlib.chdir`` (Python 3.11+)."""
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    """The root logger's handlers and level as they were before each test: a command run in the test process
    (Hydra's job logging) adds handlers writing to that test's captured streams, which are closed afterwards; a
    later test's log record would then print a logging error instead of its message."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for handler in set(root.handlers) - set(saved_handlers):
        root.removeHandler(handler)
        handler.close()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def run_cli(command: str, args: Sequence, cwd: Path, env: Optional[dict] = None, timeout: float = 600):
    """The installed ``vpt-<command>`` console script in a new process, as a user runs it (``HYDRA_FULL_ERROR=0``);
    returns the finished ``subprocess.CompletedProcess`` (text output)."""
    exe = Path(sys.executable).parent / f"vpt-{command}"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )


def run_cli_in_process(command: str, args: Sequence, cwd: Path, env: Optional[dict] = None) -> SimpleNamespace:
    """``vpt-<command> ARGS`` in this process: its ``main`` with ``sys.argv`` set, in ``cwd``, with ``env`` added to
    the environment, stdout and stderr captured; ``returncode`` as the process would exit. Where a new process would
    prove nothing more (what a command prints, its exit status, the files a short run writes): a new process spends
    about 5 s CPU importing torch and Lightning."""
    main = importlib.import_module(f"vpt_lightning.cli.{command}").main
    stdout, stderr = io.StringIO(), io.StringIO()
    env = {"HYDRA_FULL_ERROR": "0", **(env or {})}
    # the whole environment (Lightning's seeding adds PL_GLOBAL_SEED...) and the thread count (the commands pick
    # theirs from the load) are this worker's again afterwards
    saved_argv, saved_env, saved_threads = sys.argv, dict(os.environ), torch.get_num_threads()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level  # Hydra's job logging adds handlers to the root
    sys.argv = [f"vpt-{command}", *map(str, args)]
    os.environ.pop("VPT_DEBUG", None)
    os.environ.update(env)
    try:
        with chdir(cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returned = main()  # an argparse command returns its exit status, a Hydra one its job's value
                code = returned if isinstance(returned, int) and not isinstance(returned, bool) else 0
            except SystemExit as exit_:
                code = exit_.code
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        for handler in set(root.handlers) - set(saved_handlers):
            root.removeHandler(handler)
            handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())


class Payload:
    """A pickle payload: unpickling it writes ``marker`` (what an attacker's code in a shared file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('payload ran')",)


def payload_checkpoint(real: Path, out: Path, marker: Path) -> Path:
    """A copy of the real checkpoint ``real`` with a :class:`Payload` added, as a tampered download would carry:
    loadable and resumable in every other respect."""
    checkpoint = torch.load(real, map_location="cpu", weights_only=True)
    checkpoint["callbacks"] = {"evil": Payload(marker)}
    torch.save(checkpoint, out)
    return out
