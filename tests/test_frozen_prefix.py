"""The shared frozen prefix of ViT and Swin (``PromptedBackbone.frozen_prefix``): the stem and the frozen,
prompt-free blocks before the first prompted (or trainable) block run without autograd; the rest records."""

from __future__ import annotations

from typing import List

import pytest
import timm
import torch
from conftest import make_vit

from vpt_lightning import PromptConfig
from vpt_lightning.backbones import prompted_backbone
from vpt_lightning.backbones.base import FrozenPrefix

SWIN = {"img_size": 32, "window_size": 2, "embed_dim": 8, "depths": (2, 2, 2), "num_heads": (1, 2, 2)}


def make_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **SWIN).eval()


def recording_blocks(backbone, images) -> List[bool]:
    """Whether autograd is on in each block in one forward pass: forward hooks on each block's MLP, which every
    path of a block runs (timm's forward, prompted blocks, prompts as keys and values)."""
    seen: List[bool] = []
    hooks = [
        b.mlp.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled())) for b in backbone.blocks()
    ]
    try:
        backbone(images).pow(2).sum().backward()  # (a plain sum of LayerNorm outputs has no gradient)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_blocks_before_the_first_prompted_block_run_without_autograd(family):
    model = make_vit() if family == "vit" else make_swin()
    images = torch.randn(2, 3, 32, 32)
    # ViT: 4 blocks; Swin: 6 blocks in 3 stages (block 2 opens stage 1, after a patch merging)
    depth = [2, 3] if family == "vit" else [3, 4, 5]
    backbone = prompted_backbone(model, PromptConfig(num_tokens=2, depth=depth))
    n = len(backbone.blocks())
    first = depth[0]
    assert backbone.frozen_prefix() == FrozenPrefix(True, first)
    assert recording_blocks(backbone, images) == [i >= first for i in range(n)]
    prompts = next(iter(backbone.prompt_parameters().values()))
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    # a trainable block before the first prompted one moves the start of autograd to it
    backbone.blocks()[1].requires_grad_(True)
    assert backbone.frozen_prefix().first == 1
    assert recording_blocks(backbone, images) == [i >= 1 for i in range(n)]
    assert backbone.blocks()[1].norm1.weight.grad is not None
    backbone.blocks()[1].requires_grad_(False)
    # so does a trainable stem (every block records), and autograd off records nothing anywhere
    stem = model.patch_embed.proj.weight
    stem.requires_grad_(True)
    assert backbone.frozen_prefix().first == 0
    assert recording_blocks(backbone, images) == [True] * n and stem.grad is not None
    stem.requires_grad_(False)
    with torch.no_grad():
        assert backbone.frozen_prefix() == FrozenPrefix(False, 0)


def test_swin_patch_merging_that_trains_records_from_its_stage():
    backbone = prompted_backbone(make_swin(), PromptConfig(num_tokens=2, depth=[4, 5]))
    assert backbone.frozen_prefix().first == 4
    backbone.model.layers[1].downsample.requires_grad_(True)  # runs before block 2, stage 1's first block
    assert backbone.frozen_prefix().first == 2
    assert recording_blocks(backbone, torch.randn(1, 3, 32, 32)) == [False, False, True, True, True, True]


def test_vit_input_prompts_record_from_the_stem():
    backbone = prompted_backbone(make_vit(), PromptConfig(num_tokens=2, deep=False, location="pad"))
    assert backbone.frozen_prefix().first == 0
    assert recording_blocks(backbone, torch.randn(1, 3, 32, 32)) == [True] * 4
