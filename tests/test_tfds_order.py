"""TFDS's order without TensorFlow: the md5 sort key, VTAB's slices, and TFDS's own Hasher where it is installed."""

from __future__ import annotations

import hashlib

import pytest

from vpt_lightning.data.vtab_prep.sources import EXACT_SOURCES
from vpt_lightning.data.vtab_prep.tfds_order import Slice, tfds_order, tfds_sort_key


def test_sort_key_is_the_md5_of_the_split_name_then_the_key():
    assert tfds_sort_key("train", 16399) == int(hashlib.md5(b"train16399").hexdigest(), 16)
    assert tfds_sort_key("validation", "valid_7") == int(hashlib.md5(b"validationvalid_7").hexdigest(), 16)
    assert tfds_sort_key("test", b"\xff\x00") == int(hashlib.md5(b"test\xff\x00").hexdigest(), 16)
    assert tfds_sort_key("train", "a\\b.jpg") == tfds_sort_key("train", "a/b.jpg")  # TFDS hashes "/" for "\\"
    assert tfds_sort_key("train", "é") == int(hashlib.md5("trainé".encode("utf-8")).hexdigest(), 16)
    with pytest.raises(TypeError, match="int, str or bytes, got 1.5"):
        tfds_sort_key("train", 1.5)


def test_cifar100_slices_are_the_examples_tfds_wrote():
    """Issue 13's vectors (TFDS's own Hasher on CIFAR-100's train indices): train[:800] and
    val200 = train[45000:45200]."""
    order = tfds_order("train", list(range(50000)))
    spec = EXACT_SOURCES["cifar100"]
    start, stop = spec.train800.bounds(50000)
    assert (start, stop) == (0, 800) and order[:5] == [16399, 1680, 47917, 17307, 27051]
    start, stop = spec.val200.bounds(50000)
    assert (start, stop) == (45000, 45200) and order[start : start + 5] == [13431, 9237, 17462, 32685, 9518]


@pytest.mark.parametrize(
    "task, sizes, expected",
    [
        # from task_adaptation/data/*.py and the TFDS split sizes
        ("pets", {"train": 3680}, {"val200": (2944, 3144)}),
        ("svhn", {"train": 73257}, {"val200": (65931, 66131)}),
        ("eurosat", {"train": 27000}, {"val200": (16200, 16400), "test": (21600, 27000)}),
        ("resisc45", {"train": 31500}, {"val200": (18900, 19100), "test": (25200, 31500)}),
        ("clevr_distance", {"train": 70000, "validation": 15000}, {"val200": (63000, 63200), "test": (0, 15000)}),
        ("dsprites_location", {"train": 737280}, {"val200": (589824, 590024), "test": (663552, 737280)}),
        ("smallnorb_elevation", {"train": 24300, "test": 24300}, {"val200": (0, 200), "test": (12150, 24300)}),
        ("dtd", {"validation": 1880, "test": 1880}, {"val200": (0, 200), "test": (0, 1880)}),
    ],
)
def test_vtab_slices_give_the_published_offsets(task, sizes, expected):
    spec = EXACT_SOURCES[task]
    for name, bounds in expected.items():
        piece = getattr(spec, name)
        assert piece.bounds(sizes[piece.split]) == bounds, (task, name, str(piece))
    assert spec.train800.bounds(sizes.get("train", 1000)) == (0, 800)


def test_a_slice_beyond_its_split_names_the_sizes():
    with pytest.raises(ValueError, match=r"'validation' split has 150 examples, too few for \[0:200\]"):
        Slice("validation", length=200).bounds(150)
    assert (
        str(Slice("train", start_pct=(60, 20))) == "train[60%+20%:]"
        and str(Slice("train", length=800)) == "train[:800]"
    )


def test_duplicate_keys_are_an_error_naming_them():
    with pytest.raises(ValueError, match="split 'train': the key 'a.jpg' appears twice"):
        tfds_order("train", ["a.jpg", "b.jpg", "a.jpg"])


# every key format a reader yields (see the readers' docstrings), in the split names VTAB reads
KEY_FORMATS = [
    ("train", list(range(300))),  # CIFAR-100, SVHN, dSprites, sNORB
    ("validation", [f"valid_{i}" for i in range(300)]),  # Patch Camelyon
    ("train", [f"banded/banded_{i:04d}.jpg" for i in range(300)]),  # DTD
    ("validation", [f"image_{i:05d}.jpg" for i in range(1, 300)]),  # Flowers102
    ("train", [f"Abyssinian_{i}.jpg" for i in range(300)]),  # Pets
    ("train", [f"AnnualCrop_AnnualCrop_{i}.jpg" for i in range(300)]),  # EuroSAT
    ("train", [f"airplane_airplane_{i:03d}.jpg" for i in range(300)]),  # RESISC45
    ("train", [f"CLEVR_train_{i:06d}.png" for i in range(300)]),  # CLEVR
    ("validation", [f"{i:06d}.png" for i in range(300)]),  # KITTI
    ("test", [f"/a/abbey/sun_{i:016x}.jpg" for i in range(300)]),  # SUN397
    ("validation", [f"{i}_left" for i in range(300)]),  # Diabetic Retinopathy
    ("train", [f"dmlab/episode_{i}.png".encode() for i in range(300)]),  # DMLab (bytes)
]


@pytest.mark.parametrize("split, keys", KEY_FORMATS, ids=[f"{s}-{k[0]!r}" for s, k in KEY_FORMATS])
def test_our_order_is_tfds_hasher_order(split, keys):
    hashing = pytest.importorskip("tensorflow_datasets.core.hashing")
    hasher = hashing.Hasher(salt=split)
    assert [tfds_sort_key(split, k) for k in keys] == [hasher.hash_key(k) for k in keys]
    assert tfds_order(split, keys) == sorted(range(len(keys)), key=lambda i: hasher.hash_key(keys[i]))
