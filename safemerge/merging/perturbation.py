"""Universal additive perturbations in pixel space: DAM's simulated trigger.

One image-sized ``δ_t`` per task, applied as ``clamp(x + δ_t, 0, 1)`` to pixels in [0, 1] and
kept inside an ℓ∞ budget ``‖δ_t‖∞ ≤ ε`` by projection after every update.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class UniversalPerturbation(nn.Module):
    """Per-task perturbations ``δ_t`` of shape ``[3, image_size, image_size]``, zero-initialised."""

    def __init__(self, tasks: Sequence[str], image_size: int, eps: float) -> None:
        super().__init__()
        if not 0 < eps <= 1:
            raise ValueError(f"the perturbation budget eps is an ℓ∞ bound on pixels in [0, 1]; got {eps}")
        self.eps = eps
        self.tasks = list(tasks)
        self.deltas = nn.ParameterList(nn.Parameter(torch.zeros(3, image_size, image_size)) for _ in tasks)

    def delta(self, task: str) -> Tensor:
        return self.deltas[self.tasks.index(task)]

    def apply(self, images: Tensor, task: str) -> Tensor:
        return (images + self.delta(task)).clamp(0, 1)

    @torch.no_grad()
    def project_(self) -> None:
        """Project every ``δ_t`` back into its ℓ∞ ball."""
        for delta in self.deltas:
            delta.clamp_(-self.eps, self.eps)

    @torch.no_grad()
    def norms(self) -> dict[str, dict[str, float]]:
        return {
            task: {"linf": float(d.abs().max()), "l2": float(d.norm())} for task, d in zip(self.tasks, self.deltas)
        }
