"""``PromptedViT``: a timm VisionTransformer with VPT prompts, built from the model's own pieces."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .prompt import PromptConfig, Prompts

# timm VisionTransformer global_pool values that pool the tokens to one vector per image ('' does not)
POOLS = ("token", "avg", "avgmax", "max", "map", "prr")


class PromptedViT(nn.Module):
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
        super().__init__()
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
        if not isinstance(prompt, PromptConfig):
            prompt = PromptConfig.from_mapping(prompt) if prompt is not None else PromptConfig(num_tokens=0)
        self.vit = vit
        self.prompt_config = prompt
        self.backbone_eval = backbone_eval
        self.grad_checkpointing = False
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.num_patches: int = vit.patch_embed.num_patches
        self.embed_dim: int = vit.embed_dim
        self.num_features: int = vit.num_features
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
        if freeze_backbone:
            self.vit.requires_grad_(False)
        if backbone_eval:
            self.vit.eval()

    # ----------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        if self.backbone_eval:
            self.vit.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory on ViT-L/H)."""
        self.grad_checkpointing = enable

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

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's own pooling, ``fc_norm`` and head on the output of :meth:`forward_features`."""
        return self.vit.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
