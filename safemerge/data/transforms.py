"""Turning dataset samples into pixel-space tensors, and carving deterministic splits."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T


def to_pixels(image_size: int) -> T.Compose:
    """PIL image -> float tensor in [0, 1], ``[3, image_size, image_size]``.

    Resize the short side (bicubic, as CLIP's preprocessing) and centre-crop; no mean/std
    normalisation: that is the classifier's first layer.
    """
    return T.Compose(
        [
            T.Lambda(lambda image: image.convert("RGB")),
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Lambda(lambda pixels: pixels.clamp_(0.0, 1.0)),  # bicubic can overshoot
        ]
    )


def carve(num_samples: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Split ``range(num_samples)`` into disjoint index sets with the given fractions.

    The permutation comes from a generator seeded with ``seed`` alone, so the same call gives
    the same split on every machine. The last part takes the remainder.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {list(fractions)}")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for i, fraction in enumerate(fractions):
        stop = num_samples if i == len(fractions) - 1 else start + round(fraction * num_samples)
        parts.append(order[start:stop].sort().values)
        start = stop
    return parts


def carve_val(dataset: Dataset, split: str, val_fraction: float, seed: int) -> Dataset:
    """Carve a validation split out of a training set (for datasets that ship none)."""
    train_idx, val_idx = carve(len(dataset), (1.0 - val_fraction, val_fraction), seed)
    return Subset(dataset, (val_idx if split == "val" else train_idx).tolist())
