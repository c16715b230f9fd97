"""Prompt configuration and the learnable prompt tokens of VPT (paper §3.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from .dataclass_config import DataclassConfig, number

#: where prompts enter (the paper's prompt-location ablation, §4.3 and Fig. 5, and the official ``vit_ablations.py``)
LOCATIONS = ("prepend", "add", "add1", "prepend_pixel", "concat_channel", "pad")
#: locations that prompt the input image only (pixel space): VPT-Shallow, no dropout, no projection
INPUT_LOCATIONS = ("concat_channel", "pad")
#: locations whose prompts are tokens of the sequence (the only ones ``pool=prompt`` can read)
TOKEN_LOCATIONS = ("prepend", "prepend_pixel")
#: which outputs become the pooled feature (paper Fig. 8), besides ``None`` (the backbone family's own default)
POOLS = ("token", "image", "prompt", "all")
#: what normalises the pooled feature: the backbone's final norm(s), or a fresh parameter-free LayerNorm (MAE)
POOL_NORMS = ("final", "fresh")
#: ``prompt.kv_only``: ``auto`` = prompts enter only as keys and values of attention in every block whose prompt
#: outputs nothing reads (exact); ``false`` = every block runs over prompts and image tokens alike (the official way)
KV_ONLY = ("auto", "false")

DepthSpec = Union[None, int, Sequence[int]]


@dataclass
class PromptConfig(DataclassConfig):
    """What prompts to learn and where to put them (the ``prompt`` config group).

    Attributes:
        num_tokens: prompt length p per prompted block; 0 disables prompts (a linear probe).
        deep: VPT-Deep (a new prompt set at every prompted block) or VPT-Shallow (one set, inserted once).
        location: where prompts enter (the paper's prompt-location ablation; the official names in brackets):
            ``prepend`` (default): ``num_tokens`` tokens between the prefix tokens and the patch tokens;
            ``add``: one learnable vector per token of the sequence (prefix and patch tokens) added to it, so
            ``num_tokens`` only switches prompts on; ``add1`` (``add-1``): one vector added to every token;
            ``prepend_pixel``: a learnable 3 x P x (P * num_tokens) pixel strip, patch-embedded by the frozen
            patch embedding and prepended without position embedding (shallow only);
            ``concat_channel`` (``below``): ``num_tokens`` extra input channels, with a trainable copy of the
            patch embedding widened to them (shallow only); ``pad``: a learnable border of ``num_tokens`` pixels
            around the image, the model resized to the padded image (shallow only).
        dropout: dropout on the prompt tokens before insertion (0.1 in the paper's VPT-Deep VTAB runs); token
            locations only (the official code applies none to pixel prompts).
        depth: which blocks get prompts. ``None``: every block (deep) or block 0 (shallow); an int ``k``: the
            first k blocks (deep) or block k (shallow: insert once, later); a list: those block indices.
            Blocks that get no new prompts pass the previous prompt outputs on, as in the official code.
        project: if > 0, prompts live in this smaller dimension and a linear layer maps them to the width.
        init: ``xavier_uniform`` (the official init, uniform(-v, v), v = sqrt(6 / (3 * ph * pw + dim)))
            or ``zeros``.
        pool: the pooled feature (the paper's output ablation): ``None`` = the backbone family's own default
            (for ViTs timm's ``global_pool``, prompt outputs left out), ``token`` = the class token, ``image`` =
            the mean of the image (patch) tokens, ``prompt`` = the mean of the prompt tokens, ``all`` = the mean
            of prompt and image tokens (class and register tokens left out, as the official ``imgprompt_pool``).
            Each family accepts the values that apply to it.
        pool_norm: ``final`` = the backbone's final norm(s) as pretrained (timm's ``norm`` / ``fc_norm``);
            ``fresh`` = skip them and standardise the pooled vector with a fresh, frozen LayerNorm (weight 1,
            bias 0), as the official MAE code.
        kv_only: ``auto`` (default): a block whose prompt outputs are thrown away (the next block replaces them
            with its own prompts, or it is the last block and the pooled feature leaves them out) lets its prompts
            in only as keys and values of attention: queries, projection and MLP run over the image tokens alone.
            The outputs are the same (up to float rounding) at a cost that hardly grows with the prompt length.
            ``false``: every block runs over prompts and image tokens alike, as the official code.
    """

    num_tokens: int = 10
    deep: bool = True
    location: str = "prepend"
    dropout: float = 0.0
    depth: Any = None  # DepthSpec: None, an int or a list of ints (checked below)
    project: int = -1
    init: str = "xavier_uniform"
    pool: Optional[str] = None
    pool_norm: str = "final"
    kv_only: Any = "auto"  # "auto" or false (YAML's false is a bool: both spellings are taken)

    group = "prompt"

    def __post_init__(self) -> None:
        self.num_tokens = number(
            "prompt.num_tokens", self.num_tokens, "an integer >= 0 (0 = no prompts)", lambda v: v >= 0, integer=True
        )
        if not isinstance(self.deep, bool):
            raise ValueError(f"prompt.deep={self.deep!r} must be true (VPT-Deep) or false (VPT-Shallow)")
        if self.location not in LOCATIONS:
            raise ValueError(f"prompt.location={self.location!r} is not one of {list(LOCATIONS)}")
        if self.pool is not None and self.pool not in POOLS:
            raise ValueError(f"prompt.pool={self.pool!r} is not null (the backbone's default) or one of {list(POOLS)}")
        if self.pool_norm not in POOL_NORMS:
            raise ValueError(f"prompt.pool_norm={self.pool_norm!r} is not one of {list(POOL_NORMS)}")
        if self.kv_only is False or str(self.kv_only).lower() == "false":
            self.kv_only = "false"
        if self.kv_only not in KV_ONLY:
            raise ValueError(
                f"prompt.kv_only={self.kv_only!r} is not one of ['auto', false] (auto: prompts as keys and values "
                "wherever that is exact; false: the official path over prompts and image tokens)"
            )
        self.dropout = number("prompt.dropout", self.dropout, "a number in [0, 1)", lambda v: 0 <= v < 1)
        if self.init not in ("xavier_uniform", "zeros"):
            raise ValueError(f"prompt.init={self.init!r} is not one of ['xavier_uniform', 'zeros']")
        if self.project is None:
            self.project = -1
        self.project = number(
            "prompt.project", self.project, "-1 (off) or a positive dimension", lambda v: v == -1 or v > 0, True
        )
        valid_depth = "null, an integer or a list of block indices"
        if isinstance(self.depth, (str, int, float)):
            self.depth = number("prompt.depth", self.depth, valid_depth, lambda v: True, integer=True)
        elif self.depth is not None:
            self.depth = [number("prompt.depth", i, valid_depth, lambda v: True, integer=True) for i in self.depth]
            if not self.depth:
                raise ValueError("prompt.depth=[] names no block; use null for the default or num_tokens=0")
            if len(set(self.depth)) != len(self.depth):
                raise ValueError(f"prompt.depth={self.depth} repeats a block index")
            if not self.deep and len(self.depth) != 1:
                raise ValueError(
                    f"prompt.depth={self.depth} lists several blocks but prompt.deep=false (VPT-Shallow inserts "
                    "prompts once); give one block index or set prompt.deep=true"
                )
        if self.enabled:
            self._check_location()

    def _check_location(self) -> None:
        where = f"prompt.location={self.location!r}"
        if self.location in ("prepend_pixel", *INPUT_LOCATIONS):
            if self.deep:
                raise ValueError(f"{where} prompts the input image once: set prompt.deep=false (tuning=vpt_shallow)")
            if self.project > 0:
                raise ValueError(f"{where} has pixel prompts, which are not projected: set prompt.project=-1")
            if self.dropout > 0:
                raise ValueError(f"{where} has pixel prompts, which get no dropout: set prompt.dropout=0")
        if self.location in INPUT_LOCATIONS and self.depth not in (None, 0):
            raise ValueError(f"prompt.depth={self.depth} with {where}: input prompts enter before block 0 only")
        if self.pool == "prompt" and self.location not in TOKEN_LOCATIONS:
            raise ValueError(
                f"prompt.pool='prompt' with {where}: only {list(TOKEN_LOCATIONS)} add prompt tokens to pool"
            )

    @property
    def enabled(self) -> bool:
        return self.num_tokens > 0

    @property
    def adds_tokens(self) -> bool:
        """Whether the prompts are extra tokens of the sequence (``num_tokens`` of them)."""
        return self.enabled and self.location in TOKEN_LOCATIONS

    def block_indices(self, num_blocks: int) -> List[int]:
        """The sorted indices of the blocks that receive new prompts, validated against ``num_blocks``."""
        if not self.enabled:
            return []
        if self.depth is None:
            indices = list(range(num_blocks)) if self.deep else [0]
        elif isinstance(self.depth, int):
            if self.deep:
                if not 1 <= self.depth <= num_blocks:
                    raise ValueError(
                        f"prompt.depth={self.depth} (the first k blocks) must be in [1, {num_blocks}] for a "
                        f"backbone with {num_blocks} blocks"
                    )
                indices = list(range(self.depth))
            else:
                indices = [self.depth]
        else:
            indices = sorted(self.depth)
        bad = [i for i in indices if not 0 <= i < num_blocks]
        if bad:
            raise ValueError(f"prompt.depth names block(s) {bad}, but the backbone has blocks 0..{num_blocks - 1}")
        return indices


class Prompts(nn.Module):
    """The learnable prompt tokens: one ``(num_tokens, dim)`` set per prompted block.

    ``forward(i, batch_size)`` returns the (projected, dropped-out) prompts of the i-th prompted block, expanded
    to the batch. Parameters are stored as one tensor ``tokens`` of shape ``(num_sets, num_tokens, prompt_dim)``;
    ``num_tokens`` defaults to ``config.num_tokens`` (``add`` / ``add1`` give their own). ``init_dim`` replaces the
    prompt width in the Xavier bound (Swin: the first stage's width for every stage).
    """

    def __init__(
        self,
        config: PromptConfig,
        num_sets: int,
        dim: int,
        patch_size: Sequence[int],
        num_tokens: Optional[int] = None,
        init_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.config = config
        prompt_dim = config.project if config.project > 0 else dim
        length = config.num_tokens if num_tokens is None else num_tokens
        self.tokens = nn.Parameter(torch.zeros(num_sets, length, prompt_dim))
        if config.project > 0:
            self.proj = nn.Linear(prompt_dim, dim)
            nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
            nn.init.zeros_(self.proj.bias)
        else:
            self.proj = nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        if config.init == "xavier_uniform":
            # as the official code: Xavier-uniform as if the prompt were a patch-embedding output
            bound = xavier_bound(patch_size, init_dim or prompt_dim)
            nn.init.uniform_(self.tokens, -bound, bound)

    @property
    def num_sets(self) -> int:
        return self.tokens.shape[0]

    def forward(self, index: int, batch_size: int) -> torch.Tensor:
        # expand first, so that dropout draws a separate mask for each sample (as the official code)
        return self.dropout(self.proj(self.tokens[index]).unsqueeze(0).expand(batch_size, -1, -1))


def xavier_bound(patch_size: Sequence[int], dim: int) -> float:
    """The official prompt init bound v = sqrt(6 / (3 * ph * pw + dim)): Xavier-uniform of a patch embedding."""
    return math.sqrt(6.0 / float(3 * int(patch_size[0]) * int(patch_size[1]) + dim))


__all__ = ["PromptConfig", "Prompts", "LOCATIONS", "POOLS", "POOL_NORMS", "KV_ONLY", "xavier_bound"]
