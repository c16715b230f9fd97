"""Benchmark data: registry, VTAB-1k lists, FGVC JSON splits, users' folders, vpt-prepare, and bad-data errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
from vpt_lightning.data.prepare import main as prepare_main

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_image(path: Path, seed: int, size: int = 8, fmt: str = "PNG") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


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
        "cub": 200, "nabirds": 555, "oxford_flowers": 102, "stanford_dogs": 120, "stanford_cars": 196}
    assert get_task("vtab_svhn").num_classes == 10 and get_task("sun397").default_prompt_length == 5
    # the paper's VPT-Deep group means (spec §4) follow from the per-task numbers
    natural = np.mean([t.reference["vpt_deep"] for t in vtab_tasks("natural")])
    assert natural == pytest.approx(78.48, abs=0.01)
    with pytest.raises(KeyError, match="unknown vtab task 'cifar10'; valid names: .*'cifar100'"):
        get_task("cifar10", benchmark="vtab")


@pytest.mark.parametrize("task", [t.config_name for t in vtab_tasks() + fgvc_tasks()])
def test_every_task_has_a_composable_experiment(task):
    cfg = compose([f"+experiment={task}"])
    info = get_task(task)
    assert cfg.task_name == task and cfg.data.task == info.name
    assert cfg.recipe.num_tokens == info.default_prompt_length
    assert cfg.backbone.name == "vit_base_patch16_224.orig_in21k"


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


def test_vtab_normalisation_matches_hand_computation(tmp_path):
    task_dir = make_vtab_tree(tmp_path)
    dm = VTABDataModule("cifar100", str(tmp_path), img_size=8, num_workers=0)  # 8 px: the resize is the identity
    dm.setup()
    pixels = np.asarray(Image.open(task_dir / "train800" / "img_0.png"), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(dm.train_dataset[0][0], expected, rtol=1e-5, atol=1e-5)
    backbone = VTABDataModule("cifar100", str(tmp_path), img_size=8, num_workers=0, normalization="backbone",
                              backbone_data_config={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    backbone.setup()
    torch.testing.assert_close(backbone.train_dataset[0][0], torch.from_numpy(pixels).permute(2, 0, 1) * 2 - 1,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "val200.txt").unlink(), r"list file .*val200.txt' does not exist"),
        (lambda d: (d / "train800.txt").write_text("train800/img_0.png 0\nno-label-here\n"),
         r"train800.txt:2: expected 'relative/path label', got 'no-label-here'"),
        (lambda d: (d / "train800.txt").write_text("train800/img_0.png 0\ntrain800/img_1.png 100\n"),
         r"train800.txt:2: label 100 is outside \[0, 100\)"),
        (lambda d: (d / "train800.txt").write_text("train800/missing.png 3\n"),
         r"train800.txt:1: image .*missing.png' does not exist"),
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
    with pytest.raises(DataError, match=r"VTAB-1k folder of task 'cifar100' .*nowhere/cifar' does not exist.*vpt-prepare vtab"):
        VTABDataModule("cifar100", str(tmp_path / "nowhere"))


def test_corrupt_image_fails_at_load_naming_the_file(tmp_path):
    task_dir = make_vtab_tree(tmp_path)
    (task_dir / "train800" / "img_2.png").write_bytes(b"\x89PNG broken")
    dm = VTABDataModule("cifar100", str(tmp_path), num_workers=0)
    dm.setup()
    with pytest.raises(DataError, match=r"cannot read image .*img_2.png"):
        dm.train_dataset[2]
    # the opt-in full check decodes everything and reports it, exiting non-zero
    assert prepare_main(["check", "vtab", "--task", "cifar100", "--root", str(tmp_path), "--split", "tune"]) == 1


# ---- FGVC -----------------------------------------------------------------------------------------------
def make_cub(root: Path, per_class_train: int = 2) -> Path:
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


def test_fgvc_unknown_class_and_missing_json(tmp_path):
    folder = make_cub(tmp_path)
    good_val = (folder / "val.json").read_text()
    (folder / "val.json").write_text(json.dumps({"001.bird/val.jpg": 999}))
    with pytest.raises(DataError, match=r"val.json: '001.bird/val.jpg' has class id 999, not in train.json"):
        FGVCDataModule("cub", str(tmp_path), num_workers=0).setup()
    (folder / "val.json").write_text(good_val)
    (folder / "test.json").unlink()
    with pytest.raises(DataError, match=r"test.json' does not exist"):
        FGVCDataModule("cub", str(tmp_path), split="final", num_workers=0).setup()


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


# ---- vpt-prepare ----------------------------------------------------------------------------------------
def test_prepare_vtab_from_a_local_torchvision_eurosat(tmp_path):
    """torchvision's EuroSAT layout (eurosat/2750/<class>/*.jpg), written here; no download."""
    classes = [f"Class{c}" for c in range(10)]
    for c, name in enumerate(classes):
        for i in range(101):
            write_image(tmp_path / "src" / "eurosat" / "2750" / name / f"{name}_{i}.jpg", seed=c * 1000 + i, fmt="JPEG")
    out = tmp_path / "vtab-1k"
    assert prepare_main(["vtab", "--tasks", "eurosat", "--source", str(tmp_path / "src"), "--out", str(out)]) == 0
    lines = {s: (out / "eurosat" / f"{s}.txt").read_text().split("\n")[:-1] for s in ("train800", "val200", "train800val200", "test")}
    assert [len(lines[s]) for s in ("train800", "val200", "train800val200", "test")] == [800, 200, 1000, 10]
    assert not set(lines["train800"]) & set(lines["val200"]) and not set(lines["train800val200"]) & set(lines["test"])
    dm = VTABDataModule("eurosat", str(out), split="final", img_size=16, num_workers=0)
    dm.setup()
    assert len(dm.train_dataset) == 1000 and len(dm.test_dataset) == 10
    # the same seed draws the same split
    out2 = tmp_path / "again"
    prepare_main(["vtab", "--tasks", "eurosat", "--source", str(tmp_path / "src"), "--out", str(out2)])
    assert (out2 / "eurosat" / "val200.txt").read_text() == (out / "eurosat" / "val200.txt").read_text()


def test_prepare_without_data_asks_for_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="pass --download"):
        prepare_main(["vtab", "--tasks", "dtd", "--source", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="cannot build 'dmlab' from torchvision"):
        prepare_main(["vtab", "--tasks", "dmlab", "--source", str(tmp_path), "--out", str(tmp_path / "out")])


# ---- through vpt-train ----------------------------------------------------------------------------------
def _vpt_train(args, cwd):
    exe = Path(sys.executable).parent / "vpt-train"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_vtab_experiment_without_data_fails_clearly(tmp_path):
    proc = _vpt_train(["+experiment=vtab_cifar100", f"paths.data_dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0
    assert "VTAB-1k folder of task 'cifar100'" in proc.stderr + proc.stdout and "Epoch 0" not in proc.stderr


def test_vtab_experiment_trains_on_a_prepared_tree(tmp_path):
    make_vtab_tree(tmp_path / "vtab-1k", counts={"train800": 16, "val200": 8, "test": 8})
    proc = _vpt_train(["+experiment=vtab_cifar100", f"paths.data_dir={tmp_path}", "backbone=vit_tiny_random",
                       "+debug=fast", "data.num_workers=0", "data.batch_size=8", "run_name=r"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "vtab_cifar100" / "r" / "results.json").read_text())
    assert results["trainable_params"] == 2 * 10 * 32 + 32 * 100 + 100  # p=10 on both blocks of width 32 + head


def test_prepare_vtab_takes_given_train_val_indices(tmp_path):
    for c in range(10):
        for i in range(3):
            write_image(tmp_path / "src" / "eurosat" / "2750" / f"Class{c}" / f"{i}.jpg", seed=c * 10 + i, fmt="JPEG")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"eurosat": {"train": [0, 5, 7], "val": [2]}}))
    out = tmp_path / "out"
    prepare_main(["vtab", "--tasks", "eurosat", "--source", str(tmp_path / "src"), "--out", str(out),
                  "--official-splits", str(splits)])
    assert [l.split()[0] for l in (out / "eurosat" / "train800.txt").read_text().splitlines()] == [
        "images/train_0000000.png", "images/train_0000005.png", "images/train_0000007.png"]
    assert len((out / "eurosat" / "test.txt").read_text().splitlines()) == 30 - 4


# ---- vpt-prepare with the authors' split file (file names) -------------------------------------------------
def _image_pixels(task_dir: Path, line: str) -> np.ndarray:
    return np.asarray(Image.open(task_dir / line.split()[0]))


def write_dtd(root: Path, classes=("banded", "dotted", "zigzag"), per_split: int = 4) -> dict:
    """torchvision's DTD layout (dtd/dtd/images/<class>/<file>, labels/{train,val,test}1.txt); returns pixels."""
    pixels = {}
    for s, split in enumerate(("train", "val", "test")):
        lines = []
        for c, cls in enumerate(classes):
            for i in range(per_split):
                name = f"{cls}_{s}{i:03d}.jpg"
                pixels[name] = write_image(root / "dtd" / "dtd" / "images" / cls / name, seed=s * 100 + c * 10 + i,
                                           fmt="PNG")
                lines.append(f"{cls}/{name}")
        (root / "dtd" / "dtd" / "labels").mkdir(parents=True, exist_ok=True)
        (root / "dtd" / "dtd" / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return pixels


def test_prepare_reads_the_authors_file_names_from_train_and_val_splits(tmp_path):
    """Keys in the official naming ('vtab-dtd'), names of files; DTD's val200 comes from its validation split."""
    pixels = write_dtd(tmp_path / "src")
    splits = tmp_path / "vtab_trainval_splits.json"
    train_names, val_names = ["zigzag_0002.jpg", "banded_0000.jpg", "dotted/dotted_0003.jpg"], ["dotted_1001.jpg"]
    splits.write_text(json.dumps({"vtab-dtd": {"train": train_names, "val": val_names}, "vtab-caltech101": []}))
    out = tmp_path / "out"
    assert prepare_main(["vtab", "--tasks", "dtd", "--source", str(tmp_path / "src"), "--out", str(out),
                         "--official-splits", str(splits)]) == 0
    task_dir = out / "dtd"
    train = (task_dir / "train800.txt").read_text().splitlines()
    val = (task_dir / "val200.txt").read_text().splitlines()
    assert [int(l.split()[1]) for l in train] == [2, 0, 1] and [int(l.split()[1]) for l in val] == [1]
    for line, name in zip(train + val, train_names + val_names):  # the very images named, in order
        assert np.array_equal(_image_pixels(task_dir, line), pixels[name.split("/")[-1]])
    assert (task_dir / "train800val200.txt").read_text().splitlines() == train + val
    assert len((task_dir / "test.txt").read_text().splitlines()) == 12  # DTD's own test split
    dm = VTABDataModule("dtd", str(out), split="tune", img_size=8, num_workers=0)
    dm.setup()
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 1


def test_prepare_clevr_count_labels_are_counts_minus_three(tmp_path):
    """torchvision's CLEVR label is the object count (3..10); VTAB's count_all class is count - 3."""
    data = tmp_path / "src" / "clevr" / "CLEVR_v1.0"
    for split, counts in (("train", [3, 10, 5, 4]), ("val", [6, 3])):
        scenes = []
        for i, count in enumerate(counts):
            name = f"CLEVR_{split}_{i:06d}.png"
            write_image(data / "images" / split / name, seed=i)
            scenes.append({"image_filename": name, "objects": [{}] * count})
        (data / "scenes").mkdir(parents=True, exist_ok=True)
        (data / "scenes" / f"CLEVR_{split}_scenes.json").write_text(json.dumps({"scenes": scenes}))
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({'clevr(task="count_all")': {
        "train800": ["CLEVR_train_000000.png", "CLEVR_train_000001.png", "CLEVR_train_000003.png"],
        "val200": ["CLEVR_train_000002.png"]}}))
    out = tmp_path / "out"
    prepare_main(["vtab", "--tasks", "clevr_count", "--source", str(tmp_path / "src"), "--out", str(out),
                  "--official-splits", str(splits)])
    labels = lambda split: [int(l.split()[1]) for l in (out / "clevr_count" / split).read_text().splitlines()]
    assert labels("train800.txt") == [0, 7, 1] and labels("val200.txt") == [2] and labels("test.txt") == [3, 0]


def _eurosat_with_clashing_names(root: Path) -> None:
    for c in range(3):
        for i in range(4):
            write_image(root / "eurosat" / "2750" / f"Class{c}" / f"{i}.jpg", seed=c * 10 + i, fmt="JPEG")


@pytest.mark.parametrize("entry, message", [
    ({"train": ["0.jpg"], "val": ["Class1/1.jpg"]}, r"1 name\(s\) match several images, e.g. '0.jpg' \(3 files"),
    ({"train": ["Class0/0.jpg", "nope.jpg"], "val": ["Class1/1.jpg"]}, r"match no image .* e.g. 'nope.jpg'"),
    ({"train": ["Class0/0.jpg", 4], "val": ["Class1/0.jpg"]}, r"in both train and val"),
    ({"train": [99], "val": [1]}, r"index 99 is outside torchvision's 12 images"),
    ({"training": [1], "val": [2]}, r"has keys \['training', 'val'\]; expected one of \['train', 'train800'\]"),
    (["Class0/0.jpg"], r"must be .* or one list of train800 \+ val200 items, got list of length 1"),
])
def test_prepare_split_file_errors_name_the_entry(tmp_path, entry, message):
    _eurosat_with_clashing_names(tmp_path / "src")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"eurosat": entry}))
    with pytest.raises(ValueError, match=message):
        prepare_main(["vtab", "--tasks", "eurosat", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                      "--official-splits", str(splits)])


def test_prepare_split_file_without_the_task_lists_its_names_and_the_file(tmp_path):
    _eurosat_with_clashing_names(tmp_path / "src")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"vtab-dtd": {"train": [0], "val": [1]}}))
    with pytest.raises(ValueError, match=r"no entry for 'eurosat' \(its names: \['eurosat', 'vtab_eurosat', 'vtab-eurosat'\]\); "
                                         r"the file covers \['vtab-dtd'\]"):
        prepare_main(["vtab", "--tasks", "eurosat", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                      "--official-splits", str(splits)])
    splits.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        prepare_main(["vtab", "--tasks", "eurosat", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                      "--official-splits", str(splits)])


def test_tfds_ids_index_array_datasets_and_a_flat_list_is_train800_then_val200():
    from vpt_lightning.data.official_splits import resolve, task_entry

    assert resolve(["train_00012", 7, "train_16399"], None, 50000, "cifar") == [12, 7, 16399]
    with pytest.raises(ValueError, match="'apple.png' is neither an index nor a TFDS id"):
        resolve(["apple.png"], None, 100, "cifar")
    names = [f"train_{i:05d}" for i in range(1000)]
    train, val = task_entry({"vtab-cifar(num_classes=100)": names}, get_task("cifar100"), "f")
    assert train == names[:800] and val == names[800:]


def test_prepare_names_the_missing_module_of_a_dataset():
    from vpt_lightning.data.prepare import TORCHVISION_SOURCES, _require_modules

    assert TORCHVISION_SOURCES["svhn"].requires == ("scipy",) and TORCHVISION_SOURCES["patch_camelyon"].requires == ("h5py",)
    with pytest.raises(ModuleNotFoundError, match=r"torchvision needs \['no_such_module_vpt'\] to read 'svhn': pip install "
                                                  r"\"vpt-lightning\[prepare\]\""):
        _require_modules("svhn", ["no_such_module_vpt"])
