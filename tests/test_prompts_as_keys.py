"""prompt.kv_only: prompts as keys and values only, in the blocks whose prompt outputs are thrown away.

Every case compares the key/value path with the full path over ``[prefix, prompts, patches]`` on the same model
(``prompt.kv_only=false`` switches it off): logits and prompt gradients, in float64 to 1e-10 and float32 to 1e-5,
with timm's fused attention kernel and with its explicit path (``fused_attn``, which both paths follow).
Which path a block took is read from the rows its MLP saw (N image tokens, or N + p with the prompts)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from conftest import make_vit
from test_attention_kernel import set_fused
from timm.models.vision_transformer import ResPostBlock

from vpt_lightning import PromptConfig, PromptedViT

P = 5  # prompt length; the tiny ViT has 1 + 64 tokens
N = 65


def run(model: PromptedViT, images: torch.Tensor, kv: bool, seed: int = 0) -> Tuple[torch.Tensor, Dict, List[int]]:
    """Logits, prompt gradients and the rows each block's MLP saw, with ``kv_only`` auto (kv) or false."""
    model.prompt_config.kv_only = "auto" if kv else "false"
    rows: List[int] = []
    handles = [b.mlp.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1])) for b in model.vit.blocks]
    model.zero_grad()
    torch.manual_seed(seed)  # same prompt dropout / drop-path draws in both paths
    try:
        out = model(images.to(next(model.parameters()).dtype))
        out.pow(2).sum().backward()
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, rows


def assert_same(model: PromptedViT, images: torch.Tensor, atol: float, grad_rtol: float, n: int = N) -> List[int]:
    """kv and full path agree in logits and every gradient; returns the rows the kv run's MLPs saw."""
    out_kv, grads_kv, rows_kv = run(model, images, kv=True)
    out_full, grads_full, rows_full = run(model, images, kv=False)
    assert out_kv.abs().max() > 0
    assert (out_kv - out_full).abs().max().item() <= atol
    assert grads_kv.keys() == grads_full.keys() and grads_kv
    for name, grad in grads_full.items():
        assert grad.abs().max() > 0, name
        rel = ((grads_kv[name] - grad).norm() / grad.norm()).item()
        assert rel <= grad_rtol, (name, rel)
    assert all(r in (n, n + P) for r in rows_full) and rows_full[-1] == n + P  # the full path carries the prompts
    return rows_kv


def scaled_prompts(model: PromptedViT, factor: float = 5.0) -> PromptedViT:
    with torch.no_grad():  # large enough that they change the output visibly
        model.prompts.tokens.mul_(factor)
    return model


VITS = {
    "cls": {},
    "avg": {"global_pool": "avg", "class_token": False, "fc_norm": True},
    "layerscale": {"init_values": 0.3},
    "qk_norm": {"qk_norm": True},
    "registers": {"reg_tokens": 2},
}


KERNELS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])


@KERNELS
@pytest.mark.parametrize("case", sorted(VITS))
def test_vpt_deep_kv_equals_the_full_path_in_float64(case, fused, images):
    vit = make_vit(num_classes=4, **VITS[case]).double()
    set_fused(vit, fused)
    model = scaled_prompts(PromptedViT(vit, PromptConfig(num_tokens=P)).double())
    assert model.block_paths() == ["kv"] * 4 and model.feature_prompt_tokens == 0
    n = N + 2 if case == "registers" else N - 1 if case == "avg" else N
    rows = assert_same(model, images[:2], atol=1e-10, grad_rtol=1e-10, n=n)
    assert rows == [n] * 4  # no block ran its MLP over prompts


@KERNELS
@pytest.mark.parametrize("batch", [1, 3])
def test_vpt_deep_kv_equals_the_full_path_in_float32(batch, fused, images):
    vit = make_vit(num_classes=4, qk_norm=True, init_values=0.3)
    set_fused(vit, fused)
    model = scaled_prompts(PromptedViT(vit, PromptConfig(num_tokens=P)))
    assert_same(model, images[:batch], atol=1e-5, grad_rtol=1e-5)


def test_per_sample_prompt_dropout_projection_and_drop_path_in_train_mode_stay_exact(images):
    """Prompt dropout gives each sample its own prompts (not one set expanded); drop-path draws one number per
    sample in both paths, so a training backbone stays exact."""
    vit = make_vit(num_classes=4, drop_path_rate=0.5).double()
    config = PromptConfig(num_tokens=P, dropout=0.3, project=8)
    model = PromptedViT(vit, config, backbone_eval=False).double().train()
    assert model.block_paths() == ["kv"] * 4
    rows = assert_same(model, images, atol=1e-10, grad_rtol=1e-10)
    assert rows == [N] * 4


@pytest.mark.parametrize(
    "prompt, paths",
    [
        ({"deep": False}, ["full", "full", "full", "kv"]),  # shallow: prompt outputs read by the next block
        ({"deep": False, "pool": "all"}, ["full"] * 4),
        ({"depth": [0, 1]}, ["kv", "full", "full", "kv"]),  # block 1's outputs go on to blocks 2 and 3
        ({"depth": [0, 1, 3]}, ["kv", "full", "kv", "kv"]),
        ({"pool": "all"}, ["kv", "kv", "kv", "full"]),  # the last block's prompt outputs are pooled
        ({"pool": "prompt"}, ["kv", "kv", "kv", "full"]),
        ({"pool": "image"}, ["kv"] * 4),
        ({"kv_only": False}, ["full"] * 4),
    ],
    ids=["shallow", "shallow-pool-all", "depth-0-1", "depth-0-1-3", "pool-all", "pool-prompt", "pool-image", "off"],
)
def test_blocks_whose_prompt_outputs_are_read_take_the_full_path(prompt, paths, images):
    kv_only = prompt.pop("kv_only", "auto")
    model = scaled_prompts(PromptedViT(make_vit(num_classes=4).double(), PromptConfig(num_tokens=P, **prompt)).double())
    model.prompt_config.kv_only = kv_only if kv_only == "auto" else "false"
    assert model.block_paths() == paths
    if kv_only == "auto":
        rows = assert_same(model, images[:2], atol=1e-10, grad_rtol=1e-10)
        first = 0 if prompt.get("depth") is None else min(prompt["depth"])
        assert rows == [N if path == "kv" or i < first else N + P for i, path in enumerate(paths)]
    else:
        _, _, rows = run(model, images[:2], kv=False)
        assert rows == [N + P] * 4


def test_hooks_dropout_and_other_blocks_fall_back_to_the_full_path(images):
    model = PromptedViT(make_vit(num_classes=4), PromptConfig(num_tokens=P))
    handle = model.vit.blocks[1].register_forward_hook(lambda m, a, o: None)
    assert model.block_paths() == ["kv", "full", "kv", "kv"]  # a hook on a block sees its own forward
    handle.remove()
    handle = model.vit.blocks[2].attn.register_forward_pre_hook(lambda m, a: None)
    assert model.block_paths() == ["kv", "kv", "full", "kv"]
    handle.remove()
    handle = model.vit.blocks[3].attn.attn_drop.register_forward_hook(lambda m, a, o: None)  # AttentionExtract's
    assert model.block_paths() == ["kv", "kv", "kv", "full"]  # the fused kv path never calls attn_drop
    handle.remove()
    # dropout draws depend on the rows: a training backbone with dropout runs the full path (eval mode: kv)
    dropping = PromptedViT(make_vit(num_classes=4, proj_drop_rate=0.1), PromptConfig(num_tokens=P), backbone_eval=False)
    assert dropping.train().block_paths() == ["full"] * 4 and dropping.eval().block_paths() == ["kv"] * 4
    # another block type (post-norm residual block): the full path, equal to kv_only=false
    other = PromptedViT(make_vit(num_classes=4, block_fn=ResPostBlock), PromptConfig(num_tokens=P))
    assert other.block_paths() == ["full"] * 4
    with torch.no_grad():
        auto = other(images)
        other.prompt_config.kv_only = "false"
        torch.testing.assert_close(other(images), auto, rtol=0, atol=0)


def test_grad_checkpointing_recomputes_the_kv_blocks_with_the_same_gradients(images):
    model = scaled_prompts(PromptedViT(make_vit(num_classes=4).double(), PromptConfig(num_tokens=P)).double())
    _, plain, _ = run(model, images, kv=True)
    model.set_grad_checkpointing(True)
    _, checkpointed, rows = run(model, images, kv=True)
    assert rows == [N] * 8  # every kv block ran twice (forward, then recomputed in backward), over N rows
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-10, atol=0)


def test_kv_only_is_checked_and_composes():
    from vpt_lightning.config import compose

    assert PromptConfig(kv_only=False).kv_only == PromptConfig(kv_only="false").kv_only == "false"
    with pytest.raises(ValueError, match=r"prompt.kv_only='always' is not one of \['auto', false\]"):
        PromptConfig(kv_only="always")
    assert compose(["tuning=vpt_deep"]).prompt.kv_only == "auto"
    assert PromptConfig.from_mapping(compose(["tuning=vpt_deep", "prompt.kv_only=false"]).prompt).kv_only == "false"


# ---- Swin: the prompts as keys and values inside every window ------------------------------------------------
def swin_run(backbone, images: torch.Tensor, kv: bool):
    backbone.prompt_config.kv_only = "auto" if kv else "false"
    rows: List[int] = []
    handles = [b.mlp.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[1])) for b in backbone.blocks()]
    backbone.zero_grad()
    try:
        out = backbone(images.double())
        out.pow(2).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return out.detach(), {n: p.grad.clone() for n, p in backbone.prompt_parameters().items()}, rows


SWIN_CASES = {  # prompt config -> block paths (the tiny Swin: 2 + 2 + 2 blocks, shifted windows in blocks 1, 3)
    "deep-pool-all": ({"num_tokens": 3}, ["kv"] * 5 + ["full"]),
    "deep-pool-image": ({"num_tokens": 3, "pool": "image"}, ["kv"] * 6),
    "depth-0-1-4": ({"num_tokens": 2, "depth": [0, 1, 4], "pool": "image"}, ["kv", "full", "full", "kv", "full", "kv"]),
    "shallow": ({"num_tokens": 3, "deep": False}, ["full"] * 6),
}


@KERNELS
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", sorted(SWIN_CASES))
def test_swin_kv_equals_the_full_path_in_float64(case, batch, fused):
    from test_prompted_swin import make_swin

    from vpt_lightning.backbones import prompted_backbone

    prompt, paths = SWIN_CASES[case]
    swin = make_swin().double()
    set_fused(swin, fused)
    backbone = prompted_backbone(swin, prompt).double()
    with torch.no_grad():
        for prompts in backbone.prompts.values():
            prompts.tokens.mul_(5.0)
    assert backbone.block_paths() == paths
    torch.manual_seed(7)
    images = torch.randn(batch, 3, 32, 32)
    out_kv, grads_kv, rows_kv = swin_run(backbone, images, kv=True)
    out_full, grads_full, rows_full = swin_run(backbone, images, kv=False)
    assert (out_kv - out_full).abs().max() <= 1e-10 and out_kv.abs().max() > 0
    for name, grad in grads_full.items():
        assert grad.abs().max() > 0 and ((grads_kv[name] - grad).norm() / grad.norm()) <= 1e-10, name
    image_rows = [64, 64, 16, 16, 4, 4]  # tokens per image in each stage
    first = min(backbone.prompt_sets)
    assert rows_kv == [
        n if path == "kv" or i < first else n + prompt["num_tokens"]
        for i, (n, path) in enumerate(zip(image_rows, paths))
    ]
    assert rows_full == [n + prompt["num_tokens"] if i >= first else n for i, n in enumerate(image_rows)]


@KERNELS
def test_swin_kv_in_float32_and_with_grad_checkpointing(fused):
    from test_prompted_swin import make_swin

    from vpt_lightning.backbones import prompted_backbone

    swin = make_swin()
    set_fused(swin, fused)
    backbone = prompted_backbone(swin, {"num_tokens": 4, "pool": "image"})
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    results = []
    for kv, checkpointing in ((False, False), (True, False), (True, True)):
        backbone.prompt_config.kv_only = "auto" if kv else "false"
        backbone.set_grad_checkpointing(checkpointing)
        backbone.zero_grad()
        out = backbone(images)
        out.pow(2).sum().backward()
        results.append((out.detach(), backbone.prompts["0"].tokens.grad.clone()))
    (out_full, grad_full), *others = results
    for out, grad in others:
        assert (out - out_full).abs().max() <= 1e-5
        assert (grad - grad_full).norm() / grad_full.norm() <= 1e-5
