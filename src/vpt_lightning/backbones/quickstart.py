"""The offline quickstart's pretrained backbone: a small ViT pretrained on the synthetic ``shapes`` task.

The package ships the result (``assets/quickstart_vit.safetensors``, fp16, about 1.4 MB), so the quickstart
prompt-tunes a *pretrained* backbone with no network. This module rebuilds it from scratch, reproducibly:

    python -m vpt_lightning.backbones.quickstart --out src/vpt_lightning/assets/quickstart_vit.safetensors

Upstream task: kind x colour of the largest of 1-3 shapes (36 classes). The quickstart's downstream tasks
(location, count, orientation, smallest shape) ask for other things of the same images. The architecture is the one
of ``conf/backbone/quickstart_vit.yaml``; the learning rate follows :func:`vpt_lightning.schedule.warmup_cosine_factor`
(the shipped file was trained before this script used it, with the cosine over all steps times the warm-up ramp, so a
rebuild gives close, not bit-identical, weights).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Dict, Optional

import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from ..config import CONFIG_DIR
from ..data.synthetic import SyntheticDataset, get_synthetic_task
from ..runs.atomic import atomic_path
from ..schedule import warmup_cosine_factor

ASSET = Path(__file__).parent / "assets" / "quickstart_vit.safetensors"
BACKBONE_CONFIG = CONFIG_DIR / "backbone" / "quickstart_vit.yaml"


def packaged_arch() -> Dict:
    """The timm model name + kwargs of the quickstart backbone, read from ``conf/backbone/quickstart_vit.yaml`` (the
    one place they are written, so that the config and the pretraining script cannot disagree)."""
    node = OmegaConf.load(BACKBONE_CONFIG)
    return {"name": node.name, "kwargs": OmegaConf.to_container(node.kwargs)}


QUICKSTART_ARCH: Dict = packaged_arch()


def build_quickstart_vit(num_classes: int = 0) -> nn.Module:
    """The quickstart architecture, randomly initialised."""
    return timm.create_model(QUICKSTART_ARCH["name"], num_classes=num_classes, **QUICKSTART_ARCH["kwargs"])


def save_state_dict_atomic(state_dict: Dict[str, torch.Tensor], out: Path) -> None:
    """Write a safetensors file atomically (readable by all: it is a shipped asset)."""
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))


def pretrain_backbone(
    out: Path,
    num_samples: int = 24000,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1.5e-3,
    seed: int = 0,
    max_steps: Optional[int] = None,
) -> float:
    """Pretrain the quickstart ViT on ``shapes`` and save its backbone weights (no head) to ``out`` in fp16.

    Returns the held-out upstream top-1 (%) of the saved weights.
    """
    torch.manual_seed(seed)
    task = get_synthetic_task("shapes")
    model = build_quickstart_vit(num_classes=task.num_classes)
    train = SyntheticDataset("shapes", num_samples, seed=10_000 + seed)
    held_out = SyntheticDataset("shapes", 2000, seed=20_000 + seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=1, drop_last=True)
    total = epochs * len(loader) if max_steps is None else max_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, warmup, total))
    criterion = nn.CrossEntropyLoss()
    step, start = 0, time.time()
    model.train()
    while step < total:
        for images, labels in loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{total} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
            if step >= total:
                break
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(held_out, batch_size=500):
            correct += (model(images).argmax(-1) == labels).sum().item()
    accuracy = 100.0 * correct / len(held_out)
    model.reset_classifier(0)
    save_state_dict_atomic({k: v.half() for k, v in model.state_dict().items()}, Path(out))
    print(f"upstream held-out top-1 {accuracy:.1f}% ; saved {out} ({Path(out).stat().st_size / 1e6:.2f} MB)")
    return accuracy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument("--num-samples", type=int, default=24000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    pretrain_backbone(args.out, args.num_samples, args.epochs, seed=args.seed, max_steps=args.max_steps)


if __name__ == "__main__":
    main()
