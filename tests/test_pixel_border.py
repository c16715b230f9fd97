"""The one pixel-border prompt (``backbones.pixel_border.PixelBorder``): ConvNets and the ViT location ``pad``."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import make_vit
from omegaconf import OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vpt_lightning import PromptConfig, PromptedViT
from vpt_lightning.backbones import create_backbone, prompted_backbone
from vpt_lightning.backbones.convnet import PromptedConvNet
from vpt_lightning.backbones.pixel_border import PixelBorder
from vpt_lightning.config import CONFIG_DIR
from vpt_lightning.task_model import TaskSpec, build_task_model

MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.25, 0.4)


def expected_canvas(images, top_bottom, left_right, mean, std):
    """The padded images pixel by pixel: border pixel v of channel c becomes (v - mean[c]) / std[c]; the top and
    bottom rows span the full padded width (corners included), left/right columns the image's height."""
    b, c, h, w = images.shape
    p = left_right.shape[-1] // 2
    out = torch.empty(b, c, h + 2 * p, w + 2 * p)
    for ch in range(c):

        def norm(t, ch=ch):
            return (t[0, ch] - mean[ch]) / std[ch]

        out[:, ch, :p, :] = norm(top_bottom)[:p]
        out[:, ch, p + h :, :] = norm(top_bottom)[p:]
        out[:, ch, p : p + h, :p] = norm(left_right)[:, :p]
        out[:, ch, p : p + h, p + w :] = norm(left_right)[:, p:]
        out[:, ch, p : p + h, p : p + w] = images[:, ch]
    return out


@pytest.mark.parametrize("pixels, size", [(1, (5, 7)), (3, (8, 6))])
def test_border_is_the_normalised_parameters_and_the_interior_is_untouched(pixels, size):
    torch.manual_seed(0)
    border = PixelBorder(pixels, (3, *size), MEAN, STD)
    images = torch.randn(2, 3, *size)
    out = border(images)
    p, (h, w) = pixels, size
    assert out.shape == (2, 3, h + 2 * p, w + 2 * p)
    assert torch.equal(out[..., p : p + h, p : p + w], images)  # the image itself, bit for bit
    expected = expected_canvas(images, border.top_bottom.detach(), border.left_right.detach(), MEAN, STD)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # a corner pixel by hand: the top-left corner is top_bottom's first row, first column
    corner = (border.top_bottom[0, 2, 0, 0] - MEAN[2]) / STD[2]
    torch.testing.assert_close(out[1, 2, 0, 0], corner.detach(), rtol=0, atol=1e-6)
    # a border pixel at the mean normalises to 0; gradients reach both tensors
    out.sum().backward()
    assert border.top_bottom.grad is not None and border.left_right.grad is not None
    # the border pixel's gradient is 1/std per image: (v - m) / s is summed over a batch of 2
    torch.testing.assert_close(border.left_right.grad[0, 1], torch.full((h, 2 * p), 2 / STD[1]))


def test_normalisation_can_follow_the_data_and_is_no_state():
    border = PixelBorder(2, (3, 4, 4))
    assert border.mean == list(IMAGENET_DEFAULT_MEAN) and border.std == list(IMAGENET_DEFAULT_STD)
    images = torch.zeros(1, 3, 4, 4)
    before = border(images)
    border.set_normalization(MEAN, STD)
    expected = expected_canvas(images, border.top_bottom.detach(), border.left_right.detach(), MEAN, STD)
    torch.testing.assert_close(border(images), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(before, border(images))
    assert sorted(border.state_dict()) == ["left_right", "top_bottom"]
    with pytest.raises(
        ValueError, match=r"mean \(0.5, 0.5\) / std \(0.5, 0.5\) must have one value per image channel \(3\)"
    ):
        border.set_normalization((0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match=r"std \(0.5, 0.0, 0.5\) must be positive"):
        border.set_normalization(MEAN, (0.5, 0.0, 0.5))


def convnet():
    config = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "backbone" / "convnext_tiny_random.yaml"))
    return create_backbone(config)


def test_vit_pad_and_a_convnet_share_the_border_and_its_default_normalisation():
    vit = make_vit()
    assert tuple(timm.data.resolve_model_data_config(vit)["mean"]) != tuple(IMAGENET_DEFAULT_MEAN)  # 0.5s
    padded = PromptedViT(vit, PromptConfig(num_tokens=2, deep=False, location="pad"))
    model, _ = convnet()
    bordered = prompted_backbone(model, {"num_tokens": 2, "deep": False})
    assert isinstance(bordered, PromptedConvNet)
    assert type(padded.padding) is type(bordered.border) is PixelBorder
    # both normalised like the official code's images and borders (ImageNet), not by the model's data config
    for border in (padded.padding, bordered.border):
        assert border.mean == list(IMAGENET_DEFAULT_MEAN) and border.std == list(IMAGENET_DEFAULT_STD)
    # checkpoints keep their keys
    assert sorted(k for k in padded.state_dict() if not k.startswith("model.")) == [
        "padding.left_right",
        "padding.top_bottom",
    ]
    assert sorted(k for k in bordered.state_dict() if not k.startswith("model.")) == [
        "border.left_right",
        "border.top_bottom",
    ]
    # prompt.init=zeros: a black border for both
    zeros = PromptedViT(make_vit(), PromptConfig(num_tokens=1, deep=False, location="pad", init="zeros"))
    assert not zeros.padding.top_bottom.any() and not zeros.padding.left_right.any()


def test_a_task_normalises_its_border_like_its_data():
    """The DataModule's mean/std (``eval_transform``) reach the border: when the task is built from a spec that
    has them (a checkpoint or package) and when training records them (``VPTModule.set_eval_transform``)."""
    from vpt_lightning import VPTModule

    config = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "backbone" / "convnext_tiny_random.yaml"))
    prompt = {"num_tokens": 2, "deep": False}
    tuning = {"method": "vpt_shallow"}
    eval_transform = {
        "recipe": "vtab",
        "img_size": 32,
        "interpolation": "bicubic",
        "mean": list(MEAN),
        "std": list(STD),
    }
    task = build_task_model(TaskSpec(3, config, prompt, tuning, eval_transform=eval_transform))
    assert task.backbone.border.mean == list(MEAN) and task.backbone.border.std == list(STD)
    images = torch.randn(1, 3, 32, 32)
    border = task.backbone.border
    expected = expected_canvas(images, border.top_bottom.detach(), border.left_right.detach(), MEAN, STD)
    torch.testing.assert_close(border(images), expected, rtol=0, atol=1e-6)

    module = VPTModule(3, config, prompt=prompt, tuning=tuning)
    assert module.backbone.border.mean == list(IMAGENET_DEFAULT_MEAN)
    module.set_eval_transform(eval_transform)
    assert module.backbone.border.mean == list(MEAN) and module.backbone.border.std == list(STD)


# ---- the class-level model check of the base constructor ----------------------------------------------------
def test_a_model_of_another_family_is_refused_naming_its_class_and_the_accepted_ones():
    model, _ = convnet()
    with pytest.raises(TypeError) as err:
        PromptedViT(model)
    message = str(err.value)
    assert message.startswith("PromptedViT needs a timm VisionTransformer (vit_*") and message.endswith("got ConvNeXt")
    from vpt_lightning.backbones.swin import PromptedSwin

    with pytest.raises(
        TypeError, match=r"PromptedSwin needs a timm SwinTransformer \(swin_\* models\), got VisionTransformer"
    ):
        PromptedSwin(make_vit())
    with pytest.raises(TypeError, match=r"PromptedConvNet needs a timm ConvNeXt or ResNet, got VisionTransformer"):
        PromptedConvNet(make_vit())


def test_a_subclass_of_an_accepted_timm_class_passes_the_check():
    class MyViT(timm.models.vision_transformer.VisionTransformer):
        pass

    model = MyViT(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    assert PromptedViT(model, {"num_tokens": 1}).model is model
