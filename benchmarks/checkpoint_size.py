"""Size of a VPT-Deep task checkpoint for the paper's ViT-B/16 (random init: no download needed).

python benchmarks/checkpoint_size.py --num-tokens 50 --num-classes 100
"""

from __future__ import annotations

import argparse
import os
import tempfile

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from vpt_lightning import VPTModule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="vit_base_patch16_224.orig_in21k")
    parser.add_argument("--num-tokens", type=int, default=50)
    parser.add_argument("--num-classes", type=int, default=100)
    args = parser.parse_args()
    module = VPTModule(
        num_classes=args.num_classes,
        backbone={"name": args.backbone, "pretrained": False},
        prompt={"num_tokens": args.num_tokens, "deep": True},
    )
    images = torch.randn(4, 3, 224, 224)
    labels = torch.randint(0, args.num_classes, (4,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(tmp, "full.pt")
        torch.save(module.backbone.vit.state_dict(), full)
        # two real SGD steps, so the checkpoint holds momentum buffers as after training
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=False,
            max_steps=2,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, train_dataloaders=loader)
        task = os.path.join(tmp, "task.ckpt")
        trainer.save_checkpoint(task)
        counts = module.parameter_counts()
        print(f"backbone {args.backbone}: {os.path.getsize(full) / 1e6:.1f} MB of weights")
        print(
            f"VPT-Deep p={args.num_tokens}, {args.num_classes} classes: {counts['trainable_params']:,} trainable "
            f"({counts['trainable_percent']:.2f}% of the backbone); task checkpoint (Lightning, with optimizer "
            f"state) {os.path.getsize(task) / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    main()
