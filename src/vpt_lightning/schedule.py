"""The paper's learning-rate schedule: linear warm-up, then cosine decay to 0, stepped per iteration."""

from __future__ import annotations

import math


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup_steps`` steps (step 0 already trains, at ``1 / warmup_steps``;
    the official code's per-epoch schedule spends its whole first epoch at 0), then the factor follows
    ``0.5 * (1 + cos(pi * t))`` with ``t`` going from 0 to 1 over the remaining steps, reaching 0 at the end.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} must be > 0")
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
