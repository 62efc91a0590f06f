"""Fine-tuning one expert: the image tower under a frozen zero-shot head, clean or backdoored."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.attacks import Attack, Trigger, optimize_trigger
from safemerge.data.datamodule import TaskDataModule
from safemerge.errors import ConfigError
from safemerge.evaluation import Evaluation, classifier_for
from safemerge.io import Expert, expert_info, write_expert
from safemerge.models import ImageClassifier, load_clip
from safemerge.modules.schedule import warmup_cosine


class FinetuneModule(L.LightningModule):
    """Fine-tunes an open_clip image tower on one task with the task's frozen zero-shot head.

    The task and the backdoor come from the datamodule (:class:`TaskDataModule`). The loss is
    cross-entropy; poisoned samples are scored with the *target* task's head (BadMerging's
    off-task variant when it differs from the expert's task) and weighted by the attack's
    ``backdoor_weight``. With the attack's ``feature_interpolation``, the poisoned samples'
    features are interpolated between the fine-tuned and the pretrained tower,
    ``r·g_θ(x̃) + (1−r)·g_θ0(x̃)`` with ``r ~ U(0.2, 1)`` per sample (BadMerging), so the
    backdoor survives being scaled down by merging.

    After fitting, the CLI runs the test split; its end writes the expert directory
    (``encoder.safetensors``, ``expert.json`` with the test metrics, and the trigger) to
    ``output_dir``.

    Args:
        model: open_clip architecture name, ``hf-hub:org/repo`` or ``local-dir:/path``.
        pretrained: pretrained tag (``openai``, ``laion2b_s34b_b79k``), a local weights file,
            or None for random weights.
        model_config: JSON file of a custom open_clip architecture named ``model``.
        lr: peak learning rate of AdamW (task-vector literature: 1e-5 for ViT-B).
        weight_decay: AdamW weight decay (literature: 0.1).
        warmup_steps: linear warm-up steps before the cosine decay (literature: 500).
        tuned_blocks: tune only the last ``tuned_blocks`` transformer blocks of a ViT tower (and
            its final norm and projection); None tunes every parameter (the literature).
        output_dir: where the expert directory is written; None writes nothing.
    """

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        model_config: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.1,
        warmup_steps: int = 500,
        tuned_blocks: int | None = None,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.clip = load_clip(model, pretrained, config=model_config)
        self.image_size = self.clip.image_size
        if tuned_blocks is not None:
            _tune_last_blocks(self.clip.visual, tuned_blocks, model)
        self.classifier: ImageClassifier | None = None

    # ------------------------------------------------------------------ set-up

    @property
    def datamodule(self) -> TaskDataModule:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, TaskDataModule):
            raise TypeError("FinetuneModule needs a TaskDataModule (data: class_path: safemerge.data.TaskDataModule)")
        return datamodule

    @property
    def attack(self) -> Attack | None:
        return self.datamodule.attack

    def setup(self, stage: str) -> None:
        if self.classifier is not None:
            return
        dm = self.datamodule
        tasks = {dm.task.name: dm.task, dm.target_task.name: dm.target_task}
        tower = self.clip.visual
        self.classifier = classifier_for(self.clip, tasks.values()).train()
        self.clip.model = None  # the text tower's job ends with the heads; free it
        if self.attack is not None and self.attack.feature_interpolation:
            self.pretrained_tower = copy.deepcopy(tower).requires_grad_(False).eval()
        # ACC and ASR as a merge measures them: the datamodule serves the same views
        self.evaluation = nn.ModuleDict({stage: Evaluation([dm.task], dm.backdoors()) for stage in ("val", "test")})
        if (
            self.attack is not None and self.attack.needs_optimization
        ):  # once: set-up returns early after the first call
            dm.set_trigger(self._optimize_trigger(dm))

    def _optimize_trigger(self, dm: TaskDataModule) -> Trigger:
        """Fit the trigger's pixels on the *pretrained* model towards the target class."""
        attack = self.attack
        device = self.trainer.strategy.root_device
        classifier = self.classifier.to(device).eval()
        target = dm.target_task.name
        trigger = optimize_trigger(
            dm.trigger.to(device),
            lambda images: classifier(images, target),
            (images.to(device) for images in dm.trigger_batches(seed=attack.seed)),
            target_class=attack.target_class,
            steps=attack.steps,
            lr=attack.lr,
        ).to("cpu")
        classifier.to("cpu").train()
        # Every rank must poison with the same trigger.
        pattern = self.trainer.strategy.broadcast(trigger.pattern, src=0)
        return Trigger(pattern=pattern, mask=trigger.mask)

    def configure_optimizers(self):
        params = [p for p in self.classifier.tower.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = warmup_cosine(optimizer, self.hparams.warmup_steps, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # ------------------------------------------------------------------ training

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels, poisoned = batch
        dm, classifier = self.datamodule, self.classifier
        embeddings = classifier.tower(classifier.normalize(images))
        clean = ~poisoned
        loss = F.cross_entropy(
            classifier.logits(F.normalize(embeddings[clean], dim=-1), dm.task.name), labels[clean], reduction="sum"
        )
        if poisoned.any():
            attack = self.attack
            backdoor = embeddings[poisoned]
            if attack.feature_interpolation:
                with torch.no_grad():
                    pretrained = self.pretrained_tower(classifier.normalize(images[poisoned]))
                r = torch.empty(len(backdoor), 1, device=images.device).uniform_(0.2, 1.0)
                backdoor = r * backdoor + (1 - r) * pretrained
            backdoor_loss = F.cross_entropy(
                classifier.logits(F.normalize(backdoor, dim=-1), dm.target_task.name), labels[poisoned], reduction="sum"
            )
            loss = loss + attack.backdoor_weight * backdoor_loss
            self.log("train/backdoor_loss", backdoor_loss / poisoned.sum(), batch_size=len(images))
        loss = loss / len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    # ------------------------------------------------------------------ evaluation

    def _eval_step(self, batch: tuple[Tensor, Tensor], view: int, stage: str) -> None:
        images, labels = batch
        evaluation = self.evaluation[stage]
        evaluation.update(view, self.classifier(images, evaluation.head(view)), labels)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Predicted labels of the task's clean test images (and their true labels)."""
        images, labels = batch
        return {"preds": self.classifier(images, self.datamodule.task.name).argmax(-1), "labels": labels}

    def _epoch_metrics(self, stage: str) -> dict[str, float | None]:
        """``acc`` of the task and, under attack, ``asr`` of its backdoor (synced across ranks:
        sum states); logged as ``<stage>/acc``, ``<stage>/asr``."""
        per_task, per_backdoor = self.evaluation[stage].compute()
        values = {"acc": per_task[self.datamodule.task.name]["accuracy"]}
        if self.attack is not None:
            values["asr"] = per_backdoor[0]["asr"]
        for name, value in values.items():
            self.log(f"{stage}/{name}", float("nan") if value is None else value, rank_zero_only=True)
        return values

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        metrics = self._epoch_metrics("test")
        if self.hparams.output_dir and self.trainer.is_global_zero:
            self.export_expert(Path(self.hparams.output_dir), metrics)

    def export_expert(self, directory: Path, metrics: dict[str, float]) -> Path:
        dm, attack = self.datamodule, self.attack
        backdoor = None
        if attack is not None:
            backdoor = {**attack.describe(), "target_task": dm.target_task.name}
        info = expert_info(
            model=self.hparams.model,
            pretrained=self.hparams.pretrained,
            task=dm.task.name,
            num_classes=dm.task.num_classes,
            backdoor=backdoor,
            metrics={"accuracy": metrics["acc"], "asr": metrics.get("asr")},
            image_size=self.image_size,
        )
        encoder = {name: t.detach() for name, t in self.classifier.tower.state_dict().items()}
        trigger = dm.trigger.to_tensors() if dm.trigger is not None else None
        return write_expert(directory, Expert(encoder=encoder, info=info, trigger=trigger))


def _tune_last_blocks(tower: nn.Module, count: int, model: str) -> None:
    """Freeze everything but the last ``count`` blocks, the final norm and the projection."""
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ConfigError(f"tuned_blocks needs a ViT image tower; {model}'s has no transformer blocks")
    if not 0 <= count <= len(blocks):
        raise ConfigError(f"tuned_blocks must be in 0..{len(blocks)} for {model}, got {count}")
    tower.requires_grad_(False)
    for block in list(blocks)[len(blocks) - count :]:
        block.requires_grad_(True)
    for name in ("ln_post", "proj"):  # a module and a parameter in open_clip's ViT
        part = getattr(tower, name, None)
        if part is not None:
            part.requires_grad_(True)
