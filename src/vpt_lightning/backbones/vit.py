"""The ViT family: ``PromptedViT``, a timm VisionTransformer with VPT prompts, built from the model's own pieces."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..prompt import PromptConfig, Prompts
from .base import PromptedBackbone, refuse_resampling
from .registry import register_family

# timm VisionTransformer global_pool values that pool the tokens to one vector per image ('' does not)
POOLS = ("token", "avg", "avgmax", "max", "map", "prr")
NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")  # the array-name prefixes timm's .npz loader knows
NPZ_QUERY = re.compile(r"encoderblock(_0)?/MultiHeadDotProductAttention_\d/query/kernel$")  # block 0's query


@register_family(VisionTransformer)
class PromptedViT(PromptedBackbone):
    """Wrap a timm ``VisionTransformer`` and insert learnable prompts into its token sequence.

    Nothing of the ViT is copied: the forward pass calls the model's own ``patch_embed``, ``_pos_embed``
    (class/register tokens and position embedding), ``patch_drop``, ``norm_pre``, ``blocks``, ``norm`` and
    ``forward_head``. Prompts are inserted after the position embedding (they carry none), right after the
    prefix tokens (class and register tokens): ``[prefix, prompts, patches]``. Their outputs are removed again
    before the final norm, so timm's own pooling (``token``, ``avg``, ``map``...) sees exactly the prefix and
    patch tokens: the class token reads the prompts through attention, an average excludes them. A backbone with a
    class token but ``global_pool='avg'`` (e.g. MAE) thus averages the image tokens only (prompts and prefix tokens
    excluded), as timm does; ``global_pool=''`` (one output per token) is refused.

    Args:
        vit: the timm model. Its own head (if ``num_classes > 0``) is applied by ``forward``; build it with
            ``num_classes=0`` to get pooled features instead.
        prompt: a :class:`PromptConfig` (or a mapping of its fields); ``None`` or ``num_tokens=0``: no prompts.
        freeze_backbone: set ``requires_grad=False`` on every parameter of ``vit``.
        backbone_eval: keep ``vit`` in eval mode even when this module trains (its dropout and drop-path off,
            as the official VPT code); prompt dropout still follows ``self.training``.
    """

    def __init__(
        self,
        vit: nn.Module,
        prompt: Union[PromptConfig, Mapping[str, Any], None] = None,
        freeze_backbone: bool = True,
        backbone_eval: bool = True,
    ) -> None:
        if not isinstance(vit, VisionTransformer):
            raise TypeError(
                f"PromptedViT needs a timm VisionTransformer (vit_*, deit_*, ... models of "
                f"timm.models.vision_transformer), got {type(vit).__name__}"
            )
        if vit.global_pool not in POOLS:
            raise ValueError(
                f"backbone.kwargs.global_pool={vit.global_pool!r} gives one output per token, not per image; use one "
                f"of {list(POOLS)} ('token': the class token, 'avg': the mean of the image tokens)"
            )
        super().__init__(vit, prompt, freeze_backbone=freeze_backbone, backbone_eval=backbone_eval)
        prompt = self.prompt_config
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.num_patches: int = vit.patch_embed.num_patches
        self.embed_dim: int = vit.embed_dim
        blocks = prompt.block_indices(len(vit.blocks))
        # block index -> which prompt set it receives
        self.prompt_sets: Dict[int, int] = {block: i for i, block in enumerate(blocks)}
        if prompt.location == "add" and prompt.enabled and prompt.num_tokens not in (1, self.num_patches):
            raise ValueError(
                f"prompt.num_tokens={prompt.num_tokens} with prompt.location='add': added prompts need 1 token "
                f"(broadcast to every patch) or one per patch ({self.num_patches} for this backbone)"
            )
        self.prompts: Optional[Prompts] = (
            Prompts(prompt, len(blocks), self.embed_dim, vit.patch_embed.patch_size) if prompt.enabled else None
        )

    @property
    def vit(self) -> VisionTransformer:
        """The wrapped timm ``VisionTransformer`` (``self.model``)."""
        return self.model

    @property
    def num_prompt_tokens(self) -> int:
        """Number of prompt tokens the sequence carries after the first prompted block (0 for ``add``)."""
        cfg = self.prompt_config
        return cfg.num_tokens if cfg.enabled and cfg.location == "prepend" else 0

    def _first_block_needing_grad(self) -> int:
        """Index of the first block from which autograd must record (all before it are frozen and prompt-free)."""
        embedding = [self.vit.patch_embed, self.vit.norm_pre]
        params = [self.vit.pos_embed, self.vit.cls_token, self.vit.reg_token]
        if any(p.requires_grad for m in embedding for p in m.parameters()) or any(
            p is not None and p.requires_grad for p in params
        ):
            return 0
        first = min(self.prompt_sets, default=len(self.vit.blocks))
        for i, block in enumerate(self.vit.blocks[:first]):
            if any(p.requires_grad for p in block.parameters()):
                return i
        return first

    def _insert_prompts(self, x: torch.Tensor, block: int, inserted: bool) -> torch.Tensor:
        prompts = self.prompts(self.prompt_sets[block], x.shape[0]).to(x.dtype)
        start = self.num_prefix_tokens
        if self.prompt_config.location == "add":
            if x.shape[1] - start != self.num_patches and prompts.shape[1] != 1:
                raise RuntimeError("prompt.location='add' needs every patch token (disable patch dropout)")
            return torch.cat([x[:, :start], x[:, start:] + prompts], dim=1)
        # prepend: insert after the prefix tokens, or replace the previous block's prompt outputs (VPT-Deep)
        end = start + prompts.shape[1] if inserted else start
        return torch.cat([x[:, :start], prompts, x[:, end:]], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the token sequence entering block 0 (patch + position embedding, prefix tokens)."""
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final normed tokens ``[prefix, patches]`` (prompt outputs removed), like timm's."""
        first_grad = self._first_block_needing_grad() if torch.is_grad_enabled() else 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and first_grad == 0):
            x = self.embed(x)
        inserted = False
        for i, block in enumerate(self.vit.blocks):
            record = torch.is_grad_enabled() and i >= first_grad
            with torch.set_grad_enabled(record):
                if i in self.prompt_sets:
                    x = self._insert_prompts(x, i, inserted)
                    inserted = True
                if record and self.grad_checkpointing:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        if inserted and self.num_prompt_tokens:
            start = self.num_prefix_tokens
            x = torch.cat([x[:, :start], x[:, start + self.num_prompt_tokens :]], dim=1)
        return self.vit.norm(x)

    # ---- weight files and identity ----------------------------------------------------------------------
    resampled_keys = ("patch_embed.proj.weight", "pos_embed")

    @classmethod
    def load_special_file(cls, model: nn.Module, path: Path, resize: bool) -> bool:
        """The original Google (big_vision / jax) ``.npz`` checkpoints, through timm's own loader after a check."""
        if path.suffix != ".npz":
            return False
        check_npz(path, model, resize)
        try:
            model.load_pretrained(str(path))
        except KeyError as err:
            raise ValueError(f"backbone.checkpoint_path={str(path)!r} lacks array {err} for this model") from err
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"backbone.checkpoint_path={str(path)!r} could not be loaded into {type(model).__name__} by timm's "
                f".npz loader ({err}); check backbone.name and backbone.kwargs against the checkpoint"
            ) from err
        return True

    @classmethod
    def architecture(cls, model: nn.Module) -> Dict[str, Any]:
        block = model.blocks[0] if len(model.blocks) else None
        return {
            "class": type(model).__name__,
            "img_size": list(model.patch_embed.img_size or []),
            "num_heads": getattr(getattr(block, "attn", None), "num_heads", None),
            "act": type(getattr(getattr(block, "mlp", None), "act", None)).__name__,
            "num_prefix_tokens": model.num_prefix_tokens,
            "no_embed_class": model.no_embed_class,
            "global_pool": model.global_pool,
        }


def check_npz(path: Path, model: VisionTransformer, resize: bool) -> None:
    """Compare an original Google ViT ``.npz`` with the model before timm's loader (which ignores extra blocks
    and resamples embeddings silently): blocks, width, heads, class token, patch size and position grid."""
    try:
        with np.load(path) as arrays:
            names = set(arrays.files)
            prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in names), "")
            pos_keys = [f"{prefix}Transformer/posembed_input/pos_embedding", f"{prefix}pos_embedding"]
            pos_key = next((k for k in pos_keys if k in names), None)
            query = sorted(k for k in names if NPZ_QUERY.search(k))
            stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"  # big_vision: blocks stacked on axis 0
            wanted = (f"{prefix}embedding/kernel", pos_key, stacked, *query[:1])
            shapes = {k: arrays[k].shape for k in wanted if k in names}
    except Exception as err:  # not a zip of arrays, pickled data...: say which file
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} could not be read as an .npz file: {err}") from err
    kernel = shapes.get(f"{prefix}embedding/kernel")
    if kernel is None:
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} lacks the array 'embedding/kernel' of a ViT .npz")
    pos = shapes.get(pos_key)
    heads = shapes[query[0]][-2] if query else None
    if stacked in shapes:
        depth = shapes[stacked][0]
    else:
        block = re.compile(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/")
        depth = len({m.group(1) for m in map(block.match, names) if m})
    problems = []
    if depth != len(model.blocks):
        problems.append(f"{depth} Transformer/encoderblock_* blocks vs model depth {len(model.blocks)}")
    if kernel[-1] != model.embed_dim:
        problems.append(f"embedding/kernel {tuple(kernel)} (width {kernel[-1]}) vs model embed_dim {model.embed_dim}")
    num_heads = getattr(model.blocks[0].attn, "num_heads", None) if len(model.blocks) else None
    if heads is not None and num_heads is not None and heads != num_heads:
        problems.append(f"{query[0]} {heads} heads vs model num_heads {num_heads}")
    if (f"{prefix}cls" in names) != (model.cls_token is not None):
        has = "has" if f"{prefix}cls" in names else "lacks"
        problems.append(f"file {has} a class token ('cls') vs model class_token={model.cls_token is not None}")
    if pos is None and model.pos_embed is not None:
        problems.append("file lacks the position embedding 'Transformer/posembed_input/pos_embedding'")
    if problems:
        raise ValueError(
            f"backbone.checkpoint_path={str(path)!r} does not fit model {type(model).__name__}: "
            + "; ".join(problems) + "; check backbone.name and backbone.kwargs against the checkpoint"
        )
    resized = []
    patch = tuple(model.patch_embed.proj.weight.shape[-2:])
    if tuple(kernel[:2]) != patch:
        resized.append(f"embedding/kernel: file {tuple(kernel)} (patch {tuple(kernel[:2])}) vs model patch {patch}")
    if pos is not None and model.pos_embed is not None and tuple(pos) != tuple(model.pos_embed.shape):
        resized.append(f"{pos_key}: file {tuple(pos)} vs model {tuple(model.pos_embed.shape)}")
    refuse_resampling(path, resized, resize)
