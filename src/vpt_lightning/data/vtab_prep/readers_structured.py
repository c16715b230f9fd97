"""Readers of the structured VTAB-1k tasks' source files (see :mod:`.readers_natural` for the contract).

The label rules are VTAB's (``task_adaptation/data/{clevr,kitti,dsprites,smallnorb}.py``), computed in float32
where TFDS stores float32 features.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence

import numpy as np
from PIL import Image

from ..datasets import DataError, require_dir
from .source_split import SourceSplit, array_names, require_file
from .tfrecord import parse_example, records

Splits = Dict[str, SourceSplit]

CLEVR_DISTANCE_BINS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], dtype=np.float32)
KITTI_DISTANCE_BINS = np.array([-100.0, 8.0, 20.0, 999.0], dtype=np.float32)
KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")  # TFDS's order
KITTI_VEHICLES = KITTI_TYPES[:3]  # VTAB: type < 3


def bin_label(value: float, bins: np.ndarray) -> int:
    """VTAB's ``reduce_max(where(bins - value < 0))``: the last bin edge below ``value`` (float32)."""
    below = np.nonzero(bins - np.float32(value) < 0)[0]
    if not len(below):
        raise ValueError(f"{value} is not above the first bin edge {bins[0]}")
    return int(below[-1])


def clevr_count(objects: Sequence[dict]) -> int:
    """CLEVR ``count_all``: the number of objects - 3 (3..10 objects -> 0..7)."""
    return len(objects) - 3


def clevr_distance(objects: Sequence[dict]) -> int:
    """CLEVR ``closest_object_distance``: the smallest depth (``pixel_coords[2]``) binned at 8, 8.5, 9, 9.5, 10."""
    return bin_label(min(np.float32(o["pixel_coords"][2]) for o in objects), CLEVR_DISTANCE_BINS)


def read_clevr(source: Path, label: Callable[[Sequence[dict]], int]) -> Splits:
    """CLEVR v1.0 (TFDS ``clevr`` 3.1.0): key = the image's file name; VTAB uses ``train`` and ``validation``.

    As TFDS does, the sorted image files of a split are paired with the scenes in the order of
    ``CLEVR_<split>_scenes.json`` (a scene naming another image is an error). Layout: torchvision's
    ``<source>/clevr/CLEVR_v1.0/{images/<train|val>/, scenes/}``.
    """
    root = require_dir(
        source / "clevr" / "CLEVR_v1.0", "CLEVR folder", "torchvision's CLEVR layout; --download fetches it"
    )
    splits = {}
    for split, short in (("train", "train"), ("validation", "val")):
        images = sorted(p for p in require_dir(root / "images" / short, "CLEVR image folder").iterdir() if p.is_file())
        path = require_file(root / "scenes" / f"CLEVR_{short}_scenes.json", "CLEVR scene file", "part of CLEVR_v1.0")
        scenes = json.loads(path.read_text())["scenes"]
        if len(scenes) != len(images):
            raise DataError(f"{path}: {len(scenes)} scenes for {len(images)} images in {root / 'images' / short}")
        labels = []
        for image, scene in zip(images, scenes):
            if scene.get("image_filename", image.name) != image.name:
                raise DataError(
                    f"{path}: scene of {scene['image_filename']!r} where the sorted images have {image.name!r}"
                )
            labels.append(label(scene["objects"]))
        splits[split] = SourceSplit([p.name for p in images], labels, [p.name for p in images], files=images)
    return splits


def kitti_splits(train_rand: str, train_mapping: Sequence[str]) -> Dict[str, List[int]]:
    """TFDS ``kitti``'s split of the training images by drive: 10% of the drives test, 10% validation (seed 123).

    ``train_rand`` is the devkit's ``mapping/train_rand.txt`` (image i -> 1-based line of ``train_mapping.txt``,
    whose second column names the drive). Legacy NumPy seeding, as TFDS does, so the draw is the same everywhere.
    """
    lines = [int(x) - 1 for x in train_rand.replace("\n", "").split(",") if x.strip()]
    drives: Dict[str, List[int]] = {}
    for image_id, line in enumerate(lines):
        drives.setdefault(train_mapping[line].split(" ")[1], []).append(image_id)
    rng = np.random.RandomState(123)
    count = max(1, 10 * len(drives) // 100)
    test = set(rng.choice(sorted(drives), count, replace=False))
    validation = set(rng.choice(sorted(set(drives) - test), count, replace=False))
    out: Dict[str, List[int]] = {"train": [], "validation": [], "test": []}
    for drive, ids in drives.items():
        out["test" if drive in test else "validation" if drive in validation else "train"].extend(ids)
    return out


def kitti_closest_vehicle(label_file: Path) -> int:
    """KITTI ``closest_vehicle_distance``: the smallest depth ``z`` of a Car/Van/Truck (1000 with none), binned
    at 8 and 20 m (4 classes: < 8, < 20, beyond, none)."""
    depths = [np.float32(1000.0)]
    for number, line in enumerate(label_file.read_text().splitlines(), start=1):
        parts = line.split(" ")
        if len(parts) != 15:
            raise DataError(f"{label_file}:{number}: expected the 15 fields of a KITTI object label, got {line!r}")
        if parts[0] in KITTI_VEHICLES:
            depths.append(np.float32(float(parts[13])))
    return bin_label(min(depths), KITTI_DISTANCE_BINS)


def read_kitti(source: Path) -> Splits:
    """KITTI object (TFDS ``kitti`` 3.2.0, VTAB 3.1.0: same images, labels and split): key = ``"NNNNNN.png"``.

    Layout: the three zips TFDS reads unpacked into ``<source>/kitti``: ``training/image_2/*.png``,
    ``training/label_2/*.txt`` (data_object_image_2.zip, data_object_label_2.zip) and ``mapping/`` (devkit_object.zip).
    """
    root = require_dir(
        source / "kitti",
        "KITTI folder",
        "unzip data_object_image_2.zip, data_object_label_2.zip and devkit_object.zip into <source>/kitti",
    )
    hint = "from KITTI's devkit_object.zip"
    ids = kitti_splits(
        require_file(root / "mapping" / "train_rand.txt", "KITTI mapping", hint).read_text(),
        require_file(root / "mapping" / "train_mapping.txt", "KITTI mapping", hint).read_text().splitlines(),
    )
    splits = {}
    for split, image_ids in ids.items():
        images = [root / "training" / "image_2" / f"{i:06d}.png" for i in sorted(image_ids)]
        labels = [
            kitti_closest_vehicle(
                require_file(
                    root / "training" / "label_2" / f"{i:06d}.txt", "KITTI label file", "from data_object_label_2.zip"
                )
            )
            for i in sorted(image_ids)
        ]
        for path in images:
            require_file(path, "KITTI image", "from data_object_image_2.zip")
        splits[split] = SourceSplit([p.name for p in images], labels, [p.name for p in images], files=images)
    return splits


DSPRITES_FILE = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"


def _npz_rows(path: Path, member: str, wanted: Iterable[int]) -> Dict[int, np.ndarray]:
    """Rows ``wanted`` of array ``member`` of an ``.npz``, read in one pass without loading the whole array."""
    wanted = sorted(set(wanted))
    with zipfile.ZipFile(path) as archive, archive.open(f"{member}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):
            raise DataError(f"{path}: {member}.npy has .npy format version {version}; expected 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
        if fortran:
            raise DataError(f"{path}: {member} is stored in Fortran order")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        rows, position = {}, 0
        for index in wanted:
            if index >= shape[0]:
                raise DataError(f"{path}: {member} has {shape[0]} rows, asked for row {index}")
            handle.read((index - position) * row_bytes) if index > position else None
            rows[index] = np.frombuffer(handle.read(row_bytes), dtype=dtype).reshape(shape[1:])
            position = index + 1
    return rows


def read_dsprites(source: Path, attribute: str) -> Splits:
    """dSprites (TFDS ``dsprites`` 2.0.0): one ``train`` split; key = the image's index.

    TFDS reads the HDF5 release; the ``.npz`` release holds the same arrays in the same order (assumed, as both are
    DeepMind's export of one array).

    ``attribute`` is ``x_position`` (32 values -> 16 classes, value // 2) or ``orientation`` (40 -> 16, value //
    2.5). Reads the released ``<source>/dsprites/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`` (the arrays of
    the HDF5 file TFDS reads); images (0/1) are written as 0/255 greyscale PNG, as VTAB scales them.
    """
    column, factor = {"x_position": (4, 2.0), "orientation": (3, 2.5)}[attribute]
    path = require_file(
        source / "dsprites" / DSPRITES_FILE,
        "dSprites file",
        "the .npz released at github.com/deepmind/dsprites-dataset",
    )
    with np.load(path) as data:
        if "latents_classes" not in data.files or "imgs" not in data.files:
            raise DataError(f"{path}: expected the arrays 'imgs' and 'latents_classes', found {data.files}")
        classes = data["latents_classes"][:, column]
    labels = [int(np.floor(np.float32(v) / np.float32(factor))) for v in classes]
    cache: Dict[int, np.ndarray] = {}

    def prefetch(indices: Sequence[int]) -> None:
        cache.update(_npz_rows(path, "imgs", indices))

    def decode(i: int) -> Image.Image:
        pixels = cache.pop(i) if i in cache else _npz_rows(path, "imgs", [i])[i]
        return Image.fromarray(pixels.astype(np.uint8) * 255, mode="L")

    return {
        "train": SourceSplit(
            list(range(len(labels))), labels, array_names("train", len(labels)), decode=decode, prefetch=prefetch
        )
    }


def read_norb_matrix(path: Path) -> np.ndarray:
    """An array in smallNORB's binary matrix format (little-endian magic, rank, dims), memory-mapped."""
    header = np.fromfile(path, dtype="<i4", count=5)
    kinds = {0x1E3D4C55: np.uint8, 0x1E3D4C54: np.dtype("<i4")}
    if len(header) < 2 or int(header[0]) not in kinds:
        raise DataError(
            f"{path}: not a smallNORB matrix (magic {int(header[0]) if len(header) else None!r}; expected "
            f"{sorted(kinds)})"
        )
    rank = int(header[1])
    dims = [int(d) for d in np.fromfile(path, dtype="<i4", count=rank, offset=8)]
    return np.memmap(path, dtype=kinds[int(header[0])], mode="r", offset=8 + 4 * max(3, rank), shape=tuple(dims))


SMALLNORB_FILES = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing",
}


def read_smallnorb(source: Path, attribute: str) -> Splits:
    """smallNORB (TFDS ``smallnorb`` 2.0.0): key = the index in the split's files; the left image of each pair.

    ``attribute``: ``azimuth`` (info column 2, 0..34 even -> /2: 18 classes) or ``elevation`` (column 1, 9).
    Layout: the NYU files, un-gzipped, in ``<source>/smallnorb/<name>-{dat,info}.mat``.
    """
    column, divisor = {"azimuth": (2, 2), "elevation": (1, 1)}[attribute]
    splits = {}
    for split, stem in SMALLNORB_FILES.items():
        hint = "un-gzipped from cs.nyu.edu/~ylclab/data/norb-v1.0-small"
        images = read_norb_matrix(require_file(source / "smallnorb" / f"{stem}-dat.mat", "smallNORB file", hint))
        info = read_norb_matrix(require_file(source / "smallnorb" / f"{stem}-info.mat", "smallNORB file", hint))
        if images.ndim != 4 or info.ndim != 2 or len(images) != len(info):
            raise DataError(
                f"{source / 'smallnorb'}: {stem} has images {images.shape} and info {info.shape}; expected "
                "(N, 2, 96, 96) and (N, 4)"
            )
        labels = [int(v) // divisor for v in info[:, column]]
        splits[split] = SourceSplit(
            list(range(len(labels))),
            labels,
            array_names(split, len(labels)),
            decode=lambda i, images=images: Image.fromarray(np.asarray(images[i, 0]), mode="L"),
        )
    return splits


def read_dmlab(source: Path) -> Splits:
    """DMLab (TFDS ``dmlab`` 2.0.1): key = the record's ``filename`` (bytes), label = its ``label``.

    Reads ``<source>/dmlab/dmlab-<train|validation|test>.tfrecord*``, the files of the archive TFDS downloads
    (storage.googleapis.com/dmlab-vtab/dmlab.tar.gz), without TensorFlow; images are copied as encoded there.
    """
    root = require_dir(source / "dmlab", "DMLab folder", "unpack dmlab.tar.gz (the archive TFDS downloads) there")
    splits = {}
    for split in ("train", "validation", "test"):
        files = sorted(root.glob(f"dmlab-{split}.tfrecord*"))
        if not files:
            raise DataError(f"{root}: no dmlab-{split}.tfrecord* files")
        keys, labels, where = [], [], []
        for path in files:
            for offset, data in records(path):
                example = parse_example(data)
                if not {"filename", "label", "image"} <= set(example):
                    raise DataError(f"{path}: a record at byte {offset} lacks filename/label/image ({sorted(example)})")
                keys.append(example["filename"][0])
                labels.append(int(example["label"][0]))
                where.append((path, offset, len(data)))

        def decode(i: int, where=where) -> bytes:
            path, offset, length = where[i]
            with open(path, "rb") as handle:
                handle.seek(offset)
                return parse_example(handle.read(length))["image"][0]

        names = [Path(k.decode("utf-8", "replace")).name for k in keys]
        if len(set(names)) != len(names):
            names = array_names(split, len(keys))
        names = [n if Path(n).suffix.lower() in (".png", ".jpg", ".jpeg") else n + ".png" for n in names]
        splits[split] = SourceSplit(keys, labels, names, decode=decode)
    return splits
