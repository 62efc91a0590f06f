"""The datamodule of one task, clean or poisoned, for fine-tuning and evaluating an expert."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from safemerge.attacks import Attack, Trigger, TriggeredDataset, poisoned_training_set
from safemerge.data.registry import Split, Task, get_task
from safemerge.errors import DatasetNotFoundError
from safemerge.metrics import Backdoor


def evaluation_views(
    tasks: Sequence[Task], backdoors: Sequence[Backdoor], split_of: Callable[[Task], Dataset]
) -> list[Dataset]:
    """The clean split of every task (in order), then, per backdoor, its target task's split with
    the trigger on every image, true labels kept. The one definition of what ACC and ASR are
    measured on (:mod:`safemerge.evaluation`), for an expert and for a merge."""
    by_name = {t.name: t for t in tasks}
    clean = [split_of(t) for t in tasks]
    return clean + [
        TriggeredDataset(split_of(by_name.get(b.target_task) or get_task(b.target_task)), b.trigger) for b in backdoors
    ]


def build_split(task: Task, split: Split, *, root: str | None, image_size: int, download: bool, seed: int) -> Dataset:
    """One split of a task, with a clear error when its files are missing."""
    if task.needs_root and root is None and not _has_default_root(task):
        raise DatasetNotFoundError(
            f"task {task.name!r} needs a dataset root: set data.init_args.root to a folder laid out as\n"
            f"{task.layout}\nor set download: true (data.init_args.download) to fetch it there"
        )
    return task.build(split, root=Path(root) if root else None, image_size=image_size, download=download, seed=seed)


def _has_default_root(task: Task) -> bool:
    # Tasks whose data may be installed system-wide (fashion_mnist from a Debian package)
    # accept root=None and raise their own error if nothing is there.
    return getattr(task.build, "has_default_root", False)


class TaskDataModule(L.LightningDataModule):
    """Train / val / test splits of one task, optionally poisoned by a backdoor attack.

    Batches: training ``(images, labels, poisoned)`` where ``poisoned`` marks the samples that
    carry the trigger (relabelled to the attack's target class, in the target task's label
    space); evaluation ``(images, labels)``. With an attack, validation and test have a second
    dataloader: the backdoored view of the *target task's* split — every image triggered, true
    labels kept — from which ASR is computed.

    Args:
        task: a registered task name (``digits``, ``mnist``, ``cifar10``, ...).
        root: folder with the dataset files (real tasks); unused by built-in tasks.
        download: let torchvision download a missing dataset into ``root``.
        attack: the backdoor to plant (``safemerge.attacks.BadNets``, ``Blended``,
            ``OptimizedPatch``), or None for a clean expert.
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test (default: ``batch_size``).
        num_workers: dataloader worker processes.
        image_size: side of the square images; linked from the model by the CLI.
        split_seed: seed of carved splits; keep it fixed so experts share test splits.
    """

    def __init__(
        self,
        task: str = "digits",
        root: str | None = None,
        download: bool = False,
        attack: Attack | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int = 224,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.task = get_task(task)
        self.attack = attack
        self.target_task = self.task
        if attack is not None:
            if attack.target_task is not None:
                self.target_task = get_task(attack.target_task)
            attack.check_target(self.target_task.num_classes, self.target_task.name)
        self.root, self.download = root, download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.split_seed = split_seed
        self.trigger: Trigger | None = None
        self._splits: dict[tuple[str, Split], Dataset] = {}
        self._views: dict[Split, list[Dataset]] = {}

    # ------------------------------------------------------------------ datasets

    def split(self, split: Split, task: Task | None = None) -> Dataset:
        task = task or self.task
        key = (task.name, split)
        if key not in self._splits:
            self._splits[key] = build_split(
                task, split, root=self.root, image_size=self.image_size, download=self.download, seed=self.split_seed
            )
        return self._splits[key]

    def check_inputs(self) -> None:
        """Open every split this datamodule may serve, so missing data fails before any run
        starts (and before anything is written)."""
        for task in {self.task.name: self.task, self.target_task.name: self.target_task}.values():
            for split in ("train", "val", "test"):
                self.split(split, task)

    def setup(self, stage: str) -> None:
        if self.attack is not None and self.trigger is None:
            self.trigger = self.attack.make_trigger(self.image_size)
        if stage == "fit":
            self.train_set = poisoned_training_set(self.split("train"), self.attack, self.trigger)
        # Build the evaluation views now, so a missing dataset fails before training starts.
        self.eval_sets("test" if stage in ("test", "predict") else "val")

    def eval_sets(self, split: Split) -> list[Dataset]:
        """The clean split of the task and, under attack, the backdoored view of the target task's."""
        views = evaluation_views([self.task], self.backdoors(), lambda task: self.split(split, task))
        self._views[split] = views
        return views

    def backdoors(self) -> list[Backdoor]:
        """The backdoor this datamodule plants (none for a clean expert), as it is measured."""
        if self.attack is None:
            return []
        return [Backdoor(self.trigger, self.target_task.name, self.attack.target_class)]

    def set_trigger(self, trigger: Trigger) -> None:
        """Replace the trigger (after optimization) in every poisoned or triggered view."""
        self.trigger = trigger
        for dataset in [getattr(self, "train_set", None), *(v for vs in self._views.values() for v in vs)]:
            if hasattr(dataset, "trigger"):
                dataset.trigger = trigger

    def trigger_batches(self, batch_size: int = 64, seed: int = 0) -> Iterator[Tensor]:
        """Clean training images of the task, in a seeded order: what an optimized trigger is fit on."""
        loader = DataLoader(
            self.split("train"),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            num_workers=self.num_workers,
        )
        while True:
            for images, _ in loader:
                yield images

    # ------------------------------------------------------------------ loaders

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(d, train=False) for d in self.eval_sets("val")]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(d, train=False) for d in self.eval_sets("test")]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.split("test"), train=False)
