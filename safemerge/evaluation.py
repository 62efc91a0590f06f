"""The one evaluation path of ACC and ASR: views, metrics, and a loop for scripts.

A merge is evaluated on *views* (:func:`~safemerge.data.datamodule.evaluation_views`): the clean split of every task (in task order), then, per
backdoor, its target task's split with the trigger stamped on every image (true labels kept).
:class:`Evaluation` holds the metrics of one pass over those views (per task accuracy and
top-class share, per backdoor ASR) and turns them into per-task results.
:class:`~safemerge.modules.MergeModule` feeds it from Lightning's evaluation loop (views served
by :class:`~safemerge.data.MergeDataModule`), :func:`evaluate` from a plain loop (scripts).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from safemerge.data.datamodule import evaluation_views
from safemerge.data.registry import Split, Task
from safemerge.metrics import AttackSuccessRate, Backdoor, PredictionShare, task_accuracy
from safemerge.models import CLIPModel, ImageClassifier, cached_task_heads
from safemerge.report import mean_known

__all__ = ["Backdoor", "Evaluation", "classifier_for", "evaluate", "evaluate_backdoors"]


def classifier_for(
    clip: CLIPModel, tasks: Sequence[Task], heads: Mapping[str, Tensor] | None = None
) -> ImageClassifier:
    """The classifier of ``clip``'s image tower with a zero-shot head per task (``heads``: the
    tasks whose experts bring their own)."""
    return ImageClassifier(clip.visual, cached_task_heads(clip, tasks, heads), clip.mean, clip.std).eval()


def _value(metric) -> float | None:
    value = float(metric.compute())
    metric.reset()
    return None if math.isnan(value) else value


class Evaluation(nn.Module):
    """Metrics of one pass over the :func:`evaluation_views` of ``tasks`` and ``backdoors``.

    ASR follows the protocol: the trigger on every image of the target task, target-class
    samples left out (:class:`~safemerge.metrics.AttackSuccessRate`), the target task's head;
    a task attacked by several backdoors reports their mean. All states are sum-reduced, so
    the result is exact under DDP.
    """

    def __init__(self, tasks: Sequence[Task], backdoors: Sequence[Backdoor] = ()) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.backdoors = list(backdoors)
        self.accuracy = nn.ModuleList(task_accuracy(t.num_classes) for t in tasks)
        self.share = nn.ModuleList(PredictionShare(t.num_classes) for t in tasks)
        self.asr = nn.ModuleList(AttackSuccessRate(b.target_class) for b in self.backdoors)
        # The same rate on the clean images: a merge that collapses onto the target class has a
        # high ASR and an equally high target rate, which is collapse, not backdoor succession.
        self.target_rate = nn.ModuleList(AttackSuccessRate(b.target_class) for b in self.backdoors)

    def head(self, view: int) -> str:
        """The task whose head classifies the images of ``view``."""
        num_tasks = len(self.task_names)
        return self.task_names[view] if view < num_tasks else self.backdoors[view - num_tasks].target_task

    def update(self, view: int, logits: Tensor, labels: Tensor) -> None:
        num_tasks = len(self.task_names)
        if view < num_tasks:
            self.accuracy[view].update(logits, labels)
            self.share[view].update(logits)
            for backdoor, rate in zip(self.backdoors, self.target_rate):
                if backdoor.target_task == self.task_names[view]:
                    rate.update(logits, labels)
        else:
            self.asr[view - num_tasks].update(logits, labels)

    def compute(self) -> tuple[dict[str, dict[str, float | None]], list[dict[str, float | None]]]:
        """Per task ``accuracy``, ``share`` (top-class share), ``asr`` and ``target_rate`` (the
        untriggered rate; both None if no backdoor targets the task), and per backdoor its
        ``asr`` and ``target_rate``; the metrics are reset."""
        per_backdoor = [{"asr": _value(a), "target_rate": _value(t)} for a, t in zip(self.asr, self.target_rate)]
        results = {}
        for i, task in enumerate(self.task_names):
            mine = [r for r, b in zip(per_backdoor, self.backdoors) if b.target_task == task]
            results[task] = {
                "accuracy": _value(self.accuracy[i]),
                "share": _value(self.share[i]),
                **{key: mean_known([r[key] for r in mine]) for key in ("asr", "target_rate")},
            }
        return results, per_backdoor


@torch.no_grad()
def evaluate_backdoors(
    classifier: ImageClassifier,
    tasks: Sequence[Task],
    backdoors: Sequence[Backdoor] = (),
    *,
    tower_state: Mapping[str, Tensor] | None = None,
    split: Split = "test",
    image_size: int = 32,
    batch_size: int = 500,
    split_seed: int = 0,
) -> tuple[dict[str, dict[str, float | None]], list[dict[str, float | None]]]:
    """One pass over the views: ``{task: {"accuracy", "asr", "target_rate"}}`` for the tower
    (``tower_state`` loaded first; ``asr`` and ``target_rate`` None for a task no backdoor
    targets), and per backdoor its ``asr`` and ``target_rate``."""
    if tower_state is not None:
        classifier.tower.load_state_dict(tower_state)
    device = next(classifier.parameters()).device
    views = evaluation_views(
        tasks, backdoors, lambda t: t.build(split, root=None, image_size=image_size, download=False, seed=split_seed)
    )
    evaluation = Evaluation(tasks, backdoors).to(device)
    for view, dataset in enumerate(views):
        head = evaluation.head(view)
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            evaluation.update(view, classifier(images.to(device), head), labels.to(device))
    results, per_backdoor = evaluation.compute()
    return {
        task: {key: r[key] for key in ("accuracy", "asr", "target_rate")} for task, r in results.items()
    }, per_backdoor


def evaluate(
    classifier: ImageClassifier, tasks: Sequence[Task], backdoors: Sequence[Backdoor] = (), **options
) -> dict[str, dict[str, float | None]]:
    """The per-task results of :func:`evaluate_backdoors` (same options)."""
    return evaluate_backdoors(classifier, tasks, backdoors, **options)[0]
