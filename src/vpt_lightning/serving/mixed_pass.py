"""One forward pass of a shared ViT over a batch that mixes tasks, each sample with its own task's prompts and
weight updates.

The batch is sorted by task, so that each task's samples are a contiguous group of rows. Every block then runs its
norms, ``qkv``, output projection, LayerScale and MLP once over the image tokens (prefix and patch tokens) of the
whole batch, and its attention once too, each row with its own task's keys and values (padded to the longest prompt
of the batch, the padding masked):

- a task whose prompts are replaced by the next block's (VPT-Deep) or whose prompt outputs nothing reads (the last
  block: the pooled feature leaves the prompts out) adds its prompts as keys and values only, the path of
  :mod:`~vpt_lightning.backbones.prompts_as_keys`: a task's prompts cost keys, not query rows;
- a task whose prompt outputs are read later (VPT-Shallow, a ``prompt.depth`` subset) carries them as extra rows of
  its own group through the full block;
- LoRA and Adapter tasks add their updates to their own rows of the shared modules' outputs
  (:mod:`~vpt_lightning.serving.task_updates`).

Attention does not depend on the order of its keys, so each row's output equals its task's own forward pass up to
float rounding.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from ..backbones.base import PromptedBackbone
from ..backbones.prompts_as_keys import attention, finish_block, takes_prompt_keys
from ..backbones.vit import PromptedViT
from .task_updates import Group, Routing, Update, routed_updates


def joins_with_prompts(backbone: PromptedBackbone) -> bool:
    """Whether a task's prompted backbone can join :func:`mixed_features`: a ViT with prepended prompt tokens (or
    none) and timm's own pooling (no ``prompt.pool``, no fresh ``pool_norm``)."""
    cfg = backbone.prompt_config
    prompts_ok = not cfg.enabled or cfg.location == "prepend"
    return (
        isinstance(backbone, PromptedViT)
        and prompts_ok
        and cfg.pool is None
        and getattr(backbone, "pool_norm", None) is None
    )


def blocks_fit(shared: PromptedBackbone) -> bool:
    """Whether the shared backbone is built for :func:`mixed_features`: a ViT of timm's own ``Block`` and
    ``Attention`` (what :func:`shares_blocks` checks, but hooks and train-mode dropout, which come and go)."""
    return isinstance(shared, PromptedViT) and all(
        type(block) is Block and type(block.attn) is Attention for block in shared.vit.blocks
    )


def shares_blocks(shared: PromptedBackbone) -> bool:
    """Whether the shared backbone's blocks can run :func:`mixed_features` now: :func:`blocks_fit`, and no hooks
    or dropout in the way (see :func:`~vpt_lightning.backbones.prompts_as_keys.takes_prompt_keys`)."""
    return blocks_fit(shared) and all(takes_prompt_keys(block) for block in shared.vit.blocks)


def task_groups(task_index: torch.Tensor, first: Sequence[bool]) -> Tuple[torch.Tensor, List[Group]]:
    """The order that makes each task's samples contiguous (tasks with ``first[t]`` before the others, so that
    their rows share one attention call where no prompt differs) and the groups ``(task, start, end)``."""
    ranks = torch.tensor([0 if f else 1 for f in first], device=task_index.device)
    key = ranks[task_index] * len(first) + task_index
    order = torch.argsort(key, stable=True)
    tasks, counts = torch.unique_consecutive(task_index[order], return_counts=True)
    groups, start = [], 0
    for task, count in zip(tasks.tolist(), counts.tolist()):
        groups.append((task, start, start + count))
        start += count
    return order, groups


def _heads(attn: nn.Module, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``(b, heads, n, head_dim)`` and the keys and values stacked ``(2, b, heads, n, head_dim)`` of
    ``tokens`` ``(b, n, D)`` through the attention's own ``qkv`` (a module call, so routed updates apply),
    ``q_norm`` and ``k_norm`` (without a ``k_norm``, the keys and values are one view of the ``qkv`` output)."""
    return _split(attn, attn.qkv(tokens))


def _split(attn: nn.Module, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, length = qkv.shape[:2]
    qkv = qkv.reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    kv = qkv[1:] if isinstance(attn.k_norm, nn.Identity) else torch.stack([attn.k_norm(qkv[1]), qkv[2]])
    return attn.q_norm(qkv[0]), kv


def masked_attention(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The attention of the block's ``attn`` on ``q`` ``(b, heads, n, head_dim)`` over ``k``, ``v``
    ``(b, heads, m, head_dim)``; ``mask``: booleans broadcast to ``(b, heads, n, m)``, ``False`` where a row does not
    attend (the prompt slots a shorter or no prompt leaves empty). It is the training's attention
    (:func:`~vpt_lightning.backbones.prompts_as_keys.attention`, the kernel the block chose), the mask as an
    additive bias, ``-inf`` where it is ``False`` (every row attends to its image tokens)."""
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return attention(attn, q, k, v, bias)


def _prompt_heads(
    block: Block, groups: Sequence[Group], keys_only: Mapping[int, torch.Tensor], routing: Routing, longest: int
) -> Tuple[torch.Tensor, Dict[int, int]]:
    """Keys and values ``(2, S, heads, longest, head_dim)`` of every group's keys-only prompts, padded to
    ``longest`` (zero tokens, masked later), all through one ``norm1`` and one ``qkv`` call; ``S`` sources, one per
    group whose rows share their prompts (``(1, p, D)``), one per row where each row has its own (``(b, p, D)``);
    and each group's first source."""
    pieces, spans, first, sources = [], [], {}, 0
    for g in range(len(groups)):
        if g not in keys_only:
            continue
        tokens = keys_only[g]
        if tokens.shape[1] < longest:
            tokens = F.pad(tokens, (0, 0, 0, longest - tokens.shape[1]))
        pieces.append(tokens)
        first[g] = sources
        spans.append((groups[g][0], sources, sources + tokens.shape[0]))
        sources += tokens.shape[0]
    with routing.rows(spans):
        projected = block.attn.qkv(block.norm1(torch.cat(pieces) if len(pieces) > 1 else pieces[0]))
    return _split(block.attn, projected)[1], first


def _mixed_block(
    block: Block,
    x: torch.Tensor,
    groups: Sequence[Group],
    keys_only: Mapping[int, torch.Tensor],
    carried: Mapping[int, torch.Tensor],
    routing: Routing,
) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    """One block over the sorted image tokens ``x`` ``(B, N, D)``. ``keys_only``: group -> prompts ``(1 or b, p, D)``
    that enter as keys and values only; ``carried``: group -> prompt rows ``(b, c, D)`` that run through the full
    block with the group's image tokens. Returns the image tokens' and the carried rows' outputs.

    Every row attends in one call: one buffer of keys and values ``(2, B, heads, P + N, head_dim)`` holds each row's
    prompt keys in the first ``P`` slots (the longest prompt of the batch; a mask hides the slots a shorter or no
    prompt leaves empty) and its image keys after them; only the carried rows' own queries need calls of their own.
    """
    attn = block.attn
    batch, length, _ = x.shape
    normed = block.norm1(x)
    with routing.rows(groups):
        q, kv = _heads(attn, normed)
    carried_heads: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for g, rows in carried.items():
        with routing.rows([(groups[g][0], 0, rows.shape[0])]):
            carried_normed = block.norm1(rows)
            carried_heads[g] = (carried_normed, *_heads(attn, carried_normed))
    lengths = {g: t.shape[1] for g, t in keys_only.items()}
    lengths.update({g: t.shape[1] for g, t in carried.items()})
    longest = max(lengths.values(), default=0)
    mask: Optional[torch.Tensor] = None
    if not longest:
        k, v = kv[0], kv[1]
    else:
        buffer = kv.new_empty(2, batch, kv.shape[2], longest + length, kv.shape[4])
        buffer[:, :, :, longest:] = kv
        if keys_only:  # each row's prompt keys gathered from its source in one call (a finite source for the others)
            sources, first = _prompt_heads(block, groups, keys_only, routing, longest)
            index: List[int] = []
            for g, (_task, start, end) in enumerate(groups):
                if g in keys_only and keys_only[g].shape[0] > 1:
                    index += range(first[g], first[g] + end - start)
                else:
                    index += [first.get(g, 0)] * (end - start)
            buffer[:, :, :, :longest] = sources.index_select(1, torch.tensor(index, device=x.device))
        else:
            buffer[:, :, :, :longest] = 0
        for g, (_normed, _q, carried_kv) in carried_heads.items():
            start, end = groups[g][1], groups[g][2]
            buffer[:, start:end, :, : carried_kv.shape[3]] = carried_kv
        if any(lengths.get(g, 0) < longest for g in range(len(groups))):
            row_lengths = torch.tensor(
                [lengths.get(g, 0) for g, (_t, start, end) in enumerate(groups) for _ in range(end - start)],
                device=x.device,
            )
            prompt_slots = torch.arange(longest, device=x.device) < row_lengths[:, None]
            mask = torch.cat([prompt_slots, prompt_slots.new_ones(batch, length)], dim=1)[:, None, None, :]
        k, v = buffer[0], buffer[1]
    out = masked_attention(attn, q, k, v, mask)
    with routing.rows(groups):
        x = finish_block(block, x, out.transpose(1, 2), normed)
    carried_out = {}
    for g, (carried_normed, carried_q, _kv) in carried_heads.items():
        task, start, end = groups[g]
        rows_mask = mask[start:end] if mask is not None else None
        carried_attn = masked_attention(attn, carried_q, k[start:end], v[start:end], rows_mask)
        with routing.rows([(task, 0, end - start)]):
            carried_out[g] = finish_block(block, carried[g], carried_attn.transpose(1, 2), carried_normed)
    return x, carried_out


def mixed_features(
    shared: PromptedViT,
    prompts: Sequence[Mapping[int, torch.Tensor]],
    updates: Sequence[Mapping[str, Update]],
    images: torch.Tensor,
    task_index: torch.Tensor,
) -> torch.Tensor:
    """Pooled features ``(B, num_features)`` of a mixed batch, row ``b`` through task ``task_index[b]``: the prompts
    ``prompts[task]`` (block index -> the ``(p, D)`` prompts that block receives, as in evaluation: no dropout) and
    the ``updates[task]`` of its method, in one pass of ``shared`` (a backbone without prompts on the model the
    tasks share, see :func:`shares_blocks`; a task's prompts are prepended, its features pooled as timm does)."""
    vit = shared.vit
    order, groups = task_groups(task_index, [not p for p in prompts])
    identity = bool((order == torch.arange(len(order), device=order.device)).all())
    x = shared.embed(images if identity else images[order])
    routing = Routing(groups)
    last = len(vit.blocks) - 1
    carried: Dict[int, torch.Tensor] = {}
    present = {task: updates[task] for task, _, _ in groups if updates[task]}
    with routed_updates(vit, present, routing):
        for i, block in enumerate(vit.blocks):
            keys_only: Dict[int, torch.Tensor] = {}
            full: Dict[int, torch.Tensor] = {}
            for g, (task, start, end) in enumerate(groups):
                own = prompts[task]
                entering = carried.get(g)
                if i in own:  # new prompts (replacing the previous block's prompt outputs)
                    entering = own[i].unsqueeze(0).to(x.dtype)
                if entering is None:
                    continue
                if i == last or i + 1 in own:  # nothing reads this block's prompt outputs
                    keys_only[g] = entering
                else:
                    full[g] = entering.expand(end - start, -1, -1)
            x, carried = _mixed_block(block, x, groups, keys_only, full, routing)
        features = shared.forward_head(vit.norm(x))
    if identity:
        return features
    out = torch.empty_like(features)
    out[order] = features
    return out
