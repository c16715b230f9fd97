"""Write an EuroSAT-like image tree in torchvision's layout, to try the VTAB-1k route offline end to end.

    python examples/eurosat_like_tree.py /tmp/tv                       # /tmp/tv/eurosat/2750/<Class>/<Class>_<i>.jpg
    vpt-prepare vtab --tasks eurosat --source /tmp/tv --out /tmp/vtab-1k
    vpt-train +experiment=vtab_eurosat data.root=/tmp/vtab-1k backbone=quickstart_vit trainer.max_epochs=2 \
        data.split=final

1,400 images, so that VTAB's slices of EuroSAT's single split (train[:800], train[60%:+200], test train[80%:])
do not overlap. The images are 64x64 JPEGs, one look per class (a colour and a stripe angle, with noise), so two
epochs learn them; with the real EuroSAT in that folder the same commands run the paper's task.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

# the ten class folders of torchvision's EuroSAT, in the label order VTAB's reader gives them
from vpt_lightning.data.vtab_prep.readers_specialized import EUROSAT_CLASSES as CLASSES


def write_tree(root: Path, per_class: int = 140, size: int = 64, seed: int = 0) -> int:
    """Write ``per_class`` images for each of EuroSAT's 10 classes; returns how many were written."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c, name in enumerate(CLASSES):
        folder = root / "eurosat" / "2750" / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([(c * 37) % 255, (c * 91) % 255, (c * 53) % 255]) / 255
        angle = np.pi * c / len(CLASSES)
        for i in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            stripes = 0.5 + 0.5 * np.sin(12 * (np.cos(angle) * xx + np.sin(angle) * yy) * np.pi + phase)
            image = colour * (0.4 + 0.6 * stripes[..., None]) + rng.normal(0, 0.08, (size, size, 3))
            pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i + 1}.jpg", quality=90)
    return per_class * len(CLASSES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="torchvision's data root to write (the --source of vpt-prepare)")
    parser.add_argument("--per-class", type=int, default=140)
    args = parser.parse_args()
    print(f"wrote {write_tree(args.root, args.per_class)} images under {args.root / 'eurosat' / '2750'}")


if __name__ == "__main__":
    main()
