"""Dense features from a prompted ViT: the outputs of chosen blocks as spatial maps, prompt and prefix tokens removed.

The blocks' outputs are read with forward hooks on ``backbone.model.blocks[i]`` while the prompted backbone runs its
own forward pass, so prompts are inserted exactly as for classification. A tapped output is the token sequence
``[prefix (class/register), prompts, patches]``; the prefix and prompt tokens are dropped and the patch tokens are
reshaped to ``(B, C, H / patch, W / patch)``. As in SETR, the tapped outputs are the blocks' raw outputs (the
backbone's final norm is not applied; each head normalises its input itself).
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from ..backbones import PromptedViT


def check_taps(backbone: PromptedViT, taps: Sequence[int]) -> List[int]:
    """The tapped block indices as a list, refusing a non-ViT backbone, an empty list and indices out of range."""
    if not isinstance(backbone, PromptedViT):
        raise TypeError(
            f"dense features need a PromptedViT backbone (a timm VisionTransformer), got {type(backbone).__name__}"
        )
    depth = len(backbone.model.blocks)
    taps = [int(t) for t in taps]
    if not taps or any(not 0 <= t < depth for t in taps):
        raise ValueError(f"segmentation.taps={taps} must be a non-empty list of block indices in [0, {depth - 1}]")
    return taps


def prompt_tokens_after(backbone: PromptedViT, block: int) -> int:
    """Prompt tokens in the output of ``block``: ``num_prompt_tokens`` once the first prompted block has run, else 0."""
    first = min(backbone.prompt_sets, default=None)
    return backbone.num_prompt_tokens if first is not None and first <= block else 0


def dense_features(backbone: PromptedViT, images: torch.Tensor, taps: Sequence[int]) -> List[torch.Tensor]:
    """Run the prompted backbone on ``images`` and return the outputs of blocks ``taps`` as ``(B, C, h, w)`` maps.

    ``h, w`` = image size // patch size. Patch dropout must be off (every patch token is needed).
    """
    taps = check_taps(backbone, taps)
    vit = backbone.model
    patch_h, patch_w = vit.patch_embed.patch_size
    height, width = images.shape[-2] // patch_h, images.shape[-1] // patch_w
    outputs = {}
    handles = [
        vit.blocks[i].register_forward_hook(lambda module, args, output, i=i: outputs.__setitem__(i, output))
        for i in sorted(set(taps))
    ]
    try:
        backbone.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for i in taps:
        tokens = outputs[i]
        skip = backbone.num_prefix_tokens + prompt_tokens_after(backbone, i)
        patches = tokens[:, skip:]
        if patches.shape[1] != height * width:
            raise RuntimeError(
                f"block {i} gave {patches.shape[1]} patch tokens after removing {skip} prefix/prompt tokens, but a "
                f"{tuple(images.shape[-2:])} input has {height}x{width} patches (patch dropout must be off)"
            )
        maps.append(patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width))
    return maps
