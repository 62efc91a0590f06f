"""Concrete (relaxed Bernoulli) masks over parameter tensors.

A mask has one logit per parameter scalar. During training a sample is
``m = sigmoid((s + log u − log(1 − u)) / temperature)``, ``u ~ U(0, 1)``; afterwards the mask is
fixed as its expectation ``sigmoid(s)``, its sign ``s > 0``, or one sample. Every tensor's mask
is rescaled by ``1 / mean`` so the expected size of the update it gates is kept.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from safemerge.errors import ConfigError

FinalMask = Literal["expected", "discrete", "sample"]
FINAL_MASKS = ("expected", "discrete", "sample")


def check_final_mask(owner: str, kind: str) -> None:
    """A one-line error unless ``kind`` is a way to fix a mask after training."""
    if kind not in FINAL_MASKS:
        raise ConfigError(f"{owner}: final_mask must be expected, discrete or sample; got {kind!r}")


def clamped_mean(mask: Tensor) -> Tensor:
    """``mean(mask)``, at least the dtype's smallest normal number (what a mask is rescaled by)."""
    return mask.mean().clamp_min(torch.finfo(mask.dtype).tiny)


def rescale(mask: Tensor) -> Tensor:
    """``mask / mean(mask)`` (an all-zero mask stays zero)."""
    return mask / clamped_mean(mask)


class ConcreteMask(nn.Module):
    """Mask logits for tensors of the given shapes (one mask entry per scalar)."""

    def __init__(self, shapes: Sequence[torch.Size], temperature: float = 0.5, init_logit: float = 0.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.logits = nn.ParameterList(nn.Parameter(torch.full(tuple(shape), float(init_logit))) for shape in shapes)

    def sample(self, generator: torch.Generator | None = None) -> list[Tensor]:
        """One relaxed sample per tensor, differentiable in the logits."""
        masks = []
        for logits in self.logits:
            noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            noise.logit_(1e-6)  # clamp to [1e-6, 1 − 1e-6], then log u − log(1 − u), in place
            masks.append((logits + noise).div_(self.temperature).sigmoid_())
        return masks

    def expected(self) -> list[Tensor]:
        return [torch.sigmoid(logits) for logits in self.logits]

    def discrete(self) -> list[Tensor]:
        return [(logits > 0).to(logits.dtype) for logits in self.logits]

    def final(self, kind: FinalMask, generator: torch.Generator | None = None) -> list[Tensor]:
        """The mask used after training (not rescaled)."""
        if kind == "expected":
            return self.expected()
        if kind == "discrete":
            return self.discrete()
        check_final_mask("concrete mask", kind)
        return self.sample(generator)


def combine(*masks: Sequence[Tensor]) -> list[Tensor]:
    """The element-wise product of one or more masks, each tensor rescaled to mean 1."""
    return [rescale(p) for p in product(*masks)]


def product(*masks: Sequence[Tensor]) -> list[Tensor]:
    """The element-wise product of one or more masks, not rescaled (one mask: itself). For
    ``MergedEncoder.weights(..., rescale=True)``, which rescales inside its own autograd node."""
    return [torch.stack(parts).prod(0) if len(parts) > 1 else parts[0] for parts in zip(*masks)]


@torch.no_grad()
def mask_statistics(masks: Sequence[Tensor]) -> dict[str, float]:
    """Mean of the (unrescaled) mask values and the fraction of entries below 0.5 (the learned
    merge masks' and the defences' masks')."""
    total = sum(m.numel() for m in masks)
    return {
        "mean": float(sum(m.sum() for m in masks) / total),
        "below_half": float(sum((m < 0.5).sum() for m in masks) / total),
    }
