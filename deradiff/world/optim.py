"""The optimizer recipe shared by the tiny world's pretraining runs (classifier, VAE, UNet)."""

from __future__ import annotations

from typing import Iterable

import torch


def adamw_one_cycle(params: Iterable[torch.nn.Parameter], lr: float, steps: int, warmup_frac: float,
                    weight_decay: float = 1e-4) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a one-cycle schedule (short warm-up, cosine decay to ~0 by the last step).

    OneCycleLR divides by zero when its warm-up phase rounds to a single step, so the warm-up is at least two
    steps, and runs too short to schedule (smoke tests) keep a constant rate.
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if steps < 4:
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    pct_start = min(0.5, max(warmup_frac, 2.0 / steps))
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
