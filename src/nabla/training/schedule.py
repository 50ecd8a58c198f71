"""The learning-rate schedule: linear warmup, then cosine decay to a floor.

Leaves out: restarts and other shapes; the optimizer itself (nabla.training.loop).
"""

from __future__ import annotations

import math


def get_lr(step: int, lr: float, warmup: int, steps: int, min_lr: float | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of `steps`.

    Rises linearly over `warmup` steps to `lr`, then follows half a cosine down
    to `min_lr` (default lr / 10, as in Chinchilla and nanoGPT) at the last step.
    """
    min_lr = lr / 10 if min_lr is None else min_lr
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= steps:
        return min_lr
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
