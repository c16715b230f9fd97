"""``PixelBorder``: a learnable border of pixels padded around the input image (VPT's pixel-space prompt).

The one pixel prompt of the package: the ConvNet families' prompt (paper Sec. 4, Table 5) and the ViT location
``pad`` (the paper's prompt-location ablation) are the same module. Its pixels are stored in [0, 1] image space
(the official init is U(0, 1)) and normalised in the forward pass with the mean/std the images are normalised with,
so that border and image live in the same space. The official code normalises the border with the ImageNet
mean/std (``src/models/resnet.py`` ``_setup_prompt_pad``, which ``src/models/convnext.py`` inherits, and
``src/models/vit_prompt/vit_ablations.py`` for ``LOCATION == "pad"``), the statistics its data pipeline
normalises every image with (``src/data/transforms.py``): a border is built with those, and
:meth:`PixelBorder.set_normalization` switches it to the data's own statistics (``data.normalization=backbone``).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torchvision.transforms.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

#: the statistics a border is normalised with until told the data's: ImageNet's, as the official code and the
#: DataModules' default ``data.normalization=imagenet``
DEFAULT_MEAN = tuple(IMAGENET_DEFAULT_MEAN)
DEFAULT_STD = tuple(IMAGENET_DEFAULT_STD)


class PixelBorder(nn.Module):
    """``pixels`` learnable pixels padded around each side of a ``(channels, height, width)`` image.

    Two tensors in [0, 1] image space, laid out as the official ``prompt_embeddings_tb`` / ``_lr``:
    ``top_bottom`` ``(1, C, 2p, W + 2p)`` (rows ``:p`` above the image, ``p:`` below) and ``left_right``
    ``(1, C, H, 2p)`` (columns ``:p`` left, ``p:`` right): ``2pC(H + W + 2p)`` values (6p(448 + 2p) at 224 px).
    ``forward`` normalises them, ``(pixel - mean) / std`` per channel, and pads a batch of normalised images to
    ``(H + 2p, W + 2p)``: the left/right halves beside the image first, then the top/bottom rows (as the
    official ``incorporate_prompt``); every image gets the same border. ``mean``/``std`` are not part of the state
    dict: they describe the data, not the learned border.

    Args:
        pixels: ``p`` >= 1.
        image_size: ``(channels, height, width)`` of the images the border surrounds.
        mean, std: per-channel normalisation of the images (default: ImageNet's, see the module docstring).
        init: ``uniform`` (U(0, 1), the official init) or ``zeros``.
    """

    def __init__(
        self,
        pixels: int,
        image_size: Sequence[int],
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
        init: str = "uniform",
    ) -> None:
        super().__init__()
        channels, height, width = (int(v) for v in image_size)
        if int(pixels) < 1:
            raise ValueError(f"a pixel border needs at least 1 pixel per side, got {pixels}")
        self.pixels = int(pixels)
        self.image_size = (channels, height, width)
        p = self.pixels
        self.top_bottom = nn.Parameter(torch.zeros(1, channels, 2 * p, width + 2 * p))
        self.left_right = nn.Parameter(torch.zeros(1, channels, height, 2 * p))
        if init == "uniform":
            nn.init.uniform_(self.top_bottom, 0.0, 1.0)
            nn.init.uniform_(self.left_right, 0.0, 1.0)
        elif init != "zeros":
            raise ValueError(f"pixel border init {init!r} is not one of ['uniform', 'zeros']")
        self.mean: List[float] = []
        self.std: List[float] = []
        self.set_normalization(mean, std)

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise the border with ``mean``/``std`` (one value per channel): those of the images it surrounds."""
        channels = self.image_size[0]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"the pixel border's mean {tuple(mean)} / std {tuple(std)} must have one value per image channel "
                f"({channels})"
            )
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"the pixel border's std {tuple(std)} must be positive")
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]

    def normalized(self) -> tuple:
        """``(top_bottom, left_right)`` in the space of the normalised images."""
        return (TF.normalize(self.top_bottom, self.mean, self.std), TF.normalize(self.left_right, self.mean, self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.image_size:
            c, h, w = self.image_size
            raise ValueError(
                f"the pixel border prompt was built for {h}x{w} images with {c} channels (the backbone's input "
                f"size), got {tuple(x.shape[1:])}; give the data that size (data.img_size), or build the backbone "
                "for this size (backbone.kwargs img_size, or pretrained_cfg_overlay.input_size=[C, H, W])"
            )
        p, batch = self.pixels, x.shape[0]
        top_bottom, left_right = (t.to(x.dtype).expand(batch, -1, -1, -1) for t in self.normalized())
        x = torch.cat([left_right[..., :p], x, left_right[..., p:]], dim=-1)
        return torch.cat([top_bottom[:, :, :p], x, top_bottom[:, :, p:]], dim=-2)

    def extra_repr(self) -> str:
        return f"pixels={self.pixels}, image_size={self.image_size}, mean={self.mean}, std={self.std}"


__all__ = ["PixelBorder", "DEFAULT_MEAN", "DEFAULT_STD"]
