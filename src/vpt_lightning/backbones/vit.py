"""The ViT family: ``PromptedViT``, a timm VisionTransformer with VPT prompts, built from the model's own pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..prompt import INPUT_LOCATIONS, POOLS, PromptConfig, Prompts, xavier_bound
from .base import PromptedBackbone
from .loading import check_npz
from .pixel_border import PixelBorder
from .prompts_as_keys import block_with_prompt_keys, takes_prompt_keys
from .registry import register_family

# timm VisionTransformer global_pool values that pool the tokens to one vector per image ('' does not)
GLOBAL_POOLS = ("token", "avg", "avgmax", "max", "map", "prr")


@register_family(VisionTransformer)
class PromptedViT(PromptedBackbone):
    """Wrap a timm ``VisionTransformer`` and put learnable prompts into it (every ``prompt.location``).

    Nothing of the ViT is copied: the forward pass calls the model's own ``patch_embed``, ``_pos_embed``
    (class/register tokens and position embedding), ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``, ``pool``,
    ``fc_norm``, ``head_drop`` and ``head``. Token prompts (``prepend``, ``prepend_pixel``) are inserted after the
    position embedding (they carry none), right after the prefix tokens (class and register tokens):
    ``[prefix, prompts, patches]``; ``add`` / ``add1`` are added to the tokens; ``concat_channel`` and ``pad``
    change the image before the patch embedding (paper Fig. 5; the official ``vit_prompt/vit_ablations.py``).

    Pooling (``prompt.pool``, paper Fig. 8) reads the final tokens: ``None`` leaves the prompt outputs out and calls
    timm's own ``forward_head`` (the class token for ``global_pool='token'``, the mean of the image tokens for
    ``'avg'``), so a prompt-free model equals timm; ``token`` / ``image`` / ``prompt`` / ``all`` pick the class
    token or a mean, then timm's ``fc_norm``. ``prompt.pool_norm='fresh'`` skips the pretrained ``norm`` and
    ``fc_norm`` and standardises the pooled vector instead (the official MAE). ``global_pool=''`` is refused.

    Args:
        vit: the timm model. Its own head (if ``num_classes > 0``) is applied by ``forward``; build it with
            ``num_classes=0`` to get pooled features instead. ``prompt.location='pad'`` resizes it to the padded
            image (timm's ``set_input_size``: position embedding resampled).
        prompt: a :class:`PromptConfig` (or a mapping of its fields); ``None`` or ``num_tokens=0``: no prompts.
        freeze_backbone: set ``requires_grad=False`` on every parameter of ``vit``.
        backbone_eval: keep ``vit`` in eval mode even when this module trains (its dropout and drop-path off,
            as the official VPT code); prompt dropout still follows ``self.training``.
    """

    pools = POOLS
    model_hint = " (vit_*, deit_*, ... models of timm.models.vision_transformer)"

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        super().check_model(model)
        if model.global_pool not in GLOBAL_POOLS:
            raise ValueError(
                f"backbone.kwargs.global_pool={model.global_pool!r} gives one output per token, not per image; use "
                f"one of {list(GLOBAL_POOLS)} ('token': the class token, 'avg': the mean of the image tokens)"
            )

    def __init__(
        self,
        vit: nn.Module,
        prompt: Union[PromptConfig, Mapping[str, Any], None] = None,
        freeze_backbone: bool = True,
        backbone_eval: bool = True,
    ) -> None:
        super().__init__(vit, prompt, freeze_backbone=freeze_backbone, backbone_eval=backbone_eval)
        prompt = self.prompt_config
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.embed_dim: int = vit.embed_dim
        #: the size of the images this module takes (the model's own size, before ``pad`` enlarges it)
        self.image_size: Tuple[int, int] = tuple(vit.patch_embed.img_size)
        self._check_pool(vit, prompt)
        # a fresh LayerNorm without parameters: weight 1 and bias 0 for good (pool_norm='fresh', the official MAE)
        eps = getattr(vit.norm, "eps", getattr(vit.fc_norm, "eps", 1e-6))
        fresh = prompt.pool_norm == "fresh"
        self.pool_norm = nn.LayerNorm(self.embed_dim, eps=eps, elementwise_affine=False) if fresh else None
        location = prompt.location if prompt.enabled else None
        patch_size = vit.patch_embed.patch_size
        if location == "pad":  # the ConvNets' pixel border (U(0, 1) pixels, normalised like the images)
            init = "zeros" if prompt.init == "zeros" else "uniform"
            channels = vit.patch_embed.proj.in_channels
            self.padding = PixelBorder(prompt.num_tokens, (channels, *self.image_size), init=init)
            vit.set_input_size(img_size=tuple(s + 2 * prompt.num_tokens for s in self.image_size))
        if location == "concat_channel":
            self.channel_prompt, self.channel_proj = self._channel_prompt(vit, prompt.num_tokens)
        self.num_patches: int = vit.patch_embed.num_patches
        blocks = prompt.block_indices(len(vit.blocks)) if location not in INPUT_LOCATIONS else []
        # block index -> which prompt set it receives
        self.prompt_sets: Dict[int, int] = {block: i for i, block in enumerate(blocks)}
        self.prompts: Optional[Prompts] = None
        if location == "prepend_pixel":  # a pixel strip, patch-embedded by the frozen patch embedding
            bound = xavier_bound(patch_size, self.embed_dim)
            strip = torch.empty(1, vit.patch_embed.proj.in_channels, patch_size[0], patch_size[1] * prompt.num_tokens)
            self.pixel_prompt = nn.Parameter(strip.uniform_(-bound, bound))
        elif location in ("prepend", "add", "add1"):
            lengths = {"add": self.num_prefix_tokens + self.num_patches, "add1": 1}
            self.prompts = Prompts(prompt, len(blocks), self.embed_dim, patch_size, lengths.get(location))

    @staticmethod
    def _check_pool(vit: VisionTransformer, prompt: PromptConfig) -> None:
        if prompt.pool == "token" and vit.cls_token is None:
            raise ValueError("prompt.pool='token' needs a class token, but this backbone has none (class_token=False)")
        if prompt.pool == "prompt" and not prompt.adds_tokens:
            raise ValueError("prompt.pool='prompt' needs prompt tokens (prompt.num_tokens > 0)")
        if prompt.pool not in (None, "token") and vit.attn_pool is not None:
            raise ValueError(f"prompt.pool={prompt.pool!r}: this backbone pools by attention (global_pool='map')")

    @staticmethod
    def _channel_prompt(vit: VisionTransformer, channels: int) -> Tuple[nn.Parameter, nn.Conv2d]:
        """``concat_channel``: the extra input channels and a trainable patch embedding widened to them, its
        first channels the pretrained kernel and bias, the new ones U(-v, v) like the prompts."""
        proj = vit.patch_embed.proj
        bound = xavier_bound(proj.kernel_size, proj.out_channels)
        height, width = vit.patch_embed.img_size
        prompt = nn.Parameter(torch.empty(1, channels, height, width).uniform_(-bound, bound))
        widened = nn.Conv2d(
            proj.in_channels + channels, proj.out_channels, proj.kernel_size, proj.stride, bias=proj.bias is not None
        )
        with torch.no_grad():
            widened.weight.uniform_(-bound, bound)
            widened.weight[:, : proj.in_channels] = proj.weight
            if proj.bias is not None:
                widened.bias.copy_(proj.bias)
        return prompt, widened

    @property
    def vit(self) -> VisionTransformer:
        """The wrapped timm ``VisionTransformer`` (``self.model``)."""
        return self.model

    @property
    def num_prompt_tokens(self) -> int:
        """Number of prompt tokens the sequence carries after the first prompted block (``prepend``,
        ``prepend_pixel``; 0 for the other locations)."""
        return self.prompt_config.num_tokens if self.prompt_config.adds_tokens else 0

    def _stem_parameters(self) -> List[Optional[nn.Parameter]]:
        """Patch embedding, ``norm_pre``, position embedding, class and register tokens (the frozen prefix's)."""
        vit = self.vit
        return [*vit.patch_embed.parameters(), *vit.norm_pre.parameters(), vit.pos_embed, vit.cls_token, vit.reg_token]

    def _first_prompted_block(self) -> int:
        if self.prompt_config.enabled and self.prompt_config.location in INPUT_LOCATIONS:
            return 0
        return min(self.prompt_sets, default=len(self.vit.blocks))

    def _pixel_tokens(self, batch_size: int) -> torch.Tensor:
        """``prepend_pixel``: the pixel strip through the frozen patch projection and norm -> (B, p, D)."""
        patch_embed = self.vit.patch_embed
        tokens = patch_embed.proj(self.pixel_prompt).flatten(2).transpose(1, 2)
        return patch_embed.norm(tokens).expand(batch_size, -1, -1)

    def _block_prompts(self, block: int, like: torch.Tensor) -> torch.Tensor:
        """The prompts that ``block`` receives, ``(B, p, D)`` (``add``: one per token; ``add1``: one)."""
        if self.prompt_config.location == "prepend_pixel":
            return self._pixel_tokens(like.shape[0]).to(like.dtype)
        return self.prompts(self.prompt_sets[block], like.shape[0]).to(like.dtype)

    def _insert_prompts(self, x: torch.Tensor, prompts: torch.Tensor, inserted: bool) -> torch.Tensor:
        start = self.num_prefix_tokens
        if self.prompt_config.location in ("add", "add1"):
            if prompts.shape[1] not in (1, x.shape[1]):
                raise RuntimeError(
                    f"prompt.location='add' needs every token ({prompts.shape[1]}): disable patch dropout"
                )
            return x + prompts  # every token, the class token too (VPT-Deep: added again at each prompted block)
        # prepend: insert after the prefix tokens, or replace the previous block's prompt outputs (VPT-Deep)
        end = start + prompts.shape[1] if inserted else start
        return torch.cat([x[:, :start], prompts, x[:, end:]], dim=1)

    def _remove_prompts(self, x: torch.Tensor) -> torch.Tensor:
        """``[prefix, prompts, patches]`` -> ``[prefix, patches]``."""
        start = self.num_prefix_tokens
        return torch.cat([x[:, :start], x[:, start + self.num_prompt_tokens :]], dim=1)

    # ---- prompts as keys and values (prompt.kv_only) ------------------------------------------------------
    def discarded_prompt_outputs(self) -> List[int]:
        """The blocks whose prompt outputs nothing reads: the next block replaces them with new prompts, or the
        last block when the pooled feature leaves the prompts out (``prompt.pool`` not ``prompt`` / ``all``).
        Empty for ``prompt.kv_only=false`` and for prompts that are not tokens."""
        cfg = self.prompt_config
        if cfg.kv_only == "false" or not cfg.adds_tokens or not self.prompt_sets:
            return []
        last = len(self.vit.blocks) - 1
        blocks = [i for i in range(min(self.prompt_sets), last) if i + 1 in self.prompt_sets]
        return blocks + ([last] if cfg.pool not in ("prompt", "all") else [])

    def block_paths(self) -> List[str]:
        """How each block runs in the next forward pass: ``kv`` (prompts only as keys and values, see
        :mod:`~vpt_lightning.backbones.prompts_as_keys`) or ``full`` (every token through the block's own forward).
        A block whose prompt outputs are thrown away runs ``kv`` unless that would not be exact (not timm's own
        ``Block`` / ``Attention``, hooks on them, dropout drawing in train mode)."""
        discarded = set(self.discarded_prompt_outputs())
        return [
            "kv" if i in discarded and takes_prompt_keys(block) else "full" for i, block in enumerate(self.vit.blocks)
        ]

    @property
    def feature_prompt_tokens(self) -> int:
        """Prompt tokens in the output of :meth:`forward_features`: none when the pooled feature leaves them out
        and ``prompt.kv_only=auto`` (their last outputs are never computed), else :attr:`num_prompt_tokens`."""
        last = len(self.vit.blocks) - 1
        return 0 if last in self.discarded_prompt_outputs() else self.num_prompt_tokens

    def _patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.prompt_config.enabled and self.prompt_config.location == "pad":
            return self.vit.patch_embed(self.padding(x))
        if self.prompt_config.enabled and self.prompt_config.location == "concat_channel":
            x = torch.cat([x, self.channel_prompt.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
            tokens = self.channel_proj(x)
            flat = self.vit.patch_embed.flatten
            return self.vit.patch_embed.norm(tokens.flatten(2).transpose(1, 2) if flat else tokens.permute(0, 2, 3, 1))
        return self.vit.patch_embed(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the token sequence entering block 0 (patch + position embedding, prefix tokens; input prompts)."""
        vit = self.vit
        x = self._patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final tokens ``[prefix, prompts, patches]``, after the final norm unless ``pool_norm=fresh``;
        ``[prefix, patches]`` when the pooled feature leaves the prompts out (:attr:`feature_prompt_tokens` is 0).

        Blocks run as :meth:`block_paths` says: ``kv`` blocks take their prompts as keys and values only.
        """
        prefix = self.frozen_prefix()
        with prefix.stem():
            x = self.embed(x)
        paths = self.block_paths()
        tokens = self.prompt_config.adds_tokens
        carried = False  # whether x holds prompt tokens after the prefix tokens
        for i, block in enumerate(self.vit.blocks):
            record = prefix.records(i)
            with prefix.block(i):
                new = self._block_prompts(i, x) if i in self.prompt_sets else None
                if paths[i] == "kv":  # the prompts enter as keys and values; x leaves without them
                    if new is None:  # the previous block's prompt outputs, carried on
                        new = x[:, self.num_prefix_tokens : self.num_prefix_tokens + self.num_prompt_tokens]
                    x = self._remove_prompts(x) if carried else x
                    carried = False
                    x = self._run(record, block_with_prompt_keys, block, x, new)
                    continue
                if new is not None:
                    x = self._insert_prompts(x, new, carried)
                    carried = carried or tokens
                x = self._run(record, block, x)
        if carried and not self.feature_prompt_tokens:
            x = self._remove_prompts(x)
        return x if self.pool_norm is not None else self.vit.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the output of :meth:`forward_features` as ``prompt.pool`` says, then the model's head."""
        vit, pool = self.vit, self.prompt_config.pool
        start, end = self.num_prefix_tokens, self.num_prefix_tokens + self.feature_prompt_tokens
        if pool is None:  # timm's own pooling of [prefix, patches]
            without_prompts = torch.cat([x[:, :start], x[:, end:]], dim=1) if end > start else x
            if self.pool_norm is None:
                return vit.forward_head(without_prompts, pre_logits=pre_logits)
            pooled = vit.pool(without_prompts)
        elif pool == "token":
            pooled = x[:, 0]
        else:  # the mean of some of the tokens after the prefix tokens
            pooled = {"image": x[:, end:], "prompt": x[:, start:end], "all": x[:, start:]}[pool].mean(1)
        pooled = vit.head_drop(self.pool_norm(pooled) if self.pool_norm is not None else vit.fc_norm(pooled))
        return pooled if pre_logits else vit.head(pooled)

    def data_config(self) -> Dict[str, Any]:
        config = super().data_config()
        # timm reports the pretrained cfg's input size, even for a model built with another img_size; 'pad'
        # takes the model's own size and pads it
        config["input_size"] = (self.vit.patch_embed.proj.in_channels, *self.image_size)
        return config

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
