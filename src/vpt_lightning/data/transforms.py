"""Image transforms of the paper's recipes (paper Appendix A; official ``src/data/``), built from torchvision pieces.

Two recipes:
- ``vtab``: resize straight to the input size (no crop, no augmentation), for train and eval alike.
- ``fgvc``: train Resize(size*256/224) -> RandomCrop(size) -> horizontal flip; eval Resize -> CenterCrop.

Normalisation is ``imagenet`` (the paper's mean/std, default for reproduction) or ``backbone`` (the mean/std
of the backbone's own timm ``pretrained_cfg``), see :func:`resolve_normalization`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("imagenet", "backbone")
RECIPES = ("vtab", "fgvc")
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def resolve_normalization(
    normalization: str, backbone_data_config: Optional[Mapping[str, Any]] = None
) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Return ``(mean, std)`` for ``normalization`` in ``('imagenet', 'backbone')``.

    ``backbone`` needs the backbone's timm data config (``timm.data.resolve_model_data_config(model)``),
    which :class:`~vpt_lightning.VPTModule` exposes as ``module.data_config``.
    """
    if normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalization == "backbone":
        if not backbone_data_config or "mean" not in backbone_data_config:
            raise ValueError(
                "data.normalization='backbone' needs the backbone's data config (mean/std); pass "
                "backbone_data_config=module.data_config to the DataModule, or use normalization='imagenet'"
            )
        return tuple(backbone_data_config["mean"]), tuple(backbone_data_config["std"])
    raise ValueError(f"data.normalization={normalization!r} is not one of {list(NORMALIZATIONS)}")


def build_transform(
    recipe: str,
    train: bool,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> T.Compose:
    """Build the train or eval transform of ``recipe`` (``vtab`` or ``fgvc``) for square ``img_size`` inputs."""
    if recipe not in RECIPES:
        raise ValueError(f"transform recipe {recipe!r} is not one of {list(RECIPES)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {list(INTERPOLATIONS)}")
    mode = INTERPOLATIONS[interpolation]
    if recipe == "vtab":
        geometry = [T.Resize((img_size, img_size), interpolation=mode)]
    else:
        resize = int(round(img_size * 256 / 224))
        if train:
            geometry = [T.Resize(resize, interpolation=mode), T.RandomCrop(img_size), T.RandomHorizontalFlip()]
        else:
            geometry = [T.Resize(resize, interpolation=mode), T.CenterCrop(img_size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])
