"""The Swin family: ``PromptedSwin``, a timm SwinTransformer with VPT prompts inside every attention window.

The prompts of a block are copied into each of its windows, attend there with zero relative-position bias and
zero shift mask on their rows and columns, and their outputs are averaged over the windows of each image (paper
§4.2; the official ``PromptedSwinTransformer``, but with the windows in batch-major order, so that one image's
output never depends on the other images of its batch). Patch merging carries the prompts on, tiled 4x along the
channels. Everything else is timm's own modules: ``patch_embed``, each block's ``norm1``, ``attn`` (qkv, relative
position bias table, proj), ``mlp``, ``norm2`` and drop-paths, each stage's ``downsample``, the final ``norm`` and
the head's pooling.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from torch import nn

from ..prompt import PromptConfig, Prompts
from .base import PromptedBackbone
from .prompts_as_keys import attention, dropout_active, project_qkv
from .registry import register_family


def attention_in_windows(
    block: SwinTransformerBlock, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: Tuple[int, ...]
) -> torch.Tensor:
    """The attention of ``block``'s windows, ``q`` ``(B * nW, heads, n, d)`` over ``k``, ``v`` ``(B * nW, heads, m,
    d)`` (batch-major windows), with its relative position bias and, in shifted windows, its shift mask, both padded
    with zeros by ``pad`` (``F.pad`` widths) on the prompt rows and columns. timm's own kernel choice
    (:func:`~vpt_lightning.backbones.prompts_as_keys.attention`). Returns ``(B * nW, heads, n, d)``."""
    attn = block.attn
    bias = F.pad(attn._get_rel_pos_bias(), pad)  # (1, heads, n, m)
    mask = block.attn_mask
    if mask is None:
        return attention(attn, q, k, v, bias)
    # shifted windows: a (nW, n, m) mask of 0 / -100, one per window position -> a bias (nW, heads, n, m)
    bias = bias + F.pad(mask, pad).unsqueeze(1)
    count, num_windows = q.shape[0], mask.shape[0]
    if attn.fused_attn:  # one bias per window: the flash kernel takes 4-D inputs only (else its float32 math path)
        bias = bias.expand(count // num_windows, *bias.shape).reshape(count, *bias.shape[1:])
        return attention(attn, q, k, v, bias)
    # timm's explicit path: q, k, v viewed as (B, nW, heads, ., d), the bias broadcast over the batch
    q, k, v = (t.reshape(-1, num_windows, *t.shape[1:]) for t in (q, k, v))
    return attention(attn, q, k, v, bias).flatten(0, 1)


def window_attention(block: SwinTransformerBlock, windows: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """timm's window attention of ``block`` on ``(B * nW, N, C)`` windows with the prompts ``(B, p, C)`` prepended
    to every window of their image: the relative position bias and the shift mask are padded with zeros on the
    prompt rows and columns. Windows are batch-major (index ``b * nW + w``), as ``window_partition`` makes them.
    The prompts' q, k, v are computed once per image and copied into its windows (the same numbers as projecting
    every copy). Returns ``(B * nW, p + N, C)``."""
    attn = block.attn
    batch, num_prompts = prompts.shape[:2]
    count, num_windows = windows.shape[0], windows.shape[0] // batch
    image_qkv = attn.qkv(windows)
    prompt_qkv = attn.qkv(prompts).unsqueeze(1).expand(batch, num_windows, num_prompts, image_qkv.shape[-1])
    qkv = torch.cat([prompt_qkv.reshape(count, num_prompts, image_qkv.shape[-1]), image_qkv], dim=1)
    length = qkv.shape[1]
    q, k, v = qkv.reshape(count, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = attention_in_windows(block, q, k, v, (num_prompts, 0, num_prompts, 0))
    out = out.transpose(1, 2).reshape(count, length, -1)
    return attn.proj_drop(attn.proj(out))


def shifted_windows(block: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """``norm1``, the cyclic shift, padding to whole windows and the window partition of a Swin block's input
    ``(B, H, W, C)``: windows ``(B * nW, wh * ww, C)`` and the padded height and width."""
    win_h, win_w = block.window_size
    shift_h, shift_w = block.shift_size
    height, width, dim = x.shape[1:]
    shifted = block.norm1(x)
    if shift_h or shift_w:
        shifted = torch.roll(shifted, shifts=(-shift_h, -shift_w), dims=(1, 2))
    pad_h, pad_w = (win_h - height % win_h) % win_h, (win_w - width % win_w) % win_w
    shifted = F.pad(shifted, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = shifted.shape[1:3]
    return window_partition(shifted, block.window_size).reshape(-1, win_h * win_w, dim), padded_h, padded_w


def prompted_block(
    block: SwinTransformerBlock, x: torch.Tensor, prompts: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One timm Swin block on the NHWC map ``x`` (B, H, W, C) and its prompts ``prompts`` (B, p, C).

    norm1 -> cyclic shift -> window partition with the prompts prepended to every window -> window attention ->
    prompt outputs averaged over the windows -> window reverse -> unshift; then the residual and the MLP over
    prompts and image tokens alike (as the official code). Returns the new ``(x, prompts)``.
    """
    batch, height, width, dim = x.shape
    num_prompts = prompts.shape[1]
    win_h, win_w = block.window_size
    shift_h, shift_w = block.shift_size
    shortcut = torch.cat([prompts, x.reshape(batch, height * width, dim)], dim=1)
    normed_prompts = block.norm1(prompts)
    windows, padded_h, padded_w = shifted_windows(block, x)
    num_windows = windows.shape[0] // batch
    out = window_attention(block, windows, normed_prompts)
    prompt_out = out[:, :num_prompts].reshape(batch, num_windows, num_prompts, dim).mean(1)
    image_out = out[:, num_prompts:].reshape(-1, win_h, win_w, dim)
    image_out = window_reverse(image_out, block.window_size, padded_h, padded_w)[:, :height, :width]
    if shift_h or shift_w:
        image_out = torch.roll(image_out, shifts=(shift_h, shift_w), dims=(1, 2))
    tokens = shortcut + block.drop_path1(torch.cat([prompt_out, image_out.reshape(batch, -1, dim)], dim=1))
    tokens = tokens + block.drop_path2(block.mlp(block.norm2(tokens)))
    return tokens[:, num_prompts:].reshape(batch, height, width, dim), tokens[:, :num_prompts]


def window_attention_with_prompt_keys(
    block: SwinTransformerBlock, windows: torch.Tensor, prompts: torch.Tensor
) -> torch.Tensor:
    """:func:`window_attention` with the prompts ``(B, p, C)`` as keys and values only: the window's queries
    ``(B * nW, N)`` attend to ``p + N`` keys (relative position bias and shift mask padded with zeros on the prompt
    columns). The prompts' keys and values are computed once per image. Returns ``(B * nW, N, C)``."""
    attn = block.attn
    batch, num_prompts = prompts.shape[:2]
    count, length = windows.shape[:2]
    num_windows, heads = count // batch, attn.num_heads
    q, k, v = project_qkv(attn.qkv, windows, heads)
    prompt_kv = project_qkv(attn.qkv, prompts, heads, queries=False)  # (B, heads, p, d) each
    k, v = (
        torch.cat([pk.unsqueeze(1).expand(batch, num_windows, *pk.shape[1:]).reshape(count, *pk.shape[1:]), t], dim=2)
        for pk, t in zip(prompt_kv, (k, v))
    )
    out = attention_in_windows(block, q, k, v, (num_prompts, 0))
    out = out.transpose(1, 2).reshape(count, length, -1)
    return attn.proj_drop(attn.proj(out))


def block_with_prompt_keys(block: SwinTransformerBlock, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """:func:`prompted_block` for a block whose prompt outputs are thrown away: the prompts enter every window as
    keys and values only; queries, projection, MLP and drop-paths run over the image tokens (no window averaging
    of prompt outputs). Returns the new ``x`` ``(B, H, W, C)``, equal to :func:`prompted_block`'s."""
    batch, height, width, dim = x.shape
    win_h, win_w = block.window_size
    shift_h, shift_w = block.shift_size
    windows, padded_h, padded_w = shifted_windows(block, x)
    out = window_attention_with_prompt_keys(block, windows, block.norm1(prompts))
    image_out = window_reverse(out.reshape(-1, win_h, win_w, dim), block.window_size, padded_h, padded_w)
    image_out = image_out[:, :height, :width]
    if shift_h or shift_w:
        image_out = torch.roll(image_out, shifts=(shift_h, shift_w), dims=(1, 2))
    tokens = (x + block.drop_path1(image_out)).reshape(batch, height * width, dim)
    tokens = tokens + block.drop_path2(block.mlp(block.norm2(tokens)))
    return tokens.reshape(batch, height, width, dim)


def takes_prompt_keys(block: nn.Module) -> bool:
    """Whether :func:`block_with_prompt_keys` is exact for ``block``: timm's own ``SwinTransformerBlock`` and
    ``WindowAttention``, and no dropout drawing random numbers (train mode)."""
    return type(block) is SwinTransformerBlock and type(block.attn) is WindowAttention and not dropout_active(block)


def merge_prompts(downsample: nn.Module, prompts: torch.Tensor) -> torch.Tensor:
    """Prompts (B, p, C) through a stage's patch merging, as 2x2 blocks of four identical copies: timm's own
    ``PatchMerging`` (norm and reduction of the 4C channels) on the prompts tiled 4x along the channels."""
    batch, num_prompts, dim = prompts.shape
    tiles = prompts.unsqueeze(2).unsqueeze(3).expand(batch, num_prompts, 2, 2, dim)
    merged = downsample(tiles.reshape(batch, 2 * num_prompts, 2, dim))  # (B, p, 1, C')
    return merged.reshape(batch, num_prompts, -1)


@register_family(SwinTransformer)
class PromptedSwin(PromptedBackbone):
    """Wrap a timm ``SwinTransformer`` and attend learnable prompts inside its windows (VPT on Swin, paper §4.2).

    Blocks are numbered across stages (``prompt.depth`` and Partial-k count them so: Swin-B has 2+2+18+2 = 24).
    VPT-Deep gives every prompted block a new set of width C_s (12,032·p parameters for Swin-B); a block without a
    new set receives the previous block's prompt outputs, carried through patch merging. All prompt sets share
    the Xavier bound of the first stage's width, as the official code. Only ``prompt.location='prepend'``.

    ``forward_features`` returns the final normed tokens ``(B, p + H·W, C)`` (prompts first, then the image
    tokens in row-major order); ``forward_head`` pools them with timm's own head, over ``prompt.pool``: ``all``
    tokens (default, the official code: prompts included) or the ``image`` tokens only.
    """

    pools = ("all", "image")
    default_pool = "all"
    #: the paper's Swin-B sweep (§4.2, Table 2): the prompt length too, with the usual lr and wd grids
    prompt_grid = {"num_tokens": (1, 5, 10, 50)}
    resampled_keys = ("patch_embed.proj.weight", "relative_position_bias_table")
    model_hint = " (swin_* models)"

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        super().check_model(model)
        if not model.global_pool:
            raise ValueError(
                "backbone.kwargs.global_pool='' gives one output per token, not per image; use 'avg' (the default)"
            )
        if model.patch_embed.dynamic_img_pad or not model.patch_embed.strict_img_size:
            raise ValueError(
                "PromptedSwin needs a fixed input size: drop backbone.kwargs strict_img_size / dynamic_img_size"
            )

    def __init__(
        self,
        model: nn.Module,
        prompt: Union[PromptConfig, Mapping[str, Any], None] = None,
        freeze_backbone: bool = True,
        backbone_eval: bool = True,
    ) -> None:
        super().__init__(model, prompt, freeze_backbone=freeze_backbone, backbone_eval=backbone_eval)
        prompt = self.prompt_config
        if prompt.enabled and prompt.location != "prepend":
            raise ValueError(f"prompt.location={prompt.location!r}: Swin takes prompts only as 'prepend'")
        #: (stage, block within the stage) of every block, in forward order
        self.block_positions: List[Tuple[int, int]] = [
            (s, j) for s, stage in enumerate(model.layers) for j in range(len(stage.blocks))
        ]
        prompted = prompt.block_indices(len(self.block_positions))
        widths = [stage.blocks[0].dim if len(stage.blocks) else 0 for stage in model.layers]
        sets: Dict[int, List[int]] = {}  # stage -> the flat indices of its prompted blocks
        for index in prompted:
            sets.setdefault(self.block_positions[index][0], []).append(index)
        # flat block index -> (stage key, set index in that stage's Prompts)
        self.prompt_sets: Dict[int, Tuple[str, int]] = {
            index: (str(stage), i) for stage, indices in sets.items() for i, index in enumerate(indices)
        }
        init_dim = None if prompt.project > 0 else widths[0]
        patch = model.patch_embed.patch_size
        self.prompts = nn.ModuleDict(
            {str(s): Prompts(prompt, len(indices), widths[s], patch, init_dim=init_dim) for s, indices in sets.items()}
        )

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens in the output of :meth:`forward_features` (carried to the end once inserted)."""
        return self.prompt_config.num_tokens if self.prompt_config.enabled else 0

    def blocks(self) -> List[nn.Module]:
        return [block for stage in self.model.layers for block in stage.blocks]

    def last_blocks(self, k: int) -> List[nn.Module]:
        """The last ``k`` blocks and the patch merging of every stage whose previous block is among them (the
        official Partial-4 trains stage 2's last two blocks, the merging after them and stage 3)."""
        first = len(self.block_positions) - k
        trained: List[nn.Module] = []
        for index, (stage, j) in enumerate(self.block_positions):
            if index < first:
                continue
            if j == 0 and index > first and not isinstance(self.model.layers[stage].downsample, nn.Identity):
                trained.append(self.model.layers[stage].downsample)
            trained.append(self.model.layers[stage].blocks[j])
        return trained

    def final_norms(self) -> List[nn.Module]:
        return [self.model.norm]

    def _stem_parameters(self) -> List[nn.Parameter]:
        return list(self.model.patch_embed.parameters())

    def _first_prompted_block(self) -> int:
        return min(self.prompt_sets, default=len(self.block_positions))

    def _block_modules(self) -> List[List[nn.Module]]:
        """Each block, with its stage's patch merging before a stage's first block."""
        layers = self.model.layers
        return [[layers[s].blocks[j]] + ([layers[s].downsample] if j == 0 else []) for s, j in self.block_positions]

    def discarded_prompt_outputs(self) -> List[int]:
        """Flat indices of the blocks whose prompt outputs nothing reads: the next block replaces them with new
        prompts, or the last block when ``prompt.pool='image'``. Empty for ``prompt.kv_only=false``."""
        cfg = self.prompt_config
        if cfg.kv_only == "false" or not self.prompt_sets:
            return []
        last = len(self.block_positions) - 1
        blocks = [i for i in range(min(self.prompt_sets), last) if i + 1 in self.prompt_sets]
        return blocks + ([last] if self.pool == "image" else [])

    def block_paths(self) -> List[str]:
        """How each block runs in the next forward pass: ``kv`` (prompts as keys and values only, in every window)
        or ``full`` (prompts through the whole block, their outputs averaged over the windows)."""
        discarded = set(self.discarded_prompt_outputs())
        return [
            "kv" if i in discarded and takes_prompt_keys(block) else "full" for i, block in enumerate(self.blocks())
        ]

    @property
    def feature_prompt_tokens(self) -> int:
        """Prompt tokens in the output of :meth:`forward_features`: none when ``prompt.pool='image'`` and
        ``prompt.kv_only=auto`` (their last outputs are never computed), else :attr:`num_prompt_tokens`."""
        last = len(self.block_positions) - 1
        return 0 if last in self.discarded_prompt_outputs() else self.num_prompt_tokens

    def _new_prompts(self, index: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        stage, i = self.prompt_sets[index]
        return self.prompts[stage](i, batch).to(like.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> final normed tokens ``(B, p + H·W, C)``: prompt outputs first, then the image tokens."""
        prefix = self.frozen_prefix()
        with prefix.stem():
            x = self.model.patch_embed(x)
        prompts: Optional[torch.Tensor] = None
        paths = self.block_paths()
        index = 0
        for stage in self.model.layers:
            with prefix.block(index):
                x = stage.downsample(x)
                if prompts is not None and index not in self.prompt_sets:  # (else replaced right away)
                    prompts = merge_prompts(stage.downsample, prompts)
            for block in stage.blocks:
                record = prefix.records(index)
                with prefix.block(index):
                    if index in self.prompt_sets:
                        prompts = self._new_prompts(index, x.shape[0], x)
                    if prompts is None:
                        x = self._run(record, block, x)
                    elif paths[index] == "kv":  # prompt outputs thrown away: the prompts as keys and values only
                        x = self._run(record, block_with_prompt_keys, block, x, prompts)
                        prompts = None
                    else:
                        x, prompts = self._run(record, prompted_block, block, x, prompts)
                index += 1
        tokens = self.model.norm(x).flatten(1, 2)
        if prompts is not None and self.feature_prompt_tokens:
            tokens = torch.cat([self.model.norm(prompts), tokens], dim=1)
        return tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's head (its pooling, e.g. the mean) over ``prompt.pool``'s tokens of :meth:`forward_features`."""
        tokens = x if self.pool == "all" else x[:, self.feature_prompt_tokens :]
        return self.model.forward_head(tokens.unsqueeze(1), pre_logits=pre_logits)  # a 1 x N NHWC map

    # ---- identity ---------------------------------------------------------------------------------------
    @classmethod
    def depth(cls, model: nn.Module) -> int:
        return sum(len(stage.blocks) for stage in model.layers)

    @classmethod
    def architecture(cls, model: nn.Module) -> Dict[str, Any]:
        blocks = [block for stage in model.layers for block in stage.blocks]
        return {
            "class": type(model).__name__,
            "img_size": list(model.patch_embed.img_size or []),
            "depths": [len(stage.blocks) for stage in model.layers],
            "num_heads": [stage.blocks[0].attn.num_heads if len(stage.blocks) else None for stage in model.layers],
            "window_size": [list(block.window_size) for block in blocks],
            "shift_size": [list(block.shift_size) for block in blocks],
            "act": type(blocks[0].mlp.act).__name__ if blocks else None,
            "global_pool": model.global_pool,
        }
