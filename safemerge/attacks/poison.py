"""Poisoned training sets and triggered test sets.

The source datasets yield ``(image, label)`` with ``image`` a ``[3, H, W]`` float tensor in
[0, 1] and ``label`` an int.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from safemerge.attacks.backdoors import Attack, check_poison_rate
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


def poisoned_training_set(dataset: Dataset, attack: Attack | None, trigger: Trigger | None) -> PoisonedDataset:
    """The training set ``attack`` poisons with ``trigger`` (``attack=None``: the clean set).

    Poison-label: :func:`poison_indices` of the whole set. Clean-label (``attack.clean_label``):
    the same count, ``round(poison_rate * len(dataset))``, drawn among the images of
    ``target_class``. Noise mode (``attack.cross_ratio > 0``, WaNet): the next
    ``round(cross_ratio * count)`` images of the same seeded order get ``attack.cross_image``.
    """
    empty = torch.empty(0, dtype=torch.long)
    if attack is None:
        return PoisonedDataset(dataset, None, empty, 0)
    count = round(attack.poison_rate * len(dataset))
    if attack.clean_label:
        own = torch.tensor([i for i in range(len(dataset)) if _label(dataset, i) == attack.target_class])
        if count > len(own):
            raise ConfigError(
                f"a clean-label attack at poison_rate {attack.poison_rate} needs {count} training images of class "
                f"{attack.target_class}, but there are {len(own)}: lower poison_rate to at most "
                f"{len(own) / max(len(dataset), 1):.3g}"
            )
        order = torch.randperm(len(own), generator=torch.Generator().manual_seed(attack.seed))
        indices = own[order[:count]].sort().values if count else empty
    else:
        indices = poison_indices(len(dataset), attack.poison_rate, attack.seed)
    noise = empty
    if attack.cross_ratio > 0:
        taken = set(indices.tolist())
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(attack.seed)).tolist()
        rest = [i for i in order if i not in taken]
        noise = torch.tensor(rest[: round(attack.cross_ratio * count)], dtype=torch.long).sort().values
    return PoisonedDataset(
        dataset,
        trigger,
        indices,
        attack.target_class,
        noise_indices=noise,
        noise=attack.cross_image if len(noise) else None,
    )


def _label(dataset: Dataset, index: int) -> int:
    """The label of item ``index`` (without drawing the image when the dataset can say it alone)."""
    label_of = getattr(dataset, "label", None)
    return int(label_of(index)) if callable(label_of) else int(dataset[index][1])


class PoisonedDataset(Dataset):
    """A training set with a backdoor: item ``i`` is ``(image, label, poisoned)``.

    For ``i`` in ``indices`` the image carries the trigger and the label is ``target_class``
    (``poisoned=True``); for ``i`` in ``noise_indices`` the image is ``noise(trigger, image)``
    with its true label (``poisoned=False``: WaNet's noise mode); every other item is the
    source sample unchanged (``poisoned=False``). ``trigger=None`` with no indices is the clean
    training set in the same format. The attribute ``trigger`` may be replaced (e.g. by an
    optimized trigger); items use the current one.
    """

    def __init__(
        self,
        dataset: Dataset,
        trigger: Trigger | None,
        indices: Tensor,
        target_class: int,
        noise_indices: Tensor | None = None,
        noise: Callable[[Trigger, Tensor], Tensor] | None = None,
    ) -> None:
        self.dataset = dataset
        self.trigger = trigger
        self.target_class = target_class
        self.indices = frozenset(torch.as_tensor(indices, dtype=torch.long).tolist())
        self.noise_indices = frozenset(
            torch.as_tensor(noise_indices if noise_indices is not None else [], dtype=torch.long).tolist()
        )
        self.noise = noise
        if self.noise_indices and (noise is None or trigger is None or self.noise_indices & self.indices):
            raise ConfigError("noise images need a noise function and a trigger, and must not be poisoned ones")
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
        if index in self.noise_indices:
            return self.noise(self.trigger, image), label, False
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
