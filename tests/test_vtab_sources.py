"""vpt-prepare vtab in TFDS's exact order, from source files the tests write in each dataset's real format.

Each test checks the written lists against an independent computation: the md5 order of the keys the TFDS builder
yields (computed here with hashlib), VTAB's slice offsets, and VTAB's label rule applied to the written labels.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from vpt_lightning.cli.prepare import main as prepare_command
from vpt_lightning.data import DataError, VTABDataModule, get_task
from vpt_lightning.data.vtab_prep.readers_specialized import EUROSAT_CLASSES as EUROSAT

# the command's main without its console wrapper (which prints a one-line error), so errors arrive as exceptions
prepare_main = prepare_command.__wrapped__


def md5_order(split: str, keys) -> list:
    """Indices of ``keys`` sorted as TFDS stores split ``split``, computed directly."""
    as_bytes = [k if isinstance(k, bytes) else str(k).encode() for k in keys]
    return sorted(range(len(keys)), key=lambda i: int(hashlib.md5(split.encode() + as_bytes[i]).hexdigest(), 16))


def prepare(task: str, source: Path, out: Path, *extra: str) -> Path:
    assert prepare_main(["vtab", "--tasks", task, "--source", str(source), "--out", str(out), *extra]) == 0
    return out / get_task(task).folder


def lists(task_dir: Path) -> dict:
    return {
        name: [(line.split()[0], int(line.split()[1])) for line in (task_dir / f"{name}.txt").read_text().splitlines()]
        for name in ("train800", "val200", "train800val200", "test")
    }


def assert_slices(got: dict, expected: dict) -> None:
    """``expected``: name -> list of (file name, label); our list lines end in those file names."""
    for name, items in expected.items():
        assert [(Path(rel).name, label) for rel, label in got[name]] == [(Path(n).name, l) for n, l in items], name
    assert got["train800val200"] == got["train800"] + got["val200"]


# ---- CIFAR-100 and SVHN: arrays, key = index ---------------------------------------------------------------
def _arrays(n: int, seed: int, size: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_cifar100_from_torchvision_pickles_in_tfds_order(tmp_path, capsys):
    n_train, n_test = 2000, 7
    images = {"train": _arrays(n_train, 1, 32), "test": _arrays(n_test, 2, 32)}
    fine = {"train": [i % 100 for i in range(n_train)], "test": [(3 * i) % 100 for i in range(n_test)]}
    (tmp_path / "src" / "cifar-100-python").mkdir(parents=True)
    for split in ("train", "test"):
        entry = {
            "data": images[split].transpose(0, 3, 1, 2).reshape(-1, 3072),
            "fine_labels": fine[split],
            "coarse_labels": [0] * len(fine[split]),
        }
        (tmp_path / "src" / "cifar-100-python" / split).write_bytes(pickle.dumps(entry))
    task_dir = prepare("cifar100", tmp_path / "src", tmp_path / "out")
    assert "(exact: TFDS's order and VTAB's slices)" in capsys.readouterr().out
    order = md5_order("train", range(n_train))
    got = lists(task_dir)
    assert_slices(
        got,
        {
            "train800": [(f"train_{i:05d}.png", fine["train"][i]) for i in order[:800]],
            "val200": [(f"train_{i:05d}.png", fine["train"][i]) for i in order[1800:2000]],
            "test": [(f"test_{i:05d}.png", fine["test"][i]) for i in md5_order("test", range(n_test))],
        },
    )
    rel, _ = got["train800"][0]
    assert np.array_equal(np.asarray(Image.open(task_dir / rel)), images["train"][order[0]])  # the very image
    dm = VTABDataModule("cifar100", str(tmp_path / "out"), split="final", img_size=8, num_workers=0)
    dm.setup()
    assert len(dm.train_dataset) == 1000 and len(dm.test_dataset) == n_test


def test_cifar100_binary_and_pickle_read_alike(tmp_path):
    from vpt_lightning.data.vtab_prep.readers_natural import read_cifar100

    images, fine = _arrays(5, 3, 32), [7, 0, 99, 42, 7]
    for root in ("bin", "py"):
        (tmp_path / root).mkdir()
    records = [bytes([0, f]) + img.transpose(2, 0, 1).tobytes() for img, f in zip(images, fine)]
    for split in ("train", "test"):
        (tmp_path / "bin" / "cifar-100-binary").mkdir(exist_ok=True)
        (tmp_path / "bin" / "cifar-100-binary" / f"{split}.bin").write_bytes(b"".join(records))
        (tmp_path / "py" / "cifar-100-python").mkdir(exist_ok=True)
        (tmp_path / "py" / "cifar-100-python" / split).write_bytes(
            pickle.dumps({"data": images.transpose(0, 3, 1, 2).reshape(-1, 3072), "fine_labels": fine})
        )
    a, b = read_cifar100(tmp_path / "bin")["train"], read_cifar100(tmp_path / "py")["train"]
    assert list(a.labels) == list(b.labels) == fine and list(a.keys) == [0, 1, 2, 3, 4]
    assert all(np.array_equal(np.asarray(a.decode(i)), images[i]) for i in range(5))
    assert all(np.array_equal(np.asarray(b.decode(i)), images[i]) for i in range(5))
    (tmp_path / "bin" / "cifar-100-binary" / "test.bin").write_bytes(b"\x00" * 3075)
    with pytest.raises(DataError, match=r"test.bin: 3075 bytes is not a whole number of 3074-byte"):
        read_cifar100(tmp_path / "bin")


def test_svhn_mat_files_labels_ten_become_zero(tmp_path):
    from scipy.io import savemat

    n_train, n_test = 2000, 5
    digits = {"train": np.array([1 + i % 10 for i in range(n_train)]), "test": np.array([10, 1, 2, 10, 5])}
    for split, n in (("train", n_train), ("test", n_test)):
        savemat(
            tmp_path / f"{split}_32x32.mat", {"X": np.moveaxis(_arrays(n, 4), 0, -1), "y": digits[split].reshape(-1, 1)}
        )
    got = lists(prepare("svhn", tmp_path, tmp_path / "out"))
    order = md5_order("train", range(n_train))
    assert_slices(
        got,
        {
            "train800": [(f"train_{i:05d}.png", digits["train"][i] % 10) for i in order[:800]],
            "val200": [(f"train_{i:05d}.png", digits["train"][i] % 10) for i in order[1800:2000]],
            "test": [(f"test_{i:05d}.png", [0, 1, 2, 0, 5][i]) for i in md5_order("test", range(5))],
        },
    )


# ---- DTD, Flowers102, Pets: file lists ---------------------------------------------------------------------
def write_dtd(root: Path, counts=(800, 200, 3), classes=("banded", "dotted", "zigzag")) -> dict:
    """DTD's layout with fold-1 lists; returns the listed keys per TFDS split."""
    keys = {}
    for split, listed, n in zip(("train", "validation", "test"), ("train1", "val1", "test1"), counts):
        keys[split] = [f"{classes[i % 3]}/{classes[i % 3]}_{listed}_{i:04d}.jpg" for i in range(n)]
        for k in keys[split]:
            write_image(root / "dtd" / "dtd" / "images" / k, seed=len(k) + hash(k) % 1000, size=2, fmt="JPEG")
        (root / "dtd" / "dtd" / "labels").mkdir(parents=True, exist_ok=True)
        (root / "dtd" / "dtd" / "labels" / f"{listed}.txt").write_text("\n".join(keys[split]) + "\n")
    return keys


def test_dtd_fold1_in_tfds_order_and_check_against_the_authors_file(tmp_path, capsys):
    keys = write_dtd(tmp_path / "src")
    label = lambda k: ("banded", "dotted", "zigzag").index(k.split("/")[0])
    task_dir = prepare("dtd", tmp_path / "src", tmp_path / "out")
    got = lists(task_dir)
    expected = {
        s: [keys[t][i] for i in md5_order(t, keys[t])]
        for s, t in (("train800", "train"), ("val200", "validation"), ("test", "test"))
    }
    assert_slices(got, {s: [(k, label(k)) for k in v] for s, v in expected.items()})
    assert got["train800"][0][0] == f"images/train/{expected['train800'][0]}"  # class/file kept
    original = tmp_path / "src" / "dtd" / "dtd" / "images" / expected["train800"][0]
    assert (task_dir / got["train800"][0][0]).read_bytes() == original.read_bytes()  # copied, not re-encoded
    # vpt-prepare check against an authors'-style file: bare file names, same order -> 0; another order -> 1
    authors = tmp_path / "vtab_trainval_splits.json"
    names = lambda split: [k.split("/")[1] for k in expected[split]]
    authors.write_text(json.dumps({"vtab-dtd": {"train": names("train800"), "val": names("val200")}}))
    capsys.readouterr()
    assert (
        prepare_main(
            ["check", "vtab", "--task", "dtd", "--root", str(tmp_path / "out"), "--official-splits", str(authors)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "dtd train800: 800 of the 800 in vtab_trainval_splits.json are among our 800, same order" in out
    authors.write_text(
        json.dumps({"dtd": {"train": names("train800")[::-1], "val": names("val200")[:199] + ["x.jpg"]}})
    )
    assert (
        prepare_main(
            ["check", "vtab", "--task", "dtd", "--root", str(tmp_path / "out"), "--official-splits", str(authors)]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "train800: 800 of the 800" in out and "same order" not in out.split("val200")[0]
    assert "val200: 199 of the 200 in vtab_trainval_splits.json are among our 200; missing e.g. ['x.jpg']" in out


def test_flowers102_setid_splits_and_image_keys(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "flowers-102"
    ids = {"trnid": list(range(1, 801)), "valid": list(range(801, 1001)), "tstid": [1001, 1002, 1003]}
    labels = [1 + (i * 7) % 102 for i in range(1003)]  # 1-based, as imagelabels.mat
    for i in range(1, 1004):
        write_image(root / "jpg" / f"image_{i:05d}.jpg", seed=i, size=2, fmt="JPEG")
    savemat(root / "setid.mat", {k: np.array([v]) for k, v in ids.items()})
    savemat(root / "imagelabels.mat", {"labels": np.array([labels])})
    got = lists(prepare("flowers102", tmp_path, tmp_path / "out"))
    expect = lambda split, field: [
        (f"image_{ids[field][i]:05d}.jpg", labels[ids[field][i] - 1] - 1)
        for i in md5_order(split, [f"image_{j:05d}.jpg" for j in ids[field]])
    ]
    assert_slices(
        got,
        {
            "train800": expect("train", "trnid"),
            "val200": expect("validation", "valid"),
            "test": expect("test", "tstid"),
        },
    )


def test_pets_lists_give_breeds_and_val200_from_80_percent(tmp_path):
    root = tmp_path / "oxford-iiit-pet"
    lines = {
        "trainval.txt": [f"Breed{i % 37}_{i} {1 + i % 37} 1 1" for i in range(1000)],
        "test.txt": [f"Breed{i}_t{i} {1 + i} 2 1" for i in range(4)],
    }
    (root / "annotations").mkdir(parents=True)
    for listed, rows in lines.items():
        (root / "annotations" / listed).write_text("#Image CLASS-ID SPECIES BREED ID\n" + "\n".join(rows) + "\n")
        for row in rows:
            write_image(root / "images" / f"{row.split()[0]}.jpg", seed=len(row), size=2, fmt="JPEG")
    got = lists(prepare("pets", tmp_path, tmp_path / "out"))
    items = {f: [(r.split()[0] + ".jpg", int(r.split()[1]) - 1) for r in rows] for f, rows in lines.items()}
    train = [items["trainval.txt"][i] for i in md5_order("train", [n for n, _ in items["trainval.txt"]])]
    assert_slices(
        got,
        {
            "train800": train[:800],
            "val200": train[800:1000],
            "test": [items["test.txt"][i] for i in md5_order("test", [n for n, _ in items["test.txt"]])],
        },
    )
    (root / "annotations" / "test.txt").write_text("Breed0_t0 one 2 1\n")
    with pytest.raises(
        DataError, match=r"test.txt:1: expected 'name class_id species breed_id', got 'Breed0_t0 one 2 1'"
    ):
        prepare("pets", tmp_path, tmp_path / "out2")


# ---- Patch Camelyon, EuroSAT, RESISC45 -------------------------------------------------------------------
def test_patch_camelyon_keys_use_valid_but_the_salt_is_validation(tmp_path):
    import h5py

    sizes = {"train": 800, "valid": 200, "test": 3}
    arrays = {}
    (tmp_path / "pcam").mkdir()
    for short, n in sizes.items():
        x, y = _arrays(n, len(short), 8), (np.arange(n) * 7 % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        with h5py.File(tmp_path / "pcam" / f"camelyonpatch_level_2_split_{short}_x.h5", "w") as f:
            f["x"] = x
        with h5py.File(tmp_path / "pcam" / f"camelyonpatch_level_2_split_{short}_y.h5", "w") as f:
            f["y"] = y
        arrays[short] = (x, y.reshape(-1))
    task_dir = prepare("patch_camelyon", tmp_path, tmp_path / "out")
    got = lists(task_dir)
    expect = lambda split, short: [
        (f"{split}_{i:05d}.png", int(arrays[short][1][i]))
        for i in md5_order(split, [f"{short}_{i}" for i in range(sizes[short])])
    ]
    assert_slices(
        got,
        {"train800": expect("train", "train"), "val200": expect("validation", "valid"), "test": expect("test", "test")},
    )
    first = md5_order("validation", [f"valid_{i}" for i in range(200)])[0]
    assert np.array_equal(np.asarray(Image.open(task_dir / got["val200"][0][0])), arrays["valid"][0][first])


def test_eurosat_one_split_sliced_60_20_20_with_label_prefixed_keys(tmp_path):
    names = [f"{EUROSAT[i % 10]}/{EUROSAT[i % 10]}_{i // 10 + 1}.jpg" for i in range(1400)]
    for n in names:
        write_image(tmp_path / "eurosat" / "2750" / n, seed=len(n), size=2, fmt="JPEG")
    got = lists(prepare("eurosat", tmp_path, tmp_path / "out"))
    items = sorted(names)  # the reader lists class folders, then files, sorted
    order = md5_order("train", [f"{n.split('/')[0]}_{n.split('/')[1]}" for n in items])
    pick = lambda idx: [(items[i], EUROSAT.index(items[i].split("/")[0])) for idx_ in [idx] for i in idx_]
    assert_slices(got, {"train800": pick(order[:800]), "val200": pick(order[840:1040]), "test": pick(order[1120:])})
    assert len(got["test"]) == 280 and got["test"][0][0].startswith("images/train/")


def test_eurosat_too_few_images_for_vtab_slices_is_an_error(tmp_path):
    for i in range(30):
        write_image(tmp_path / "eurosat" / "2750" / "Forest" / f"Forest_{i}.jpg", seed=i, size=2, fmt="JPEG")
    with pytest.raises(ValueError, match=r"train\[:800\]: the source's 'train' split has 30 examples, too few"):
        prepare("eurosat", tmp_path, tmp_path / "out")
    write_image(tmp_path / "eurosat" / "2750" / "Forest" / "Jungle_1.jpg", seed=0, size=2, fmt="JPEG")
    with pytest.raises(
        DataError, match=r"Jungle_1.jpg: a EuroSAT file name starts with its class, one of \['AnnualCrop'"
    ):
        prepare("eurosat", tmp_path, tmp_path / "out")


def test_resisc45_keys_join_folder_and_file(tmp_path):
    classes = ("airplane", "beach", "church")
    names = [f"{classes[i % 3]}/{classes[i % 3]}_{i // 3 + 1:03d}.jpg" for i in range(1400)]
    for n in names:
        write_image(tmp_path / "NWPU-RESISC45" / n, seed=len(n), size=2, fmt="JPEG")
    got = lists(prepare("resisc45", tmp_path, tmp_path / "out"))
    items = sorted(names)
    order = md5_order("train", [n.replace("/", "_") for n in items])
    pick = lambda idx: [(items[i], classes.index(items[i].split("/")[0])) for i in idx]
    assert_slices(got, {"train800": pick(order[:800]), "val200": pick(order[840:1040]), "test": pick(order[1120:])})


# ---- CLEVR, KITTI: labels from scene JSON / object labels ---------------------------------------------------
def write_clevr(root: Path, n_train: int = 2000, n_val: int = 5) -> dict:
    """CLEVR_v1.0 with scenes listing objects (3..10) at depths ``pixel_coords[2]``; returns the scenes."""
    rng = np.random.default_rng(0)
    scenes = {}
    for split, n in (("train", n_train), ("val", n_val)):
        scenes[split] = []
        for i in range(n):
            name = f"CLEVR_{split}_{i:06d}.png"
            write_image(root / "clevr" / "CLEVR_v1.0" / "images" / split / name, seed=i, size=2)
            depths = rng.choice([7.9, 8.0, 8.2, 8.5, 8.7, 9.4, 9.6, 10.0, 12.5], size=3 + i % 8)
            scenes[split].append(
                {
                    "image_index": i,
                    "image_filename": name,
                    "objects": [{"pixel_coords": [10, 20, float(z)], "shape": "cube"} for z in depths],
                }
            )
        (root / "clevr" / "CLEVR_v1.0" / "scenes").mkdir(parents=True, exist_ok=True)
        (root / "clevr" / "CLEVR_v1.0" / "scenes" / f"CLEVR_{split}_scenes.json").write_text(
            json.dumps({"scenes": scenes[split]})
        )
    return scenes


def _clevr_distance_by_hand(z: float) -> int:
    # VTAB's bins [0, 8, 8.5, 9, 9.5, 10, 100]: the last edge strictly below the closest depth
    return sum(edge < z for edge in (8.0, 8.5, 9.0, 9.5, 10.0, 100.0))


@pytest.mark.parametrize("task", ["clevr_count", "clevr_distance"])
def test_clevr_tasks_label_scenes_as_vtab_does(tmp_path, task):
    scenes = write_clevr(tmp_path / "src")
    rule = (
        (lambda s: len(s["objects"]) - 3)
        if task == "clevr_count"
        else (lambda s: _clevr_distance_by_hand(min(o["pixel_coords"][2] for o in s["objects"])))
    )
    got = lists(prepare(task, tmp_path / "src", tmp_path / "out"))
    pick = lambda split, idx: [(scenes[split][i]["image_filename"], rule(scenes[split][i])) for i in idx]
    train_order = md5_order("train", [s["image_filename"] for s in scenes["train"]])
    assert_slices(
        got,
        {
            "train800": pick("train", train_order[:800]),
            "val200": pick("train", train_order[1800:2000]),
            "test": pick("val", md5_order("validation", [s["image_filename"] for s in scenes["val"]])),
        },
    )
    if task == "clevr_distance":  # 8.0 is not above the edge 8: class 0; 8.2 -> 1; 10.0 -> 4; 12.5 -> 5
        assert [_clevr_distance_by_hand(z) for z in (8.0, 8.2, 10.0, 12.5)] == [0, 1, 4, 5]
        assert {label for _, label in got["train800"]} <= set(range(6)) and len({l for _, l in got["train800"]}) > 2


def test_clevr_scene_of_another_image_is_an_error(tmp_path):
    scenes = write_clevr(tmp_path, n_train=3, n_val=2)
    scenes["val"][1]["image_filename"] = "CLEVR_val_000009.png"
    (tmp_path / "clevr" / "CLEVR_v1.0" / "scenes" / "CLEVR_val_scenes.json").write_text(
        json.dumps({"scenes": scenes["val"]})
    )
    with pytest.raises(
        DataError,
        match=r"CLEVR_val_scenes.json: scene of 'CLEVR_val_000009.png' where the sorted images "
        r"have 'CLEVR_val_000001.png'",
    ):
        prepare("clevr_count", tmp_path, tmp_path / "out")


def write_kitti(root: Path, drives: int = 20, per_drive: int = 110) -> dict:
    """KITTI's training images/labels and the devkit mapping; returns per image the closest vehicle depth."""
    n = drives * per_drive
    rng = np.random.default_rng(5)
    line_of_image = rng.permutation(n) + 1  # train_rand.txt: image i -> 1-based mapping line
    mapping = [f"2011_09_26 2011_09_26_drive_{d:04d}_sync {f:010d}" for d in range(drives) for f in range(per_drive)]
    (root / "kitti" / "mapping").mkdir(parents=True)
    (root / "kitti" / "mapping" / "train_rand.txt").write_text(",".join(str(v) for v in line_of_image) + "\n")
    (root / "kitti" / "mapping" / "train_mapping.txt").write_text("\n".join(mapping) + "\n")
    closest = {}
    (root / "kitti" / "training" / "label_2").mkdir(parents=True)
    for i in range(n):
        write_image(root / "kitti" / "training" / "image_2" / f"{i:06d}.png", seed=i, size=2)
        z = [None, 5.0, 8.0, 15.0, 19.99, 20.0, 60.0][i % 7]
        lines = [
            "Pedestrian 0.00 0 -0.20 712.40 143.00 810.73 307.92 1.89 0.48 1.20 1.84 1.47 2.50 0.01",
            "DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10",
        ]
        if z is not None:
            lines += [
                f"{['Car', 'Van', 'Truck'][i % 3]} 0.00 0 1.5 1 2 3 4 1.5 1.6 3.9 -4.0 1.7 {z + 3:.2f} 1.6",
                f"Car 0.00 1 1.5 1 2 3 4 1.5 1.6 3.9 2.0 1.7 {z:.2f} 1.6",
            ]
        (root / "kitti" / "training" / "label_2" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
        closest[f"{i:06d}.png"] = z
    return closest


def test_kitti_closest_vehicle_distance_in_tfds_drive_split(tmp_path):
    closest = write_kitti(tmp_path)
    # VTAB: the last of the edges [-100, 8, 20, 999] strictly below the depth (1000 without a vehicle)
    label = lambda z: 3 if z is None else 0 if z <= 8 else 1 if z <= 20 else 2
    assert [label(z) for z in (5.0, 8.0, 19.99, 20.0, 60.0, None)] == [0, 0, 1, 1, 2, 3]
    from vpt_lightning.data.vtab_prep.readers_structured import read_kitti

    splits = read_kitti(tmp_path)
    assert sum(len(s) for s in splits.values()) == 2200 and (len(splits["validation"]), len(splits["test"])) == (
        220,
        220,
    )
    got = lists(prepare("kitti_distance", tmp_path, tmp_path / "out"))
    pick = lambda split, n=None: [
        (k, label(closest[k]))
        for k in [list(splits[split].keys)[i] for i in md5_order(split, list(splits[split].keys))][:n]
    ]
    assert_slices(got, {"train800": pick("train", 800), "val200": pick("validation", 200), "test": pick("test")})


def test_kitti_split_is_tfds_own_drive_split(tmp_path):
    builder = pytest.importorskip("tensorflow_datasets.datasets.kitti.kitti_dataset_builder")
    import io
    import os

    write_kitti(tmp_path, drives=30, per_drive=3)
    from vpt_lightning.data.vtab_prep.readers_structured import kitti_splits

    mapping = tmp_path / "kitti" / "mapping"
    devkit = [
        (os.path.join("mapping", name), io.BytesIO((mapping / name).read_bytes()))
        for name in ("train_rand.txt", "train_mapping.txt")
    ]
    train, validation, test = builder._build_splits(devkit)
    ours = kitti_splits(
        (mapping / "train_rand.txt").read_text(), (mapping / "train_mapping.txt").read_text().splitlines()
    )
    assert {k: sorted(v) for k, v in ours.items()} == {
        "train": sorted(train),
        "validation": sorted(validation),
        "test": sorted(test),
    }


def test_kitti_malformed_label_names_file_and_line(tmp_path):
    write_kitti(tmp_path, drives=10, per_drive=2)
    (tmp_path / "kitti" / "training" / "label_2" / "000003.txt").write_text("Car 0.0 0\n")
    with pytest.raises(
        DataError, match=r"000003.txt:1: expected the 15 fields of a KITTI object label, got 'Car 0.0 0'"
    ):
        prepare("kitti_distance", tmp_path, tmp_path / "out")


# ---- dSprites, smallNORB: arrays in their released formats ------------------------------------------------
@pytest.mark.parametrize(
    "task, column, rule",
    [
        ("dsprites_location", 4, lambda v: v // 2),  # 32 x positions -> 16
        ("dsprites_orientation", 3, lambda v: int(v / 2.5)),  # 40 orientations -> 16
    ],
)
def test_dsprites_npz_binned_labels_and_0_255_images(tmp_path, task, column, rule):
    n = 2000
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 2, size=(n, 64, 64), dtype=np.uint8)
    classes = np.zeros((n, 6), dtype=np.int64)
    classes[:, 3], classes[:, 4] = np.arange(n) % 40, (np.arange(n) * 7) % 32
    (tmp_path / "dsprites").mkdir()
    np.savez_compressed(
        tmp_path / "dsprites" / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
        imgs=imgs,
        latents_classes=classes,
        latents_values=classes.astype(float),
    )
    task_dir = prepare(task, tmp_path, tmp_path / "out")
    got = lists(task_dir)
    order = md5_order("train", range(n))
    pick = lambda idx: [(f"train_{i:05d}.png", rule(int(classes[i, column]))) for i in idx]
    assert_slices(got, {"train800": pick(order[:800]), "val200": pick(order[1600:1800]), "test": pick(order[1800:])})
    assert rule(31 if column == 4 else 39) == 15 and rule(3) == 1  # the top class is 15
    i = order[1800]
    assert np.array_equal(np.asarray(Image.open(task_dir / got["test"][0][0])), imgs[i] * 255)


def write_norb(path: Path, array: np.ndarray) -> None:
    """smallNORB's binary matrix: magic (uint8 or int32), rank, max(3, rank) dims, then the data (little-endian)."""
    magic = 0x1E3D4C55 if array.dtype == np.uint8 else 0x1E3D4C54
    dims = list(array.shape) + [1] * (3 - array.ndim)
    path.write_bytes(
        struct.pack(f"<ii{len(dims)}i", magic, array.ndim, *dims)
        + array.astype(array.dtype.newbyteorder("<")).tobytes()
    )


@pytest.mark.parametrize(
    "task, rule", [("smallnorb_azimuth", lambda info: info[2] // 2), ("smallnorb_elevation", lambda info: info[1])]
)
def test_smallnorb_left_images_with_val200_and_test_from_the_test_files(tmp_path, task, rule):
    folder = tmp_path / "smallnorb"
    folder.mkdir()
    data = {}
    for split, stem, n in (
        ("train", "smallnorb-5x46789x9x18x6x2x96x96-training", 800),
        ("test", "smallnorb-5x01235x9x18x6x2x96x96-testing", 410),
    ):
        dat = np.random.default_rng(n).integers(0, 256, size=(n, 2, 6, 6), dtype=np.uint8)
        info = np.stack(
            [np.arange(n) % 10, np.arange(n) % 9, (np.arange(n) * 2) % 36, np.arange(n) % 6], axis=1
        ).astype(np.int32)
        write_norb(folder / f"{stem}-dat.mat", dat)
        write_norb(folder / f"{stem}-info.mat", info)
        write_norb(folder / f"{stem}-cat.mat", (np.arange(n) % 5).astype(np.int32))
        data[split] = (dat, info)
    task_dir = prepare(task, tmp_path, tmp_path / "out")
    got = lists(task_dir)
    pick = lambda split, idx: [(f"{split}_{i:05d}.png", int(rule(data[split][1][i]))) for i in idx]
    test_order = md5_order("test", range(410))
    assert_slices(
        got,
        {
            "train800": pick("train", md5_order("train", range(800))),
            "val200": pick("test", test_order[:200]),
            "test": pick("test", test_order[205:]),
        },
    )  # test[50%:] of 410
    first = test_order[205]
    assert np.array_equal(np.asarray(Image.open(task_dir / got["test"][0][0])), data["test"][0][first, 0])  # left image
    (folder / "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat").write_bytes(b"\x00" * 24)
    with pytest.raises(DataError, match=r"training-dat.mat: not a smallNORB matrix \(magic 0; expected"):
        prepare(task, tmp_path, tmp_path / "out2")


# ---- DMLab: TFRecords of tf.train.Example, written here byte by byte -------------------------------------
def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = b""
    while True:
        out += bytes([(value & 0x7F) | (0x80 if value > 0x7F else 0)])
        value >>= 7
        if not value:
            return out


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def example(features: dict) -> bytes:
    """A serialized tf.train.Example: bytes features as BytesList, ints as packed Int64List."""
    entries = b""
    for name, value in features.items():
        feature = (
            _field(1, _field(1, value))
            if isinstance(value, bytes)
            else _field(3, _field(1, b"".join(_varint(v) for v in [value])))
        )
        entries += _field(1, _field(1, name.encode()) + _field(2, feature))
    return _field(1, entries)


def write_tfrecord(path: Path, payloads) -> None:
    with open(path, "wb") as handle:
        for data in payloads:
            length = struct.pack("<Q", len(data))
            handle.write(length + struct.pack("<I", _masked(length)) + data + struct.pack("<I", _masked(data)))


def test_crc32c_matches_the_standard_check_value():
    from vpt_lightning.data.vtab_prep.tfrecord import crc32c

    assert _crc32c_bitwise(b"123456789") == 0xE3069283 == crc32c(b"123456789")


def test_dmlab_tfrecords_keyed_by_filename(tmp_path):
    folder = tmp_path / "dmlab"
    folder.mkdir()
    sizes, records = {"train": 800, "validation": 200, "test": 4}, {}
    for split, n in sizes.items():
        records[split] = []
        for i in range(n):
            png = tmp_path / "frame.png"
            write_image(png, seed=i + n, size=3)
            records[split].append((f"dmlab/{split}/frame_{i:05d}.png".encode(), (i * 5) % 6, png.read_bytes()))
        half = n // 2  # several files per split, as the released archive has
        for part, chunk in enumerate((records[split][:half], records[split][half:])):
            write_tfrecord(
                folder / f"dmlab-{split}.tfrecord-0000{part}-of-00002",
                [example({"image": img, "filename": name, "label": label}) for name, label, img in chunk],
            )
    task_dir = prepare("dmlab", tmp_path, tmp_path / "out")
    got = lists(task_dir)
    pick = lambda split: [
        (Path(records[split][i][0].decode()).name, records[split][i][1])
        for i in md5_order(split, [r[0] for r in records[split]])
    ]
    assert_slices(got, {"train800": pick("train"), "val200": pick("validation"), "test": pick("test")})
    first = md5_order("test", [r[0] for r in records["test"]])[0]
    assert (task_dir / got["test"][0][0]).read_bytes() == records["test"][first][2]  # the encoded image, as stored
    data = (folder / "dmlab-test.tfrecord-00000-of-00002").read_bytes()
    (folder / "dmlab-test.tfrecord-00000-of-00002").write_bytes(data[:8] + b"\x00\x00\x00\x00" + data[12:])
    with pytest.raises(DataError, match=r"dmlab-test.tfrecord-00000-of-00002: bad TFRecord length checksum at byte 0"):
        prepare("dmlab", tmp_path, tmp_path / "out2")


# ---- Diabetic Retinopathy: Kaggle CSVs, btgraham-300 --------------------------------------------------------
def write_fundus(path: Path, seed: int, size=(120, 160)) -> None:
    """A JPEG like a fundus photograph: a noisy bright disc on black."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.45 * h) ** 2
    rng = np.random.default_rng(seed)
    pixels = (disc[..., None] * rng.integers(60, 220, size=(h, w, 3))).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)


def test_retinopathy_splits_from_the_kaggle_csvs(tmp_path):
    from vpt_lightning.data.vtab_prep.prepare import exact_indices
    from vpt_lightning.data.vtab_prep.readers_specialized import read_retinopathy
    from vpt_lightning.data.vtab_prep.sources import EXACT_SOURCES

    root = tmp_path / "diabetic_retinopathy"
    train = [(f"{i}_{'left' if i % 2 else 'right'}", i % 5) for i in range(810)]
    solution = [(f"t{i}_left", (i * 3) % 5, "Public" if i % 3 else "Private") for i in range(330)]
    for name, _ in train:
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "train" / f"{name}.jpeg").write_bytes(b"")  # decoded only when written
    for name, _, _ in solution:
        (root / "test").mkdir(parents=True, exist_ok=True)
        (root / "test" / f"{name}.jpeg").write_bytes(b"")
    (root / "trainLabels.csv").write_text("image,level\n" + "".join(f"{n},{l}\n" for n, l in train))
    (root / "retinopathy_solution.csv").write_text(
        "image,level,Usage\n" + "".join(f"{n},{l},{u}\n" for n, l, u in solution)
    )
    splits = read_retinopathy(tmp_path)
    public = [(n, l) for n, l, u in solution if u == "Public"]
    private = [(n, l) for n, l, u in solution if u == "Private"]
    assert (len(splits["validation"]), len(splits["test"])) == (len(public), len(private)) == (220, 110)
    chosen = exact_indices(EXACT_SOURCES["diabetic_retinopathy"], splits, "diabetic_retinopathy")
    for name, (split, rows) in (
        ("train800", ("train", train)),
        ("val200", ("validation", public)),
        ("test", ("test", private)),
    ):
        expected = [rows[i] for i in md5_order(split, [n for n, _ in rows])][
            : 800 if name == "train800" else 200 if name == "val200" else None
        ]
        indices = chosen[name][1]
        assert chosen[name][0] == split
        assert [(splits[split].keys[i], splits[split].labels[i]) for i in indices] == expected
    (root / "trainLabels.csv").write_text("image,level\n10_left,7\n")
    with pytest.raises(DataError, match=r"trainLabels.csv:2: level '7' is not a grade 0-4"):
        read_retinopathy(tmp_path)


def test_btgraham_300_equals_tfds_processing(tmp_path):
    pytest.importorskip("cv2")
    dr = pytest.importorskip("tensorflow_datasets.image_classification.diabetic_retinopathy_detection")
    from vpt_lightning.data.vtab_prep.readers_specialized import btgraham_300

    for seed, size in ((0, (120, 160)), (1, (700, 900))):
        path = tmp_path / f"{seed}.jpeg"
        write_fundus(path, seed, size)
        with open(path, "rb") as handle:
            theirs = dr._btgraham_processing(
                image_fobj=handle, filepath=str(path), target_pixels=300, crop_to_radius=True
            ).getvalue()
        ours = btgraham_300(path)
        assert ours == theirs
        image = np.asarray(Image.open(__import__("io").BytesIO(ours)))
        assert image.shape[:2] == (540, 540) and abs(int(image[0, 0].mean()) - 128) <= 2  # grey outside the disc


# ---- SUN397: TFDS's split lists ---------------------------------------------------------------------------
def test_sun397_uses_tfds_split_lists(tmp_path, monkeypatch):
    import vpt_lightning.data.vtab_prep.readers_natural as natural

    classes = ["/a/abbey", "/b/beach", "/c/church/outdoor"]
    lists_ = {
        "train": [f"{classes[i % 3]}/sun_tr{i:05d}.jpg" for i in range(1000)],
        "validation": [f"{classes[i % 3]}/sun_va{i:05d}.jpg" for i in range(200)],
        "test": [f"{classes[i % 3]}/sun_te{i:05d}.jpg" for i in range(5)]
        + ["/c/church/outdoor/sun_bhenjvsvrtumjuri.jpg"],
    }
    monkeypatch.setattr(natural, "sun397_split_lists", lambda: lists_)
    chosen = {split: [keys[i] for i in md5_order(split, keys)] for split, keys in lists_.items()}
    for key in chosen["train"][:800] + chosen["validation"] + chosen["test"]:
        write_image(tmp_path / "SUN397" / key.lstrip("/"), seed=len(key), size=2, fmt="JPEG")
    got = lists(prepare("sun397", tmp_path, tmp_path / "out"))  # the other 200 training images need not exist
    label = lambda key: classes.index(key.rsplit("/", 1)[0])
    assert_slices(
        got,
        {
            "train800": [(k, label(k)) for k in chosen["train"][:800]],
            "val200": [(k, label(k)) for k in chosen["validation"]],
            "test": [(k, label(k)) for k in chosen["test"] if "bhenjvsvrtumjuri" not in k],
        },
    )  # TFDS skips it


def test_sun397_split_lists_ship_with_tensorflow_datasets():
    pytest.importorskip("tensorflow_datasets")
    from vpt_lightning.data.vtab_prep.readers_natural import sun397_split_lists

    lists_ = sun397_split_lists()
    assert {k: len(v) for k, v in lists_.items()} == {"train": 76128, "validation": 10875, "test": 21750}
    assert len({k.rsplit("/", 1)[0] for v in lists_.values() for k in v}) == 397


def test_every_vtab_task_has_a_route():
    from vpt_lightning.data import vtab_tasks
    from vpt_lightning.data.vtab_prep.prepare import route
    from vpt_lightning.data.vtab_prep.sources import EXACT_SOURCES, TORCHVISION_SOURCES

    assert {t.name for t in vtab_tasks()} - set(EXACT_SOURCES) == {"caltech101"}
    assert "caltech101" in TORCHVISION_SOURCES and route("caltech101") == "redrawn"
    assert route("caltech101", Path("splits.json")) == "authors" and route("dtd") == "exact"
    assert route("dtd", redraw=True) == "redrawn"
