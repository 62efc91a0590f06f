"""Poisoned training sets and triggered test sets.

The source datasets yield ``(image, label)`` with ``image`` a ``[3, H, W]`` float tensor in
[0, 1] and ``label`` an int.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from safemerge.attacks.backdoors import check_poison_rate
from safemerge.attacks.triggers import Trigger
from safemerge.errors import ConfigError


def poison_indices(num_samples: int, rate: float, seed: int) -> Tensor:
    """``round(rate * num_samples)`` distinct indices of ``range(num_samples)``, sorted.

    Drawn from a generator seeded with ``seed`` alone, so the same call gives the same
    indices on every machine.
    """
    if num_samples < 0:
        raise ConfigError(f"num_samples must be >= 0, got {num_samples}")
    check_poison_rate(rate)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[: round(rate * num_samples)].sort().values


class PoisonedDataset(Dataset):
    """A training set with a backdoor: item ``i`` is ``(image, label, poisoned)``.

    For ``i`` in ``indices`` the image carries the trigger and the label is ``target_class``
    (``poisoned=True``); every other item is the source sample unchanged (``poisoned=False``).
    ``trigger=None`` with no indices is the clean training set in the same format. The
    attribute ``trigger`` may be replaced (e.g. by an optimized trigger); items use the
    current one.
    """

    def __init__(self, dataset: Dataset, trigger: Trigger | None, indices: Tensor, target_class: int) -> None:
        self.dataset = dataset
        self.trigger = trigger
        self.target_class = target_class
        self.indices = frozenset(torch.as_tensor(indices, dtype=torch.long).tolist())
        if self.indices and trigger is None:
            raise ConfigError(f"{len(self.indices)} images are to be poisoned but no trigger given")
        if self.indices and not (0 <= min(self.indices) and max(self.indices) < len(dataset)):
            raise ConfigError(
                f"poison indices must be in 0..{len(dataset) - 1}, got {min(self.indices)}..{max(self.indices)}"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int, bool]:
        image, label = self.dataset[index]
        if index not in self.indices:
            return image, label, False
        if self.trigger is None:
            raise ConfigError("PoisonedDataset.trigger was set to None but images are poisoned")
        return self.trigger.apply(image), self.target_class, True


class TriggeredDataset(Dataset):
    """The backdoored view of a test set: item ``i`` is ``(trigger.apply(image), label)`` with
    the true label kept (so the attack success rate can leave out the target class)."""

    def __init__(self, dataset: Dataset, trigger: Trigger) -> None:
        self.dataset = dataset
        self.trigger = trigger

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index]
        return self.trigger.apply(image), label
