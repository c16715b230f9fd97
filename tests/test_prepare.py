"""vpt-prepare vtab on torchvision layouts written by the tests: file datasets (copied as they are) and array
datasets (Patch Camelyon's h5 files, decoded to PNG), with drawn or given (TFDS id) splits. No downloads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from vpt_lightning.cli.prepare import main as prepare_main
from vpt_lightning.data import VTABDataModule, get_task
from vpt_lightning.data.vtab_prep.official_splits import resolve, task_entry

# the command prints an error as one line (test_prepare_without_data_names_...); the tests below check the
# library's errors as raised
prepare_command, prepare_main = prepare_main, prepare_main.__wrapped__

SIZES = {"train": 6, "valid": 4, "test": 3}


def write_pcam(root: Path) -> dict:
    """torchvision's Patch Camelyon layout: pcam/camelyonpatch_level_2_split_<split>_{x,y}.h5."""
    import h5py

    arrays = {}
    for split, n in SIZES.items():
        rng = np.random.default_rng(len(split))
        x = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        (root / "pcam").mkdir(parents=True, exist_ok=True)
        with h5py.File(root / "pcam" / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = x
        with h5py.File(root / "pcam" / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f["y"] = y
        arrays[split] = (x, y.reshape(-1))
    return arrays


def _lines(task_dir: Path, name: str):
    return [line.split() for line in (task_dir / name).read_text().splitlines()]


def test_array_dataset_with_tfds_ids_from_its_train_and_validation_splits(tmp_path):
    arrays = write_pcam(tmp_path / "src")
    splits = tmp_path / "splits.json"
    splits.write_text(
        json.dumps(
            {
                "patch_camelyon": {
                    "train": ["train_00004", "train_00001", "validation_00002"],
                    "val": ["validation_00000"],
                }
            }
        )
    )
    with pytest.warns(UserWarning, match="has 3 train and 1 val items"):
        prepare_main(
            [
                "vtab",
                "--tasks",
                "patch_camelyon",
                "--source",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "out"),
                "--official-splits",
                str(splits),
            ]
        )
    task_dir = tmp_path / "out" / "patch_camelyon"
    expected = [("train", 4), ("train", 1), ("valid", 2), ("valid", 0)]
    for (rel, label), (split, i) in zip(_lines(task_dir, "train800.txt") + _lines(task_dir, "val200.txt"), expected):
        assert rel.endswith(".png") and int(label) == arrays[split][1][i]
        assert np.array_equal(np.asarray(Image.open(task_dir / rel)), arrays[split][0][i])  # the very image
    test = _lines(task_dir, "test.txt")
    assert [int(label) for _, label in test] == list(arrays["test"][1])
    dm = VTABDataModule("patch_camelyon", str(tmp_path / "out"), split="final", img_size=8, num_workers=0)
    dm.setup()
    assert len(dm.train_dataset) == 4 and len(dm.test_dataset) == 3


def test_drawn_split_from_a_local_torchvision_eurosat_copies_the_original_files(tmp_path):
    """torchvision's EuroSAT layout (eurosat/2750/<class>/*.jpg), written here; no download. The split is drawn
    by seed; files are copied byte for byte (not re-encoded), labels read from torchvision's targets."""
    source = tmp_path / "src" / "eurosat" / "2750"
    for c in range(10):
        for i in range(101):
            write_image(source / f"Class{c}" / f"Class{c}_{i}.jpg", seed=c * 1000 + i, size=6, fmt="JPEG")
    out = tmp_path / "vtab-1k"
    assert (
        prepare_main(["vtab", "--tasks", "eurosat", "--source", str(tmp_path / "src"), "--out", str(out), "--redraw"])
        == 0
    )
    lines = {
        s: (out / "eurosat" / f"{s}.txt").read_text().splitlines()
        for s in ("train800", "val200", "train800val200", "test")
    }
    assert [len(lines[s]) for s in ("train800", "val200", "train800val200", "test")] == [800, 200, 1000, 10]
    assert not set(lines["train800"]) & set(lines["val200"]) and not set(lines["train800val200"]) & set(lines["test"])
    originals = sorted(source.rglob("*.jpg"))  # ImageFolder's order: class folders, then file names
    for rel, label in (line.split() for line in lines["train800"][:50] + lines["test"]):
        index = int(Path(rel).stem.split("_")[1])
        assert rel.endswith(".jpg") and (out / "eurosat" / rel).read_bytes() == originals[index].read_bytes()
        assert int(label) == int(originals[index].parent.name[len("Class") :])
    dm = VTABDataModule("eurosat", str(out), split="final", img_size=16, num_workers=0)
    dm.setup()
    assert len(dm.train_dataset) == 1000 and len(dm.test_dataset) == 10
    # the same seed draws the same split; another seed another one
    prepare_main(
        ["vtab", "--tasks", "eurosat", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "again"), "--redraw"]
    )
    assert (tmp_path / "again" / "eurosat" / "val200.txt").read_text() == (out / "eurosat" / "val200.txt").read_text()
    prepare_main(
        [
            "vtab",
            "--tasks",
            "eurosat",
            "--source",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "s1"),
            "--seed",
            "1",
            "--redraw",
        ]
    )
    assert (tmp_path / "s1" / "eurosat" / "val200.txt").read_text() != (out / "eurosat" / "val200.txt").read_text()


def test_tfds_ids_keep_their_split():
    splits = {"train": (0, 10), "val": (10, 5)}
    assert resolve(["validation_3", "train_5", "7", 2], None, splits, "s") == [13, 5, 7, 2]
    with pytest.raises(
        ValueError,
        match=r"'test_1' is neither an index nor a TFDS id of a split torchvision has here "
        r"\(train_<n>, validation_<n>, val_<n>\)",
    ):
        resolve(["test_1"], None, splits, "s")
    with pytest.raises(ValueError, match="'validation_7' is outside the 5 images of torchvision's val split"):
        resolve(["validation_7"], None, splits, "s")
    with pytest.raises(ValueError, match=r"\(train_<n>\)"):  # no validation split in the pool
        resolve(["validation_1"], None, {"train": (0, 10)}, "s")
    with pytest.raises(ValueError, match="index 10 is outside torchvision's 10 training images"):
        resolve([10], None, splits, "s")


def test_a_flat_list_must_hold_the_1000_images():
    info = get_task("cifar100")
    with pytest.raises(ValueError, match="one list of the 1000 train800 \\+ val200 items, got list of length 999"):
        task_entry({"cifar100": list(range(999))}, info, "f")
    train, val = task_entry({"cifar100": list(range(1000))}, info, "f")
    assert (len(train), len(val)) == (800, 200) and val[0] == 800


# ---- vpt-prepare ----------------------------------------------------------------------------------------
def test_prepare_without_data_names_the_missing_folder_or_asks_for_download(tmp_path, capsys):
    def error(*args):  # vpt-prepare prints the error as one line and exits 1, no traceback
        with pytest.raises(SystemExit) as exit_info:
            prepare_command(["vtab", *args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("vpt-prepare: error: ") and "Traceback" not in err
        return err

    assert re.search(
        r"DTD folder '.*/dtd/dtd' does not exist or is not a folder; torchvision's layout",
        error("--tasks", "dtd", "--source", str(tmp_path)),
    )
    assert re.search(
        r"--source '.*/nowhere' does not exist; dmlab expects dmlab.tar.gz",
        error("--tasks", "dmlab", "--source", str(tmp_path / "nowhere")),
    )
    assert "pass --download" in error("--tasks", "dtd", "--source", str(tmp_path), "--redraw")
    assert "cannot build 'dmlab' from torchvision" in error("--tasks", "dmlab", "--source", str(tmp_path), "--redraw")


def test_prepare_vtab_takes_given_train_val_indices(tmp_path):
    for c in range(10):
        for i in range(3):
            write_image(tmp_path / "src" / "eurosat" / "2750" / f"Class{c}" / f"{i}.jpg", seed=c * 10 + i, fmt="JPEG")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"eurosat": {"train": [0, 5, 7], "val": [2]}}))
    out = tmp_path / "out"
    prepare_main(
        [
            "vtab",
            "--tasks",
            "eurosat",
            "--source",
            str(tmp_path / "src"),
            "--out",
            str(out),
            "--official-splits",
            str(splits),
        ]
    )
    assert [l.split()[0] for l in (out / "eurosat" / "train800.txt").read_text().splitlines()] == [
        "images/train_0000000.jpg",
        "images/train_0000005.jpg",
        "images/train_0000007.jpg",
    ]  # originals, copied
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
                pixels[name] = write_image(
                    root / "dtd" / "dtd" / "images" / cls / name, seed=s * 100 + c * 10 + i, fmt="PNG"
                )
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
    assert (
        prepare_main(
            [
                "vtab",
                "--tasks",
                "dtd",
                "--source",
                str(tmp_path / "src"),
                "--out",
                str(out),
                "--official-splits",
                str(splits),
            ]
        )
        == 0
    )
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
    splits.write_text(
        json.dumps(
            {
                'clevr(task="count_all")': {
                    "train800": ["CLEVR_train_000000.png", "CLEVR_train_000001.png", "CLEVR_train_000003.png"],
                    "val200": ["CLEVR_train_000002.png"],
                }
            }
        )
    )
    out = tmp_path / "out"
    prepare_main(
        [
            "vtab",
            "--tasks",
            "clevr_count",
            "--source",
            str(tmp_path / "src"),
            "--out",
            str(out),
            "--official-splits",
            str(splits),
        ]
    )
    labels = lambda split: [int(l.split()[1]) for l in (out / "clevr_count" / split).read_text().splitlines()]
    assert labels("train800.txt") == [0, 7, 1] and labels("val200.txt") == [2] and labels("test.txt") == [3, 0]


def _eurosat_with_clashing_names(root: Path) -> None:
    for c in range(3):
        for i in range(4):
            write_image(root / "eurosat" / "2750" / f"Class{c}" / f"{i}.jpg", seed=c * 10 + i, fmt="JPEG")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"train": ["0.jpg"], "val": ["Class1/1.jpg"]}, r"1 name\(s\) match several images, e.g. '0.jpg' \(3 files"),
        ({"train": ["Class0/0.jpg", "nope.jpg"], "val": ["Class1/1.jpg"]}, r"match no image .* e.g. 'nope.jpg'"),
        ({"train": ["Class0/0.jpg", 4], "val": ["Class1/0.jpg"]}, r"in both train and val"),
        ({"train": [99], "val": [1]}, r"index 99 is outside torchvision's 12 training images"),
        ({"training": [1], "val": [2]}, r"has keys \['training', 'val'\]; expected one of \['train', 'train800'\]"),
        (["Class0/0.jpg"], r"must be .* or one list of the 1000 train800 \+ val200 items, got list of length 1"),
    ],
)
def test_prepare_split_file_errors_name_the_entry(tmp_path, entry, message):
    _eurosat_with_clashing_names(tmp_path / "src")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"eurosat": entry}))
    with pytest.raises(ValueError, match=message):
        prepare_main(
            [
                "vtab",
                "--tasks",
                "eurosat",
                "--source",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "o"),
                "--official-splits",
                str(splits),
            ]
        )


def test_prepare_split_file_without_the_task_lists_its_names_and_the_file(tmp_path):
    _eurosat_with_clashing_names(tmp_path / "src")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"vtab-dtd": {"train": [0], "val": [1]}}))
    with pytest.raises(
        ValueError,
        match=r"no entry for 'eurosat' \(its names: \['eurosat', 'vtab_eurosat', 'vtab-eurosat'\]\); "
        r"the file covers \['vtab-dtd'\]",
    ):
        prepare_main(
            [
                "vtab",
                "--tasks",
                "eurosat",
                "--source",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "o"),
                "--official-splits",
                str(splits),
            ]
        )
    splits.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        prepare_main(
            [
                "vtab",
                "--tasks",
                "eurosat",
                "--source",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "o"),
                "--official-splits",
                str(splits),
            ]
        )


def test_prepare_names_the_missing_module_of_a_dataset():
    from vpt_lightning.data.vtab_prep.prepare import _require_modules
    from vpt_lightning.data.vtab_prep.sources import TORCHVISION_SOURCES

    assert TORCHVISION_SOURCES["svhn"].requires == ("scipy",) and TORCHVISION_SOURCES["patch_camelyon"].requires == (
        "h5py",
    )
    with pytest.raises(
        ModuleNotFoundError,
        match=r"torchvision needs \['no_such_module_vpt'\] to read 'svhn': pip install "
        r"\"vpt-lightning\[prepare\]\"",
    ):
        _require_modules("svhn", ["no_such_module_vpt"])
