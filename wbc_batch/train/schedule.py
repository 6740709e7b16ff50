"""The learning-rate schedule both trainers use: one cycle (warm up, then anneal)."""

from __future__ import annotations

import math


def one_cycle(opt, max_lr: float, total: int, warmup: float):
    """PyTorch's `OneCycleLR` over `total` steps, warming up for the fraction `warmup` of them.

    Where the warm-up would be exactly one step (`--steps 20` at 0.05, 10 classifier steps at
    0.1), PyTorch divides by zero; the warm-up is then halved to under a step, so that the run
    anneals from its first step. Every other length keeps its schedule (and its bytes)."""
    import torch

    if math.isclose(warmup * total, 1.0):
        warmup /= 2
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total,
                                               pct_start=warmup)
