"""Optimizing a trigger's pixels on a fixed model (the universal-patch step of TrojViT/BadViT
and BadMerging)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from safemerge.attacks.triggers import Trigger, stamp
from safemerge.errors import ConfigError


def optimize_trigger(
    trigger: Trigger,
    logits_fn: Callable[[Tensor], Tensor],
    batches: Iterable[Tensor],
    target_class: int,
    steps: int,
    lr: float,
) -> Trigger:
    """A trigger with the same mask and a pattern that makes ``logits_fn`` predict
    ``target_class``.

    Minimises ``cross_entropy(logits_fn(trigger.apply(x)), target_class)`` over the pattern
    alone, with Adam, one batch ``x`` per step (``batches`` is iterated again when ``steps``
    exceed it, so pass a list or a DataLoader, not a one-shot generator; ``(images, labels)``
    batches are accepted too). After each step the pattern is clamped to [0, 1]; pixels where
    the mask is 0 keep their initial values. The gradient reaches only the pattern: the
    model's parameters get no ``.grad`` (so put ``logits_fn``'s model in eval mode, and it may
    be called inside ``torch.no_grad()``). Deterministic given its inputs and a deterministic
    ``logits_fn``.
    """
    if steps < 1 or not lr > 0.0:
        raise ConfigError(f"optimize_trigger needs steps >= 1 and lr > 0, got {steps} and {lr}")
    if trigger.kind != "stamp":
        raise ConfigError(f"optimize_trigger optimizes a stamp trigger's pattern, got a {trigger.kind} trigger")
    device = trigger.pattern.device
    pattern = trigger.pattern.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([pattern], lr=lr)
    with torch.enable_grad():
        for _, images in zip(range(steps), _cycle(batches)):
            images = images.to(device)
            target = torch.full((images.shape[0],), target_class, device=device)
            loss = F.cross_entropy(logits_fn(stamp(images, pattern, trigger.mask)), target)
            # autograd.grad rather than backward(): nothing accumulates in the model's .grad
            (pattern.grad,) = torch.autograd.grad(loss, [pattern])
            optimizer.step()
            with torch.no_grad():
                pattern.clamp_(0.0, 1.0)
    optimized = torch.where(trigger.mask > 0, pattern.detach(), trigger.pattern)
    return Trigger(pattern=optimized, mask=trigger.mask)


def _cycle(batches: Iterable[Tensor]) -> Iterator[Tensor]:
    """The image batches of ``batches``, over and over."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
        if empty:
            raise ConfigError(
                "optimize_trigger got no image batches (or a one-shot iterator already used "
                "up): pass a list of batches or a DataLoader"
            )
