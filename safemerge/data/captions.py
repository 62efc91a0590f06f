"""Captioned scenes of the mini domain, for contrastive pretraining of the tiny CLIP."""

from __future__ import annotations

import lightning as L
import open_clip
import torch
from torch.utils.data import DataLoader, Dataset

from safemerge.data.registry import get_task
from safemerge.errors import ConfigError


class CaptionDataModule(L.LightningDataModule):
    """Seeded, freshly rendered (image, caption) pairs; validation is zero-shot classification.

    Training batches are ``(images [B, 3, S, S] in [0, 1], tokens [B, context_length])``: the
    captions are tokenized in the loader workers with open_clip's tokenizer. Validation serves
    the val split of each task in ``eval_tasks`` (one dataloader per task), on which the
    pretraining module measures zero-shot accuracy.

    Args:
        num_samples: scenes per training epoch (each epoch renders new ones: the seed is
            offset by the epoch).
        batch_size: contrastive batch size (negatives per sample = batch_size - 1).
        num_workers: rendering workers.
        image_size: image side, linked from the model by the CLI.
        context_length: tokens per caption; must equal the text tower's.
        digit_fraction: fraction of scenes that show a handwritten digit.
        mention: probability that a caption names each attribute (``shape``, ``colour``,
            ``count``, ``digit``, ``texture``); rarer mentions make that task's zero-shot harder.
            None: :data:`safemerge.data.mini_v1.DEFAULT_MENTION`.
        eval_tasks: tasks whose zero-shot accuracy is measured at validation (default: the
            corpus's tasks).
        seed: seed of the rendered scenes.
        corpus: ``scenes`` (v1: :class:`safemerge.data.mini_v1_captions.CaptionedScenes`, one scene domain)
            or ``domains`` (v2: :class:`safemerge.data.mini_v2.DomainCaptions`, six domains;
            ``digit_fraction`` and ``mention`` do not apply).
    """

    def __init__(
        self,
        num_samples: int = 256_000,
        batch_size: int = 256,
        num_workers: int = 0,
        image_size: int = 32,
        context_length: int = 32,
        digit_fraction: float = 0.3,
        mention: dict[str, float] | None = None,
        eval_tasks: list[str] | None = None,
        eval_batch_size: int = 500,
        seed: int = 0,
        corpus: str = "scenes",
    ) -> None:
        super().__init__()
        from safemerge.data.mini_v1_tasks import mini_task_names
        from safemerge.data.mini_v2 import domain_task_names

        if corpus not in ("scenes", "domains"):
            raise ConfigError(f"corpus must be 'scenes' or 'domains', got {corpus!r}")
        self.corpus = corpus

        self.num_samples, self.batch_size, self.num_workers = num_samples, batch_size, num_workers
        self.image_size, self.context_length = image_size, context_length
        self.digit_fraction, self.mention, self.seed = digit_fraction, mention, seed
        default_tasks = mini_task_names() if corpus == "scenes" else domain_task_names()
        self.eval_tasks = [get_task(name) for name in (eval_tasks or default_tasks)]
        self.eval_batch_size = eval_batch_size
        self._tokenizer = open_clip.SimpleTokenizer(context_length=context_length)

    def _collate(self, samples: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in samples])
        return images, self._tokenizer([caption for _, caption in samples])

    def train_dataloader(self) -> DataLoader:
        from safemerge.data.mini_v1_captions import CaptionedScenes
        from safemerge.data.mini_v2 import DomainCaptions

        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        seed = self.seed + 1000 * epoch
        scenes: Dataset = (
            CaptionedScenes(
                self.num_samples,
                seed=seed,
                split="train",
                image_size=self.image_size,
                digit_fraction=self.digit_fraction,
                mention=self.mention,
            )
            if self.corpus == "scenes"
            else DomainCaptions(self.num_samples, seed=seed, split="train", image_size=self.image_size)
        )
        return DataLoader(
            scenes,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            drop_last=True,
            persistent_workers=False,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                task.build("val", root=None, image_size=self.image_size, download=False, seed=0),
                batch_size=self.eval_batch_size,
                num_workers=0,  # small: worker start-up would dominate
            )
            for task in self.eval_tasks
        ]
