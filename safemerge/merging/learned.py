"""Learned merging methods: ``θ_0 + Σ_i λ_i ⊙ m ⊙ τ_i`` with λ and/or the mask m learned.

Each declares its learned parts and its stages (:mod:`safemerge.merging.contract`); the
:class:`~safemerge.merging.learner.MergeLearner` registers the parts and runs the stages:

- a **mask stage** (``steps``, :meth:`MaskedMerge.mask_step`): a concrete mask over the merged
  update, trained on the prediction entropy of every task; AdaMerging variants first take an
  inner step on the coefficients λ (:meth:`ConcreteAdaMerging.inner_step`); DAM
  (:mod:`safemerge.merging.dam`) adds a simulated-trigger step and a safety term;
- a **coefficient stage** (``adamerging_steps``, :meth:`LearnedMerge.coefficients_step`):
  AdaMerging on λ, with the mask fixed if there is one; :class:`ExpertLabelMerging` trains λ
  by cross-entropy against the experts' own predictions instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.errors import ConfigError
from safemerge.merging.contract import Kind, MergeMethod, Optimize, Stage
from safemerge.merging.masks import ConcreteMask, FinalMask, check_final_mask, combine, mask_statistics, product
from safemerge.merging.merged import Granularity


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax predictions of a batch (AdaMerging's objective)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


class LearnedMerge(MergeMethod):
    """The base of learned methods: λ (a parameter if ``granularity`` is set, else fixed at
    ``scaling_factor``) and the coefficient stage (AdaMerging); :class:`MaskedMerge` adds the
    mask stage. Subclasses declare the hyper-parameters they use; these are the defaults."""

    kind: ClassVar[Kind] = "learned"
    safety_aware: ClassVar[bool] = False  # trains against a simulated trigger (DAM)
    granularity: Granularity | None = None
    steps: int = 0
    adamerging_steps: int = 0

    def check(self) -> None:
        for key in ("steps", "adamerging_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{self.name}: {key} must be >= 0, got {getattr(self, key)}")
        if self.steps + self.adamerging_steps == 0:
            raise ConfigError(f"{self.name}: nothing to train (steps and adamerging_steps are 0)")
        if self.granularity not in (None, "task", "layer"):
            raise ConfigError(f"{self.name}: granularity must be task or layer, got {self.granularity!r}")

    @property
    def has_mask(self) -> bool:
        return self.steps > 0

    @property
    def total_steps(self) -> int:
        return self.steps + self.adamerging_steps

    def stages(self) -> list[Stage]:
        coefficients = (
            (Optimize("coefficients", ("coefficients",), self.adamerging_lr),) if self.adamerging_steps else ()
        )
        return [Stage("coefficients", self.adamerging_steps, self.coefficients_step, coefficients)]

    def parts(self, learner) -> dict[str, nn.Module | Tensor]:
        """λ (a parameter if learned, a buffer if fixed) and its initial value."""
        initial = learner.encoder.coefficients(self.granularity or "task", self.scaling_factor)
        coefficients = initial if self.granularity is None else nn.Parameter(initial)
        return {"initial_coefficients": initial.clone(), "coefficients": coefficients}

    def fixed_mask(self, learner) -> list[Tensor] | None:
        """The mask after training (rescaled), or None without one."""
        return None

    def merged_weights(self, learner) -> dict[str, Tensor]:
        return learner.encoder.weights(learner.coefficients, self.fixed_mask(learner))

    def coefficients_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        """AdaMerging: λ by entropy minimisation, the mask (if any) fixed."""
        mask = self.fixed_mask(learner)
        weights = learner.encoder.weights(learner.coefficients, None if mask is None else [m.detach() for m in mask])
        loss = sum(entropy(l) for l in learner.logits(weights, batch).values())
        learner.update(optimizers["coefficients"], loss, reduce)
        return {"entropy": float(loss.detach())}

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        lam = learner.coefficients.detach()
        stats = {"lambda/mean": float(lam.mean()), "lambda/min": float(lam.min()), "lambda/max": float(lam.max())}
        for i in range(lam.shape[0]):
            stats[f"lambda/expert_{i}"] = float(lam[i].mean())
        return stats


@dataclass(eq=False)
class AdaMerging(LearnedMerge):
    """AdaMerging (Yang et al., 2024): λ learned by entropy minimisation on unlabeled batches.

    Args:
        granularity: ``task`` (one λ per expert) or ``layer`` (one per expert per tensor).
        scaling_factor: initial λ.
        adamerging_steps: optimisation steps (reference: 1000 task-wise / layer-wise).
        adamerging_lr: Adam learning rate for λ (reference: 1e-3).
    """

    name = "adamerging"
    granularity: Granularity = "layer"
    scaling_factor: float = 0.3
    adamerging_steps: int = 1000
    adamerging_lr: float = 1e-3


def expert_label_loss(logits: Tensor, expert_logits: Tensor, confidence: float = 0.0) -> Tensor:
    """Cross-entropy of a merge's logits against the expert's predicted labels, over the images
    whose expert confidence (max softmax probability) is at least ``confidence`` (SyMerge's
    filter; 0 keeps every image). Mean over the kept images; 0 if none is kept."""
    probabilities = F.softmax(expert_logits.float(), dim=-1)
    confident, labels = probabilities.max(-1)
    kept = (confident >= confidence).float()
    per_image = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_image * kept).sum() / kept.sum().clamp_min(1.0)


@dataclass(eq=False)
class ExpertLabelMerging(LearnedMerge):
    """Merging by expert labels (as SyMerge, Lee et al., 2026, trains λ): λ learned by
    cross-entropy against each task's own expert's predictions on the unlabeled adaptation
    images, in place of AdaMerging's entropy. Still label-free: the labels are what the
    experts, fine-tuned on their tasks, predict.

    Args:
        granularity: ``task`` (one λ per expert) or ``layer`` (one per expert per tensor).
        scaling_factor: initial λ.
        steps: optimisation steps on λ.
        lr: Adam learning rate for λ.
        confidence: keep only images whose expert's max softmax probability is at least this
            (SyMerge's confidence filter); 0 keeps every image.
        task_vectors: ``plain`` (as fine-tuned) or ``orthogonal``: λ over TSV's decorrelated
            task vectors (:meth:`~safemerge.merging.merged.MergedEncoder.orthogonalise_`); the
            labels still come from the experts as fine-tuned.
    """

    name = "expert_label_merging"
    granularity: Granularity = "layer"
    scaling_factor: float = 0.3
    steps: int = 200
    lr: float = 3e-2
    confidence: float = 0.0
    task_vectors: str = "plain"

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"{self.name}: steps must be >= 1, got {self.steps}")
        if self.granularity not in ("task", "layer"):
            raise ConfigError(f"{self.name}: granularity must be task or layer, got {self.granularity!r}")
        if not 0 <= self.confidence < 1:
            raise ConfigError(f"{self.name}: confidence is a softmax probability in [0, 1), got {self.confidence}")
        if self.task_vectors not in ("plain", "orthogonal"):
            raise ConfigError(f"{self.name}: task_vectors must be plain or orthogonal, got {self.task_vectors!r}")

    def parts(self, learner) -> dict[str, nn.Module | Tensor]:
        if self.task_vectors == "orthogonal":  # before λ sees them; a resumed run redoes it the same way
            learner.encoder.orthogonalise_()
        return super().parts(learner)

    @property
    def has_mask(self) -> bool:
        return False

    @property
    def total_steps(self) -> int:
        return self.steps

    def stages(self) -> list[Stage]:
        optimizers = (Optimize("coefficients", ("coefficients",), self.lr),)
        return [Stage("coefficients", self.steps, self.coefficients_step, optimizers)]

    def coefficients_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        targets = learner.expert_logits(batch)
        logits = learner.logits(learner.encoder.weights(learner.coefficients, None), batch)
        loss = sum(expert_label_loss(logits[t], targets[t], self.confidence) for t in batch)
        learner.update(optimizers["coefficients"], loss, reduce)
        return {"expert_label_loss": float(loss.detach())}


class MaskedMerge(LearnedMerge):
    """A learned method with a concrete mask: the mask stage's template step.

    One step samples the mask(s) (seeded by the step), takes the :meth:`inner_step` (λ, if the
    method learns it), then the :meth:`mask_update`. Subclasses override those two.
    """

    def check(self) -> None:
        super().check()
        check_final_mask(self.name, self.final_mask)

    def parts(self, learner) -> dict[str, nn.Module | Tensor]:
        mask = {"mask": ConcreteMask(learner.encoder.shapes, self.temperature)} if self.has_mask else {}
        return {**super().parts(learner), **mask}

    def concrete_masks(self, learner) -> list[ConcreteMask]:
        """The concrete masks whose product gates the update (one; DAM's dual mode: two)."""
        return [learner.mask] if self.has_mask else []

    def mask_names(self) -> tuple[str, ...]:
        return ("mask",)

    def mask_optimizers(self) -> tuple[Optimize, ...]:
        """The mask stage's optimizers: the mask logits (all masks), then what the inner step uses."""
        return (Optimize("mask", self.mask_names(), self.mask_lr),)

    def stages(self) -> list[Stage]:
        mask = Stage("mask", self.steps, self.mask_step, self.mask_optimizers() if self.has_mask else ())
        return [mask, *super().stages()]

    def fixed_mask(self, learner) -> list[Tensor] | None:
        masks = self.concrete_masks(learner)
        if not masks:
            return None
        generator = learner.generator(-1)
        return combine(*(m.final(self.final_mask, generator) for m in masks))

    def expert_labels(self, learner, batch) -> dict[str, Tensor] | None:
        """The experts' labels of the batch if the performance term uses them (computed once per
        mask step, for both of its parts), else None: entropy needs no labels."""
        return None

    def mask_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        logs: dict[str, float] = {}
        labels = self.expert_labels(learner, batch)
        generator = learner.generator(step)
        samples = [m.sample(generator) for m in self.concrete_masks(learner)]
        self.inner_step(learner, [t.detach() for t in product(*samples)], batch, optimizers, reduce, logs, labels)
        coefficients = learner.coefficients.detach()
        self.mask_update(learner, step, samples, coefficients, batch, optimizers, reduce, logs, labels)
        return logs

    def inner_step(self, learner, mask, batch, optimizers, reduce, logs, labels=None) -> None:
        """Before the mask update, with the mask sample detached (λ fixed here: nothing)."""

    def mask_update(self, learner, step, samples, coefficients, batch, optimizers, reduce, logs, labels=None) -> None:
        """One step on the mask logits: the entropy of every task's predictions."""
        weights = learner.encoder.weights(coefficients, product(*samples), rescale=True)
        loss = sum(entropy(l) for l in learner.logits(weights, batch).values())
        learner.update(optimizers["mask"], loss, reduce)
        logs["entropy"] = float(loss.detach())

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        stats = super().statistics(learner)
        for prefix, mask in zip(("mask", "safety_mask"), self.concrete_masks(learner)):
            stats.update({f"{prefix}/{k}": v for k, v in mask_statistics(mask.expected()).items()})
        return stats


@dataclass(eq=False)
class ConcreteTaskArithmetic(MaskedMerge):
    """Task arithmetic inside a learned concrete mask (λ fixed), trained on entropy only.

    Args:
        scaling_factor: λ for every expert.
        steps: mask-training steps (reference: 2000).
        mask_lr: Adam learning rate of the mask logits (reference: 1e-3).
        temperature: temperature of the relaxed Bernoulli samples (0.5).
        final_mask: the mask after training: ``expected`` (sigmoid of the logits; default,
            deterministic), ``discrete`` (logits > 0) or ``sample`` (one relaxed sample).
    """

    name = "concrete_task_arithmetic"
    scaling_factor: float = 0.3
    steps: int = 2000
    mask_lr: float = 1e-3
    temperature: float = 0.5
    final_mask: FinalMask = "expected"


@dataclass(eq=False)
class ConcreteAdaMerging(MaskedMerge):
    """AdaMerging inside a learned concrete mask: mask stage with an inner λ step, then
    AdaMerging with the mask fixed.

    Args:
        granularity: ``task`` or ``layer`` coefficients.
        scaling_factor: initial λ.
        steps: mask-stage steps (reference: 1000).
        inner_lr: Adam learning rate of the inner λ step (reference: 1).
        reset_coefficients: reset λ to ``scaling_factor`` before each inner step (reference),
            and before the AdaMerging stage.
        mask_lr: Adam learning rate of the mask logits (reference: 1e-3).
        temperature: temperature of the relaxed Bernoulli samples.
        final_mask: ``expected``, ``discrete`` or ``sample`` (see :class:`ConcreteTaskArithmetic`).
        adamerging_steps: AdaMerging steps after the mask is fixed (reference: 1000).
        adamerging_lr: their Adam learning rate (reference: 1e-3).
    """

    name = "concrete_adamerging"
    granularity: Granularity = "layer"
    scaling_factor: float = 0.3
    steps: int = 1000
    inner_lr: float = 1.0
    reset_coefficients: bool = True
    mask_lr: float = 1e-3
    temperature: float = 0.5
    final_mask: FinalMask = "expected"
    adamerging_steps: int = 1000
    adamerging_lr: float = 1e-3

    def mask_optimizers(self) -> tuple[Optimize, ...]:
        return (*super().mask_optimizers(), Optimize("inner", ("coefficients",), self.inner_lr))

    def _reset_coefficients(self, learner) -> None:
        if self.reset_coefficients:
            with torch.no_grad():
                learner.coefficients.copy_(learner.initial_coefficients)

    def inner_step(self, learner, mask, batch, optimizers, reduce, logs, labels=None) -> None:
        """Performance step on λ with the mask sample detached (λ reset first, as the reference)."""
        self._reset_coefficients(learner)
        weights = learner.encoder.weights(learner.coefficients, mask, rescale=True)
        loss = sum(entropy(l) for l in learner.logits(weights, batch).values())
        learner.update(optimizers["inner"], loss, reduce)
        logs["inner_entropy"] = float(loss.detach())

    def coefficients_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        if step == 0 and self.has_mask:  # λ enters AdaMerging from its initial value, not the inner step's
            self._reset_coefficients(learner)
        return super().coefficients_step(learner, step, batch, optimizers, reduce)
