"""One forward pass of a shared ViT over a batch that mixes tasks, each sample with its own task's prompts and
weight updates.

The batch is sorted by task, so that each task's samples are a contiguous group of rows. Every block then runs its
norms, ``qkv``, output projection, LayerScale and MLP once over the image tokens (prefix and patch tokens) of the
whole batch; only the attention itself runs per group, with the group's keys and values:

- a task whose prompts are replaced by the next block's (VPT-Deep) or whose prompt outputs nothing reads (the last
  block: the pooled feature leaves the prompts out) adds its prompts as keys and values only, the path of
  :mod:`~vpt_lightning.backbones.prompts_as_keys`: a task's prompts cost keys, not query rows, and tasks of
  different prompt lengths need no padding or mask;
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


def shares_blocks(shared: PromptedBackbone) -> bool:
    """Whether the shared backbone's blocks can run :func:`mixed_features`: a ViT of timm's own ``Block`` and
    ``Attention`` (see :func:`~vpt_lightning.backbones.prompts_as_keys.takes_prompt_keys`)."""
    return isinstance(shared, PromptedViT) and all(takes_prompt_keys(block) for block in shared.vit.blocks)


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


def _prompt_heads(
    block: Block, groups: Sequence[Group], keys_only: Mapping[int, torch.Tensor], routing: Routing
) -> Dict[int, torch.Tensor]:
    """Keys and values ``(2, 1 or b, heads, p, head_dim)`` of every group's keys-only prompts, all groups' prompt
    rows through one ``norm1`` and one ``qkv`` call."""
    attn = block.attn
    order = [g for g in range(len(groups)) if g in keys_only]
    if not order:
        return {}
    rows = [keys_only[g].reshape(-1, keys_only[g].shape[-1]) for g in order]
    spans, start = [], 0
    for g, r in zip(order, rows):
        spans.append((groups[g][0], start, start + r.shape[0]))
        start += r.shape[0]
    with routing.rows(spans):
        projected = attn.qkv(block.norm1(torch.cat(rows) if len(rows) > 1 else rows[0]))
    heads = {}
    for g, (_, begin, end) in zip(order, spans):
        batch, length, _ = keys_only[g].shape
        heads[g] = _split(attn, projected[begin:end].reshape(batch, length, -1))[1]
    return heads


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
    block with the group's image tokens. Returns the image tokens' and the carried rows' outputs."""
    attn = block.attn
    batch, length, _ = x.shape
    normed = block.norm1(x)
    with routing.rows(groups):
        q, kv = _heads(attn, normed)
    prompt_heads = _prompt_heads(block, groups, keys_only, routing)
    carried_heads: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for g, rows in carried.items():
        with routing.rows([(groups[g][0], 0, rows.shape[0])]):
            carried_normed = block.norm1(rows)
            carried_heads[g] = (carried_normed, *_heads(attn, carried_normed))
    # one buffer of keys and values (2, B, heads, P + N, head_dim): every row's image keys at the end (one copy for
    # the batch), each group's prompt keys in the p slots just before them; a group attends to its own slice
    longest = max(
        [t.shape[3] for t in prompt_heads.values()] + [t[2].shape[3] for t in carried_heads.values()], default=0
    )
    if longest:
        buffer = kv.new_empty(2, batch, kv.shape[2], longest + length, kv.shape[4])
        buffer[:, :, :, longest:] = kv
    k, v = kv[0], kv[1]
    # the attention outputs of every row, (B, N, heads, head_dim): each call writes its rows (the CPU and flash
    # kernels return this layout transposed, so the writes are plain copies and no concatenation is needed)
    merged: Optional[torch.Tensor] = None
    carried_attn: Dict[int, torch.Tensor] = {}
    plain_start: Optional[int] = None  # the first row of a run of groups whose keys are their own image tokens

    def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return attention(attn, q_, k_, v_)

    def write(start: int, end: int, out: torch.Tensor) -> None:
        nonlocal merged
        out = out.transpose(1, 2)
        if start == 0 and end == batch:
            merged = out
            return
        if merged is None:
            merged = out.new_empty(batch, *out.shape[1:])
        merged[start:end] = out

    for g, (_task, start, end) in enumerate(groups):
        if g not in prompt_heads and g not in carried_heads:
            plain_start = start if plain_start is None else plain_start
            continue
        if plain_start is not None:
            write(plain_start, start, attend(q[plain_start:start], k[plain_start:start], v[plain_start:start]))
            plain_start = None
        prompt_kv = prompt_heads[g] if g in prompt_heads else carried_heads[g][2]
        first = longest - prompt_kv.shape[3]
        buffer[:, start:end, :, first:longest] = prompt_kv
        keys, values = buffer[0, start:end, :, first:], buffer[1, start:end, :, first:]
        write(start, end, attend(q[start:end], keys, values))
        if g in carried_heads:
            carried_attn[g] = attend(carried_heads[g][1], keys, values)
    if plain_start is not None:
        write(plain_start, batch, attend(q[plain_start:], k[plain_start:], v[plain_start:]))
    with routing.rows(groups):
        x = finish_block(block, x, merged, normed)
    carried_out = {}
    for g, out in carried_attn.items():
        task, start, end = groups[g]
        with routing.rows([(task, 0, end - start)]):
            carried_out[g] = finish_block(block, carried[g], out.transpose(1, 2), carried_heads[g][0])
    return x, carried_out


def mixed_features(
    shared: PromptedViT,
    tasks: Sequence[PromptedViT],
    updates: Sequence[Mapping[str, Update]],
    images: torch.Tensor,
    task_index: torch.Tensor,
) -> torch.Tensor:
    """Pooled features ``(B, num_features)`` of a mixed batch, row ``b`` through ``tasks[task_index[b]]``: its
    prompts (in evaluation: no prompt dropout) and the ``updates[task]`` of its method, in one pass of ``shared``
    (a backbone without prompts on the model the tasks share, see :func:`shares_blocks`; every present task must
    pass :func:`joins_with_prompts`)."""
    vit = shared.vit
    order, groups = task_groups(task_index, [not t.prompt_sets for t in tasks])
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
                own = tasks[task]
                entering = carried.get(g)
                if i in own.prompt_sets:  # new prompts (replacing the previous block's prompt outputs)
                    entering = own.prompts(own.prompt_sets[i], 1).to(x.dtype)
                if entering is None:
                    continue
                if i == last or i + 1 in own.prompt_sets:  # nothing reads this block's prompt outputs
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
