"""A copy of a module tree that shares every parameter and buffer with the original.

A task's network is built on such a copy of the shared frozen backbone (once per task shape, to read where its
tensors go; for good by a task that cannot be data in the one pass): a tuning method that adds modules to the
backbone (peft's LoRA layers, adapters) or swaps one (``prompt.location='pad'`` resizes the position embedding)
changes the copy's structure only, never the model the other tasks use, while the frozen weights stay in memory once.
"""

from __future__ import annotations

import copy
import itertools

from torch import nn


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the original's own tensor objects (the modules
    are new; the weights are not copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)
