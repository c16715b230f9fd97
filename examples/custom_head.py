"""Subclass VPTModule in your own Lightning project: a custom head and loss, no Hydra needed.

    python examples/custom_head.py                # the packaged pretrained mini ViT, 5 epochs
    python examples/custom_head.py --epochs 1 --limit-batches 2   # a quick check
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from torch import nn

from vpt_lightning import VPTModule
from vpt_lightning.config import asset_path
from vpt_lightning.data.synthetic import SyntheticDataModule
from vpt_lightning.heads import register_head


# registered by name, so that the task's package can be loaded and served: vpt-serve --import examples/custom_head.py
@register_head("examples.cosine")
class CosineHead(nn.Module):
    """A cosine-similarity classifier with a learnable temperature."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(2.5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosine = nn.functional.normalize(features, dim=-1) @ nn.functional.normalize(self.weight, dim=-1).T
        return cosine * self.log_scale.exp()


class CosineVPT(VPTModule):
    """VPT-Deep with a cosine head and label smoothing: only the two hooks change."""

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        return CosineHead(in_features, num_classes)

    def build_loss(self) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=0.1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit-batches", type=float, default=1.0)
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    data = SyntheticDataModule(task="orientation", num_train=1000, num_val=200, num_test=500, batch_size=64, num_workers=0)
    module = CosineVPT(
        num_classes=data.num_classes,
        backbone={
            "name": "vit_tiny_patch16_224",
            "checkpoint_path": asset_path("quickstart_vit.safetensors"),
            "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3},
        },
        prompt={"num_tokens": 10, "deep": True},
        optim={"base_lr": 10.0, "warmup_epochs": 1},
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
        limit_test_batches=args.limit_batches,
    )
    trainer.fit(module, datamodule=data)
    results = trainer.test(module, datamodule=data)[0]
    print(f"test top-1 with a cosine head: {100 * results['test/top1']:.1f}%")
    return results


if __name__ == "__main__":
    main()
