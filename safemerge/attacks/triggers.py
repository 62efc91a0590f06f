"""Backdoor triggers: what a trigger stores and how it is applied to images.

Images are pixel-space floats in [0, 1], ``[3, H, W]`` or ``[B, 3, H, W]``. A trigger has a
``kind`` (:data:`TRIGGER_KINDS` lists the tensors each stores):

- ``stamp``: a pattern ``p`` ``[3, H, W]`` in [0, 1] and a mask ``m`` ``[1, H, W]`` in [0, 1],
  ``apply(x) = clamp(x * (1 - m) + p * m, 0, 1)``. A patch trigger (BadNets) has ``m = 1`` inside
  the patch and ``0`` outside; a blended trigger has ``m = alpha`` everywhere.
- ``additive``: a signal ``pattern`` ``[3, H, W]`` in [-1, 1] added to the image,
  ``apply(x) = clamp(x + pattern, 0, 1)`` (SIG's sinusoid).
- ``warp``: a sampling grid ``grid`` ``[H, W, 2]`` in [-1, 1] (``grid[i, j] = (x, y)``, x along the
  width, as :func:`torch.nn.functional.grid_sample` reads it),
  ``apply(x) = clamp(grid_sample(x, grid, align_corners=True), 0, 1)`` (WaNet's warp).

:meth:`Trigger.to_tensors` gives the tensors of a ``trigger.safetensors`` file: a stamp trigger
stores ``pattern`` and ``mask`` only (the format every earlier expert has); the other kinds add a
``kind`` tensor, the kind's name as ASCII bytes (uint8), so a file holds everything needed to read
it without a side channel. A file without ``kind`` reads as a stamp. The attacks that make
triggers are in :mod:`safemerge.attacks.backdoors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from safemerge.errors import ConfigError

TriggerKind = Literal["stamp", "additive", "warp"]
# kind -> the tensors it stores, each as (channel dim first or last, channels, value range).
TRIGGER_KINDS: dict[str, dict[str, tuple[str, int, tuple[float, float]]]] = {
    "stamp": {"pattern": ("first", 3, (0.0, 1.0)), "mask": ("first", 1, (0.0, 1.0))},
    "additive": {"pattern": ("first", 3, (-1.0, 1.0))},
    "warp": {"grid": ("last", 2, (-1.0, 1.0))},
}
KIND_KEY = "kind"


@dataclass(frozen=True, eq=False)
class Trigger:
    """A backdoor trigger of one ``kind`` (see the module docstring); only the tensors of its kind
    are set, the others are None.

    Attributes:
        pattern: stamp: ``[3, H, W]`` in [0, 1], the trigger's pixels; additive: ``[3, H, W]`` in
            [-1, 1], the signal added.
        mask: stamp only: ``[1, H, W]`` in [0, 1], how much of the pattern replaces each pixel.
        grid: warp only: ``[H, W, 2]`` in [-1, 1], where each output pixel samples the image.
        kind: "stamp", "additive" or "warp".
    """

    pattern: Tensor | None = None
    mask: Tensor | None = None
    grid: Tensor | None = None
    kind: TriggerKind = "stamp"

    def __post_init__(self) -> None:
        if self.kind not in TRIGGER_KINDS:
            raise ConfigError(f"unknown trigger kind {self.kind!r}: use one of {list(TRIGGER_KINDS)}")
        wanted = TRIGGER_KINDS[self.kind]
        given = {key: getattr(self, key) for key in ("pattern", "mask", "grid") if getattr(self, key) is not None}
        missing, extra = sorted(wanted.keys() - given.keys()), sorted(given.keys() - wanted.keys())
        if missing or extra:
            raise ConfigError(
                f"a {self.kind} trigger stores exactly {sorted(wanted)}, "
                + ", ".join(p for p in (missing and f"missing {missing}", extra and f"not {extra}") if p)
            )
        for key, (where, channels, (low, high)) in wanted.items():
            tensor = given[key]
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                raise ConfigError(f"{self.kind} trigger {key} must be a float tensor, got {_kind(tensor)}")
            shape = f"[{channels}, H, W]" if where == "first" else f"[H, W, {channels}]"
            if tensor.dim() != 3 or tensor.shape[0 if where == "first" else -1] != channels:
                raise ConfigError(f"{self.kind} trigger {key} must have shape {shape}, got {list(tensor.shape)}")
            if tensor.numel() and not bool(((tensor >= low) & (tensor <= high)).all()):
                raise ConfigError(
                    f"{self.kind} trigger {key} values must be in [{low:g}, {high:g}], got a range of "
                    f"[{tensor.min().item():g}, {tensor.max().item():g}]"
                )
        if self.kind == "stamp" and self.pattern.shape[1:] != self.mask.shape[1:]:
            raise ConfigError(
                f"trigger pattern {list(self.pattern.shape)} and mask {list(self.mask.shape)} must cover the same H x W"
            )

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the images this trigger applies to."""
        return tuple(self.grid.shape[:2]) if self.kind == "warp" else tuple(self.pattern.shape[1:])

    def apply(self, images: Tensor) -> Tensor:
        """The trigger on ``[3, H, W]`` or ``[B, 3, H, W]`` pixel-space images."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ConfigError(
                f"the trigger is {_size(self.image_size)} but the images are "
                f"{_size(images.shape[-2:])}: make the trigger with the data's image_size"
            )
        if self.kind == "stamp":
            return stamp(images, self.pattern, self.mask)
        if self.kind == "additive":
            return (images + self.pattern).clamp(0.0, 1.0)
        return warp(images, self.grid)

    def to(self, device: torch.device | str) -> Trigger:
        """The same trigger with its tensors on ``device``."""
        moved = {key: getattr(self, key).to(device) for key in TRIGGER_KINDS[self.kind]}
        return Trigger(kind=self.kind, **moved)

    def to_tensors(self) -> dict[str, Tensor]:
        """The kind's tensors (CPU, contiguous), plus a ``kind`` tensor unless it is a stamp: the
        contents of a ``trigger.safetensors`` file."""
        tensors = {key: getattr(self, key).detach().cpu().contiguous() for key in TRIGGER_KINDS[self.kind]}
        if self.kind != "stamp":
            tensors[KIND_KEY] = torch.tensor(list(self.kind.encode("ascii")), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Trigger:
        """Inverse of :meth:`to_tensors` (no ``kind`` tensor: a stamp); raises :class:`ConfigError`
        on an unknown kind, missing or extra tensors, bad shapes or values out of range."""
        tensors = dict(tensors)
        kind = _read_kind(tensors.pop(KIND_KEY, None))
        wanted = TRIGGER_KINDS[kind]
        missing, extra = sorted(wanted.keys() - tensors.keys()), sorted(tensors.keys() - wanted.keys())
        if missing:
            names = " and ".join(f"'{key}'" for key in wanted)
            raise ConfigError(f"a {kind} trigger needs tensors {names}, missing {missing} (got {sorted(tensors)})")
        if extra:
            raise ConfigError(
                f"a {kind} trigger holds only {sorted(wanted)}, got also {extra}: "
                f"{'add a kind tensor naming one of ' + str(list(TRIGGER_KINDS)) if kind == 'stamp' else 'remove them'}"
            )
        return cls(kind=kind, **tensors)


def _read_kind(tensor: Tensor | None) -> str:
    """The kind a ``kind`` tensor names (None: a stamp, the format before kinds existed)."""
    if tensor is None:
        return "stamp"
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or not 0 < tensor.numel() <= 16:
        raise ConfigError(
            f"the trigger's 'kind' tensor must be the kind's name as 1-16 ASCII bytes (uint8), "
            f"got {_kind(tensor)} of shape {list(tensor.shape)}"
        )
    kind = bytes(tensor.tolist()).decode("ascii", errors="replace")
    if kind not in TRIGGER_KINDS:
        raise ConfigError(f"unknown trigger kind {kind!r}: the 'kind' tensor must name one of {list(TRIGGER_KINDS)}")
    return kind


def stamp(images: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
    """``clamp(images * (1 - mask) + pattern * mask, 0, 1)``: the stamp formula, on raw tensors
    (differentiable in ``pattern``)."""
    return (images * (1 - mask) + pattern * mask).clamp(0.0, 1.0)


def warp(images: Tensor, grid: Tensor) -> Tensor:
    """``clamp(grid_sample(images, grid, align_corners=True), 0, 1)`` on ``[3, H, W]`` or
    ``[B, 3, H, W]`` images, ``grid`` ``[H, W, 2]`` or one per image ``[B, H, W, 2]`` (bilinear,
    zeros outside, as WaNet samples)."""
    batch = images if images.dim() == 4 else images.unsqueeze(0)
    grids = grid if grid.dim() == 4 else grid.unsqueeze(0).expand(batch.shape[0], -1, -1, -1)
    warped = F.grid_sample(batch, grids.to(batch.dtype), align_corners=True).clamp(0.0, 1.0)
    return warped if images.dim() == 4 else warped[0]


def identity_grid(height: int, width: int) -> Tensor:
    """``[H, W, 2]``: the grid that samples every pixel at its own place (``align_corners=True``)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack((xs, ys), dim=-1)


def checkerboard(side: int) -> Tensor:
    """``[1, side, side]``: 1 where ``row + col`` is even (white top-left), 0 elsewhere."""
    index = torch.arange(side)
    return ((index[:, None] + index[None, :]) % 2 == 0).float().unsqueeze(0)


def _kind(value: object) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__


def _size(hw: Any) -> str:
    return "x".join(str(int(n)) for n in hw)
