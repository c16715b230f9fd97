"""ViT ablations (paper Figs. 5 and 8, Table 4): prompt locations, output pooling, the MAE and MoCo v3 backbones,
their configs and the paper's numbers for them in vpt-report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_vit, quiet_trainer, run_cli_in_process
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed

from vpt_lightning import PromptConfig, PromptedViT, VPTModule
from vpt_lightning.backbones import create_backbone
from vpt_lightning.config import compose
from vpt_lightning.protocol.report import build_report

D, N_BLOCKS, PATCH, SIZE = 32, 4, 4, 32
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def run_blocks(vit, tokens, insert=None):
    """Blocks of ``vit`` on ``tokens``; ``insert``: prompt tokens put after the class token before block 0."""
    if insert is not None:
        tokens = torch.cat([tokens[:, :1], insert.expand(tokens.shape[0], -1, -1), tokens[:, 1:]], dim=1)
    for block in vit.blocks:
        tokens = block(tokens)
    return tokens


def embed(vit, patches):
    """[CLS, patches] + position embedding, by the equations (standard ViT: class token, pos embed on all)."""
    cls = vit.cls_token.expand(patches.shape[0], -1, -1)
    return torch.cat([cls, patches], dim=1) + vit.pos_embed


def conv_patches(images, weight, bias):
    return F.conv2d(images, weight, bias, stride=PATCH).flatten(2).transpose(1, 2)


# ---- prompt locations ------------------------------------------------------------------------------------
def test_prepend_pixel_is_the_patch_embedded_strip_without_position_embedding(images):
    vit = make_vit()
    model = PromptedViT(vit, PromptConfig(num_tokens=3, deep=False, location="prepend_pixel", pool="all")).eval()
    strip = model.pixel_prompt.detach()
    assert strip.shape == (1, 3, PATCH, PATCH * 3)
    weight, bias = vit.patch_embed.proj.weight, vit.patch_embed.proj.bias
    prompts = conv_patches(strip, weight, bias)  # (1, 3, D): one token per P x P square of the strip
    x = vit.norm(run_blocks(vit, embed(vit, conv_patches(images, weight, bias)), insert=prompts))
    torch.testing.assert_close(model(images), x[:, 1:].mean(1), rtol=1e-5, atol=1e-5)


def test_concat_channel_widens_the_patch_embedding_with_the_pretrained_kernel(images):
    vit = make_vit()
    model = PromptedViT(vit, PromptConfig(num_tokens=2, deep=False, location="concat_channel")).eval()
    proj = model.channel_proj
    assert proj.weight.shape == (D, 5, PATCH, PATCH) and model.channel_prompt.shape == (1, 2, SIZE, SIZE)
    torch.testing.assert_close(proj.weight[:, :3], vit.patch_embed.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(proj.bias, vit.patch_embed.proj.bias, rtol=0, atol=0)
    assert proj.weight[:, 3:].abs().max() <= (6 / (3 * PATCH * PATCH + D)) ** 0.5
    # the conv over [image; prompt channels] = the pretrained conv on the image + the new kernel on the prompt
    channels = model.channel_prompt.detach().expand(images.shape[0], -1, -1, -1)
    patches = conv_patches(images, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias) + conv_patches(
        channels, proj.weight[:, 3:].detach(), None
    )
    x = vit.norm(run_blocks(vit, embed(vit, patches)))
    torch.testing.assert_close(model(images), x[:, 0], rtol=1e-5, atol=1e-5)


def test_pad_resizes_the_model_and_pads_the_normalized_image(images):
    p = 2
    vit = make_vit()
    pos_embed = vit.pos_embed.detach().clone()
    model = PromptedViT(vit, PromptConfig(num_tokens=p, deep=False, location="pad")).eval()
    assert tuple(vit.patch_embed.img_size) == (SIZE + 2 * p, SIZE + 2 * p)
    assert model.data_config()["input_size"] == (3, SIZE, SIZE)  # the images it takes stay the model's size
    grid = (SIZE + 2 * p) // PATCH
    torch.testing.assert_close(vit.pos_embed, resample_abs_pos_embed(pos_embed, (grid, grid), num_prefix_tokens=1))
    pad = model.padding
    assert pad.top_bottom.shape == (1, 3, 2 * p, SIZE + 2 * p) and pad.left_right.shape == (1, 3, SIZE, 2 * p)
    # the border by the official equations: left/right halves beside the image, then top/bottom halves
    lr, tb = (pad.left_right.detach() - MEAN) / STD, (pad.top_bottom.detach() - MEAN) / STD
    canvas = torch.zeros(images.shape[0], 3, SIZE + 2 * p, SIZE + 2 * p)
    canvas[..., p:-p, p:-p] = images
    canvas[..., p:-p, :p], canvas[..., p:-p, -p:] = lr[..., :p], lr[..., p:]
    canvas[..., :p, :], canvas[..., -p:, :] = tb[..., :p, :], tb[..., p:, :]
    torch.testing.assert_close(model(images), vit(canvas), rtol=1e-5, atol=1e-5)  # timm itself on the padded image
    # a border at the ImageNet mean normalises to 0: zero-padding the normalised image
    with torch.no_grad():
        pad.top_bottom.copy_(MEAN.expand_as(pad.top_bottom))
        pad.left_right.copy_(MEAN.expand_as(pad.left_right))
    torch.testing.assert_close(model(images), vit(F.pad(images, (p, p, p, p))), rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"pixel border prompt was built for 32x32 images with 3 channels .*got \(3, 36, 36\)"
    ):
        model(canvas)


@pytest.mark.parametrize(
    "prompt, trainable",
    [
        (dict(num_tokens=4, deep=True), N_BLOCKS * 4 * D),
        (dict(num_tokens=4, deep=True, location="add"), N_BLOCKS * (1 + 64) * D),
        (dict(num_tokens=4, deep=True, location="add1"), N_BLOCKS * D),
        (dict(num_tokens=4, deep=False, location="prepend_pixel"), 3 * PATCH * PATCH * 4),
        (dict(num_tokens=2, deep=False, location="concat_channel"), 2 * SIZE * SIZE + D * 5 * PATCH * PATCH + D),
        (dict(num_tokens=2, deep=False, location="pad"), 3 * 4 * (SIZE + 4) + 3 * SIZE * 4),
    ],
    ids=["prepend", "add", "add1", "prepend_pixel", "concat_channel", "pad"],
)
def test_gradients_reach_only_the_prompts(prompt, trainable, images):
    model = PromptedViT(make_vit(), PromptConfig(**prompt)).train()
    model(images).pow(2).sum().backward()
    prompts = model.prompt_parameters()
    assert sum(p.numel() for p in prompts.values()) == trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts.values())
    assert all(not p.requires_grad and p.grad is None for p in model.vit.parameters())


@pytest.mark.parametrize("location", ["concat_channel", "pad"])
def test_task_checkpoint_holds_only_prompts_and_head(location, tmp_path, images):

    from vpt_lightning.data.synthetic import SyntheticDataModule

    backbone = {"name": "vit_tiny_patch16_224", "kwargs": TINY, "init_seed": 0}
    module = VPTModule(
        num_classes=9,
        backbone=backbone,
        prompt=dict(num_tokens=2, deep=False, location=location),
        optim=dict(base_lr=0.5, warmup_epochs=0),
    )
    data = SyntheticDataModule(task="location", num_train=16, num_val=8, num_test=8, batch_size=8, num_workers=0)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    expected = {f"backbone.{name}" for name in module.backbone.prompt_parameters()} | {"head.weight", "head.bias"}
    assert set(saved) == expected
    reloaded = VPTModule.load_from_checkpoint(path).eval()
    torch.testing.assert_close(reloaded(images), module.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (dict(location="pad", deep=True), "prompt.location='pad' prompts the input image once: set prompt.deep=false"),
        (dict(location="prepend_pixel", deep=False, project=8), "pixel prompts, which are not projected"),
        (dict(location="concat_channel", deep=False, dropout=0.1), "pixel prompts, which get no dropout"),
        (dict(location="pad", deep=False, depth=2), "prompt.depth=2 with prompt.location='pad'"),
        (dict(location="add", pool="prompt"), "prompt.pool='prompt' with prompt.location='add'"),
        (
            dict(pool="max"),
            "prompt.pool='max' is not null (the backbone's default) or one of ['token', 'image', 'prompt', 'all']",
        ),
        (dict(pool_norm="none"), "prompt.pool_norm='none' is not one of ['final', 'fresh']"),
    ],
)
def test_bad_location_or_pool_is_named(prompt, message):
    with pytest.raises(ValueError) as err:
        PromptConfig(**prompt)
    assert message in str(err.value)


def test_pool_needs_what_it_reads():
    with pytest.raises(ValueError, match="prompt.pool='token' needs a class token"):
        PromptedViT(make_vit(class_token=False, global_pool="avg"), PromptConfig(num_tokens=2, pool="token"))
    with pytest.raises(ValueError, match=r"prompt.pool='prompt' needs prompt tokens"):
        PromptedViT(make_vit(), PromptConfig(num_tokens=0, pool="prompt"))


# ---- output pooling ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("vit_kwargs", [{}, {"reg_tokens": 2}], ids=["cls", "registers"])
def test_pools_read_the_right_tokens(vit_kwargs, images):
    p = 5
    vit = make_vit(**vit_kwargs)
    outputs = {
        pool: PromptedViT(vit, PromptConfig(num_tokens=p, deep=True, pool=pool))
        for pool in (None, "token", "image", "prompt", "all")
    }
    for model in outputs.values():  # the same prompts everywhere
        model.prompts.load_state_dict(outputs[None].prompts.state_dict())
    feats = {pool: model.eval()(images) for pool, model in outputs.items()}
    # the final tokens by the equations: [prefix, prompts, patches], prompts replaced before every block
    model, n_prefix = outputs[None], vit.num_prefix_tokens
    tokens = model.prompts.tokens.detach()
    x = model.embed(images)
    for i, block in enumerate(vit.blocks):
        prm = tokens[i].expand(images.shape[0], -1, -1)
        x = block(torch.cat([x[:, :n_prefix], prm, x[:, n_prefix + (p if i else 0) :]], dim=1))
    x = vit.norm(x)
    image, prompt = x[:, n_prefix + p :].mean(1), x[:, n_prefix : n_prefix + p].mean(1)
    torch.testing.assert_close(feats["token"], x[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[None], x[:, 0], rtol=1e-5, atol=1e-5)  # timm's global_pool='token'
    torch.testing.assert_close(feats["image"], image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["prompt"], prompt, rtol=1e-5, atol=1e-5)
    n_image = x.shape[1] - n_prefix - p
    torch.testing.assert_close(feats["all"], (n_image * image + p * prompt) / (n_image + p), rtol=1e-5, atol=1e-5)


def test_fresh_pool_norm_standardises_the_mean_of_prompts_and_patches(images):
    """The official MAE: no pretrained final norm, a fresh LayerNorm (weight 1, bias 0) on the pooled mean."""
    vit = make_vit()
    model = PromptedViT(vit, PromptConfig(num_tokens=3, deep=False, pool="all", pool_norm="fresh")).eval()
    x = run_blocks(vit, model.embed(images), insert=model.prompts.tokens.detach()[0])
    mean = x[:, 1:].mean(1)
    expected = (mean - mean.mean(-1, keepdim=True)) / torch.sqrt(mean.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        vit.norm.weight.mul_(3)
        vit.norm.bias.add_(1)
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)  # the pretrained norm is not in use
    assert [name for name, _ in model.named_parameters() if not name.startswith("model.")] == ["prompts.tokens"]


# ---- MAE and MoCo v3: configs and weight files -------------------------------------------------------------
TINY_OVERRIDES = [f"+backbone.kwargs.{k}={v}" for k, v in TINY.items()]


def test_mae_config_composes_with_the_official_pooling():
    cfg = compose(["backbone=vit_base_patch16_224_mae", "tuning=vpt_deep"])
    assert cfg.backbone.name == "vit_base_patch16_224.mae" and cfg.backbone.pretrained is True
    assert (cfg.prompt.pool, cfg.prompt.pool_norm, cfg.prompt.deep) == ("all", "fresh", True)
    linear = compose(["backbone=vit_base_patch16_224_mae", "tuning=linear"])
    assert (linear.prompt.num_tokens, linear.prompt.pool, linear.prompt.pool_norm) == (0, "all", "fresh")
    timm_own = compose(["backbone=vit_base_patch16_224_mae", "prompt.pool=null", "prompt.pool_norm=final"])
    assert (timm_own.prompt.pool, timm_own.prompt.pool_norm) == (None, "final")


def test_mae_official_file_loads_and_pools_as_the_official_code(tmp_path, images):
    """A file as the official MAE release (``{'model': state_dict}``, final ``norm`` included) into the MAE
    config (tiny): it loads strictly, and the features are the fresh-LayerNorm mean of prompts and patches."""
    source = make_vit(seed=3)
    torch.save({"model": source.state_dict()}, tmp_path / "mae_pretrain_vit_tiny.pth")
    cfg = compose(
        [
            "backbone=vit_base_patch16_224_mae",
            f"backbone.checkpoint_path={tmp_path}/mae_pretrain_vit_tiny.pth",
            *TINY_OVERRIDES,
        ]
    )
    model, identity = create_backbone(dict(cfg.backbone))
    assert identity["weights"] == "file"
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    prompted = PromptedViT(model, PromptConfig(num_tokens=0, pool=cfg.prompt.pool, pool_norm=cfg.prompt.pool_norm))
    mean = run_blocks(source, source.patch_drop(source._pos_embed(source.patch_embed(images))))[:, 1:].mean(1)
    torch.testing.assert_close(prompted(images), F.layer_norm(mean, (D,), eps=1e-6), rtol=1e-5, atol=1e-5)


def mocov3_linear_file(path, state_dict, head=True, extra=()):
    """A file in the format of MoCo v3's linear-probe checkpoint (main_lincls.py under DDP)."""
    weights = {f"module.{k}": v for k, v in state_dict.items()}
    if head:
        weights.update({"module.head.weight": torch.randn(1000, D), "module.head.bias": torch.zeros(1000)})
    weights.update({f"module.{k}": torch.zeros(1) for k in extra})
    torch.save(
        {
            "epoch": 90,
            "arch": "vit_base",
            "state_dict": weights,
            "best_acc1": torch.tensor(76.7),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        },
        path,
    )
    return path


def sincos_vit(seed=5):
    """A tiny ViT with MoCo v3's fixed 2-D sin-cos position embedding (a zero class-token entry)."""
    from timm.layers import build_sincos2d_pos_embed

    vit = make_vit(seed=seed)
    grid = build_sincos2d_pos_embed((SIZE // PATCH, SIZE // PATCH), D)
    with torch.no_grad():
        vit.pos_embed.copy_(torch.cat([torch.zeros(1, D), grid]).unsqueeze(0))
    return vit


def mocov3_cfg(path):
    return compose(["backbone=vit_base_patch16_224_mocov3", f"backbone.checkpoint_path={path}", *TINY_OVERRIDES])


def test_mocov3_linear_probe_file_loads(tmp_path, images):
    source = sincos_vit()
    path = mocov3_linear_file(tmp_path / "linear-vit-b-300ep.pth.tar", source.state_dict())
    cfg = mocov3_cfg(path)
    assert cfg.backbone.reference == "mocov3" and cfg.backbone.pretrained is False
    model, _ = create_backbone(dict(cfg.backbone))
    assert not any(k.startswith("head.") for k in model.state_dict())
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    # the official output: the class token after the final norm
    torch.testing.assert_close(PromptedViT(model, PromptConfig(num_tokens=0))(images), source(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "drop, extra, message",
    [
        ("blocks.1.attn.qkv.weight", (), r"missing keys: blocks\.1\.attn\.qkv\.weight"),
        ("pos_embed", (), r"missing keys: pos_embed"),
        (None, ("predictor.fc.weight",), r"unexpected keys: predictor\.fc\.weight"),
    ],
)
def test_wrong_mocov3_file_names_the_key(drop, extra, message, tmp_path):
    state = {k: v for k, v in sincos_vit().state_dict().items() if k != drop}
    path = mocov3_linear_file(tmp_path / "wrong.pth.tar", state, extra=extra)
    with pytest.raises(ValueError, match=message):
        create_backbone(dict(mocov3_cfg(path).backbone))


def test_mocov3_without_a_file_fails_clearly():
    cfg = compose(["backbone=vit_base_patch16_224_mocov3"])
    message = r"backbone.reference='mocov3': timm has no weights .* set backbone.checkpoint_path .*linear-vit-b-300ep"
    with pytest.raises(ValueError, match=message):
        create_backbone(dict(cfg.backbone))


def test_mocov3_config_prints_with_its_file_still_to_give(tmp_path):
    proc = run_cli_in_process("train", ["backbone=vit_base_patch16_224_mocov3", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  name: vit_base_patch16_224\n" in proc.stdout and "  reference: mocov3\n" in proc.stdout


# ---- the paper's numbers beside ours ---------------------------------------------------------------------
def summary(task, tuning, top1, backbone, reference=None):
    return {
        "task_name": task,
        "tuning": tuning,
        "backbone": backbone,
        "backbone_reference": reference,
        "test_top1": {"mean": top1, "std": 0.0},
        "test_top1_per_seed": {"0": top1},
        "trainable_params": 1,
        "trainable_percent": 0.01,
    }


def vtab_summaries(tuning, backbone, reference=None):
    from vpt_lightning.data.registry import vtab_tasks

    return [summary(t.config_name, tuning, 0.5, backbone, reference) for t in vtab_tasks()]


@pytest.mark.parametrize(
    "backbone, reference, row",
    [
        ("vit_base_patch16_224.mae", None, "| VTAB natural (mean of 7) | 50.00 | 36.02 |"),
        ("vit_base_patch16_224", "mocov3", "| VTAB natural (mean of 7) | 50.00 | 70.27 |"),
        ("swin_base_patch4_window7_224.ms_in22k", None, "| VTAB structured (mean of 8) | 50.00 | 53.35 |"),
    ],
)
def test_report_shows_the_backbones_group_means(backbone, reference, row):
    markdown, table = build_report(vtab_summaries("vpt_deep", backbone, reference))
    assert row in markdown
    means = {"mae": (36.02, 60.61, 26.57), "mocov3": (70.27, 83.04, 42.38)}.get(reference or "mae")
    if "swin" not in backbone:
        assert f"| VTAB mean of the 3 group means | 50.00 | {sum(means) / 3:.2f} |" in markdown
        over_tasks = (7 * means[0] + 4 * means[1] + 8 * means[2]) / 19
        assert f"| VTAB mean over the 19 tasks | 50.00 | {over_tasks:.2f} |" in markdown
    assert "| vtab_cifar100 | 50.00 ± 0.00 (0.01% params) | — |" in markdown  # no per-task numbers
    assert "group means for" in markdown


def test_report_keeps_the_vit_b_numbers_for_other_backbones():
    markdown, _ = build_report(vtab_summaries("vpt_deep", "vit_tiny_patch16_224"))
    assert "| vtab_cifar100 | 50.00 ± 0.00 (0.01% params) | 78.8 |" in markdown


def test_unknown_reference_is_named():
    from vpt_lightning.backbones import BackboneConfig

    with pytest.raises(ValueError, match=r"backbone.reference='moco' is not one of \["):
        BackboneConfig(name="vit_base_patch16_224", reference="moco")
