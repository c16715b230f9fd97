"""PromptedViT against timm's own forward and against an independent per-block reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_vit

from vpt_lightning import PromptConfig, PromptedViT

D, N_BLOCKS, N_PATCHES = 32, 4, 64


def reference_features(vit, images, prompt_sets, location="prepend"):
    """Independent reference: embed by hand, then loop over the blocks inserting prompts as the paper says.

    ``prompt_sets`` maps block index -> (p, d) prompt tensor. Prepend: the first prompted block inserts the
    prompts after the prefix tokens, every later prompted block *replaces* the previous prompt outputs, blocks
    without a set pass them on. Add / add1: the prompts are added to every token (class token included), at
    each prompted block. Returns the pooled features.
    """
    b = images.shape[0]
    patches = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # conv patchify
    prefix = []
    if vit.cls_token is not None:
        prefix.append(vit.cls_token.expand(b, -1, -1))
    if vit.reg_token is not None:
        prefix.append(vit.reg_token.expand(b, -1, -1))
    n_prefix = sum(t.shape[1] for t in prefix)
    if vit.no_embed_class:
        x = torch.cat(prefix + [patches + vit.pos_embed], dim=1)
    else:
        x = torch.cat(prefix + [patches], dim=1) + vit.pos_embed
    p_len = 0
    for i, block in enumerate(vit.blocks):
        if i in prompt_sets:
            prm = prompt_sets[i].unsqueeze(0).expand(b, -1, -1)
            if location in ("add", "add1"):
                x = x + prm  # (b, n_prefix + n_patches or 1, d)
            else:
                x = torch.cat([x[:, :n_prefix], prm, x[:, n_prefix + p_len :]], dim=1)
                p_len = prm.shape[1]
        x = block(x)
    x = vit.norm(x)
    image_tokens = x[:, n_prefix + p_len :]
    if vit.global_pool == "token":
        return x[:, 0]
    return vit.fc_norm(image_tokens.mean(dim=1))


def sets_of(model: PromptedViT):
    tokens = model.prompts.tokens.detach()
    if model.prompt_config.project > 0:  # projected prompts, computed here: tokens @ W^T + b
        weight, bias = model.prompts.proj.weight.detach(), model.prompts.proj.bias.detach()
        tokens = tokens @ weight.T + bias
    return {block: tokens[i] for block, i in model.prompt_sets.items()}


@pytest.mark.parametrize(
    "vit_kwargs",
    [{}, {"global_pool": "avg", "class_token": False, "fc_norm": True}, {"reg_tokens": 2}, {"no_embed_class": True}],
    ids=["cls", "avgpool-no-cls", "registers", "no-embed-class"],
)
def test_without_prompts_equals_timm(vit_kwargs, images):
    vit = make_vit(num_classes=7, **vit_kwargs)
    model = PromptedViT(vit, PromptConfig(num_tokens=0))
    torch.testing.assert_close(model(images), vit(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "vit_kwargs",
    [
        {},
        {"global_pool": "avg", "class_token": False, "fc_norm": True},
        {"global_pool": "avg", "fc_norm": True},
        {"reg_tokens": 2},
        {"no_embed_class": True},
    ],
    ids=["cls", "avgpool-no-cls", "cls-avgpool-mae", "registers", "no-embed-class"],
)
@pytest.mark.parametrize(
    "prompt",
    [
        dict(num_tokens=5, deep=True),
        dict(num_tokens=3, deep=False),
        dict(num_tokens=4, deep=True, depth=2),
        dict(num_tokens=4, deep=True, depth=[1, 3]),
        dict(num_tokens=2, deep=False, depth=2),
        dict(num_tokens=1, deep=True, location="add1"),
        dict(num_tokens=7, deep=True, location="add"),
        dict(num_tokens=3, deep=False, location="add"),
        dict(num_tokens=5, deep=True, project=8),
        dict(num_tokens=3, deep=False, depth=1, project=8),
    ],
    ids=[
        "deep",
        "shallow",
        "deep-first2",
        "deep-list",
        "shallow-at2",
        "add1-deep",
        "add-deep",
        "add-shallow",
        "deep-project",
        "shallow-project",
    ],
)
def test_prompted_features_equal_reference(vit_kwargs, prompt, images):
    vit = make_vit(**vit_kwargs)
    model = PromptedViT(vit, PromptConfig(**prompt)).eval()
    if prompt.get("project", -1) > 0:  # the projection's bias starts at zero: make it count
        torch.nn.init.normal_(model.prompts.proj.bias)
    expected = reference_features(vit, images, sets_of(model), prompt.get("location", "prepend"))
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_prompts_change_the_output(images):
    vit = make_vit()
    assert not torch.allclose(PromptedViT(vit, PromptConfig(num_tokens=5))(images), vit(images))


def test_gradients_reach_every_prompt_set_and_no_backbone_weight(images):
    model = PromptedViT(make_vit(), PromptConfig(num_tokens=3, deep=True, depth=[0, 2, 3]))
    model.train()
    model(images).pow(2).sum().backward()
    grad = model.prompts.tokens.grad
    assert grad is not None and grad.shape == (3, 3, D)
    assert all(grad[i].abs().sum() > 0 for i in range(3))
    assert all(not p.requires_grad and p.grad is None for p in model.vit.parameters())


@pytest.mark.parametrize(
    "prompt, expected",
    [
        (dict(num_tokens=10, deep=False), 10 * D),
        (dict(num_tokens=10, deep=True), N_BLOCKS * 10 * D),
        (dict(num_tokens=7, deep=True, depth=3), 3 * 7 * D),
        (dict(num_tokens=7, deep=True, depth=[0, 3]), 2 * 7 * D),
        (dict(num_tokens=5, deep=True, project=8), N_BLOCKS * 5 * 8 + 8 * D + D),
        (dict(num_tokens=0), 0),
    ],
)
def test_trainable_parameter_counts(prompt, expected):
    model = PromptedViT(make_vit(), PromptConfig(**prompt))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_xavier_uniform_init_bound():
    model = PromptedViT(make_vit(), PromptConfig(num_tokens=50, deep=True))
    bound = math.sqrt(6.0 / (3 * 4 * 4 + D))
    tokens = model.prompts.tokens.detach()
    assert tokens.abs().max() <= bound
    # uniform(-v, v) has std v / sqrt(3)
    assert abs(tokens.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_backbone_stays_in_eval_mode_and_prompt_dropout_trains(images):
    model = PromptedViT(make_vit(drop_rate=0.5, drop_path_rate=0.5), PromptConfig(num_tokens=4, dropout=0.5))
    model.train()
    assert model.training and model.prompts.training
    assert not any(m.training for m in model.vit.modules())
    # prompt dropout is random in train mode, the output is deterministic in eval mode
    assert not torch.allclose(model(images), model(images))
    model.eval()
    torch.testing.assert_close(model(images), model(images))


def test_backbone_may_train_when_asked():
    model = PromptedViT(make_vit(), PromptConfig(num_tokens=4), freeze_backbone=False, backbone_eval=False).train()
    assert all(m.training for m in model.vit.modules())
    assert all(p.requires_grad for p in model.vit.parameters())


def test_frozen_blocks_before_the_first_prompt_run_without_autograd(images):
    model = PromptedViT(make_vit(), PromptConfig(num_tokens=3, deep=False, depth=2)).train()
    recorded = {}
    for i, block in enumerate(model.vit.blocks):
        block.register_forward_hook(lambda mod, inp, out, i=i: recorded.__setitem__(i, out.requires_grad))
    model(images).pow(2).sum().backward()
    assert recorded == {0: False, 1: False, 2: True, 3: True}
    assert model.prompts.tokens.grad is not None and model.prompts.tokens.grad.abs().sum() > 0


def test_linear_probe_builds_no_graph(images):
    model = PromptedViT(make_vit(), PromptConfig(num_tokens=0)).train()
    assert not model(images).requires_grad


def test_gradient_checkpointing_gives_the_same_gradients(images):
    grads = []
    for checkpointing in (False, True):
        model = PromptedViT(make_vit(), PromptConfig(num_tokens=3))
        torch.manual_seed(0)
        model.prompts.tokens.data.normal_()
        model.set_grad_checkpointing(checkpointing)
        model(images).pow(2).sum().backward()
        grads.append(model.prompts.tokens.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "prompt, message",
    [
        (dict(num_tokens=-1), "prompt.num_tokens=-1"),
        (
            dict(location="middle"),
            "prompt.location='middle' is not one of "
            "['prepend', 'add', 'add1', 'prepend_pixel', 'concat_channel', 'pad']",
        ),
        (dict(dropout=1.5), "prompt.dropout=1.5"),
        (dict(deep=False, depth=[0, 1]), "prompt.deep=false"),
        (dict(project=0), "prompt.project=0"),
        (dict(init="normal"), "prompt.init='normal'"),
        (dict(dropout="0.1x"), "prompt.dropout='0.1x' is not a valid number; it must be a number in [0, 1)"),
        (dict(num_tokens="ten"), "prompt.num_tokens='ten' is not a valid number; it must be an integer >= 0"),
        (dict(num_tokens=2.5), "prompt.num_tokens=2.5 is not a valid number; it must be an integer >= 0"),
        (dict(project="8x"), "prompt.project='8x' is not a valid number; it must be -1 (off) or a positive"),
        (dict(depth="two"), "prompt.depth='two' is not a valid number; it must be null, an integer or a list"),
        (dict(depth=[0, "1x"]), "prompt.depth='1x' is not a valid number"),
        (dict(dropout=True), "prompt.dropout=True is not a valid number"),
        (dict(deep="false"), "prompt.deep='false' must be true (VPT-Deep) or false (VPT-Shallow)"),
    ],
)
def test_bad_prompt_config_names_the_key(prompt, message):
    with pytest.raises(ValueError) as err:
        PromptConfig(**prompt)
    assert message in str(err.value)


def test_numeric_strings_are_converted():
    config = PromptConfig(num_tokens="5", dropout="0.1", project="8", depth="2")
    assert (config.num_tokens, config.dropout, config.project, config.depth) == (5, 0.1, 8, 2)
    assert PromptConfig(depth=["0", 3.0]).depth == [0, 3]


def test_backbone_without_pooling_is_refused():
    with pytest.raises(ValueError, match=r"backbone.kwargs.global_pool='' gives one output per token.*'token', 'avg'"):
        PromptedViT(make_vit(global_pool=""), PromptConfig(num_tokens=2))


def test_unknown_prompt_key_is_named():
    with pytest.raises(ValueError, match=r"unknown prompt option\(s\) \['tokens'\]"):
        PromptConfig.from_mapping({"tokens": 3})


@pytest.mark.parametrize(
    "prompt, message",
    [
        (dict(num_tokens=3, depth=9), r"prompt.depth=9 .* must be in \[1, 4\]"),
        (dict(num_tokens=3, depth=[0, 7]), r"block\(s\) \[7\], but the backbone has blocks 0..3"),
    ],
)
def test_prompt_config_checked_against_backbone(prompt, message):
    with pytest.raises(ValueError, match=message):
        PromptedViT(make_vit(), PromptConfig(**prompt))


def test_non_vit_model_is_rejected():
    with pytest.raises(TypeError, match=r"needs a timm VisionTransformer .*got Linear"):
        PromptedViT(torch.nn.Linear(2, 2), PromptConfig())


# ---- fast paths of the frozen backbone: grad mode per block, and what gradient checkpointing recomputes ----
def _record_grad_mode(model: PromptedViT) -> dict:
    """Forward pre-hooks on patch_embed and every block: the grad mode each one sees when it runs."""
    seen = {}
    model.vit.patch_embed.register_forward_pre_hook(
        lambda mod, inp: seen.__setitem__("patch_embed", torch.is_grad_enabled())
    )
    for i, block in enumerate(model.vit.blocks):
        block.register_forward_pre_hook(lambda mod, inp, i=i: seen.__setitem__(i, torch.is_grad_enabled()))
    return seen


def test_grad_mode_is_off_in_the_frozen_blocks_before_the_first_prompted_block(images):
    model = PromptedViT(make_vit(), PromptConfig(num_tokens=3, depth=[2, 3])).train()
    seen = _record_grad_mode(model)
    assert torch.is_grad_enabled()
    out = model(images)
    assert seen == {"patch_embed": False, 0: False, 1: False, 2: True, 3: True}
    assert out.requires_grad


def test_linear_probe_runs_patch_embed_and_every_block_without_grad_mode(images):
    model = PromptedViT(make_vit(), PromptConfig(num_tokens=0)).train()
    seen = _record_grad_mode(model)
    model(images)
    assert seen == {"patch_embed": False, 0: False, 1: False, 2: False, 3: False}


def _count_block_calls(blocks, run_forward):
    """Calls of each block's forward during the forward pass, and in total after backward."""
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda mod, inp, i=i: calls.__setitem__(i, calls[i] + 1))
    out = run_forward()
    after_forward = list(calls)
    out.pow(2).sum().backward()  # not out.sum(): the sum of a LayerNorm'd output has (numerically) zero gradient
    return after_forward, calls


@pytest.mark.parametrize("checkpointing, expected", [(False, [1, 1, 1, 1]), (True, [1, 1, 2, 2])])
def test_grad_checkpointing_recomputes_the_prompted_blocks_in_backward(images, checkpointing, expected):
    model = PromptedViT(make_vit(), PromptConfig(num_tokens=3, depth=[2, 3])).train()
    model.set_grad_checkpointing(checkpointing)
    after_forward, total = _count_block_calls(model.vit.blocks, lambda: model(images))
    assert after_forward == [1, 1, 1, 1]
    assert total == expected  # frozen leading blocks ran without autograd: nothing to recompute
    assert model.prompts.tokens.grad is not None and model.prompts.tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("checkpointing, expected", [(False, [1, 1, 1, 1]), (True, [1, 1, 2, 2])])
def test_vpt_module_grad_checkpointing_recomputes_blocks(images, checkpointing, expected):
    from conftest import TINY_BACKBONE

    from vpt_lightning import VPTModule

    module = VPTModule(
        num_classes=5,
        backbone=TINY_BACKBONE,
        prompt={"num_tokens": 3, "depth": [2, 3]},
        grad_checkpointing=checkpointing,
    ).train()
    after_forward, total = _count_block_calls(module.backbone.vit.blocks, lambda: module(images))
    assert after_forward == [1, 1, 1, 1]
    assert total == expected
    assert module.backbone.prompts.tokens.grad is not None and module.head.weight.grad is not None
