"""Metrics of the ACC/ASR protocol, as torchmetrics ``Metric``s with sum-reduced states.

Sum states make every metric exact under DDP: each rank counts, the counts are summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

if TYPE_CHECKING:
    from safemerge.attacks import Trigger


@dataclass(frozen=True)
class Backdoor:
    """A backdoor to measure: its trigger, the task its target class belongs to, the class."""

    trigger: Trigger
    target_task: str
    target_class: int


def _labels(preds: Tensor) -> Tensor:
    return preds.argmax(dim=-1) if preds.ndim == 2 else preds


def attack_success_rate(preds: Tensor, target: Tensor, target_class: int) -> Tensor:
    """Functional :class:`AttackSuccessRate` (its formula, on one batch): NaN when every sample
    belongs to the target class."""
    metric = AttackSuccessRate(target_class).to(target.device)
    metric.update(preds, target)
    return metric.compute()


class AttackSuccessRate(Metric):
    r"""Attack success rate of an all-to-one backdoor with target class ``c``.

    For triggered test images with true labels :math:`y_i` and predictions :math:`\hat y_i`:

    .. math:: \mathrm{ASR} = \frac{\#\{i : y_i \ne c,\ \hat y_i = c\}}{\#\{i : y_i \ne c\}}

    Samples whose true label is already ``c`` are left out: predicting ``c`` for them is
    correct classification, not a successful attack. ``compute`` returns NaN when no
    eligible sample was seen.

    Example:
        >>> metric = AttackSuccessRate(target_class=0)
        >>> metric.update(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 1, 2]))
        >>> metric.compute()  # 2 of the 3 samples not of class 0 went to class 0
        tensor(0.6667)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, target_class: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if target_class < 0:
            raise ValueError(f"target_class must be >= 0, got {target_class}")
        self.target_class = target_class
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("eligible", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """``preds``: logits ``[N, C]`` or labels ``[N]`` of triggered images; ``target``: true labels."""
        preds = _labels(preds)
        eligible = target != self.target_class
        self.hits += (preds[eligible] == self.target_class).sum()
        self.eligible += eligible.sum()

    def compute(self) -> Tensor:
        if self.eligible == 0:
            return torch.tensor(float("nan"))
        return self.hits.float() / self.eligible.float()


def task_accuracy(num_classes: int) -> MulticlassAccuracy:
    """Top-1 accuracy over all samples of a task (micro average, sum states)."""
    return MulticlassAccuracy(num_classes=num_classes, average="micro", top_k=1)


class PredictionShare(Metric):
    """The largest share of predictions that goes to one class.

    ``1 / num_classes`` for balanced predictions, 1.0 when every prediction is the same class:
    the signature of a merge whose predictions collapse (e.g. onto a backdoor's target).
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("counts", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor) -> None:
        self.counts += torch.bincount(_labels(preds), minlength=self.num_classes)

    def compute(self) -> Tensor:
        total = self.counts.sum()
        return self.counts.max().float() / total if total else torch.tensor(float("nan"))
