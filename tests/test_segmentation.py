"""Segmentation: dense features, SETR-PUP heads, sliding-window inference, SegmentationModule, mIoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONE, make_vit, quiet_trainer

from vpt_lightning.backbones import PromptedViT
from vpt_lightning.segmentation import (
    SETRPUP,
    SegmentationModule,
    SETRPUPConfig,
    SETRUpHead,
    default_taps,
    dense_features,
    multi_scale_inference,
    slide_inference,
)
from vpt_lightning.segmentation.setr_pup import up_steps
from vpt_lightning.segmentation.sliding import window_starts

SEG = {"taps": [1, 3], "head": {"channels": 16}}


def seg_module(tuning="vpt_deep", prompt=None, num_classes=5, **seg) -> SegmentationModule:
    prompt = prompt if prompt is not None else ({"num_tokens": 5, "deep": True} if tuning == "vpt_deep" else None)
    return SegmentationModule(num_classes, TINY_BACKBONE, prompt, {"base_lr": 0.1}, {"method": tuning}, {**SEG, **seg})


# ---- dense features ---------------------------------------------------------------------------------------
def test_dense_features_without_prompts_equal_timm_intermediates(images):
    vit = make_vit()
    backbone = PromptedViT(vit, None)
    maps = dense_features(backbone, images, [0, 2, 3])
    expected = vit.forward_intermediates(
        images, indices=[0, 2, 3], norm=False, output_fmt="NCHW", intermediates_only=True
    )
    assert [m.shape for m in maps] == [(3, 32, 8, 8)] * 3
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deep,depth,stripped", [(True, None, [6, 6, 6]), (False, [2], [1, 1, 6])])
def test_dense_features_strip_prompt_and_class_tokens(images, deep, depth, stripped):
    """Block outputs are [cls, prompts, patches]; the maps are the last 64 tokens, whatever block the prompts enter."""
    backbone = PromptedViT(make_vit(), {"num_tokens": 5, "deep": deep, "depth": depth, "dropout": 0.0})
    seen = {}
    hooks = [
        backbone.model.blocks[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
        for i in (0, 1, 2)
    ]
    maps = dense_features(backbone, images, [0, 1, 2])
    for h in hooks:
        h.remove()
    for i, skip in zip((0, 1, 2), stripped):
        assert seen[i].shape[1] == skip + 64
        torch.testing.assert_close(maps[i], seen[i][:, skip:].transpose(1, 2).reshape(3, 32, 8, 8))
    # the prompts reach the maps: gradients flow to them
    maps[-1].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.prompt_parameters().values())


def test_dense_features_refuse_bad_taps(images):
    backbone = PromptedViT(make_vit(), None)
    with pytest.raises(ValueError, match=r"segmentation.taps=\[4\].*\[0, 3\]"):
        dense_features(backbone, images, [4])


def test_default_taps_are_setr_for_vit_large():
    assert default_taps(24) == [9, 14, 19, 23]
    assert default_taps(6) == [1, 2, 4, 5]


# ---- SETR-PUP heads ----------------------------------------------------------------------------------------
def test_setr_up_head_equals_its_equations():
    torch.manual_seed(0)
    head = SETRUpHead(8, 3, channels=4, num_convs=2, up_scale=2).eval()
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 5, 5)
    y = x.permute(0, 2, 3, 1)
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-6)
    y = (y * head.norm.weight + head.norm.bias).permute(0, 3, 1, 2)
    layers = list(head.up_convs)
    for conv, bn in ((layers[0], layers[1]), (layers[4], layers[5])):
        y = F.conv2d(y, conv.weight, padding=1)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
    y = F.conv2d(y, head.classifier.weight, head.classifier.bias)
    torch.testing.assert_close(head(x), y, atol=1e-5, rtol=1e-5)
    assert y.shape == (2, 3, 20, 20)


def test_setr_pup_for_vit_large_has_the_papers_head_only_size():
    """Head only = 13.18M (Table 3): LN + conv(no bias) + BN per step, 1x1 classifier; 4 decode + 3x2 aux convs."""
    head = SETRPUP(1024, 150, num_maps=4, patch=16, config=SETRPUPConfig())
    step = lambda cin: 9 * cin * 256 + 2 * 256  # noqa: E731
    classifier = 256 * 150 + 150
    norm = 2 * 1024
    expected = (norm + step(1024) + 3 * step(256) + classifier) + 3 * (norm + step(1024) + step(256) + classifier)
    count = sum(p.numel() for p in head.parameters())
    assert count == expected
    assert abs(count / 1e6 - 13.18) / 13.18 < 0.005  # the paper's figure, to 0.5 % (13.14M)
    logits, aux = head([torch.randn(1, 1024, 2, 2)] * 4)
    assert logits.shape == (1, 150, 32, 32) and [a.shape for a in aux] == [(1, 150, 32, 32)] * 3


def test_up_steps_make_the_patch_size():
    assert up_steps(16, None) == (4, 2)
    assert up_steps(16, 2) == (2, 4)
    assert up_steps(4, None) == (2, 2)
    with pytest.raises(ValueError, match="3 upsampling steps cannot make patch size 16"):
        up_steps(16, 3)
    with pytest.raises(ValueError, match="patch size 14 is not a power of 2"):
        up_steps(14, None)


# ---- sliding-window and multi-scale inference -------------------------------------------------------------
def test_window_starts_follow_mmsegmentation():
    assert window_starts(1000, 512, 341) == [0, 341, 488]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]


def test_one_window_over_the_whole_image_is_a_plain_forward():
    module = seg_module().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(module, images, 32, 21, 5), module(images))


def test_overlapping_windows_are_averaged():
    """Image 3 x 5, window 3, stride 2: windows at columns 0-2 and 2-4; column 2 averages both windows' outputs."""
    image = torch.arange(15.0).view(1, 1, 3, 5)
    model = lambda crop: crop.mean(dim=(-2, -1), keepdim=True).expand(-1, 2, *crop.shape[-2:])  # noqa: E731
    out = slide_inference(model, image, 3, 2, 2)
    left, right = image[..., :3].mean(), image[..., 2:].mean()
    expected = torch.tensor([left, left, (left + right) / 2, right, right]).expand(1, 2, 3, 5)
    torch.testing.assert_close(out, expected)


def test_an_image_smaller_than_the_window_is_padded_and_cropped_back():
    image = torch.randn(1, 3, 20, 26)
    model = lambda crop: crop[:, :2] * 2  # noqa: E731
    out = slide_inference(model, image, 32, 21, 2)
    torch.testing.assert_close(out, image[:, :2] * 2)


def test_multi_scale_with_flip_averages_probabilities():
    image = torch.randn(1, 3, 32, 32)
    ramp = torch.linspace(-2, 2, 32)
    model = lambda crop: crop[:, :2] + ramp[: crop.shape[-1]]  # noqa: E731 - not flip-equivariant
    got = multi_scale_inference(model, image, [1.0], True, 32, 32, 2)
    plain = (image[:, :2] + ramp).softmax(1)
    flipped = (image.flip(-1)[:, :2] + ramp).softmax(1).flip(-1)
    torch.testing.assert_close(got, (plain + flipped) / 2)
    assert multi_scale_inference(model, image, [0.5, 1.5], False, 32, 21, 2).shape == (1, 2, 32, 32)


# ---- the module --------------------------------------------------------------------------------------------
def test_loss_is_cross_entropy_with_ignore_and_weighted_aux_heads():
    module = seg_module()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 5, (2, 32, 32))
    masks[:, :4] = 255
    logits, aux = module.forward_all(images)
    assert len(aux) == 1 and logits.shape == (2, 5, 32, 32)

    def ce(x):  # mean negative log-likelihood over the counted pixels
        keep = masks != 255
        logp = x.log_softmax(1).permute(0, 2, 3, 1)[keep]
        return -logp.gather(1, masks[keep][:, None]).mean()

    loss = module.loss(logits, masks) + 0.4 * module.loss(aux[0], masks)
    torch.testing.assert_close(loss, ce(logits) + 0.4 * ce(aux[0]))


def test_only_prompts_and_heads_train_and_heads_get_their_lr():
    module = seg_module(head_lr_mult=10.0)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("head.", "backbone.prompts")) for n in names)
    assert any(n.startswith("backbone.prompts") for n in names)
    groups = module.optimizer_parameters(0.01)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.1) and "lr" not in groups[0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in module.head.parameters()}
    head_only = seg_module("linear")
    assert {n.split(".")[0] for n, p in head_only.named_parameters() if p.requires_grad} == {"head"}
    assert head_only.parameter_counts()["trainable_params"] == sum(p.numel() for p in head_only.head.parameters())


def test_a_method_with_its_own_classifier_is_refused():
    with pytest.raises(ValueError, match="tuning=mlp_3 brings its own classifier head"):
        seg_module("mlp")


def test_val_miou_equals_a_confusion_matrix_computation_and_checkpoint_roundtrip(tmp_path):
    """mIoU over the val set = mean over classes present in prediction or target of TP / (TP + FP + FN),
    ignoring label 255; the small task checkpoint reloads to the same predictions."""

    from vpt_lightning.data.seg_synthetic import ShapeSegmentationDataModule

    module = seg_module(num_classes=7)
    data = ShapeSegmentationDataModule(num_train=8, num_val=6, num_test=4, batch_size=4, num_workers=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    images = torch.stack([data.val_dataset[i][0] for i in range(6)])
    masks = torch.stack([data.val_dataset[i][1] for i in range(6)])
    masks[0, :5] = 255  # some ignored pixels
    module.eval()
    with torch.no_grad():
        preds = module(images).argmax(1)
    keep = masks != 255
    confusion = np.zeros((7, 7), dtype=np.int64)
    np.add.at(confusion, (masks[keep].numpy(), preds[keep].numpy()), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    expected = np.mean(tp[union > 0] / union[union > 0])
    loader = torch.utils.data.DataLoader(list(zip(images, masks)), batch_size=4)
    evaluator = quiet_trainer()
    metrics = evaluator.validate(module, dataloaders=loader, verbose=False)[0]
    assert metrics["val/miou"] == pytest.approx(expected, abs=1e-6)
    assert metrics["val/acc"] == pytest.approx(tp.sum() / keep.sum().item(), abs=1e-6)

    # a class absent from both predictions and targets does not count (as mmsegmentation's nan-mean)
    metric = module.val_metrics["miou"].clone()
    metric.reset()
    metric.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 255]]))
    assert metric.compute().item() == pytest.approx((1 + 1 / 2 + 0) / 3)

    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert all(k.startswith(("head.", "backbone.prompts")) for k in saved)
    assert any(k.endswith("running_mean") for k in saved)  # the heads' BatchNorm statistics travel along
    reloaded = SegmentationModule.load_from_checkpoint(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), module(images))
