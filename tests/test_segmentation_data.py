"""Segmentation data (ADE20K layout, the synthetic shape task) and the segmentation experiments end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image
from PIL import Image

from vpt_lightning.data.ade20k import ADE20KDataModule, rescaled_size
from vpt_lightning.data.datasets import DataError
from vpt_lightning.data.seg_synthetic import ShapeSegmentationDataset
from vpt_lightning.data.synthetic import _shape_mask


def write_ade20k(root: Path, sizes=((40, 56), (48, 36), (64, 64)), val_sizes=((40, 52), (36, 44))) -> dict:
    """A small tree in the official ADEChallengeData2016 layout; returns the annotations written, by stem."""
    written = {}
    for split, prefix, shapes in (("training", "ADE_train", sizes), ("validation", "ADE_val", val_sizes)):
        for i, (h, w) in enumerate(shapes, start=1):
            stem = f"{prefix}_{i:08d}"
            write_image(
                root / "ADEChallengeData2016" / "images" / split / f"{stem}.jpg", seed=i, size=(h, w), fmt="JPEG"
            )
            labels = np.random.default_rng(i).integers(0, 151, size=(h, w), dtype=np.uint8)
            path = root / "ADEChallengeData2016" / "annotations" / split / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels, mode="L").save(path)
            written[stem] = labels
    return written


def test_rescaled_size_is_mmsegmentations_keep_ratio_rule():
    assert rescaled_size(480, 640, (2048, 512)) == (512, 683)  # short side bound
    assert rescaled_size(300, 2400, (2048, 512)) == (256, 2048)  # long side bound
    assert rescaled_size(640, 480, (2048, 512), ratio=0.5) == (341, 256)  # portrait: short side is the width


def test_ade20k_items_shift_labels_and_augment_to_the_crop(tmp_path):
    written = write_ade20k(tmp_path)
    data = ADE20KDataModule(str(tmp_path), crop_size=32, scale=(128, 32), ratio_range=(0.5, 2.0), num_workers=0)
    data.setup("fit")
    assert len(data.train_dataset) == 3 and len(data.val_dataset) == 2 and data.test_dataset is data.val_dataset
    # eval: the image rescaled to short side 32, the mask at its original size, 0 -> 255 and k -> k - 1
    image, mask = data.val_dataset[0]
    assert image.shape == (3, 32, 42) and image.dtype == torch.float32
    labels = written["ADE_val_00000001"].astype(np.int64)
    np.testing.assert_array_equal(mask.numpy(), np.where(labels == 0, 255, labels - 1))
    # train: crop 32 x 32, labels within 0..149 or 255 (also the padding)
    torch.manual_seed(0)
    for i in range(3):
        image, mask = data.train_dataset[i]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
        values = set(mask.unique().tolist())
        assert values <= set(range(150)) | {255}
    batch = next(iter(data.train_dataloader()))
    assert batch[0].shape[1:] == (3, 32, 32)


def test_ade20k_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="data.root .*does not exist"):
        ADE20KDataModule(str(tmp_path / "nowhere"), num_workers=0).setup("fit")
    (tmp_path / "ADEChallengeData2016" / "images" / "training").mkdir(parents=True)
    with pytest.raises(DataError, match="ADE20K annotation folder .*does not exist.*official layout"):
        ADE20KDataModule(str(tmp_path), num_workers=0).setup("fit")
    (tmp_path / "ADEChallengeData2016" / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(DataError, match="ADE20K image folder .*holds no"):
        ADE20KDataModule(str(tmp_path), num_workers=0).setup("fit")
    write_ade20k(tmp_path)
    (tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) .*no annotation.*ADE_train_00000002.png"):
        ADE20KDataModule(str(tmp_path), num_workers=0).setup("fit")


@pytest.mark.parametrize("bad,message", [("rgb", "mode 'RGB'"), ("range", "holds label 200 > 150")])
def test_ade20k_malformed_annotation_is_named(tmp_path, bad, message):
    write_ade20k(tmp_path)
    path = tmp_path / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png"
    if bad == "rgb":
        Image.new("RGB", (52, 40)).save(path)
    else:
        Image.fromarray(np.full((40, 52), 200, dtype=np.uint8), mode="L").save(path)
    data = ADE20KDataModule(str(tmp_path), crop_size=32, scale=(128, 32), num_workers=0)
    data.setup("fit")
    with pytest.raises(DataError, match=message):
        data.val_dataset[0]


def test_shape_segmentation_masks_label_the_shapes():
    dataset = ShapeSegmentationDataset(4, seed=3)
    rng = np.random.default_rng([3, 0])
    from vpt_lightning.data.synthetic import _random_shapes

    shapes = _random_shapes(rng, int(rng.integers(1, 5)), 32, (0.15, 0.35))
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) + 0.5
    expected = np.zeros((32, 32), dtype=np.int64)
    for shape in shapes:
        expected[_shape_mask(shape, yy, xx)] = shape.kind + 1
    image, mask = dataset[0]
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert image.shape == (3, 32, 32) and (mask > 0).any() and (mask == 0).any()
    torch.testing.assert_close(dataset[0][0], image)  # reproducible


# ---- the experiments ---------------------------------------------------------------------------------------
def test_ade20k_experiment_composes_the_papers_recipe():
    from vpt_lightning.config import compose

    cfg = compose(["+experiment=ade20k_setr_pup"])
    assert cfg.backbone.name == "vit_large_patch16_224.orig_in21k" and cfg.backbone.kwargs.img_size == 512
    assert cfg.backbone.resize_embeddings and cfg.task_type == "segmentation"
    assert list(cfg.segmentation.taps) == [9, 14, 19, 23] and cfg.segmentation.stride == 341
    assert cfg.tuning.method == "vpt_deep" and cfg.prompt.num_tokens == 10 and cfg.optim.base_lr == 0.001
    assert compose(["+experiment=ade20k_setr_pup", "tuning=linear"]).prompt.num_tokens == 0


def test_ade20k_experiment_runs_a_smoke_step_on_a_written_tree(tmp_path):
    """The experiment's recipe on a tiny backbone (64 px, patch 16) and a written ADE20K tree: fit, val, test."""
    from vpt_lightning.config import compose
    from vpt_lightning.runs.training import train

    write_ade20k(tmp_path / "ade")
    cfg = compose(
        [
            "+experiment=ade20k_setr_pup",
            "+debug=fast",
            "backbone=vit_tiny_random",
            "backbone.kwargs.img_size=64",
            "backbone.kwargs.patch_size=16",
            f"data.root={tmp_path / 'ade'}",
            "data.crop_size=64",
            "data.scale=[256,64]",
            "data.batch_size=2",
            "data.num_workers=0",
            "segmentation.taps=[0,1]",
            "segmentation.window=64",
            "segmentation.stride=43",
            "segmentation.ms_scales=[0.75,1.0]",
            "segmentation.head.channels=8",
            "trainer.accelerator=cpu",
            "trainer.max_steps=1",
            "logger=[]",
            "~callbacks.lr_monitor",
            f"run_dir={tmp_path / 'run'}",
            f"paths.output_dir={tmp_path}",
        ]
    )
    results = train(cfg)
    for key in ("val/miou", "test/miou", "test/miou_ms", "trainable_params"):
        assert key in results, key
    assert 0 <= results["test/miou_ms"] <= 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["segmentation"]["taps"] == [0, 1] and saved["method"] == "vpt_deep"


def test_quickstart_seg_trains_offline_and_reports_miou(tmp_path, capsys):
    from vpt_lightning.config import compose
    from vpt_lightning.runs.training import train

    cfg = compose(
        [
            "+experiment=quickstart_seg",
            "data.num_train=16",
            "data.num_val=8",
            "data.num_test=8",
            "data.batch_size=8",
            "trainer.max_epochs=1",
            "logger=[]",
            "~callbacks.lr_monitor",
            f"run_dir={tmp_path / 'run'}",
            f"paths.output_dir={tmp_path}",
        ]
    )
    assert cfg.backbone.checkpoint_path.endswith("quickstart_vit.safetensors")
    results = train(cfg)
    assert 0 <= results["val/miou"] <= 1 and results["global_step"] == 2
    assert "val mIoU (%)" in capsys.readouterr().out


def test_report_shows_segmentation_runs_beside_table_3(tmp_path, capsys):
    from vpt_lightning.cli.report import main

    def write(folder, **results):
        path = tmp_path / folder / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(results))

    seg = {"task_type": "segmentation"}
    write(
        "a",
        task_name="ade20k_setr_pup",
        tuning="vpt_deep",
        method="vpt_deep",
        trainable_params=13_430_000,
        **{"test/miou": 0.4011, "test/miou_ms": 0.4234},
        config=seg,
    )
    write(
        "b",
        task_name="quickstart_seg",
        tuning="linear",
        method="linear",
        trainable_params=120_000,
        **{"val/miou": 0.5},
        config=seg,
    )
    write("c", task_name="quickstart", tuning="vpt_deep", method="vpt_deep", **{"test/top1": 0.9}, config={})
    assert main([str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| ade20k_setr_pup | vpt_deep | 40.11 | 42.34 | 13.43 | 42.11 | 44.06 | 13.43 |" in report
    assert "| quickstart_seg | linear | 50.00 | — | 0.12 | — | — | — |" in report
    assert "| Head only | 35.12 | 37.46 | 13.18 |" in report and "quickstart |" not in report
    assert not (tmp_path / "report.csv").exists()  # no classification summaries: no classification table
