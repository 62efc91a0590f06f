"""Tasks built from data that ships inside pip packages, so safemerge runs offline.

``digits``: scikit-learn's handwritten digits (1,797 real 8×8 images, 16 grey levels),
upscaled to the model's image size.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from safemerge.data.tasks import Split, Task
from safemerge.data.templates import TEMPLATES
from safemerge.data.transforms import carve

# Digits has no official split: a fixed, seeded 70/10/20 carve.
DIGITS_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


class SmallImages(Dataset):
    """Low-resolution images upscaled on access to ``[3, image_size, image_size]`` in [0, 1]."""

    def __init__(self, images: Tensor, labels: Tensor, image_size: int) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, h, w], got {tuple(images.shape)}")
        self.images, self.labels, self.image_size = images, labels, image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = F.interpolate(
            self.images[index : index + 1], size=(self.image_size,) * 2, mode="bilinear", align_corners=False
        )[0]
        return image.expand(3, -1, -1).clamp(0.0, 1.0).contiguous(), int(self.labels[index])


def build_digits(split: Split, *, root: Path | None, image_size: int, download: bool, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    parts = dict(zip(DIGITS_FRACTIONS, carve(len(labels), tuple(DIGITS_FRACTIONS.values()), seed)))
    index = parts[split]
    return SmallImages(images[index], labels[index], image_size)


TASKS: tuple[Task, ...] = (
    Task(
        name="digits",
        classnames=tuple(str(digit) for digit in range(10)),
        templates=TEMPLATES["mnist"],
        build=build_digits,
        needs_root=False,
        layout="(built in: scikit-learn's load_digits, no files needed)",
    ),
)
