"""ONNX export of trained quickstart tasks, run by onnxruntime and compared with PyTorch on images prepared by the
task's own eval transform (the ``onnx`` extra)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from conftest import quiet_trainer  # noqa: E402

from vpt_lightning import VPTModule  # noqa: E402
from vpt_lightning.backbones.quickstart import QUICKSTART_ARCH  # noqa: E402
from vpt_lightning.cli.export import main as export_main  # noqa: E402
from vpt_lightning.config import asset_path  # noqa: E402
from vpt_lightning.data.synthetic import SyntheticDataModule, SyntheticDataset  # noqa: E402
from vpt_lightning.sharing.onnx_export import (  # noqa: E402
    MAX_LOGIT_DIFF,
    OnnxExportError,
    check_onnx,
    export_onnx,
    onnx_logits,
    prepare_images,
    read_metadata,
)
from vpt_lightning.sharing.task_sources import load_task  # noqa: E402

QUICKSTART_BACKBONE = {**QUICKSTART_ARCH, "checkpoint_path": asset_path("quickstart_vit.safetensors")}


def quickstart_data() -> SyntheticDataModule:
    # the quickstart task, with ImageNet normalisation as vpt-train's; 16 training images for two steps
    return SyntheticDataModule(task="orientation", num_train=16, num_val=8, num_test=8, batch_size=8, num_workers=0)


def train_quickstart_task(tmp_path: Path, prompt: dict) -> Path:
    """Two training steps of a quickstart task on the packaged backbone; the task checkpoint vpt-train writes."""

    data = quickstart_data()
    module = VPTModule(
        num_classes=data.num_classes,
        backbone=QUICKSTART_BACKBONE,
        prompt=prompt,
        optim={"base_lr": 0.3, "weight_decay": 0.0},
        task_name="quickstart",
        class_names=data.classes,
        eval_transform=data.eval_transform_config(),
    )
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


def write_quickstart_images(folder: Path, count: int, size: int = 48) -> list:
    """PNG files of quickstart test images, at ``size`` px so that the eval transform's resize does work."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = SyntheticDataset("orientation", count, seed=7, img_size=size)
    paths = []
    for i in range(count):
        pixels, _ = dataset.sample(i)
        paths.append(folder / f"img_{i}.png")
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def test_vpt_deep_quickstart_task_matches_pytorch_through_onnxruntime_at_batch_1_and_3(tmp_path):
    module = VPTModule.load_from_checkpoint(train_quickstart_task(tmp_path, {"num_tokens": 10, "deep": True})).eval()
    path = export_onnx(module, tmp_path / "task.onnx")

    images = prepare_images(write_quickstart_images(tmp_path / "images", 3), module.hparams.eval_transform)
    assert images.shape == (3, 3, 32, 32)
    # the eval transform is the task's own: ImageNet mean/std of vpt-train, not [0, 1] pixels
    assert images.min() < -1.0
    for batch in (images, images[:1]):
        diff = check_onnx(module, path, batch)
        assert diff <= MAX_LOGIT_DIFF
    with torch.no_grad():
        expected = module(images)
    np.testing.assert_allclose(onnx_logits(path, images), expected.numpy(), atol=MAX_LOGIT_DIFF, rtol=0)
    # the prompts are in the graph: without them PyTorch's logits are far from the exported file's
    with torch.no_grad():
        prompts = module.backbone.prompts.tokens.clone()
        module.backbone.prompts.tokens.zero_()
        without_prompts = module(images)
        module.backbone.prompts.tokens.copy_(prompts)
    assert (without_prompts - expected).abs().max() > 100 * MAX_LOGIT_DIFF

    graph = onnx.load(str(path))
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # a symbolic, dynamic batch axis
    metadata = read_metadata(path)
    assert metadata["class_names"] == list(module.hparams.class_names)
    assert metadata["eval_transform"]["img_size"] == 32
    assert metadata["eval_transform"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert metadata["num_classes"] == 8


def test_cli_exports_a_vpt_shallow_checkpoint_and_prints_the_difference(tmp_path, capsys):
    checkpoint = train_quickstart_task(tmp_path, {"num_tokens": 5, "deep": False})
    write_quickstart_images(tmp_path / "images", 3)
    out = tmp_path / "onnx" / "task.onnx"
    code = export_main(["onnx", str(checkpoint), "--out", str(out), "--images", str(tmp_path / "images")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    diff = float(re.search(r"max \|logit difference\| onnxruntime vs PyTorch: (\S+)", printed.out).group(1))
    assert 0 <= diff <= MAX_LOGIT_DIFF
    assert "3 image(s)" in printed.out and out.is_file()
    # an independent run of the file on an image prepared by hand as vpt-train's eval does
    from torchvision import transforms as T

    prepare = T.Compose(
        [
            T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    image = prepare(Image.open(tmp_path / "images" / "img_1.png").convert("RGB"))[None]
    module = VPTModule.load_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits(out, image), module(image).numpy(), atol=MAX_LOGIT_DIFF, rtol=0)
    # the same task as a package (what vpt-train leaves in <run>/task) exports to the same graph's logits
    load_task(checkpoint).save_pretrained(tmp_path / "package")
    code = export_main(["onnx", str(tmp_path / "package"), "--out", str(tmp_path / "pkg.onnx"), "--num-images", "2"])
    assert code == 0, capsys.readouterr().err
    np.testing.assert_allclose(onnx_logits(tmp_path / "pkg.onnx", image), onnx_logits(out, image), atol=1e-6, rtol=0)


class DriftingModel(nn.Module):
    """A model whose eager forward differs from what is exported (a stand-in for an op the exporter gets wrong)."""

    eval_transform = {"recipe": "vtab", "img_size": 8}

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.conv(images).flatten(1)
        return logits if torch.compiler.is_exporting() else logits + 1e-3


def test_cli_fails_with_a_clear_message_above_the_tolerance(tmp_path, capsys):
    code = export_main(
        ["onnx", "drifting", "--out", str(tmp_path / "m.onnx"), "--num-images", "2"],
        onnx_loader=lambda source: DriftingModel(),
    )
    printed = capsys.readouterr()
    assert code == 1
    assert "above the tolerance 0.0001" in printed.err and "Traceback" not in printed.err
    diff = float(re.search(r"onnxruntime vs PyTorch: (\S+)", printed.out).group(1))
    assert diff == pytest.approx(1e-3, rel=1e-2)


def test_cli_names_a_missing_checkpoint_without_a_traceback(tmp_path, capsys):
    code = export_main(["onnx", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and "nope.ckpt" in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


class FeatureMap(nn.Module):
    eval_transform = {"img_size": 8}

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def test_unsupported_models_are_refused_before_export(tmp_path):
    with pytest.raises(OnnxExportError, match=r"returned \(2, 2, 8, 8\).*\(batch, num_classes\) logits"):
        export_onnx(FeatureMap(), tmp_path / "seg.onnx")
    with pytest.raises(OnnxExportError, match="bfloat16.*float32"):
        export_onnx(DriftingModel().to(torch.bfloat16), tmp_path / "bf16.onnx")
    with pytest.raises(OnnxExportError, match="3 class names for 4 logits"):
        export_onnx(DriftingModel(), tmp_path / "names.onnx", class_names=["a", "b", "c"])
    module = VPTModule(num_classes=3, backbone=QUICKSTART_BACKBONE, prompt={"num_tokens": 0})
    module.inputs_are_features = True
    with pytest.raises(OnnxExportError, match="inputs_are_features"):
        export_onnx(module, tmp_path / "features.onnx")
    assert not list(tmp_path.glob("*.onnx"))
