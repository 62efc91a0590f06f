"""Backdoor triggers: a pattern and a mask, and how they are stamped on images.

A trigger is a pattern ``p`` and a mask ``m`` over the image; applying it to pixel-space images
``x`` (float in [0, 1]) gives ``clamp(x * (1 - m) + p * m, 0, 1)``. A patch trigger has ``m = 1``
inside the patch and ``0`` outside; a blended trigger has ``m = alpha`` everywhere. The attacks
that make triggers are in :mod:`safemerge.attacks.backdoors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from safemerge.errors import ConfigError


@dataclass(frozen=True, eq=False)
class Trigger:
    """A backdoor trigger: ``apply(x) = clamp(x * (1 - mask) + pattern * mask, 0, 1)``.

    Attributes:
        pattern: ``[3, H, W]`` float in [0, 1], the trigger's pixels.
        mask: ``[1, H, W]`` float in [0, 1], how much of the pattern replaces each pixel.
    """

    pattern: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        for key, tensor, channels in (("pattern", self.pattern, 3), ("mask", self.mask, 1)):
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise ConfigError(f"trigger {key} must be a float tensor, got {_kind(tensor)}")
            if tensor.dim() != 3 or tensor.shape[0] != channels:
                raise ConfigError(f"trigger {key} must have shape [{channels}, H, W], got {list(tensor.shape)}")
            if tensor.numel() and not bool(((tensor >= 0) & (tensor <= 1)).all()):
                raise ConfigError(
                    f"trigger {key} values must be in [0, 1], got a range of "
                    f"[{tensor.min().item():g}, {tensor.max().item():g}]"
                )
        if self.pattern.shape[1:] != self.mask.shape[1:]:
            raise ConfigError(
                f"trigger pattern {list(self.pattern.shape)} and mask {list(self.mask.shape)} must cover the same H x W"
            )

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images this trigger applies to."""
        return tuple(self.pattern.shape[1:])

    def apply(self, images: Tensor) -> Tensor:
        """Stamp the trigger on ``[3, H, W]`` or ``[B, 3, H, W]`` pixel-space images."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ConfigError(
                f"the trigger is {_size(self.image_size)} but the images are "
                f"{_size(images.shape[-2:])}: make the trigger with the data's image_size"
            )
        return stamp(images, self.pattern, self.mask)

    def to(self, device: torch.device | str) -> Trigger:
        """The same trigger with its tensors on ``device``."""
        return Trigger(pattern=self.pattern.to(device), mask=self.mask.to(device))

    def to_tensors(self) -> dict[str, Tensor]:
        """``{"pattern", "mask"}`` (CPU, contiguous), e.g. for a safetensors file."""
        return {"pattern": self.pattern.detach().cpu().contiguous(), "mask": self.mask.detach().cpu().contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Trigger:
        """Inverse of :meth:`to_tensors`; raises :class:`ConfigError` on missing keys, bad
        shapes or values outside [0, 1]."""
        missing = sorted({"pattern", "mask"} - set(tensors))
        if missing:
            raise ConfigError(
                f"a trigger needs tensors 'pattern' and 'mask', missing {missing} (got {sorted(tensors)})"
            )
        return cls(pattern=tensors["pattern"], mask=tensors["mask"])


def stamp(images: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
    """``clamp(images * (1 - mask) + pattern * mask, 0, 1)``: the trigger formula, on raw tensors
    (differentiable in ``pattern``)."""
    return (images * (1 - mask) + pattern * mask).clamp(0.0, 1.0)


def checkerboard(side: int) -> Tensor:
    """``[1, side, side]``: 1 where ``row + col`` is even (white top-left), 0 elsewhere."""
    index = torch.arange(side)
    return ((index[:, None] + index[None, :]) % 2 == 0).float().unsqueeze(0)


def _kind(value: object) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__


def _size(hw: Any) -> str:
    return "x".join(str(int(n)) for n in hw)
