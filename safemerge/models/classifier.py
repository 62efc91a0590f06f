"""The classifier of the pixel-space convention: normalise → image tower → frozen head."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ImageClassifier(nn.Module):
    """An image tower with one frozen zero-shot head per task.

    ``forward(images, task)`` takes pixels in [0, 1] (``[B, 3, H, W]``), normalises them with the
    model's mean/std, embeds them with the image tower, L2-normalises, and multiplies by the
    task's head (which carries the logit scale). Only the tower has trainable parameters.
    """

    def __init__(
        self, tower: nn.Module, heads: Mapping[str, Tensor], mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.tower = tower
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.tasks = list(heads)
        for task, head in heads.items():
            self.register_buffer(self._head_name(task), head.detach().clone().float())

    @staticmethod
    def _head_name(task: str) -> str:
        return f"head_{task}"

    def head(self, task: str) -> Tensor:
        if task not in self.tasks:
            raise KeyError(f"no head for task {task!r}; heads: {self.tasks}")
        return getattr(self, self._head_name(task))

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def features(self, images: Tensor, tower: nn.Module | None = None) -> Tensor:
        """Unit-norm image embeddings (of ``tower`` if given, else of this classifier's)."""
        tower = self.tower if tower is None else tower
        return F.normalize(tower(self.normalize(images)), dim=-1)

    def logits(self, features: Tensor, task: str) -> Tensor:
        head = self.head(task)
        return features.to(head.dtype) @ head.T

    def forward(self, images: Tensor, task: str) -> Tensor:
        return self.logits(self.features(images), task)
