"""The guard of the bf16 speed: under bf16 autocast, the prompted blocks run the attention that timm's own block
would run (``Attention.fused_attn`` / ``WindowAttention.fused_attn``: ``F.scaled_dot_product_attention``'s CPU
flash kernel, or timm's explicit ``softmax(q * scale @ k^T) @ v``), and every matrix product in bfloat16, in the
forward and the backward pass. No wall time: the aten ops that run are recorded with their inputs' dtypes (a
``TorchDispatchMode`` below autocast sees the ops after its casts). A path that calls the fused kernel whatever
timm's block says, or one that computes in float32 under bf16 autocast, fails here."""

from __future__ import annotations

from collections import Counter
from typing import Set, Tuple

import pytest
import torch
from conftest import make_vit
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vpt_lightning import PromptConfig, PromptedViT
from vpt_lightning.backbones import prompted_backbone

FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"  # the CPU kernel timm's fused path reaches in bf16
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
Ops = Counter  # (op name, dtypes of its tensor arguments) -> calls


class RecordOps(TorchDispatchMode):
    """Every aten op that runs, with the dtypes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        self.ops[func.name(), dtypes] += 1
        return func(*args, **(kwargs or {}))


def bf16_step_ops(model: nn.Module, images: torch.Tensor) -> Ops:
    """The ops of one bf16-autocast forward and backward pass of ``model``."""
    with RecordOps() as record:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        out.float().pow(2).sum().backward()
    return record.ops


def set_fused(model: nn.Module, fused: bool) -> None:
    """What ``TIMM_FUSED_ATTN=1`` / ``0`` sets on every timm attention when the model is built."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def attention_ops(ops: Ops) -> Set[Tuple[str, torch.dtype]]:
    """The attention kernels and softmaxes that ran (forward and backward), each with the dtype of its first
    (query / scores) argument: one pair per dtype it ran in."""
    kinds = ("scaled_dot_product", "_softmax")
    return {(name, dtypes[0]) for (name, dtypes) in ops if any(k in name for k in kinds) and "log_softmax" not in name}


def check(ops: Ops, fused: bool, softmax_dtype: torch.dtype = torch.bfloat16) -> None:
    """``fused``: the CPU flash kernel in bf16 (not the slow math fall-back); else timm's explicit path, its softmax
    in ``softmax_dtype``. Either way every matrix product in bf16."""
    if fused:
        assert attention_ops(ops) == {(FUSED, torch.bfloat16), (f"{FUSED}_backward", torch.bfloat16)}
    else:
        expected = {("aten::_softmax", softmax_dtype), ("aten::_softmax_backward_data", softmax_dtype)}
        assert attention_ops(ops) == expected
    matmuls = {dtypes for (name, dtypes) in ops if name in MATMULS or "scaled_dot_product" in name}
    assert matmuls and all(d == torch.bfloat16 for dtypes in matmuls for d in dtypes[:3]), matmuls  # no fp32


@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_vit_prompt_key_blocks_follow_timms_attention_choice_in_bf16(fused):
    images = torch.randn(2, 3, 32, 32)
    vit = make_vit(num_classes=4)
    set_fused(vit, fused)
    check(bf16_step_ops(vit, images), fused)  # timm's own blocks, without prompts
    model = PromptedViT(vit, PromptConfig(num_tokens=5))
    assert model.block_paths() == ["kv"] * 4
    check(bf16_step_ops(model, images), fused)


@pytest.mark.parametrize("kv_only", ["auto", "false"])
@pytest.mark.parametrize("fused", [False, True], ids=["explicit", "fused"])
def test_swin_prompted_windows_follow_timms_attention_choice_in_bf16(fused, kv_only):
    """Both Swin paths: prompts as keys and values, and prompts through the whole block (their window attention).
    timm's explicit window attention adds its float32 position bias to the bf16 scores: softmax in float32, and so
    do the prompted windows. (timm's own fused window attention passes that float32 bias to the kernel, which then
    runs its math fall-back in float32 under bf16 autocast; the prompted windows give it the bias in q's dtype.)"""
    from test_prompted_swin import make_swin

    images = torch.randn(2, 3, 32, 32)
    swin = make_swin()
    set_fused(swin, fused)
    if not fused:
        check(bf16_step_ops(swin, images), fused, torch.float32)  # timm's own blocks, without prompts
    backbone = prompted_backbone(swin, {"num_tokens": 3, "pool": "image", "kv_only": kv_only})
    assert set(backbone.block_paths()) == {"kv" if kv_only == "auto" else "full"}
    check(bf16_step_ops(backbone, images), fused, torch.float32)
