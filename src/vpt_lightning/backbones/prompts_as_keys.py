"""Prompts as keys and values only: a timm ViT ``Block`` whose prompt outputs are thrown away.

In VPT-Deep every block's prompt outputs are replaced by the next block's fresh prompts (and the last block's are
left out of the pooled feature), so nothing reads them. The queries, output projection, LayerScale, MLP and
drop-paths of such a block need only run over the image tokens; the prompts still change every image token
through the keys and values of attention. The image-token outputs are the same as those of the block run over the
full ``[prefix, prompts, patches]`` sequence (up to float rounding), at a cost that hardly grows with the prompt
length. Everything is the block's own timm modules; only the attention call itself is written here
(:func:`attention`), and it follows the block's own choice of kernel, as timm's ``Attention`` does.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn.modules import module as torch_module


def has_hooks(module: nn.Module) -> bool:
    """Whether forward hooks would run around ``module``'s own forward (its own or global ones)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
    )


def dropout_active(module: nn.Module) -> bool:
    """Whether ``module`` (in train mode) holds a dropout with p > 0, whose random draws depend on the row count."""
    return module.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def takes_prompt_keys(block: nn.Module) -> bool:
    """Whether :func:`block_with_prompt_keys` gives ``block``'s own image-token outputs exactly: a timm ``Block``
    with timm's ``Attention`` (not a subclass, nor another block or attention type), no hooks on either nor on the
    attention's ``attn_drop`` (they would not run: the fused attention skips ``attn_drop``, where timm's
    ``AttentionExtract`` catches the attention maps), and no dropout drawing random numbers (in train mode).
    Drop-paths draw one number per sample and stay exact."""
    return (
        type(block) is Block
        and type(block.attn) is Attention
        and not has_hooks(block)
        and not has_hooks(block.attn)
        and not has_hooks(block.attn.attn_drop)
        and not dropout_active(block)
    )


def project_qkv(qkv: nn.Module, tokens: torch.Tensor, heads: int, queries: bool = True) -> Tuple[torch.Tensor, ...]:
    """An attention's ``qkv`` layer on ``tokens`` ``(b, n, D)``: ``(q, k, v)`` if ``queries``, else ``(k, v)``, each
    ``(b, heads, n, head_dim)``. A plain ``nn.Linear`` computes just the rows of its weight that are needed, the
    queries in a tensor of their own (so autograd keeps no more than for the concatenated sequence); another
    module (a LoRA layer, one with hooks) runs whole and its outputs are split."""
    batch, length, _ = tokens.shape
    if type(qkv) is not nn.Linear or has_hooks(qkv):
        out = qkv(tokens).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return out if queries else out[1:]
    width = qkv.out_features // 3

    def part(index: int) -> torch.Tensor:  # each of q, k, v its own tensor: no unbind/stack in backward
        rows = slice(index * width, (index + 1) * width)
        out = F.linear(tokens, qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows])
        return out.reshape(batch, length, heads, -1).transpose(1, 2)

    return tuple(part(i) for i in ((0, 1, 2) if queries else (1, 2)))


def attention(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The attention of timm's ``attn`` (an ``Attention`` or Swin's ``WindowAttention``) on ``q`` ``(..., n, d)``
    and ``k``, ``v`` ``(..., m, d)``, with an additive ``bias`` broadcast to ``(..., n, m)``; returns ``(..., n, d)``.

    As ``attn.fused_attn`` says (``TIMM_FUSED_ATTN``): PyTorch's fused ``scaled_dot_product_attention`` (the bias in
    q's dtype), or timm's explicit ``softmax(q * scale @ k^T + bias) @ v`` through ``attn.attn_drop``: the same ops
    as timm's own forward, so the same dtypes under autocast (timm's explicit path is the faster one in bf16 on
    CPUs, whose flash kernel's backward is slow)."""
    if attn.fused_attn:
        mask = None if bias is None else bias.to(q.dtype)
        dropout = attn.attn_drop.p if attn.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=attn.scale)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return attn.attn_drop(scores.softmax(dim=-1)) @ v


def block_with_prompt_keys(block: Block, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """One timm ``Block`` on the image tokens ``x`` ``(B, N, D)`` (prefix and patch tokens) with ``prompts``
    ``(B, p, D)`` as extra keys and values. Returns ``(B, N, D)``: the block's outputs for the image tokens, as if
    it had run over ``[prefix, prompts, patches]`` (attention does not depend on the order of its keys).

    A prompt tensor that is one set expanded over the batch (no per-sample dropout) has its keys and values
    computed once.
    """
    attn = block.attn
    batch = x.shape[0]
    heads = attn.num_heads
    shared = batch > 1 and prompts.stride(0) == 0
    normed = block.norm1(x)
    q, k, v = project_qkv(attn.qkv, normed, heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    prompt_k, prompt_v = project_qkv(attn.qkv, block.norm1(prompts[:1] if shared else prompts), heads, queries=False)
    prompt_k = attn.k_norm(prompt_k)
    if shared:
        prompt_k, prompt_v = (t.expand(batch, -1, -1, -1) for t in (prompt_k, prompt_v))
    k, v = torch.cat([prompt_k, k], dim=2), torch.cat([prompt_v, v], dim=2)  # the order of keys changes nothing
    return finish_block(block, x, attention(attn, q, k, v).transpose(1, 2), normed)


def finish_block(block: Block, x: torch.Tensor, out: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """The rest of a timm ``Block`` after its attention: ``out`` ``(B, N, heads, head_dim)`` (the attention's
    output per head), ``x`` the block's input and ``normed`` its ``norm1(x)`` -> the block's outputs ``(B, N, D)``
    (attention norm and gate if the block has them, projection, LayerScale, drop-paths and the MLP)."""
    attn = block.attn
    out = out.reshape(x.shape)
    out = getattr(attn, "norm", nn.Identity())(out)
    gate: Optional[nn.Module] = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(normed).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
