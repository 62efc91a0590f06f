"""Merging experts: one LightningModule for every method (a strategy object) and defence."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.data.merge import MergePlan
from safemerge.data.registry import get_task
from safemerge.defenses import Defense
from safemerge.errors import ConfigError
from safemerge.evaluation import Evaluation, classifier_for
from safemerge.io import Expert, expert_info, save_tensors, write_expert
from safemerge.merging import LearnedMerge, MergedEncoder, MergeMethod, StaticMerge
from safemerge.merging.learner import MergeLearner
from safemerge.merging.subspace import check_energy, clean_bases
from safemerge.models import load_clip
from safemerge.modules.resume import ResumeCheckpoint, check_resumable, keep_trainable_state, last_checkpoint
from safemerge.pool import backdoors_of, check_pool, read_pool
from safemerge.report import build_report, report_markdown, write_report

# A resumed merge's adaptation stream starts at the learner's step count (the datamodule reads
# it), which Lightning cannot see: its warning that the dataloader is not resumable is wrong here.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

LEARNED_FILE = "learned.safetensors"


def _check_arguments(method: MergeMethod, defense: Defense | None, checkpoint_every: int | None) -> None:
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every is a number of adaptation steps >= 1 (or null), got {checkpoint_every}")
    if not isinstance(method, (StaticMerge, LearnedMerge)):
        raise ConfigError(
            f"method must be a safemerge.merging method (a StaticMerge or a LearnedMerge), got {type(method).__name__}"
        )
    if defense is not None and not isinstance(defense, Defense):
        raise ConfigError(f"defense must be a safemerge.defenses defence, got {type(defense).__name__}")


class MergeModule(L.LightningModule):
    """Merge the image towers of N experts into one multi-task tower, then report ACC and ASR.

    ``fit`` validates the experts, builds their task vectors, trains what the method (and the
    defence, after it) learns on unlabeled adaptation batches of every task
    (:class:`~safemerge.data.MergeDataModule`), and the CLI then tests: clean accuracy of every
    task, ASR of every backdoor recorded in the experts' ``expert.json`` (also one targeting
    another expert's task), each expert's own accuracy. ``report.json``, ``report.md`` and
    ``merged/`` (the merged tower as an expert directory) are written to ``output_dir``.

    Args:
        experts: expert directories. In a config, mini-pool references (``mini:<task>``,
            ``mini:<task>:backdoored``) are resolved into directories (fine-tuned and cached on
            first use) by the CLI before the module is built
            (:func:`safemerge.experts.resolve_experts`).
        method: the merging method (``safemerge.merging.TaskArithmetic``, ``Ties``,
            ``AdaMerging``, ``DAMAdaMerging``, ...).
        defense: an optional post-merge defence (``safemerge.defenses.AWM``, ``SAU``), applied
            on top of the method and trained after it.
        model: open_clip architecture of the base; None takes the experts'.
        pretrained: pretrained weights of the base; None takes the experts'.
        model_config: JSON file of a custom open_clip architecture named ``model``.
        output_dir: where the report and the merged tower are written; None writes nothing.
        task_vector_dtype: storage of the task vectors, ``float32`` or ``bfloat16`` (half the
            memory; the merged weights are still formed in float32).
        checkpoint_chunk: images per checkpointed chunk of the merged tower's forward while
            learning (None: no checkpointing); bounds activation memory at scale.
        checkpoint_every: a merge that learns writes its resume checkpoint
            (``<output_dir>/checkpoints/last.ckpt``) every this many adaptation steps (None:
            only at the end of training and on SIGTERM); ``--ckpt_path last`` resumes from it
            (:mod:`safemerge.modules.resume`).
        seed: seeds the mask samples and the adaptation stream; the CLI passes its
            ``seed_everything``.
        scan: run the pre-merge backdoor scan (:mod:`safemerge.scan`) on the experts first;
            ``report.json`` records its document under ``scan``.
        flagged_scale: with ``scan``, multiply the task vector of every expert the scan flags
            by this factor before merging (0 drops it; None merges it as any other). Its task's
            expert pseudo-labels still come from the expert as fine-tuned: a backdoored expert
            labels clean images as well as a clean one.
        clean_subspace: restrict every expert's task vector, per matrix, to the leading
            eigenvectors of its own task's clean input second moment that hold this fraction of
            its trace (:mod:`safemerge.merging.subspace`; None: no restriction), before any
            method merges them; label- and trigger-free. Expert pseudo-labels still come from
            the experts as fine-tuned.
        clean_subspace_images: unlabeled images per task (its ``val`` split, seeded by
            ``seed``) that estimate the second moments.
    """

    def __init__(
        self,
        experts: list[str],
        method: MergeMethod,
        defense: Defense | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        model_config: str | None = None,
        output_dir: str | None = "outputs/merge",
        task_vector_dtype: Literal["float32", "bfloat16"] = "float32",
        checkpoint_chunk: int | None = None,
        checkpoint_every: int | None = 100,
        seed: int = 0,
        scan: bool = False,
        flagged_scale: float | None = None,
        clean_subspace: float | None = None,
        clean_subspace_images: int = 500,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["method", "defense"])
        self.automatic_optimization = False
        self.strict_loading = False  # a resume checkpoint holds the learned tensors only (on_load_checkpoint)
        _check_arguments(method, defense, checkpoint_every)
        if flagged_scale is not None and (not scan or not 0 <= flagged_scale <= 1):
            raise ConfigError(
                f"flagged_scale {flagged_scale}: a factor in [0, 1] for the experts the scan flags (set scan: true)"
            )
        if clean_subspace is not None:
            check_energy("clean_subspace", clean_subspace)
            if clean_subspace_images < 2:
                raise ConfigError(f"clean_subspace_images must be >= 2, got {clean_subspace_images}")
        self.method, self.defense = method, defense
        # What W&B (and any logger) records of the method and the defence.
        self.hparams.update(method=method.describe(), defense=defense.describe() if defense else None)
        self.seed = seed
        self._start = time.time()

        pool = read_pool(experts, model, pretrained)
        self.clip = load_clip(pool.model, pool.pretrained, config=model_config)
        self.image_size = self.clip.image_size
        base = self.clip.visual.state_dict()
        check_pool(pool, base)

        self.expert_names = pool.references
        self.task_names = pool.tasks
        self.backdoors, self.backdoor_info = backdoors_of(pool.experts, self.task_names)
        tasks = [get_task(t) for t in self.task_names]
        self.classifier = classifier_for(
            self.clip, tasks, {e.task: e.head for _, e in pool.experts if e.head is not None}
        )
        self.clip.model = None  # the text tower's job ends with the heads
        states = pool.encoders
        self.scan = self._scan(experts, seed, flagged_scale) if scan else None
        self.encoder = MergedEncoder(
            self.classifier.tower,
            states,
            vector_dtype=getattr(torch, task_vector_dtype),
            checkpoint_chunk=checkpoint_chunk,
        )
        self.clean_subspace = None  # what the restriction did, for the report
        if clean_subspace is not None:
            self._restrict_to_clean_subspaces(tasks, clean_subspace, clean_subspace_images, seed)
        flagged = self.scan["handled"] if self.scan else []
        for index in flagged:  # the unedited vector stays the expert's own (its pseudo-labels)
            self.encoder.edit_expert_(index, scale=flagged_scale)
        if (flagged or clean_subspace is not None) and isinstance(method, StaticMerge):
            states = [self.encoder.edited_weights(i) for i in range(len(states))]
        static = method.merge(base, states) if isinstance(method, StaticMerge) else None
        self.learner = self._learner(static) if isinstance(method, LearnedMerge) or defense is not None else None
        self.static_weights = static
        del pool, states
        self.val_metrics = Evaluation(tasks, self.backdoors)
        self.test_metrics = Evaluation(tasks, self.backdoors)
        self.expert_metrics = Evaluation(tasks)  # each expert on its own task
        self._eval_weights: dict[str, Tensor] | None = None
        self._expert_weights: tuple[int, dict[str, Tensor]] | None = None

    def _restrict_to_clean_subspaces(self, tasks, energy: float, images: int, seed: int) -> None:
        """Each expert's task vector restricted to its own task's clean input subspace
        (:mod:`safemerge.merging.subspace`), from ``images`` val images run through the expert."""
        from safemerge.scan import task_images

        start, kept = time.time(), []
        for index, task in enumerate(tasks):
            pixels = task_images(task, images, seed, self.image_size).to(self.encoder.vectors(0).device)
            bases = clean_bases(
                self.encoder.tower, self.encoder.expert_weights(index), self.classifier.normalize(pixels), energy
            )
            self.encoder.restrict_(index, bases)
            kept += [basis.shape[1] / basis.shape[0] for basis in bases.values()]
        self.clean_subspace = {"energy": energy, "images": images, "dimensions_kept": sum(kept) / len(kept)}
        print(
            f"clean subspace: {len(tasks)} task vectors restricted (energy {energy}, "
            f"{100 * self.clean_subspace['dimensions_kept']:.0f} % of input dimensions kept) in {time.time() - start:.1f} s"
        )

    @staticmethod
    def _scan(experts: list[str], seed: int, flagged_scale: float | None) -> dict:
        """The pre-merge scan's document, with ``handled``: the indices of the flagged experts
        whose vectors ``flagged_scale`` scales (none without it)."""
        from safemerge.scan import scan_experts

        document = scan_experts(experts, seed=seed)
        by_path = {str(e["path"]): e for e in document["experts"]}
        flagged = [i for i, path in enumerate(experts) if by_path[str(path)]["flagged"]]
        print(f"scan: {len(flagged)} of {len(experts)} experts flagged" + (f" ({flagged})" if flagged else ""))
        return {**document, "flagged_scale": flagged_scale, "handled": flagged if flagged_scale is not None else []}

    def _learner(self, static_weights: dict[str, Tensor] | None) -> MergeLearner:
        """The learned parts of the method and the defence, and the schedule that trains them."""
        return MergeLearner(
            self.encoder,
            self.classifier,
            self.method,
            self.task_names,
            self.image_size,
            self.seed,
            defense=self.defense,
            static_weights=static_weights,
        )

    # ------------------------------------------------------------------ set-up

    @property
    def adaptation_steps(self) -> int:
        return self.learner.total_steps if self.learner is not None else 0

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # One pass over the adaptation stream is the whole training: its length is the schedule's.
            self.trainer.fit_loop.max_epochs = 1
        # Under DDP (which wraps the module after this hook) only the learned tensors are DDP's
        # business; the frozen ones (base, task vectors, heads: most of the memory) are
        # identical on every rank and must not be broadcast at every forward.
        learned = {id(p) for p in self.parameters() if p.requires_grad}
        self._ddp_params_and_buffers_to_ignore = [
            name for name, tensor in [*self.named_parameters(), *self.named_buffers()] if id(tensor) not in learned
        ]

    def data_plan(self) -> MergePlan:
        """What this merge's data must serve (:class:`~safemerge.data.merge.MergeDataModule`)."""
        return MergePlan(
            self.task_names, self.backdoors, self.adaptation_steps, self.seed, lambda: self.completed_steps
        )

    @property
    def completed_steps(self) -> int:
        return int(self.learner.completed_steps) if self.learner is not None else 0

    def configure_callbacks(self) -> list[L.Callback]:
        attached = any(isinstance(c, ResumeCheckpoint) for c in self.trainer.callbacks)  # by fit, before test
        if self.learner is None or not self.hparams.output_dir or attached:
            return []
        return [ResumeCheckpoint(last_checkpoint(self.hparams.output_dir), self.hparams.checkpoint_every)]

    def configure_optimizers(self):
        if self.learner is None:
            return None
        return list(self.learner.make_optimizers().values())

    # ------------------------------------------------------------------ training

    def _reduce(self, tensor: Tensor) -> Tensor:
        # Average a gradient over processes: every rank then takes the same optimizer step.
        return self.trainer.strategy.reduce(tensor, reduce_op="mean") if self.trainer.world_size > 1 else tensor

    def on_train_start(self) -> None:
        model = self.trainer.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # Gradients are reduced explicitly, per phase (torch.autograd.grad, then _reduce):
            # DDP must not expect its own backward pass.
            model.require_backward_grad_sync = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        # Lightning hands back the optimizers in the order the learner declared them
        named = dict(zip(self.learner.optimizer_names(), optimizers))
        losses = self.learner.training_step(batch_idx, batch, named, reduce=self._reduce)
        size = sum(len(x) for x in batch.values())
        stage, _, _ = self.learner.stage(batch_idx)
        self.log_dict({f"train/{stage.name}/{k}": v for k, v in losses.items()}, batch_size=size, prog_bar=False)
        if batch_idx % self.trainer.log_every_n_steps == 0 or batch_idx == self.adaptation_steps - 1:
            self.log_dict({f"train/{k}": v for k, v in self.learner.statistics().items()}, batch_size=size)

    def merged_weights(self) -> dict[str, Tensor]:
        """The merged tower's weights now (what would be exported)."""
        if self.learner is not None:
            return self.learner.merged_weights()
        return {k: v.to(self.device) for k, v in self.static_weights.items()}

    # ------------------------------------------------------------------ evaluation

    def _logits(self, images: Tensor, weights: dict[str, Tensor], task: str) -> Tensor:
        features = F.normalize(self.encoder(self.classifier.normalize(images), weights), dim=-1)
        return self.classifier.logits(features, task)

    def _on_eval_start(self) -> None:
        self._eval_weights = self.merged_weights()
        self._expert_weights = None

    on_validation_epoch_start = on_test_epoch_start = _on_eval_start

    def _eval_step(self, metrics: Evaluation, batch, view: int) -> None:
        images, labels = batch
        head = metrics.head(view)
        metrics.update(view, self._logits(images, self._eval_weights, head), labels)
        if metrics is self.test_metrics and view < len(self.task_names):
            self.expert_metrics.update(view, self._logits(images, self._expert(view), head), labels)

    def _expert(self, index: int) -> dict[str, Tensor]:
        if self._expert_weights is None or self._expert_weights[0] != index:
            self._expert_weights = (index, {k: v.detach() for k, v in self.encoder.expert_weights(index).items()})
        return self._expert_weights[1]

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.val_metrics, batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_metrics, batch, dataloader_idx)

    def _log_results(self, stage: str, results: dict[str, dict[str, float | None]]) -> None:
        metrics = {}
        for task, r in results.items():
            metrics[f"{stage}/{task}/acc"] = r["accuracy"]
            metrics[f"{stage}/{task}/top_class_share"] = r["share"]
            if r["asr"] is not None:
                metrics[f"{stage}/{task}/asr"] = r["asr"]
                metrics[f"{stage}/{task}/target_rate"] = r["target_rate"]
        metrics[f"{stage}/avg/acc"] = sum(r["accuracy"] for r in results.values()) / len(results)
        rates = [r["asr"] for r in results.values() if r["asr"] is not None]
        if rates:
            metrics[f"{stage}/avg/asr"] = sum(rates) / len(rates)
        self.log_dict(metrics, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        results, _ = self.val_metrics.compute()
        self._log_results("val", results)
        self._eval_weights = None

    def on_test_epoch_end(self) -> None:
        results, backdoor_rates = self.test_metrics.compute()
        experts, _ = self.expert_metrics.compute()
        for task, r in results.items():
            r["expert_accuracy"] = experts[task]["accuracy"]
        self._log_results("test", results)
        report = build_report(
            self.method.name,
            results,
            config=self._config(),
            runtime_s=time.time() - self._start,
            backdoors=[{**info, **rates} for info, rates in zip(self.backdoor_info, backdoor_rates)],
            defense=self.defense.describe() if self.defense else None,
            scan=self.scan,
            **self._report_fields(),
        )
        self._log_table(report)
        if self.trainer.is_global_zero:
            if self.hparams.output_dir:
                self.export(Path(self.hparams.output_dir), report)
            print(report_markdown(report))
        self._eval_weights = None

    def _report_fields(self) -> dict:
        """What the method and the defence add to the report (DAM: its attribution)."""
        if self.learner is None:
            return {}
        return self.learner.report_fields(dict(zip(self.task_names, self.expert_names)))

    def _config(self) -> dict:
        return {
            "method": self.method.describe(),
            "defense": self.defense.describe() if self.defense else None,
            "experts": self.expert_names,
            "model": self.hparams.model or self.clip.name,
            "pretrained": self.clip.pretrained,
            "seed": self.seed,
            "adaptation_steps": self.adaptation_steps,
            "clean_subspace": self.clean_subspace,
            "world_size": self.trainer.world_size if self._trainer else 1,
        }

    def _log_table(self, report: dict) -> None:
        logger = self.logger
        if logger is None or not hasattr(logger, "log_table") or not self.trainer.is_global_zero:
            return
        columns = ["task", "accuracy", "asr", "expert_accuracy", "normalized_accuracy"]
        rows = [[task] + [r[c] for c in columns[1:]] for task, r in report["tasks"].items()]
        logger.log_table(key="test/report", columns=columns, data=rows)

    def export(self, directory: Path, report: dict) -> None:
        """Write ``report.json``, ``report.md`` and ``merged/`` (an expert directory)."""
        weights = {k: v.detach().cpu() for k, v in self._eval_weights.items()}
        tasks = [get_task(t) for t in self.task_names]
        info = expert_info(
            model=self.clip.name,
            pretrained=self.clip.pretrained,
            task="+".join(self.task_names),
            num_classes=sum(t.num_classes for t in tasks),
            backdoor=None,
            metrics={"accuracy": report["average"]["accuracy"], "asr": report["average"]["asr"]},
            image_size=self.image_size,
            tasks=self.task_names,
            method=self.method.name,
            defense=self.defense.name if self.defense else None,
        )
        write_expert(directory / "merged", Expert(encoder=weights, info=info))
        if self.learner is not None:  # λ, mask logits, triggers, defence masks, for inspection
            save_tensors(directory / LEARNED_FILE, self.learner.learned_state())
        write_report(directory, report)

    # ------------------------------------------------------------------ resuming (safemerge.modules.resume)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_resumable(checkpoint, "the checkpoint")
        self.learner.resume(checkpoint["state_dict"], checkpoint["safemerge"]["notes"])
        checkpoint["state_dict"] = {}  # loaded; Lightning's own (non-strict) load has nothing left to do

    def check_resumable(self, checkpoint: dict, source: str) -> None:
        """A one-line :class:`CheckpointError` unless ``checkpoint`` is a resume checkpoint of this merge."""
        check_resumable(self, checkpoint, source)
