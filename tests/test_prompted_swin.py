"""VPT on Swin (paper §4.2): PromptedSwin against timm with prompts off, against a per-image computation written here
from the equations (windows, relative position bias, shift mask, patch merging), batch independence, parameter
counts, training only prompts and head, weight files, and the configs."""

from __future__ import annotations

import math
from typing import Dict

import pytest
import timm
import torch
from conftest import SMOKE_RUN, make_vit, quiet_trainer
from safetensors.torch import save_file
from torch import nn

from vpt_lightning import VPTModule
from vpt_lightning.backbones import create_backbone, family_class_of_model, prompted_backbone
from vpt_lightning.backbones.swin import PromptedSwin, prompted_block
from vpt_lightning.config import compose
from vpt_lightning.data.synthetic import SyntheticDataModule
from vpt_lightning.sharing.checkpoint import read_task_checkpoint

# 32 px, patch 4: an 8x8 grid; window 2: stage 0 has 16 windows (shifted by 1 in block 1), stage 1 4x4 with 4
# windows (shifted), stage 2 2x2 with one window (no shift)
SWIN = {"img_size": 32, "window_size": 2, "embed_dim": 8, "depths": (2, 2, 2), "num_heads": (1, 2, 2)}
SWIN_BACKBONE = {"name": "swin_tiny_patch4_window7_224", "kwargs": SWIN, "init_seed": 0}


def make_swin(seed: int = 0, **overrides) -> nn.Module:
    """A tiny random timm Swin with every weight randomised (timm's init leaves small tables and unit norms)."""
    torch.manual_seed(seed)
    model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **{**SWIN, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "relative_position_bias_table" in name else 0.2).add_(1.0 if "norm" in name else 0.0)
    return model.eval()


# ---- the independent computation: one image at a time, one window at a time, from the equations ----------------
def ref_block(block, x: torch.Tensor, prompts: torch.Tensor) -> tuple:
    """Swin block with prompts on one image: x (H, W, C), prompts (p, C)."""
    height, width, dim = x.shape
    p = prompts.shape[0]
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    attn = block.attn
    heads = attn.num_heads
    normed, normed_prompts = block.norm1(x), block.norm1(prompts)
    shifted = torch.roll(normed, shifts=(-sh, -sw), dims=(0, 1))
    # the shift mask's regions (Swin paper): rows [0, H-wh), [H-wh, H-sh), [H-sh, H); columns alike
    rows, cols = torch.arange(height), torch.arange(width)
    band_h = (rows >= height - wh).long() + (rows >= height - sh).long() if sh else torch.zeros_like(rows)
    band_w = (cols >= width - ww).long() + (cols >= width - sw).long() if sw else torch.zeros_like(cols)
    region = band_h[:, None] * 3 + band_w[None, :]
    local = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"), -1).reshape(-1, 2)
    rel = local[:, None, :] - local[None, :, :]  # (N, N, 2) relative (dy, dx)
    table_index = (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)
    pos_bias = attn.relative_position_bias_table[table_index].permute(2, 0, 1)  # (heads, N, N)
    out_map = torch.empty_like(x)
    prompt_outs = []
    for i in range(height // wh):
        for j in range(width // ww):
            window = shifted[i * wh : (i + 1) * wh, j * ww : (j + 1) * ww].reshape(-1, dim)
            seq = torch.cat([normed_prompts, window])
            qkv = attn.qkv(seq).reshape(len(seq), 3, heads, -1)
            q, k, v = (qkv[:, n].transpose(0, 1) for n in range(3))  # (heads, L, d)
            logits = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
            logits[:, p:, p:] += pos_bias
            labels = region[i * wh : (i + 1) * wh, j * ww : (j + 1) * ww].reshape(-1)
            logits[:, p:, p:] -= 100.0 * (labels[:, None] != labels[None, :]).float()
            out = attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(len(seq), -1))
            prompt_outs.append(out[:p])
            out_map[i * wh : (i + 1) * wh, j * ww : (j + 1) * ww] = out[p:].reshape(wh, ww, dim)
    out_map = torch.roll(out_map, shifts=(sh, sw), dims=(0, 1))
    tokens = torch.cat([prompts + torch.stack(prompt_outs).mean(0), (x + out_map).reshape(-1, dim)])
    tokens = tokens + block.mlp(block.norm2(tokens))
    return tokens[p:].reshape(height, width, dim), tokens[:p]


def ref_merge(merging, x: torch.Tensor, prompts: torch.Tensor) -> tuple:
    """The original Swin patch merging (x0, x1, x2, x3 concatenated) and the prompts tiled 4x along channels."""
    merged = torch.cat([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]], -1)
    return merging.reduction(merging.norm(merged)), merging.reduction(merging.norm(prompts.repeat(1, 4)))


def ref_features(model, image: torch.Tensor, sets: Dict[int, torch.Tensor], pool: str) -> torch.Tensor:
    """The pooled feature of one image; ``sets``: flat block index -> the (p, C) prompts inserted there."""
    x = model.patch_embed(image[None])[0]
    prompts = torch.zeros(0, x.shape[-1])
    index = 0
    for s, stage in enumerate(model.layers):
        if s > 0:
            x, prompts = ref_merge(stage.downsample, x, prompts)
        for block in stage.blocks:
            prompts = sets.get(index, prompts)
            x, prompts = ref_block(block, x, prompts)
            index += 1
    image_tokens = model.norm(x).reshape(-1, x.shape[-1])
    tokens = torch.cat([model.norm(prompts), image_tokens]) if pool == "all" else image_tokens
    return tokens.mean(0)


@pytest.fixture
def swin_images() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randn(3, 3, 32, 32)


def test_prompts_off_equal_timm_and_a_prompt_free_block_equals_timms(swin_images):
    model = make_swin()
    backbone = prompted_backbone(model, {"num_tokens": 0})
    assert isinstance(backbone, PromptedSwin)
    expected = model.forward_head(model.forward_features(swin_images), pre_logits=True)
    torch.testing.assert_close(backbone(swin_images), expected, rtol=0, atol=1e-5)
    x = model.patch_embed(swin_images)
    for stage in model.layers:
        x = stage.downsample(x)
        for block in stage.blocks:  # shifted and plain windows, several and one per image
            ours, prompts = prompted_block(block, x, x.new_zeros(3, 0, x.shape[-1]))
            x = block(x)
            torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)
            assert prompts.shape == (3, 0, x.shape[-1])


CASES = {  # name: prompt config, expected {flat block: (stage, set index)}
    "deep": ({"num_tokens": 3, "deep": True, "pool": "all"}, {i: (i // 2, i % 2) for i in range(6)}),
    "shallow": ({"num_tokens": 3, "deep": False, "pool": "image"}, {0: (0, 0)}),
    "shallow_in_stage_1": ({"num_tokens": 2, "deep": False, "depth": 3, "pool": "all"}, {3: (1, 0)}),
    "deep_blocks_0_1_4": ({"num_tokens": 2, "depth": [0, 1, 4], "pool": "image"}, {0: (0, 0), 1: (0, 1), 4: (2, 0)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_features_equal_a_per_image_computation_from_the_equations(swin_images, case):
    prompt, where = CASES[case]
    model = make_swin()
    backbone = prompted_backbone(model, prompt)
    with torch.no_grad():
        for prompts in backbone.prompts.values():  # scaled up so that they matter
            prompts.tokens.mul_(5.0)
        sets = {block: backbone.prompts[str(stage)].tokens[i] for block, (stage, i) in where.items()}
        assert sum(p.shape[0] for p in backbone.prompt_parameters().values()) == len(where)
        ours = backbone(swin_images[:2])
        expected = torch.stack([ref_features(model, image, sets, prompt["pool"]) for image in swin_images[:2]])
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
        assert (ours - prompted_backbone(model, {"num_tokens": 0})(swin_images[:2])).abs().max() > 1e-2


@pytest.mark.parametrize("deep", [True, False])
def test_an_image_gets_the_same_output_in_a_batch_of_one_and_of_two(swin_images, deep):
    backbone = prompted_backbone(make_swin(), {"num_tokens": 4, "deep": deep})
    with torch.no_grad():
        pair = backbone(swin_images[:2])
        torch.testing.assert_close(backbone(swin_images[:1]), pair[:1], rtol=0, atol=1e-6)
        torch.testing.assert_close(backbone(swin_images[1:2]), pair[1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("deep", [True, False])
def test_merged_prompts_reach_the_output_only_in_shallow_mode(swin_images, deep):
    """Spec §9.3: in VPT-Deep the prompts leaving patch merging are replaced (zeroing them changes nothing)."""
    backbone = prompted_backbone(make_swin(), {"num_tokens": 3, "deep": deep})
    before = backbone(swin_images)

    def zero_prompt_tiles(module, inputs, output):  # prompts go through merging as (B, 2p, 2, C) tiles
        return torch.zeros_like(output) if inputs[0].shape[1:3] == (6, 2) else None

    for stage in backbone.model.layers[1:]:
        stage.downsample.register_forward_hook(zero_prompt_tiles)
    changed = (backbone(swin_images) - before).abs().max()
    assert changed == 0 if deep else changed > 1e-3


@pytest.mark.parametrize("prompt", [{"num_tokens": 2}, {"num_tokens": 2, "deep": False, "depth": 3}])
def test_gradient_checkpointing_gives_the_same_prompt_gradients(swin_images, prompt):
    backbone = prompted_backbone(make_swin(), prompt)
    grads = []
    for enable in (False, True):
        backbone.set_grad_checkpointing(enable)
        backbone.zero_grad()
        backbone(swin_images).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in backbone.prompt_parameters().items()})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_swin_b_prompt_counts_and_one_init_bound_for_every_stage():
    model = timm.create_model("swin_base_patch4_window7_224", num_classes=0, device="meta")
    bound = math.sqrt(6 / (3 * 4 * 4 + 128))
    assert bound == pytest.approx(0.18464, abs=1e-5)
    for p in (1, 10, 50):
        deep = prompted_backbone(model, {"num_tokens": p, "deep": True})
        assert sum(t.numel() for t in deep.prompt_parameters().values()) == 12032 * p
        shallow = prompted_backbone(model, {"num_tokens": p, "deep": False})
        assert sum(t.numel() for t in shallow.prompt_parameters().values()) == 128 * p
    shapes = {name: tuple(t.shape) for name, t in deep.prompt_parameters().items()}
    assert shapes == {
        "prompts.0.tokens": (2, 50, 128),
        "prompts.1.tokens": (2, 50, 256),
        "prompts.2.tokens": (18, 50, 512),
        "prompts.3.tokens": (2, 50, 1024),
    }
    for tokens in deep.prompt_parameters().values():
        assert bound * 0.95 < tokens.abs().max() <= bound


@pytest.mark.parametrize(
    "prompt, message",
    [
        (
            {"num_tokens": 2, "pool": "token"},
            r"prompt.pool='token' is not supported by PromptedSwin; use one of \['all', 'image'\]",
        ),
        ({"num_tokens": 1, "location": "add"}, "only as 'prepend'"),
        ({"num_tokens": 2, "depth": 7}, r"must be in \[1, 6\]"),
    ],
)
def test_bad_prompt_options_are_refused_by_name(prompt, message):
    with pytest.raises(ValueError, match=message):
        prompted_backbone(make_swin(), prompt)


def test_partial_k_counts_blocks_across_stages_and_trains_the_merging_between_them():
    backbone = prompted_backbone(make_swin(), {"num_tokens": 0})
    layers = backbone.model.layers
    assert backbone.blocks() == [b for stage in layers for b in stage.blocks]
    assert backbone.last_blocks(2) == list(layers[2].blocks)  # the official Partial-2: the last stage alone
    assert backbone.last_blocks(3) == [layers[1].blocks[1], layers[2].downsample, *layers[2].blocks]
    assert backbone.final_norms() == [backbone.model.norm]


def _fit(tmp_path, tuning=None, prompt=None, steps=2) -> tuple:
    data = SyntheticDataModule(task="count", num_train=16, num_val=8, num_test=8, batch_size=8, num_workers=0)
    module = VPTModule(data.num_classes, SWIN_BACKBONE, prompt, {"base_lr": 1.0, "warmup_epochs": 0}, tuning=tuning)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    changed = sorted(k for k, v in module.state_dict().items() if not torch.equal(v, before[k]))
    return module, path, changed


def test_vpt_deep_on_swin_trains_only_prompts_and_head_and_saves_only_them(tmp_path):
    module, path, changed = _fit(tmp_path, prompt={"num_tokens": 2})
    trained = [
        "backbone.prompts.0.tokens",
        "backbone.prompts.1.tokens",
        "backbone.prompts.2.tokens",
        "head.bias",
        "head.weight",
    ]
    assert changed == trained
    assert sorted(n for n, p in module.named_parameters() if p.requires_grad) == trained
    task = read_task_checkpoint(path)
    assert sorted(task.state_dict) == trained
    assert task.identity["depth"] == 6 and task.identity["architecture"]["depths"] == [2, 2, 2]
    assert task.identity["architecture"]["window_size"] == [[2, 2]] * 6
    restored = VPTModule.load_from_checkpoint(path)
    torch.testing.assert_close(restored.eval()(torch.ones(1, 3, 32, 32)), module.eval()(torch.ones(1, 3, 32, 32)))


def test_partial_1_on_swin_trains_the_last_block_and_the_final_norm(tmp_path):
    _, _, changed = _fit(tmp_path, tuning={"method": "partial", "last_blocks": 1}, steps=1)
    assert {
        k.split(".")[1:4] == ["model", "layers", "2"] or k.startswith(("backbone.model.norm", "head.")) for k in changed
    } == {True}
    assert any(k.startswith("backbone.model.layers.2.blocks.1.") for k in changed)
    assert not any(k.startswith("backbone.model.layers.2.blocks.0.") for k in changed)


# ---- weight files ----------------------------------------------------------------------------------------
def _original_layout(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A timm Swin state dict in the original Microsoft layout: patch merging at the end of stages 0..n-2."""

    def rename(key: str) -> str:
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            return key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        return key

    return {
        "model": {
            **{rename(k): v for k, v in state_dict.items()},
            "head.weight": torch.zeros(5, 32),
            "head.bias": torch.zeros(5),
        }
    }


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "original"])
def test_a_swin_weights_file_loads_through_timms_swin_filter(tmp_path, fmt, swin_images):
    source = make_swin(seed=3)
    path = tmp_path / f"swin.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(_original_layout(state) if fmt == "original" else state, path)
    model, identity = create_backbone({**SWIN_BACKBONE, "checkpoint_path": str(path)})
    assert identity["weights"] == "file" and identity["depth"] == 6
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.testing.assert_close(model.eval()(swin_images), source(swin_images), rtol=0, atol=0)


def test_a_wrong_file_fails_naming_keys_and_another_window_size_needs_resize(tmp_path):
    vit = tmp_path / "vit.pth"
    torch.save(make_vit().state_dict(), vit)
    with pytest.raises(ValueError, match=r"does not fit model SwinTransformer; missing keys: layers\.0\.blocks"):
        create_backbone({**SWIN_BACKBONE, "checkpoint_path": str(vit)})
    deeper = tmp_path / "deeper.pth"
    torch.save(make_swin(depths=(2, 2, 4), num_heads=(1, 2, 2)).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"unexpected keys: layers\.2\.blocks\.2\."):
        create_backbone({**SWIN_BACKBONE, "checkpoint_path": str(deeper)})
    window4 = tmp_path / "window4.pth"
    torch.save(make_swin(window_size=4).state_dict(), window4)
    with pytest.raises(
        ValueError,
        match=r"window size \(layers\.0\.blocks\.0\.attn\.relative_position_bias_table: "
        r"file \(49, 1\) vs model \(9, 1\)",
    ):
        create_backbone({**SWIN_BACKBONE, "checkpoint_path": str(window4)})
    model, _ = create_backbone({**SWIN_BACKBONE, "checkpoint_path": str(window4), "resize_embeddings": True})
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (9, 1)


# ---- configs ---------------------------------------------------------------------------------------------
def test_the_paper_config_composes_and_refuses_a_file_of_another_swin(tmp_path):
    cfg = compose(["+experiment=vtab_cifar100", "backbone=swin_base_patch4_window7_224_in22k"])
    assert cfg.backbone.name == "swin_base_patch4_window7_224.ms_in22k" and cfg.backbone.pretrained
    assert timm.is_model_pretrained(cfg.backbone.name)
    tiny = tmp_path / "tiny_swin.pth"
    torch.save(make_swin().state_dict(), tiny)
    with pytest.raises(
        ValueError,
        match=r"tiny_swin.pth' does not fit model SwinTransformer; missing keys: "
        r"layers\.2\.blocks\.10\..*shape mismatches: layers\.0\.blocks\.0\.attn\.proj\.bias: "
        r"file \(8,\) vs model \(128,\)",
    ):
        create_backbone({**cfg.backbone, "checkpoint_path": str(tiny)})


def test_the_tiny_random_config_builds_a_swin_for_the_quickstarts_32_px_images():
    cfg = compose(["+experiment=quickstart", "backbone=swin_tiny_random"])
    model, identity = create_backbone(cfg.backbone)  # OmegaConf lists (depths) reach timm as lists
    assert family_class_of_model(model) is PromptedSwin and identity["depth"] == 4
    backbone = prompted_backbone(model, {"num_tokens": 10})
    assert backbone.data_config()["input_size"] == (3, 32, 32)
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


# ---- vpt-tune's grids and vpt-report's reference numbers -------------------------------------------------
def test_vpt_tune_sweeps_swins_prompt_lengths_with_the_same_lr_grid():
    from vpt_lightning.protocol.task_protocol import grid_points

    vit = compose(["+experiment=vtab_cifar100"], config_name="tune")
    vit_points = grid_points(vit.protocol, "vpt_deep")
    for backbone in ("swin_base_patch4_window7_224_in22k", "swin_tiny_random"):
        cfg = compose(["+experiment=vtab_cifar100", f"backbone={backbone}"], config_name="tune")
        swin = grid_points(cfg.protocol, "vpt_deep")
        assert len(swin) == 4 * len(vit_points) == 4 * 10 * 4 and {p["num_tokens"] for p in swin} == {1, 5, 10, 50}
        assert {p["base_lr"] for p in swin} == {p["base_lr"] for p in vit_points}
        linear = compose(["+experiment=vtab_cifar100", f"backbone={backbone}", "tuning=linear"], config_name="tune")
        assert {p["num_tokens"] for p in grid_points(linear.protocol, "linear")} == {None}  # no prompts
    assert {p["num_tokens"] for p in vit_points} == {None}


def _summary(task: str, tuning: str, top1: float, backbone: str) -> dict:
    return {
        "task_name": task,
        "tuning": tuning,
        "test_top1_per_seed": {"0": top1},
        "test_top1": {"mean": top1, "std": 0.0},
        "trainable_params": 10,
        "trainable_percent": 0.5,
        "backbone": backbone,
    }


def test_vpt_report_shows_the_papers_swin_b_group_means_beside_swin_b_runs():
    from vpt_lightning.data.registry import vtab_tasks
    from vpt_lightning.protocol.report import build_report

    groups = {"natural": 0.70, "specialized": 0.80, "structured": 0.50}
    summaries = [
        _summary(t.config_name, tuning, groups[group], "swin_base_patch4_window7_224.ms_in22k")
        for group in groups
        for t in vtab_tasks(group)
        for tuning in ("vpt_deep", "mlp_3")
    ]
    markdown, _ = build_report(summaries)
    assert "| VTAB natural (mean of 7) | 70.00 | 70.00 | 76.78 | 73.56 |" in markdown  # ours (vpt_deep, mlp_3), paper
    assert "| VTAB structured (mean of 8) | 50.00 | 50.00 | 53.35 | 35.69 |" in markdown
    assert (
        f"| VTAB mean of the 3 group means | 66.67 | 66.67 | {(76.78 + 84.53 + 53.35) / 3:.2f} | "
        f"{(73.56 + 75.21 + 35.69) / 3:.2f} |" in markdown
    )
    cifar = next(line for line in markdown.splitlines() if line.startswith("| vtab_cifar100"))
    assert cifar.endswith("| — | — |")  # no per-task numbers for Swin-B (never ViT-B's 78.8)
    assert "Swin-B supervised ImageNet-21k (no per-task numbers" in markdown


def test_the_quickstart_trains_end_to_end_on_the_tiny_random_swin(tmp_path):
    from vpt_lightning.runs.training import train

    cfg = compose(
        [
            "+experiment=quickstart",
            "backbone=swin_tiny_random",
            *SMOKE_RUN,
            f"run_dir={tmp_path}",
        ]
    )
    results = train(cfg)
    assert 0 <= results["test/top1"] <= 1 and results["trainable_params"] == 10 * (32 * 2 + 64 * 2) + 64 * 8 + 8
    assert sorted(read_task_checkpoint(tmp_path / "checkpoints" / "last.ckpt").state_dict) == [
        "backbone.prompts.0.tokens",
        "backbone.prompts.1.tokens",
        "head.bias",
        "head.weight",
    ]
