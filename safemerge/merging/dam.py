"""DAM, defense-aware merging (DAM.md): a masked merge trained against a simulated trigger.

:class:`DefenseAwareMask` holds DAM's options (declared once, as dataclass fields) and its
steps; mixed in before :class:`~safemerge.merging.learned.ConcreteTaskArithmetic` or
:class:`~safemerge.merging.learned.ConcreteAdaMerging` it makes :class:`DAMTaskArithmetic` and
:class:`DAMAdaMerging`, whose options are the base method's followed by DAM's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.errors import ConfigError
from safemerge.merging.contract import Optimize
from safemerge.merging.learned import ConcreteAdaMerging, ConcreteTaskArithmetic, entropy
from safemerge.merging.masks import ConcreteMask, product
from safemerge.merging.simulated_triggers import (
    PerturbationSpace,
    check_area_weight,
    check_budget,
    shared_adversarial_examples,
    simulated_trigger,
)

PerformanceLoss = Literal["entropy", "expert_labels"]
SafetyLoss = Literal["entropy", "consistency"]
Trigger = Literal["additive", "patch", "shared"]
Masks = Literal["single", "dual"]
Attribution = Literal["none", "cap", "trim"]
Labels = Mapping[str, Tensor]


def _entropy_safety(triggered: Tensor, labels: Tensor) -> Tensor:
    # DAM's reference: confident predictions on triggered inputs (whatever the class), per image
    log_probs = F.log_softmax(triggered.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def _consistency_safety(triggered: Tensor, labels: Tensor) -> Tensor:
    # AWM/SAU's ask: the clean label kept under the trigger, per image
    return F.cross_entropy(triggered.float(), labels, reduction="none")


SAFETY_LOSSES = {"entropy": _entropy_safety, "consistency": _consistency_safety}
CHOICES = {
    "masks": ("single", "dual"),
    "performance_loss": ("entropy", "expert_labels"),
    "safety_loss": tuple(SAFETY_LOSSES),
    "perturbation_space": ("pixel", "normalized"),
    "trigger": ("additive", "patch", "shared"),
    "attribution": ("none", "cap", "trim"),
}


def performance_loss(logits: Mapping[str, Tensor], labels: Labels | None) -> Tensor:
    """The performance term, summed over tasks: the entropy of the predictions (``labels`` None,
    AdaMerging's and DAM's) or their cross-entropy against the given labels (the experts')."""
    if labels is None:
        return sum(entropy(l) for l in logits.values())
    return sum(F.cross_entropy(l.float(), labels[t]) for t, l in logits.items())


@dataclass(eq=False)
class DefenseAwareMask:
    """DAM's additions to a masked merge: a simulated trigger, a safety term in the mask step, and
    the attribution of the trigger's effect to one expert.

    Per mask step, after the inner λ step: one step of the simulated trigger against the
    clean labels (:meth:`MergeLearner.trigger_step`; ``shared``: per-image shared adversarial
    examples instead), then one mask step on ``L_perf + α · L_safe`` (single mask) or ``m1`` on
    the first term and ``m2`` on the second (dual masks). The clean labels are the merged
    model's own predictions (``performance_loss: entropy``) or each task's expert's
    (``expert_labels``, computed once per batch), for the trigger, the consistency loss, and
    — with ``expert_labels`` — the performance term of the mask step, the inner λ step and the
    AdaMerging stage (cross-entropy instead of entropy). After the last mask step the trigger's effect (the share of
    pseudo-labels it flips) is measured with each expert left out; the expert whose removal
    lowers it most is recorded (``report.json`` "attribution"), and capped or trimmed if
    ``attribution`` says so.

    Args:
        masks: ``single`` (one mask trained by both losses, as the released code) or ``dual``
            (m = m1 ⊙ m2: m1 trained by the performance loss, m2 by the safety loss).
        performance_loss: ``entropy`` (the reference) or ``expert_labels`` (cross-entropy
            against :meth:`MergeLearner.expert_pseudo_labels`, label-free too).
        safety_loss: ``entropy`` (entropy on triggered inputs, the reference) or
            ``consistency`` (cross-entropy of triggered inputs against the clean label,
            what AWM and SAU ask).
        adv_weight: α, the weight of the safety loss (reference: 0.1).
        perturbation_eps: ℓ∞ budget of the additive trigger δ, on pixels in [0, 1].
        perturbation_lr: Adam learning rate of the simulated trigger (reference: 1e-4 for δ;
            a patch trigger's logits need about 0.1).
        perturbation_space: ``pixel`` (``clamp(x + δ, 0, 1)`` on pixels, bounded; default) or
            ``normalized`` (the released code: δ added to the *normalised* image, then
            ``clamp(·, 0, 1)``, δ unbounded), to measure what that clamp does.
        trigger: ``additive`` (a universal δ per task), ``patch`` (Neural-Cleanse mask and
            pattern per task, ``x' = (1 − m) ⊙ x + m ⊙ p``) or ``shared`` (SAU's per-image
            shared adversarial examples, one signed step in the ε ball, toward a wrong class
            the masked merge and the unmasked one agree on; the safety term counts only the
            examples on which both predict the same wrong class).
        area_weight: the patch trigger's area penalty ``area_weight · mean(m)`` (>= 0).
        patch_size: None, or the side of the bottom-right window the patch is confined to.
        targeted: the trigger minimises CE toward the easiest class instead of maximising CE
            against the pseudo-labels.
        attribution: after the mask stage, which expert's task vector carries the trigger's
            effect (leave-one-out); ``cap`` scales that expert's τ by ``attribution_factor``,
            ``trim`` zeroes the ``attribution_factor`` fraction of its smallest-magnitude
            entries (as TIES' trim), ``none`` only records.
        attribution_factor: the cap factor, or the trimmed fraction, in [0, 1].
    """

    safety_aware = True
    masks: Masks = "single"
    performance_loss: PerformanceLoss = "entropy"
    safety_loss: SafetyLoss = "entropy"
    adv_weight: float = 0.1
    perturbation_eps: float = 16 / 255
    perturbation_lr: float = 1e-4
    perturbation_space: PerturbationSpace = "pixel"
    trigger: Trigger = "additive"
    area_weight: float = 1e-3
    patch_size: int | None = None
    targeted: bool = False
    attribution: Attribution = "none"
    attribution_factor: float = 0.5

    def check(self) -> None:
        super().check()
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{self.name}: {key} must be {' or '.join(allowed)}; got {getattr(self, key)!r}")
        check_budget(self.name, self.perturbation_eps)
        check_area_weight(self.name, self.area_weight)
        if self.perturbation_space == "normalized" and self.trigger != "additive":
            raise ConfigError(f"{self.name}: perturbation_space: normalized applies to the additive trigger only")
        if self.trigger == "shared" and self.targeted:
            raise ConfigError(f"{self.name}: targeted applies to the additive and patch triggers (shared is per image)")
        if self.adv_weight < 0:
            raise ConfigError(f"{self.name}: adv_weight must be >= 0, got {self.adv_weight}")
        if not 0 <= self.attribution_factor <= 1:
            raise ConfigError(f"{self.name}: attribution_factor (cap factor / trimmed fraction) must be in [0, 1]")

    # ------------------------------------------------------------------ parts

    def parts(self, learner) -> dict[str, nn.Module | Tensor]:
        parts = super().parts(learner)
        if self.masks == "dual":
            parts["safety_mask"] = ConcreteMask(learner.encoder.shapes, self.temperature)
        if self.trigger == "shared":  # per-image examples, made afresh each step: nothing to learn
            return parts
        classifier = learner.classifier
        parts["perturbation"] = simulated_trigger(
            self.trigger,
            learner.tasks,
            learner.image_size,
            eps=self.perturbation_eps,
            space=self.perturbation_space,
            mean=classifier.mean.flatten().tolist(),
            std=classifier.std.flatten().tolist(),
            area_weight=self.area_weight,
            patch_size=self.patch_size,
            targeted=self.targeted,
        ).to(learner.encoder.vectors(0).device)
        return parts

    def concrete_masks(self, learner) -> list[ConcreteMask]:
        return [*super().concrete_masks(learner), *([learner.safety_mask] if self.masks == "dual" else [])]

    def mask_names(self) -> tuple[str, ...]:
        return (*super().mask_names(), *(("safety_mask",) if self.masks == "dual" else ()))

    def mask_optimizers(self) -> tuple[Optimize, ...]:
        if self.trigger == "shared":
            return super().mask_optimizers()
        return (*super().mask_optimizers(), Optimize("perturbation", ("perturbation",), self.perturbation_lr))

    # ------------------------------------------------------------------ steps

    def expert_labels(self, learner, batch) -> Labels | None:
        """The experts' labels of the batch if the performance term uses them, else None."""
        return learner.expert_pseudo_labels(batch) if self.performance_loss == "expert_labels" else None

    def triggered_batch(self, learner, weights, coefficients, batch, labels, optimizers, reduce, logs):
        """The batch under the simulated trigger (after its step, if it learns), and for the
        shared trigger the unmasked reference's predictions on it (else None)."""
        if self.trigger == "shared":
            reference = learner.encoder.weights(coefficients)  # the merge without the mask
            triggered = shared_adversarial_examples(learner, weights, reference, batch, labels, self.perturbation_eps)
            return triggered, learner.pseudo_labels(reference, triggered)
        trigger = learner.perturbation
        logs["perturbation_loss"] = learner.trigger_step(
            trigger, weights, batch, labels, optimizers["perturbation"], reduce
        )
        with torch.no_grad():
            return {t: trigger.apply(x, t) for t, x in batch.items()}, None

    def mask_update(self, learner, step, samples, coefficients, batch, optimizers, reduce, logs, labels=None) -> None:
        with torch.no_grad():  # the simulated trigger is fitted against the merged weights, detached
            sampled = learner.encoder.weights(coefficients, [t.detach() for t in product(*samples)], rescale=True)
        clean_labels = labels if labels is not None else learner.pseudo_labels(sampled, batch)
        triggered, reference = self.triggered_batch(
            learner, sampled, coefficients, batch, clean_labels, optimizers, reduce, logs
        )

        weights = learner.encoder.weights(coefficients, product(*samples), rescale=True)
        logits = learner.forward_pairs(weights, [*batch.items(), *triggered.items()])
        clean, perturbed = dict(zip(batch, logits[: len(batch)])), dict(zip(batch, logits[len(batch) :]))
        performance = performance_loss(clean, labels)
        safety, counted = 0.0, 0
        for t, l in perturbed.items():
            per_image = SAFETY_LOSSES[self.safety_loss](l, clean_labels[t])
            if reference is not None:  # shared trigger: only where both models agree on a wrong class
                shared = (l.detach().argmax(-1) == reference[t]) & (reference[t] != clean_labels[t])
                per_image, counted = per_image * shared, counted + int(shared.sum())
            safety = safety + per_image.sum() / len(l)
        masks = self.concrete_masks(learner)
        if len(masks) == 1:
            learner.update(optimizers["mask"], performance + self.adv_weight * safety, reduce)
        else:  # dual: m1 by the performance loss, m2 by the safety loss, from one forward pass
            m1, m2 = list(masks[0].parameters()), list(masks[1].parameters())
            grads = torch.autograd.grad(performance, m1, retain_graph=True)
            grads += torch.autograd.grad(self.adv_weight * safety, m2)
            learner.apply_gradients(optimizers["mask"], grads, reduce)
        logs.update({self.performance_name(): float(performance.detach()), "safety_loss": float(safety.detach())})
        if reference is not None:
            logs["shared_fraction"] = counted / sum(len(x) for x in batch.values())
        if step == self.steps - 1:
            self.attribute(learner, batch, reduce)

    def performance_name(self, prefix: str = "") -> str:
        """The logged name of the performance term (``entropy``, as before, or ``expert_ce``)."""
        return prefix + ("entropy" if self.performance_loss == "entropy" else "expert_ce")

    @torch.no_grad()
    def attribution_batch(self, learner, coefficients: Tensor, batch) -> dict[str, Tensor]:
        """The batch under the final simulated trigger (shared: examples against the final merge)."""
        if self.trigger != "shared":
            return {t: learner.perturbation.apply(x, t) for t, x in batch.items()}
        weights = learner.encoder.weights(coefficients, self.fixed_mask(learner))
        labels = self.expert_labels(learner, batch) or learner.pseudo_labels(weights, batch)
        reference = learner.encoder.weights(coefficients)
        return shared_adversarial_examples(learner, weights, reference, batch, labels, self.perturbation_eps)

    @torch.no_grad()
    def flip_rate(self, learner, coefficients: Tensor, batch, triggered) -> Tensor:
        """The share of the merge's own clean predictions that the simulated trigger flips."""
        weights = learner.encoder.weights(coefficients, self.fixed_mask(learner))
        clean = learner.pseudo_labels(weights, batch)
        flipped = learner.pseudo_labels(weights, triggered)
        flips = sum((flipped[t] != clean[t]).sum() for t in batch).float()
        return flips / sum(len(x) for x in batch.values())

    @torch.no_grad()
    def attribute(self, learner, batch, reduce) -> None:
        """Leave-one-out: how much the trigger's flip rate drops without each expert's τ_i."""
        coefficients = learner.coefficients.detach()
        triggered = self.attribution_batch(learner, coefficients, batch)
        full = float(reduce(self.flip_rate(learner, coefficients, batch, triggered)))
        drops = []
        for i in range(learner.encoder.num_experts):
            without = coefficients.clone()
            without[i] = 0
            drops.append(full - float(reduce(self.flip_rate(learner, without, batch, triggered))))
        top = max(range(len(drops)), key=drops.__getitem__)
        learner.notes["attribution"] = {
            "flip_rate": full,
            "drop": dict(zip(learner.tasks, drops)),
            "expert": learner.tasks[top],
            "action": self.attribution,
            "factor": self.attribution_factor,
        }
        self.edit_attributed(learner)

    @staticmethod
    def edit_attributed(learner) -> None:
        """Cap or trim the attributed expert's task vector, as ``learner.notes`` records."""
        attribution = learner.notes["attribution"]
        top = learner.tasks.index(attribution["expert"])
        if attribution["action"] == "cap":
            learner.encoder.edit_expert_(top, scale=attribution["factor"])
        elif attribution["action"] == "trim":
            learner.encoder.edit_expert_(top, trim=attribution["factor"])

    def resumed(self, learner) -> None:
        """The attribution edits the frozen task vectors: a resumed run edits them again."""
        super().resumed(learner)
        if "attribution" in learner.notes:
            self.edit_attributed(learner)

    def report_fields(self, learner, experts: Mapping[str, str]) -> dict[str, Any]:
        """``attribution``: which expert carries the simulated trigger's effect (by reference)."""
        attribution = learner.notes.get("attribution")
        if attribution is None:
            return {}
        return {"attribution": {**attribution, "expert": experts[attribution["expert"]]}}

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        stats = super().statistics(learner)
        if self.trigger != "shared":
            stats.update({f"delta/{k}": v for k, v in learner.perturbation.statistics().items()})
        return stats


@dataclass(eq=False)
class DAMTaskArithmetic(DefenseAwareMask, ConcreteTaskArithmetic):
    """DAM over task arithmetic: λ fixed, the mask trained on entropy plus a safety loss against
    a per-task simulated trigger. Options: :class:`ConcreteTaskArithmetic`'s, then
    :class:`DefenseAwareMask`'s."""

    name = "dam_task_arithmetic"


@dataclass(eq=False)
class DAMAdaMerging(DefenseAwareMask, ConcreteAdaMerging):
    """DAM over AdaMerging (task-wise or layer-wise): the mask stage of DAM with an inner λ step,
    then AdaMerging with the mask fixed. Options: :class:`ConcreteAdaMerging`'s, then
    :class:`DefenseAwareMask`'s."""

    name = "dam_adamerging"

    def inner_step(self, learner, mask, batch, optimizers, reduce, logs, labels: Labels | None = None) -> None:
        """ConcreteAdaMerging's inner λ step, on the experts' labels with ``expert_labels``."""
        if labels is None:
            return super().inner_step(learner, mask, batch, optimizers, reduce, logs)
        self._reset_coefficients(learner)
        weights = learner.encoder.weights(learner.coefficients, mask, rescale=True)
        loss = performance_loss(learner.logits(weights, batch), labels)
        learner.update(optimizers["inner"], loss, reduce)
        logs["inner_expert_ce"] = float(loss.detach())

    def coefficients_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        """AdaMerging with the mask fixed; with ``expert_labels``, on the experts' labels."""
        if self.performance_loss == "entropy":
            return super().coefficients_step(learner, step, batch, optimizers, reduce)
        if step == 0 and self.has_mask:  # λ enters the stage from its initial value, not the inner step's
            self._reset_coefficients(learner)
        mask = self.fixed_mask(learner)
        weights = learner.encoder.weights(learner.coefficients, None if mask is None else [m.detach() for m in mask])
        loss = performance_loss(learner.logits(weights, batch), learner.expert_pseudo_labels(batch))
        learner.update(optimizers["coefficients"], loss, reduce)
        return {"expert_ce": float(loss.detach())}
