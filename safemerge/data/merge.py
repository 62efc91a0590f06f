"""Data of a merge: unlabeled adaptation batches of every task, and the evaluation views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, get_worker_info

from safemerge.data.datamodule import build_split, evaluation_views
from safemerge.data.registry import SPLITS, Split, Task, get_task
from safemerge.errors import ConfigError
from safemerge.seeding import seeded_generator


class AdaptationStream(IterableDataset):
    """``steps`` batches, each ``{task: images}`` with ``batch_size`` images per task.

    The global batch of every step is drawn from a generator seeded by ``seed`` and the task
    (epochs of seeded permutations), the same in every process; a process keeps its share
    ``[rank::world_size]``. So a run on N processes sees exactly the batches of a
    single-process run with the same global batch size. With dataloader workers, worker
    ``w`` materialises the steps ``start + w, start + w + W, ...`` (the loader interleaves them
    back in order). Labels are dropped: adaptation is unsupervised.

    A resumed merge starts at ``start`` (its completed steps): the permutations are drawn from
    step 0 (indices only, no image is loaded), so step ``s`` gets the batch of an uninterrupted
    run. The length stays ``steps``, the schedule's, which is what Lightning counts the resumed
    epoch against.
    """

    def __init__(
        self,
        datasets: dict[str, Dataset],
        batch_size: int,
        steps: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(
                f"the adaptation batch size ({batch_size} per task) must be divisible by the number "
                f"of processes ({world_size}) so every process gets the same share"
            )
        self.datasets, self.batch_size, self.steps, self.start = datasets, batch_size, steps, start
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        orders = {task: self._indices(task, len(ds)) for task, ds in self.datasets.items()}
        for step in range(self.steps):
            indices = {task: [next(order) for _ in range(self.batch_size)] for task, order in orders.items()}
            if step >= self.start and (step - self.start) % workers == worker:
                yield {
                    task: torch.stack([self.datasets[task][i][0] for i in idx[self.rank :: self.world_size]])
                    for task, idx in indices.items()
                }

    def _indices(self, task: str, size: int) -> Iterator[int]:
        generator = seeded_generator(self.seed, task)
        while True:
            yield from torch.randperm(size, generator=generator).tolist()


@dataclass
class MergePlan:
    """What a merge's data serves, given by the merge module (``MergeModule.data_plan``): its
    tasks (in order), the backdoors to measure, the adaptation steps and their seed, and
    ``start``, read when the adaptation stream is made: the steps already done (a resumed merge's)."""

    tasks: Sequence[str]
    backdoors: Sequence
    steps: int
    seed: int
    start: Callable[[], int] = lambda: 0


class MergeDataModule(L.LightningDataModule):
    """Adaptation batches and evaluation data of a merge.

    The tasks, the backdoors to measure and the number of adaptation steps come from the
    merge module's :class:`MergePlan` (:meth:`bind`; the CLI binds them). Training batches are ``{task: images}`` (unlabeled, in
    [0, 1]). Validation and test dataloaders are, in order: the clean split of every task (in
    the module's task order), then, per backdoor, its target task's split with the trigger on
    every image (true labels kept, for ASR).

    Args:
        root: folder with the datasets of real tasks; unused by built-in tasks.
        download: let torchvision download a missing dataset into ``root``.
        adaptation_split: the split whose images (without labels) the learned methods adapt
            on. ``val`` keeps the test split unseen; ``test`` is the test-time-adaptation
            protocol of AdaMerging and DAM.
        batch_size: adaptation images per task per step, over all processes (reference: 16).
        eval_batch_size: batch size of validation and test.
        num_workers: dataloader worker processes.
        image_size: side of the square images; linked from the model by the CLI.
        split_seed: seed of carved splits; keep it equal to the experts' so test splits match.
        adaptation_limit: None, or adapt on only the first N images of each task's adaptation
            split (few-shot adaptation).
    """

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        adaptation_split: Split = "val",
        batch_size: int = 16,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        image_size: int = 224,
        split_seed: int = 0,
        adaptation_limit: int | None = None,
    ) -> None:
        super().__init__()
        if adaptation_split not in SPLITS:
            raise ConfigError(f"adaptation_split must be one of {', '.join(SPLITS)}; got {adaptation_split!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if adaptation_limit is not None and adaptation_limit < 0:
            raise ConfigError(f"adaptation_limit must be >= 0 (images per task), got {adaptation_limit}")
        self.adaptation_limit = adaptation_limit
        self.root, self.download, self.adaptation_split = root, download, adaptation_split
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.image_size, self.split_seed = image_size, split_seed
        self.tasks: list[Task] | None = None
        self._splits: dict[tuple[str, Split], Dataset] = {}

    def bind(self, plan: MergePlan) -> None:
        """Serve the merge ``plan`` describes."""
        self.plan = plan
        self.tasks = [get_task(name) for name in plan.tasks]
        self.backdoors, self.steps, self.seed = list(plan.backdoors), plan.steps, plan.seed

    def _bound(self) -> list[Task]:
        if self.tasks is None:
            raise ConfigError(
                "the merge data serves a merge: bind it to the merge module's plan first "
                "(datamodule.bind(model.data_plan()); the CLI does this)"
            )
        return self.tasks

    def split(self, task: Task, split: Split) -> Dataset:
        key = (task.name, split)
        if key not in self._splits:
            self._splits[key] = build_split(
                task, split, root=self.root, image_size=self.image_size, download=self.download, seed=self.split_seed
            )
        return self._splits[key]

    def adaptation_set(self, task: Task) -> Dataset:
        """The unlabeled images a learned method or defence adapts on, for one task."""
        dataset = self.split(task, self.adaptation_split)
        if self.adaptation_limit is not None:
            dataset = Subset(dataset, range(min(self.adaptation_limit, len(dataset))))
        return dataset

    def check_inputs(self) -> None:
        """Open every split the merge reads, so missing data fails before anything is written;
        a merge that learns (a learned method or a defence) needs adaptation images of every task."""
        for task in self._bound():
            for split in {self.adaptation_split, "val", "test"}:
                self.split(task, split)
            if self.steps and len(self.adaptation_set(task)) == 0:
                raise ConfigError(
                    f"task {task.name} has no adaptation images (split {self.adaptation_split!r}, adaptation_limit "
                    f"{self.adaptation_limit}): a learned method or defence adapts on unlabeled images of every task"
                )

    def train_dataloader(self) -> DataLoader:
        tasks = self._bound()
        trainer = self.trainer
        start = self.plan.start()  # a resumed merge continues the stream where its learned state stopped
        stream = AdaptationStream(
            {t.name: self.adaptation_set(t) for t in tasks},
            self.batch_size,
            self.steps,
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            start=start,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False)

    def eval_views(self, split: Split) -> list[Dataset]:
        return evaluation_views(self._bound(), self.backdoors, lambda task: self.split(task, split))

    def _eval_loaders(self, split: Split) -> list[DataLoader]:
        return [
            DataLoader(view, batch_size=self.eval_batch_size, num_workers=self.num_workers)
            for view in self.eval_views(split)
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
