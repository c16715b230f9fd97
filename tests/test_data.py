"""Benchmark data: registry, VTAB-1k lists, FGVC JSON splits, users' folders, vpt-prepare, and bad-data errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli_in_process, write_image
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from vpt_lightning.cli.prepare import main as prepare_main
from vpt_lightning.config import compose
from vpt_lightning.data import (
    DataError,
    FGVCDataModule,
    FolderDataModule,
    VTABDataModule,
    fgvc_tasks,
    get_task,
    make_train_val_split,
    vtab_tasks,
)
from vpt_lightning.data.transforms import INTERPOLATIONS
from vpt_lightning.protocol.paper import METHODS, REFERENCE

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_vtab_tree(root: Path, task: str = "cifar100", counts=None, num_labels: int = 5) -> Path:
    counts = counts or {"train800": 8, "val200": 4, "test": 6}
    task_dir = root / get_task(task).folder
    lines = {}
    for split, n in counts.items():
        lines[split] = []
        for i in range(n):
            rel = f"{split}/img_{i}.png"
            write_image(task_dir / rel, seed=hash((split, i)) % 1000)
            lines[split].append(f"{rel} {i % num_labels}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, entries in lines.items():
        (task_dir / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return task_dir


# ---- registry -------------------------------------------------------------------------------------------
def test_registry_has_19_vtab_tasks_in_7_4_8_groups_and_5_fgvc():
    assert len(vtab_tasks()) == 19
    assert [len(vtab_tasks(g)) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert {t.name: t.num_classes for t in fgvc_tasks()} == {
        "cub": 200,
        "nabirds": 555,
        "oxford_flowers": 102,
        "stanford_dogs": 120,
        "stanford_cars": 196,
    }
    assert get_task("vtab_svhn").num_classes == 10 and get_task("sun397").default_prompt_length == 5
    # the paper's VPT-Deep group means (paper Table 1) follow from the per-task numbers
    natural = np.mean([REFERENCE[t.config_name]["vpt_deep"] for t in vtab_tasks("natural")])
    assert natural == pytest.approx(78.48, abs=0.01)
    with pytest.raises(KeyError, match="unknown vtab task 'cifar10'; valid names: .*'cifar100'"):
        get_task("cifar10", benchmark="vtab")


def test_paper_numbers_cover_every_task_and_method_of_the_registry():
    assert set(REFERENCE) == {t.config_name for t in vtab_tasks() + fgvc_tasks()}
    assert all(tuple(row) == METHODS for row in REFERENCE.values())
    assert REFERENCE["vtab_svhn"]["linear"] == 36.6 and REFERENCE["fgvc_stanford_cars"]["vpt_deep"] == 83.6


@pytest.mark.parametrize("task", [t.config_name for t in vtab_tasks() + fgvc_tasks()])
def test_every_task_has_a_composable_experiment(task):
    cfg = compose([f"+experiment={task}"])
    info = get_task(task)
    assert cfg.task_name == task and cfg.data.task == info.name
    assert cfg.recipe.num_tokens == info.default_prompt_length
    assert cfg.backbone.name == "vit_base_patch16_224.orig_in21k"
    assert (cfg.trainer.max_epochs, cfg.optim.warmup_epochs) == (100, 10)
    # the official hyper-parameter release's SUN397, DMLab and EuroSAT recipes; a batch of 64 elsewhere
    published = {"vtab_sun397": (25.0, 1e-4, 128), "vtab_dmlab": (1.0, 1e-3, 64), "vtab_eurosat": (1.0, 1e-3, 64)}
    if task in published:
        assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.data.batch_size) == pytest.approx(published[task])
    else:
        assert cfg.data.batch_size == 64


def test_prompt_lengths_are_written_once_in_the_task_table():
    """The experiments read each task's prompt length from the registry (``${vpt.prompt_length:...}``); none of their
    YAML files writes a number for it, and a command-line value still wins."""
    from vpt_lightning.config import CONFIG_DIR

    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        value = (OmegaConf.to_container(OmegaConf.load(path)).get("recipe") or {}).get("num_tokens")
        if path.stem.startswith(("vtab_", "fgvc_")):
            assert value is None or str(value).startswith("${vpt.prompt_length:"), f"{path.name}: num_tokens={value}"
    cfg = compose(["+experiment=vtab_clevr_distance"])
    assert (cfg.recipe.num_tokens, cfg.prompt.num_tokens) == (200, 200)
    cfg = compose(["+experiment=vtab_clevr_distance", "recipe.num_tokens=7"])
    assert (cfg.recipe.num_tokens, cfg.prompt.num_tokens) == (7, 7)
    assert compose(["+experiment=vtab_clevr_distance", "prompt.num_tokens=3"]).prompt.num_tokens == 3


def test_loader_settings_compose_from_the_command_line():
    cfg = compose(["+experiment=vtab_cifar100", "data.pin_memory=false", "data.eval_batch_size=128"])
    assert cfg.data.pin_memory is False and cfg.data.eval_batch_size == 128 and cfg.data.batch_size == 64
    for name in ("fgvc_cub", "quickstart"):
        data = compose([f"+experiment={name}", "data.pin_memory=true", "data.eval_batch_size=32"]).data
        assert data.pin_memory is True and data.eval_batch_size == 32
    folder = compose(["data=folder", "data.root=/x", "data.pin_memory=false"]).data
    assert folder.pin_memory is False and folder.eval_batch_size is None


class _Trainer:  # what the loaders read of a Lightning Trainer
    def __init__(self, num_devices: int) -> None:
        self.num_devices, self.world_size, self.global_rank, self.accelerator = num_devices, 1, 0, object()


def test_loader_settings_and_workers_per_process(tmp_path, monkeypatch):
    import os

    make_vtab_tree(tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    dm = VTABDataModule("cifar100", str(tmp_path), img_size=8, batch_size=4, eval_batch_size=3)
    dm.setup()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (train.batch_size, val.batch_size) == (4, 3)
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    assert (train.num_workers, train.persistent_workers, train.pin_memory) == (8, True, False)  # 12 CPUs, capped at 8
    dm.trainer = _Trainer(num_devices=4)  # DDP, 4 processes on the node: 12 // 4 workers each
    assert dm.train_dataloader().num_workers == 3 and dm.val_dataloader().num_workers == 3
    dm.trainer = _Trainer(num_devices=16)  # more processes than CPUs: load in the main process
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.persistent_workers) == (0, False)
    fixed = VTABDataModule("cifar100", str(tmp_path), img_size=8, num_workers=0, pin_memory=True)
    fixed.setup()
    loader = fixed.val_dataloader()
    assert (loader.batch_size, loader.num_workers, loader.persistent_workers, loader.pin_memory) == (64, 0, False, True)


# ---- VTAB -----------------------------------------------------------------------------------------------
def test_vtab_split_modes_counts_labels_and_transform(tmp_path):
    make_vtab_tree(tmp_path)
    tune = VTABDataModule("cifar100", str(tmp_path), img_size=16, num_workers=0)
    tune.setup()
    assert (len(tune.train_dataset), len(tune.val_dataset), len(tune.test_dataset)) == (8, 4, 4)
    assert tune.num_classes == 100 and [tune.train_dataset[i][1] for i in range(8)] == [0, 1, 2, 3, 4, 0, 1, 2]
    final = VTABDataModule("cifar100", str(tmp_path), split="final", img_size=16, num_workers=0)
    final.setup()
    assert (len(final.train_dataset), final.val_dataset, len(final.test_dataset)) == (12, None, 6)
    image, _ = final.test_dataset[0]
    assert image.shape == (3, 16, 16)


def test_vtab_resizes_a_non_square_image_straight_to_the_square(tmp_path):
    task_dir = make_vtab_tree(tmp_path)
    for split in ("train800", "val200"):
        write_image(task_dir / split / "img_0.png", seed=5, size=(30, 40))  # 40 wide, 30 high
    dm = VTABDataModule("cifar100", str(tmp_path), img_size=16, num_workers=0)
    dm.setup()
    resize = T.Compose(
        [T.Resize((16, 16), interpolation=INTERPOLATIONS["bicubic"]), T.ToTensor(), T.Normalize(MEAN, STD)]
    )
    for split, dataset in (("train800", dm.train_dataset), ("val200", dm.val_dataset)):
        image = dataset[0][0]
        assert image.shape == (3, 16, 16)  # an aspect-keeping Resize(16) would give 16 x 21
        torch.testing.assert_close(image, resize(Image.open(task_dir / split / "img_0.png").convert("RGB")))
        torch.testing.assert_close(dataset[0][0], image)  # no augmentation


def test_vtab_normalisation_matches_hand_computation(tmp_path):
    task_dir = make_vtab_tree(tmp_path)
    dm = VTABDataModule("cifar100", str(tmp_path), img_size=8, num_workers=0)  # 8 px: the resize is the identity
    dm.setup()
    pixels = np.asarray(Image.open(task_dir / "train800" / "img_0.png"), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(
        3, 1, 1
    )
    torch.testing.assert_close(dm.train_dataset[0][0], expected, rtol=1e-5, atol=1e-5)
    backbone = VTABDataModule(
        "cifar100",
        str(tmp_path),
        img_size=8,
        num_workers=0,
        normalization="backbone",
        backbone_data_config={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    )
    backbone.setup()
    torch.testing.assert_close(
        backbone.train_dataset[0][0], torch.from_numpy(pixels).permute(2, 0, 1) * 2 - 1, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "val200.txt").unlink(), r"list file .*val200.txt' does not exist"),
        (
            lambda d: (d / "train800.txt").write_text("train800/img_0.png 0\nno-label-here\n"),
            r"train800.txt:2: expected 'relative/path label', got 'no-label-here'",
        ),
        (
            lambda d: (d / "train800.txt").write_text("train800/img_0.png 0\ntrain800/img_1.png 100\n"),
            r"train800.txt:2: label 100 is outside \[0, 100\)",
        ),
        (
            lambda d: (d / "train800.txt").write_text("train800/missing.png 3\n"),
            r"train800.txt:1: image .*missing.png' does not exist",
        ),
        (lambda d: (d / "train800.txt").write_text("\n"), r"train800.txt: the split is empty"),
    ],
    ids=["missing-list", "malformed-line", "label-range", "missing-image", "empty-split"],
)
def test_vtab_bad_lists_fail_in_setup_naming_file_and_line(tmp_path, damage, message):
    task_dir = make_vtab_tree(tmp_path)
    damage(task_dir)
    dm = VTABDataModule("cifar100", str(tmp_path), num_workers=0)
    with pytest.raises(DataError, match=message):
        dm.setup()


def test_missing_root_names_folder_and_the_fix(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(
        DataError,
        match=r"VTAB-1k folder of task 'cifar100' .*nowhere/cifar' does not exist.*"
        rf"'vpt-prepare vtab --tasks cifar100 --source SOURCE_ROOT --out {root}'",
    ):
        VTABDataModule("cifar100", str(root))
    for task, source in (
        ("dmlab", "dmlab.tar.gz"),
        ("kitti_distance", "devkit_object.zip"),
        ("smallnorb_azimuth", "NYU"),
        ("resisc45", "NWPU-RESISC45"),
        ("clevr_distance", "CLEVR_v1.0"),
        ("caltech101", "--official-splits"),
    ):
        with pytest.raises(DataError, match=rf"--tasks {task} .*{source}"):
            VTABDataModule(task, str(root))


def test_corrupt_image_fails_at_load_naming_the_file(tmp_path, capsys):
    task_dir = make_vtab_tree(tmp_path)
    (task_dir / "train800" / "img_2.png").write_bytes(b"\x89PNG broken")
    dm = VTABDataModule("cifar100", str(tmp_path), num_workers=0)
    dm.setup()
    with pytest.raises(DataError, match=r"cannot read image .*img_2.png"):
        dm.train_dataset[2]
    # the opt-in full check decodes everything and reports it, exiting non-zero
    assert prepare_main(["check", "vtab", "--task", "cifar100", "--root", str(tmp_path), "--split", "tune"]) == 1
    out = capsys.readouterr().out.splitlines()
    bad = [line for line in out if "cannot read image" in line]
    assert len(bad) == 1 and f"{task_dir / 'train800' / 'img_2.png'}'" in bad[0]
    assert out[-1] == "vtab cifar100 (tune): 1 unreadable image(s)"


# ---- FGVC -----------------------------------------------------------------------------------------------
def make_cub(root: Path, per_class_train: int = 2) -> Path:
    """A CUB tree: 200 classes (1-based ids) with ``per_class_train`` train images each, val/test for 3 classes."""
    folder = root / "CUB_200_2011"
    splits = {"train": {}, "val": {}, "test": {}}
    for cid in range(1, 201):  # official ids are 1-based
        for i in range(per_class_train):
            rel = f"{cid:03d}.bird/train_{i}.jpg"
            write_image(folder / "images" / rel, seed=cid * 10 + i, fmt="JPEG")
            splits["train"][rel] = cid
    for cid in (1, 2, 3):
        rel = f"{cid:03d}.bird/val.jpg"
        write_image(folder / "images" / rel, seed=cid, fmt="JPEG")
        splits["val"][rel] = cid
        rel = f"{cid:03d}.bird/test.jpg"
        write_image(folder / "images" / rel, seed=cid + 7, fmt="JPEG")
        splits["test"][rel] = cid
    for name, mapping in splits.items():
        (folder / f"{name}.json").write_text(json.dumps(mapping))
    return folder


def test_fgvc_json_splits_labels_and_transforms(tmp_path):
    make_cub(tmp_path)
    dm = FGVCDataModule("cub", str(tmp_path), img_size=16, num_workers=0)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (400, 3)
    assert sorted({label for _, label in dm.train_dataset.samples}) == list(range(200))  # 1-based -> 0-based
    assert dm.train_dataset[0][0].shape == (3, 16, 16)
    final = FGVCDataModule("cub", str(tmp_path), split="final", img_size=16, num_workers=0)
    final.setup()
    assert (len(final.train_dataset), final.val_dataset, len(final.test_dataset)) == (403, None, 3)


def test_fgvc_transforms_on_a_non_square_image(tmp_path):
    folder = make_cub(tmp_path, per_class_train=1)
    for rel in ("001.bird/train_0.jpg", "001.bird/val.jpg"):
        write_image(folder / "images" / rel, seed=9, size=(40, 50), fmt="JPEG")  # 50 wide, 40 high
    dm = FGVCDataModule("cub", str(tmp_path), img_size=16, num_workers=0)
    dm.setup()
    assert dm.train_dataset.samples[0][0].name == "train_0.jpg" and dm.val_dataset.samples[0][0].name == "val.jpg"

    def resized(rel):  # shorter side to round(16 * 256 / 224) = 18: 40 x 50 -> 18 x 22, normalised
        image = Image.open(folder / "images" / rel).convert("RGB")
        bilinear = INTERPOLATIONS["bilinear"]
        return TF.normalize(TF.to_tensor(TF.resize(image, [18, 22], interpolation=bilinear)), MEAN, STD)

    # eval: the centre 16 x 16 of the 18 x 22 resize
    torch.testing.assert_close(dm.val_dataset[0][0], resized("001.bird/val.jpg")[:, 1:17, 3:19])
    # train: a random 16 x 16 crop of the resize, maybe flipped, different across calls
    full = resized("001.bird/train_0.jpg")
    crops = [full[:, top : top + 16, left : left + 16] for top in range(3) for left in range(7)]
    crops += [crop.flip(-1) for crop in crops]
    torch.manual_seed(0)
    outputs = [dm.train_dataset[0][0] for _ in range(12)]
    for out in outputs:
        assert out.shape == (3, 16, 16)
        assert any(torch.allclose(out, crop, atol=1e-5) for crop in crops)
    assert len({tuple(out.flatten().tolist()) for out in outputs}) > 1


@pytest.mark.parametrize(
    "damage, split, message",
    [
        (lambda f: shutil.rmtree(f), "tune", r"FGVC folder of 'cub' '.*/CUB_200_2011' does not exist.*set data.root"),
        (lambda f: (f / "test.json").unlink(), "final", r"FGVC split file '.*test.json' does not exist"),
        (
            lambda f: (f / "images" / "005.bird" / "train_0.jpg").unlink(),
            "tune",
            r"train.json: key '005.bird/train_0.jpg': image '.*images/005.bird/train_0.jpg' does not exist",
        ),
        (lambda f: (f / "val.json").write_text("{}"), "tune", r"val.json: the split is empty"),
        (
            lambda f: (f / "val.json").write_text(json.dumps({"001.bird/val.jpg": 999})),
            "tune",
            r"val.json: key '001.bird/val.jpg' has class id 999, not in train.json \(its 200 ids span 1..200\)",
        ),
        (
            lambda f: (f / "test.json").write_text(json.dumps({"001.bird/test.jpg": True})),
            "final",
            r"test.json: key '001.bird/test.jpg' has class id true; expected an integer class id",
        ),
    ],
    ids=["missing-root", "missing-json", "missing-image", "empty-split", "label-range", "bool-label"],
)
def test_fgvc_bad_data_names_the_json_file_and_key(tmp_path, damage, split, message):
    damage(make_cub(tmp_path, per_class_train=1))
    with pytest.raises(DataError, match=message):
        FGVCDataModule("cub", str(tmp_path), split=split, num_workers=0).setup()


def test_fgvc_split_tool_is_stratified_and_seeded(tmp_path):
    mapping = {f"c{c}/img{i}.jpg": c for c in range(4) for i in range(10)}
    source = tmp_path / "all.json"
    source.write_text(json.dumps(mapping))
    sizes = make_train_val_split(source, tmp_path / "a", seed=3)
    make_train_val_split(source, tmp_path / "b", seed=3)
    assert sizes == {"train": 36, "val": 4}
    val = json.loads((tmp_path / "a" / "val.json").read_text())
    assert sorted(val.values()) == [0, 1, 2, 3] and val == json.loads((tmp_path / "b" / "val.json").read_text())
    train = json.loads((tmp_path / "a" / "train.json").read_text())
    assert not set(train) & set(val) and set(train) | set(val) == set(mapping)


# ---- users' folders -------------------------------------------------------------------------------------
def test_image_folder_with_val_drawn_by_seed(tmp_path):
    for c, name in enumerate(["cat", "dog", "owl"]):
        for i in range(10):
            write_image(tmp_path / "train" / name / f"{i}.png", seed=c * 100 + i)
    dm = FolderDataModule(str(tmp_path), val_fraction=0.2, seed=1, img_size=16, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "owl"]
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (24, 6)
    assert not {p for p, _ in dm.train_dataset.samples} & {p for p, _ in dm.val_dataset.samples}
    with pytest.raises(DataError, match="data.split=final needs a test split"):
        FolderDataModule(str(tmp_path), split="final", num_workers=0).setup()


def test_csv_list(tmp_path):
    rows = ["path,label"]
    for i in range(6):
        write_image(tmp_path / "imgs" / f"{i}.png", seed=i)
        rows.append(f"imgs/{i}.png,{['a', 'b'][i % 2]}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    dm = FolderDataModule(str(tmp_path), train_list="train.csv", val_fraction=0.34, num_workers=0, img_size=8)
    dm.setup()
    assert dm.classes == ["a", "b"] and len(dm.train_dataset) + len(dm.val_dataset) == 6
    (tmp_path / "bad.csv").write_text("imgs/0.png\n")
    with pytest.raises(DataError, match=r"bad.csv:1: expected 'path,label'"):
        FolderDataModule(str(tmp_path), train_list="bad.csv")


def write_csv(root: Path, name: str, labels, start: int = 0) -> None:
    """``root/name`` listing new images ``imgs/<start + i>.png`` with ``labels``."""
    rows = ["path,label"]
    for i, label in enumerate(labels, start=start):
        write_image(root / "imgs" / f"{i}.png", seed=i)
        rows.append(f"imgs/{i}.png,{label}")
    (root / name).write_text("\n".join(rows) + "\n")


def test_csv_integer_labels_are_class_ids(tmp_path):
    write_csv(tmp_path, "train.csv", [0, 2] * 4)
    write_csv(tmp_path, "test.csv", [1, 2], start=100)
    dm = FolderDataModule(str(tmp_path), train_list="train.csv", test_list="test.csv", num_workers=0, img_size=8)
    assert dm.classes == ["0", "1", "2"] and dm.num_classes == 3
    dm.setup()
    assert sorted({label for _, label in dm.train_dataset.samples + dm.val_dataset.samples}) == [0, 2]
    assert [label for _, label in dm.test_dataset.samples] == [1, 2]


@pytest.mark.parametrize("fraction", [0, 1.0, -0.1, 1.5])
def test_folder_val_fraction_must_be_between_0_and_1(tmp_path, fraction):
    write_image(tmp_path / "train" / "cat" / "0.png", seed=0)
    with pytest.raises(ValueError, match=rf"data.val_fraction={fraction} must be in \(0, 1\)"):
        FolderDataModule(str(tmp_path), val_fraction=fraction)


@pytest.mark.parametrize("n, fraction", [(1, 0.1), (3, 0.9)])
def test_folder_draw_that_leaves_no_training_image_fails(tmp_path, n, fraction):
    for i in range(n):
        write_image(tmp_path / "train" / "cat" / f"{i}.png", seed=i)
    dm = FolderDataModule(str(tmp_path), val_fraction=fraction, num_workers=0)
    with pytest.raises(
        DataError, match=rf"train: {n} training image\(s\) with data.val_fraction={fraction} leave none"
    ):
        dm.setup()


def _folder_tree(root: Path, val=True) -> None:
    for c, name in enumerate(["cat", "dog"]):
        for i in range(3):
            write_image(root / "train" / name / f"{i}.png", seed=c * 10 + i)
    if val:
        (root / "val" / "cat").mkdir(parents=True)


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda r: None, {"root": "nowhere"}, r"data.root '.*nowhere' does not exist"),
        (
            lambda r: (write_csv(r, "train.csv", [0, 1, 0]), (r / "imgs" / "1.png").unlink()),
            {"train_list": "train.csv"},
            r"train.csv:3: image '.*imgs/1.png' does not exist",
        ),
        (lambda r: (r / "train" / "cat").mkdir(parents=True), {}, r"train: the train split is empty \(no .jpg/"),
        (_folder_tree, {}, r"val: the val split is empty"),
        (
            lambda r: (write_csv(r, "train.csv", [0, 1, 0, 1]), write_csv(r, "val.csv", [1, 7], start=10)),
            {"train_list": "train.csv", "val_list": "val.csv"},
            r"val.csv:3: label '7' is not a class id in \[0, 2\)",
        ),
        (
            lambda r: (write_csv(r, "train.csv", ["a", "b"]), write_csv(r, "val.csv", ["fox"], start=10)),
            {"train_list": "train.csv", "val_list": "val.csv"},
            r"val.csv:2: label 'fox' is not one of the training classes \['a', 'b'\]",
        ),
        (
            lambda r: write_csv(r, "train.csv", [0, -1]),
            {"train_list": "train.csv"},
            r"train.csv:3: label '-1' is not a class id in \[0, 1\)",
        ),
    ],
    ids=["missing-root", "missing-image", "empty-train", "empty-val", "label-range", "unknown-name", "negative-label"],
)
def test_folder_bad_data_names_the_file_and_line(tmp_path, make, kwargs, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        FolderDataModule(str(tmp_path / kwargs.pop("root", "")), **kwargs, num_workers=0).setup()


# ---- through vpt-train ----------------------------------------------------------------------------------
def test_vtab_experiment_without_data_fails_clearly(tmp_path):
    proc = run_cli_in_process("train", ["+experiment=vtab_cifar100", f"paths.data_dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0
    assert "VTAB-1k folder of task 'cifar100'" in proc.stderr + proc.stdout and "Epoch 0" not in proc.stderr


def test_vtab_experiment_trains_on_a_prepared_tree(tmp_path):
    make_vtab_tree(tmp_path / "vtab-1k", counts={"train800": 16, "val200": 8, "test": 8})
    proc = run_cli_in_process(
        "train",
        [
            "+experiment=vtab_cifar100",
            f"paths.data_dir={tmp_path}",
            "backbone=vit_tiny_random",
            "+debug=fast",
            "data.num_workers=0",
            "data.batch_size=8",
            "run_name=r",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "vtab_cifar100" / "r" / "results.json").read_text())
    assert results["trainable_params"] == 2 * 10 * 32 + 32 * 100 + 100  # p=10 on both blocks of width 32 + head


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_train=0), "data.num_train=0 must be an integer >= 1"),
        (dict(num_test=2.5), "data.num_test=2.5 must be an integer >= 1"),
        (dict(batch_size=True), "data.batch_size=True must be an integer >= 1"),
        (dict(img_size=-32), "data.img_size=-32 must be an integer >= 1 (or null: the backbone's input size)"),
    ],
)
def test_synthetic_counts_and_sizes_are_checked_naming_the_key(kwargs, message):
    from vpt_lightning.data.seg_synthetic import ShapeSegmentationDataModule
    from vpt_lightning.data.synthetic import SyntheticDataModule

    for module in (SyntheticDataModule, ShapeSegmentationDataModule):
        with pytest.raises(ValueError, match=re.escape(message)):
            module(**kwargs)
        with pytest.raises(ValueError, match=re.escape("data.num_val=0 must be an integer >= 1")):
            module(num_val=0)  # 'tune' validates on them
        final = module(split="final", num_train=4, num_val=0, num_test=2)  # 'final' trains on train + val
        final.setup()
        assert len(final.train_dataset) == 4 and final.val_dataset is None


def test_non_ascii_digit_labels_are_names_not_numbers(tmp_path):
    """'²'.isdigit() is True but int('²') fails: a label or class folder named so is a class name, never a crash."""
    write_csv(tmp_path, "train.csv", ["a", "²"] * 3)
    dm = FolderDataModule(str(tmp_path), train_list="train.csv", val_fraction=0.34, num_workers=0, img_size=8)
    assert dm.classes == ["a", "²"]
    (tmp_path / "list.txt").write_text("imgs/0.png ²\n")
    from vpt_lightning.data.datasets import read_list_file

    with pytest.raises(DataError, match="expected 'relative/path label'"):
        read_list_file(tmp_path / "list.txt", tmp_path, num_classes=2)


# ---- a split's index file is read as data: a regular file, under a cap -------------------------------------------
def _index_readers():
    from vpt_lightning.data.datasets import read_json_object, read_list_file
    from vpt_lightning.data.folder import read_csv_list

    return {
        "vtab list": (lambda p: read_list_file(p, p.parent, num_classes=2), "a.png 0\n"),
        "fgvc split": (lambda p: read_json_object(p, "FGVC split file"), '{"a.png": 1}'),
        "folder csv": (lambda p: read_csv_list(p), "path,label\na.png,0\n"),
    }


@pytest.mark.parametrize("reader", ["vtab list", "fgvc split", "folder csv"])
def test_an_index_file_that_is_a_fifo_a_device_or_too_large_is_refused_unread(tmp_path, monkeypatch, reader):
    import vpt_lightning.data.datasets as datasets

    read, good_text = _index_readers()[reader]
    write_image(tmp_path / "a.png", seed=0)
    good = tmp_path / "good.txt"
    good.write_text(good_text)
    assert read(good)  # the same file kinds read well when regular
    os.mkfifo(tmp_path / "pipe.txt")  # opening it to read would wait for a writer for ever
    (tmp_path / "zero.txt").symlink_to("/dev/zero")  # reading it would never end
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    refused = {
        "pipe.txt": "pipe.txt: a FIFO, not a regular file: not read",
        "zero.txt": "zero.txt: a character device, not a regular file: not read",
        "missing.txt": "missing.txt' does not exist",
        "dangling.txt": "dangling.txt' does not exist",
    }
    for name, message in refused.items():
        with pytest.raises(DataError, match=re.escape(message)):
            read(tmp_path / name)
    monkeypatch.setattr(datasets, "MAX_INDEX_FILE_BYTES", len(good_text.encode()) - 1)
    with pytest.raises(DataError, match=rf"good.txt: {len(good_text.encode())} bytes is over the limit of"):
        read(good)


def test_a_csv_list_with_a_field_over_the_csv_limit_is_a_data_error_naming_its_line(tmp_path):
    from vpt_lightning.data.folder import read_csv_list

    write_image(tmp_path / "a.png", seed=0)
    (tmp_path / "list.csv").write_text("path,label\na.png,0\n" + "b" * 200_000 + ",1\n")
    with pytest.raises(DataError, match=r"list.csv:3: field larger than field limit"):
        read_csv_list(tmp_path / "list.csv")
