"""Contrastive pretraining of the mini benchmark's tiny CLIP."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from safemerge.data.captions import CaptionDataModule
from safemerge.errors import ConfigError
from safemerge.io import save_tensors, write_json
from safemerge.metrics import task_accuracy
from safemerge.models import load_clip, zero_shot_head
from safemerge.modules.schedule import warmup_cosine


class PretrainModule(L.LightningModule):
    """CLIP's symmetric InfoNCE loss on (image, caption) batches, from random weights.

    ``loss = (CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)) / 2`` with unit-norm image and text
    embeddings and a learnable logit scale ``s`` capped at ``max_logit_scale``. Validation
    measures zero-shot accuracy on the datamodule's evaluation tasks with heads built from the
    current text tower. At the end of fitting the weights are written in fp16 safetensors to
    ``output`` (with the architecture's ``open_clip_config.json`` beside it, so the folder is
    also an open_clip ``local-dir:`` model).

    Under DDP each rank contrasts its own batch (no feature gathering), so the number of
    negatives is the per-device batch size.

    Args:
        model: an open_clip architecture name (``MiniCLIP-ViT``, ``MiniCLIP-RN``).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to gains, biases, embeddings' scale).
        warmup_steps: linear warm-up before cosine decay.
        max_logit_scale: cap of the logit scale (CLIP: 100).
        output: weights file to write at the end (``.safetensors``), or None.
        init: weights to start from (a pretrained tag or file, as in ``load_clip``); None:
            random initialisation. Continuing from an earlier model reuses its compute.
        snapshots: also write the weights at every validation, as ``<output>.step<N>.safetensors``
            (to choose the pretraining length by measuring what each length gives).
    """

    def __init__(
        self,
        model: str = "MiniCLIP-ViT",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 200,
        max_logit_scale: float = 100.0,
        output: str | None = None,
        init: str | None = None,
        snapshots: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        clip = load_clip(model, init)
        self.model = clip.model.train()
        self.context_length = clip.context_length
        self.image_size = clip.image_size
        self.register_buffer("mean", torch.tensor(clip.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(clip.std).view(1, 3, 1, 1), persistent=False)
        self._clip = clip

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if isinstance(dm, CaptionDataModule) and dm.context_length != self.context_length:
            raise ConfigError(
                f"data context_length {dm.context_length} differs from the text tower's "
                f"{self.context_length}; set data.init_args.context_length: {self.context_length}"
            )

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (no_decay if param.ndim < 2 or "logit_scale" in name or "embedding" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        schedule = warmup_cosine(optimizer, self.hparams.warmup_steps, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, tokens = batch
        image_features = F.normalize(self.model.encode_image((images - self.mean) / self.std), dim=-1)
        text_features = F.normalize(self.model.encode_text(tokens), dim=-1)
        scale = self.model.logit_scale.exp()
        logits = scale * image_features @ text_features.T
        targets = torch.arange(len(images), device=images.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", scale)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():  # CLIP clamps the learnable temperature
            self.model.logit_scale.clamp_(0, math.log(self.hparams.max_logit_scale))

    # ------------------------------------------------------------------ zero-shot validation

    def on_validation_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        self._eval_tasks = dm.eval_tasks
        self._heads = [
            zero_shot_head(self._clip, task.classnames, [task.prompts(c) for c in task.classnames])
            for task in self._eval_tasks
        ]
        self._accuracies = [task_accuracy(task.num_classes).to(self.device) for task in self._eval_tasks]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        features = F.normalize(self.model.encode_image((images - self.mean) / self.std), dim=-1)
        self._accuracies[dataloader_idx].update(features @ self._heads[dataloader_idx].T, labels)

    def on_validation_epoch_end(self) -> None:
        values = []
        for task, accuracy in zip(self._eval_tasks, self._accuracies):
            value = float(accuracy.compute())
            values.append(value)
            self.log(f"val/{task.name}/zero_shot_acc", value, add_dataloader_idx=False)
        self.log("val/zero_shot_acc", sum(values) / len(values), prog_bar=True, add_dataloader_idx=False)
        output = self.hparams.output
        if output and self.hparams.snapshots and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.export(Path(output).with_suffix(f".step{self.global_step}.safetensors"))

    def on_fit_end(self) -> None:
        if self.hparams.output and self.trainer.is_global_zero and not self.trainer.interrupted:
            self.export(Path(self.hparams.output))

    def export(self, path: Path) -> None:
        """fp16 weights (the committed mini CLIP is small this way) and the open_clip config."""
        weights = {name: t.detach().half() for name, t in self.model.state_dict().items()}
        save_tensors(path, weights)
        config = {
            "model_cfg": open_clip.get_model_config(self.hparams.model),
            "preprocess_cfg": {"mean": list(self._clip.mean), "std": list(self._clip.std)},
        }
        write_json(path.with_name("open_clip_config.json"), config)
