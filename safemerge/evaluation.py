"""Evaluation of an image tower on several tasks: clean ACC and ASR per backdoor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from safemerge.attacks import Trigger
from safemerge.data.registry import Split, Task
from safemerge.metrics import AttackSuccessRate, task_accuracy
from safemerge.models import CLIPModel, ImageClassifier, cached_task_heads


@dataclass(frozen=True)
class Backdoor:
    """A backdoor to measure: its trigger, the task its target class belongs to, the class."""

    trigger: Trigger
    target_task: str
    target_class: int


def classifier_for(clip: CLIPModel, tasks: Sequence[Task]) -> ImageClassifier:
    """The classifier of ``clip``'s image tower with a zero-shot head per task."""
    return ImageClassifier(clip.visual, cached_task_heads(clip, tasks), clip.mean, clip.std).eval()


@torch.no_grad()
def evaluate(
    classifier: ImageClassifier,
    tasks: Sequence[Task],
    backdoors: Sequence[Backdoor] = (),
    *,
    tower_state: Mapping[str, Tensor] | None = None,
    split: Split = "test",
    image_size: int = 32,
    batch_size: int = 500,
    split_seed: int = 0,
) -> dict[str, dict[str, float | None]]:
    """``{task: {"accuracy", "asr", "target_rate"}}`` for the tower (``tower_state`` loaded first).

    ASR follows the protocol: the trigger on every test image of the target task, target-class
    samples left out, the target task's head. ``target_rate`` is the same share measured on the
    *untriggered* images: a merge that sends everything to the target class has a high ASR and
    an equally high target rate, which is collapse, not backdoor succession. With several
    backdoors on one task, the means; both None for a task no backdoor targets.
    """
    if tower_state is not None:
        classifier.tower.load_state_dict(tower_state)
    device = next(classifier.parameters()).device
    results: dict[str, dict[str, float | None]] = {}
    for task in tasks:
        dataset = task.build(split, root=None, image_size=image_size, download=False, seed=split_seed)
        accuracy = task_accuracy(task.num_classes).to(device)
        attacks = [b for b in backdoors if b.target_task == task.name]
        rates = [AttackSuccessRate(b.target_class).to(device) for b in attacks]
        clean_rates = [AttackSuccessRate(b.target_class).to(device) for b in attacks]
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            images, labels = images.to(device), labels.to(device)
            logits = classifier(images, task.name)
            accuracy.update(logits, labels)
            for backdoor, rate, clean_rate in zip(attacks, rates, clean_rates):
                rate.update(classifier(backdoor.trigger.to(device).apply(images), task.name), labels)
                clean_rate.update(logits, labels)
        results[task.name] = {
            "accuracy": float(accuracy.compute()), "asr": _mean(rates), "target_rate": _mean(clean_rates),
        }
    return results


def _mean(metrics: Sequence[AttackSuccessRate]) -> float | None:
    return sum(float(m.compute()) for m in metrics) / len(metrics) if metrics else None
