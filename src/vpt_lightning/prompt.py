"""Prompt configuration and the learnable prompt tokens of VPT (spec §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from .dataclass_config import DataclassConfig, number

LOCATIONS = ("prepend", "add")

DepthSpec = Union[None, int, Sequence[int]]


@dataclass
class PromptConfig(DataclassConfig):
    """What prompts to learn and where to put them (the ``prompt`` config group).

    Attributes:
        num_tokens: prompt length p per prompted block; 0 disables prompts (a linear probe).
        deep: VPT-Deep (a new prompt set at every prompted block) or VPT-Shallow (one set, inserted once).
        location: ``prepend`` (between the prefix tokens and the patch tokens, the paper's default) or ``add``
            (added element-wise to the patch tokens; ``num_tokens`` must then be 1 or the number of patches).
        dropout: dropout on the prompt tokens before insertion (0.1 in the paper's VPT-Deep VTAB runs).
        depth: which blocks get prompts. ``None``: every block (deep) or block 0 (shallow); an int ``k``: the
            first k blocks (deep) or block k (shallow: insert once, later); a list: those block indices.
            Blocks that get no new prompts pass the previous prompt outputs on, as in the official code.
        project: if > 0, prompts live in this smaller dimension and a linear layer maps them to the width.
        init: ``xavier_uniform`` (the official init, uniform(-v, v), v = sqrt(6 / (3 * ph * pw + dim)))
            or ``zeros``.
        pool: which output tokens the pooled feature averages; ``None``: the family's default. Each family lists
            the values it accepts (Swin: ``all``, prompts and image tokens, the official code; ``image``).
    """

    num_tokens: int = 10
    deep: bool = True
    location: str = "prepend"
    dropout: float = 0.0
    depth: Any = None  # DepthSpec: None, an int or a list of ints (checked below)
    project: int = -1
    init: str = "xavier_uniform"
    pool: Optional[str] = None

    group = "prompt"

    def __post_init__(self) -> None:
        self.num_tokens = number(
            "prompt.num_tokens", self.num_tokens, "an integer >= 0 (0 = no prompts)", lambda v: v >= 0, integer=True
        )
        if not isinstance(self.deep, bool):
            raise ValueError(f"prompt.deep={self.deep!r} must be true (VPT-Deep) or false (VPT-Shallow)")
        if self.location not in LOCATIONS:
            raise ValueError(f"prompt.location={self.location!r} is not one of {list(LOCATIONS)}")
        self.dropout = number("prompt.dropout", self.dropout, "a number in [0, 1)", lambda v: 0 <= v < 1)
        if self.init not in ("xavier_uniform", "zeros"):
            raise ValueError(f"prompt.init={self.init!r} is not one of ['xavier_uniform', 'zeros']")
        if self.project is None:
            self.project = -1
        self.project = number(
            "prompt.project", self.project, "-1 (off) or a positive dimension", lambda v: v == -1 or v > 0, True
        )
        if self.pool is not None and not isinstance(self.pool, str):
            raise ValueError(f"prompt.pool={self.pool!r} must be null (the backbone family's default) or a name")
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

    @property
    def enabled(self) -> bool:
        return self.num_tokens > 0

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
            raise ValueError(
                f"prompt.depth names block(s) {bad}, but the backbone has blocks 0..{num_blocks - 1}"
            )
        return indices


class Prompts(nn.Module):
    """The learnable prompt tokens: one ``(num_tokens, dim)`` set per prompted block.

    ``forward(i, batch_size)`` returns the (projected, dropped-out) prompts of the i-th prompted block, expanded
    to the batch. Parameters are stored as one tensor ``tokens`` of shape ``(num_sets, num_tokens, prompt_dim)``.
    ``init_dim`` replaces the prompt width in the Xavier bound (Swin: the first stage's width for every stage).
    """

    def __init__(
        self,
        config: PromptConfig,
        num_sets: int,
        dim: int,
        patch_size: Sequence[int],
        init_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.config = config
        prompt_dim = config.project if config.project > 0 else dim
        self.tokens = nn.Parameter(torch.zeros(num_sets, config.num_tokens, prompt_dim))
        if config.project > 0:
            self.proj = nn.Linear(prompt_dim, dim)
            nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
            nn.init.zeros_(self.proj.bias)
        else:
            self.proj = nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        if config.init == "xavier_uniform":
            # as the official code: Xavier-uniform as if the prompt were a patch-embedding output
            fan = init_dim or prompt_dim
            bound = math.sqrt(6.0 / float(3 * int(patch_size[0]) * int(patch_size[1]) + fan))
            nn.init.uniform_(self.tokens, -bound, bound)

    @property
    def num_sets(self) -> int:
        return self.tokens.shape[0]

    def forward(self, index: int, batch_size: int) -> torch.Tensor:
        # expand first, so that dropout draws a separate mask for each sample (as the official code)
        return self.dropout(self.proj(self.tokens[index]).unsqueeze(0).expand(batch_size, -1, -1))


__all__ = ["PromptConfig", "Prompts", "LOCATIONS"]
