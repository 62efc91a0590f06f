"""The learning-rate schedule of CLIP fine-tuning and pretraining."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> dict:
    """Linear warm-up over ``warmup_steps`` (at most half the run), then cosine decay to zero
    at ``total_steps``; as a Lightning ``lr_scheduler`` entry stepped every batch."""
    total = max(1, total_steps)
    warmup = min(warmup_steps, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}
