"""DAM, defense-aware merging (DAM.md): a masked merge trained against a simulated trigger.

:class:`DefenseAwareMask` holds DAM's options (declared once, as dataclass fields) and its
steps; mixed in before :class:`~safemerge.merging.learned.ConcreteTaskArithmetic` or
:class:`~safemerge.merging.learned.ConcreteAdaMerging` it makes :class:`DAMTaskArithmetic` and
:class:`DAMAdaMerging`, whose options are the base method's followed by DAM's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.errors import ConfigError
from safemerge.merging.contract import Optimize
from safemerge.merging.learned import ConcreteAdaMerging, ConcreteTaskArithmetic, entropy
from safemerge.merging.masks import ConcreteMask, product
from safemerge.merging.simulated_triggers import (
    PerturbationSpace,
    TriggerShape,
    check_area_weight,
    check_budget,
    simulated_trigger,
)

SafetyLoss = Literal["entropy", "consistency"]
Masks = Literal["single", "dual"]
Attribution = Literal["none", "cap", "trim"]


def _entropy_safety(clean: Sequence[Tensor], triggered: Sequence[Tensor]) -> Tensor:
    # DAM's reference: confident predictions on triggered inputs (whatever the class)
    return sum(entropy(t) for t in triggered)


def _consistency_safety(clean: Sequence[Tensor], triggered: Sequence[Tensor]) -> Tensor:
    # AWM/SAU's ask: the clean prediction kept under the trigger
    return sum(F.cross_entropy(t.float(), c.argmax(-1).detach()) for c, t in zip(clean, triggered))


SAFETY_LOSSES = {"entropy": _entropy_safety, "consistency": _consistency_safety}
CHOICES = {
    "masks": ("single", "dual"),
    "safety_loss": tuple(SAFETY_LOSSES),
    "perturbation_space": ("pixel", "normalized"),
    "trigger": ("additive", "patch"),
    "attribution": ("none", "cap", "trim"),
}


@dataclass(eq=False)
class DefenseAwareMask:
    """DAM's additions to a masked merge: a simulated trigger, a safety term in the mask step, and
    the attribution of the trigger's effect to one expert.

    Per mask step, after the inner λ step: one step of the simulated trigger against the
    merged model's own clean predictions (:meth:`MergeLearner.trigger_step`), then one mask
    step on ``Σ_t H(clean) + α · L_safe`` (single mask) or ``m1`` on the first term and ``m2``
    on the second (dual masks). After the last mask step the trigger's effect (the share of
    pseudo-labels it flips) is measured with each expert left out; the expert whose removal
    lowers it most is recorded (``report.json`` "attribution"), and capped or trimmed if
    ``attribution`` says so.

    Args:
        masks: ``single`` (one mask trained by both losses, as the released code) or ``dual``
            (m = m1 ⊙ m2: m1 trained by the performance loss, m2 by the safety loss).
        safety_loss: ``entropy`` (entropy on triggered inputs, the reference) or
            ``consistency`` (cross-entropy of triggered inputs against the clean prediction,
            what AWM and SAU ask).
        adv_weight: α, the weight of the safety loss (reference: 0.1).
        perturbation_eps: ℓ∞ budget of the additive trigger δ, on pixels in [0, 1].
        perturbation_lr: Adam learning rate of the simulated trigger (reference: 1e-4 for δ;
            a patch trigger's logits need about 0.1).
        perturbation_space: ``pixel`` (``clamp(x + δ, 0, 1)`` on pixels, bounded; default) or
            ``normalized`` (the released code: δ added to the *normalised* image, then
            ``clamp(·, 0, 1)``, δ unbounded), to measure what that clamp does.
        trigger: ``additive`` (a universal δ per task) or ``patch`` (Neural-Cleanse mask and
            pattern per task, ``x' = (1 − m) ⊙ x + m ⊙ p``).
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
    safety_loss: SafetyLoss = "entropy"
    adv_weight: float = 0.1
    perturbation_eps: float = 16 / 255
    perturbation_lr: float = 1e-4
    perturbation_space: PerturbationSpace = "pixel"
    trigger: TriggerShape = "additive"
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
        if self.adv_weight < 0:
            raise ConfigError(f"{self.name}: adv_weight must be >= 0, got {self.adv_weight}")
        if not 0 <= self.attribution_factor <= 1:
            raise ConfigError(f"{self.name}: attribution_factor (cap factor / trimmed fraction) must be in [0, 1]")

    # ------------------------------------------------------------------ parts

    def parts(self, learner) -> dict[str, nn.Module | Tensor]:
        parts = super().parts(learner)
        if self.masks == "dual":
            parts["safety_mask"] = ConcreteMask(learner.encoder.shapes, self.temperature)
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
        return (*super().mask_optimizers(), Optimize("perturbation", ("perturbation",), self.perturbation_lr))

    # ------------------------------------------------------------------ steps

    def mask_update(self, learner, step, samples, coefficients, batch, optimizers, reduce, logs) -> None:
        trigger = learner.perturbation
        with torch.no_grad():  # the simulated trigger is fitted against the merged weights, detached
            weights = learner.encoder.weights(coefficients, [t.detach() for t in product(*samples)], rescale=True)
        pseudo = learner.pseudo_labels(weights, batch)
        logs["perturbation_loss"] = learner.trigger_step(
            trigger, weights, batch, pseudo, optimizers["perturbation"], reduce
        )

        weights = learner.encoder.weights(coefficients, product(*samples), rescale=True)
        with torch.no_grad():
            triggered = {t: trigger.apply(x, t) for t, x in batch.items()}
        logits = learner.forward_pairs(weights, [*batch.items(), *triggered.items()])
        clean, perturbed = logits[: len(batch)], logits[len(batch) :]
        performance = sum(entropy(l) for l in clean)
        safety = SAFETY_LOSSES[self.safety_loss](clean, perturbed)
        masks = self.concrete_masks(learner)
        if len(masks) == 1:
            learner.update(optimizers["mask"], performance + self.adv_weight * safety, reduce)
        else:  # dual: m1 by the performance loss, m2 by the safety loss, from one forward pass
            m1, m2 = list(masks[0].parameters()), list(masks[1].parameters())
            grads = torch.autograd.grad(performance, m1, retain_graph=True)
            grads += torch.autograd.grad(self.adv_weight * safety, m2)
            learner.apply_gradients(optimizers["mask"], grads, reduce)
        logs.update(entropy=float(performance.detach()), safety_loss=float(safety.detach()))
        if step == self.steps - 1:
            self.attribute(learner, batch, reduce)

    @torch.no_grad()
    def flip_rate(self, learner, coefficients: Tensor, batch, reduce) -> float:
        """The share of the merge's own clean predictions that the simulated trigger flips."""
        weights = learner.encoder.weights(coefficients, self.fixed_mask(learner))
        clean = learner.pseudo_labels(weights, batch)
        triggered = learner.pseudo_labels(weights, {t: learner.perturbation.apply(x, t) for t, x in batch.items()})
        flips = sum((triggered[t] != clean[t]).sum() for t in batch).float()
        return float(reduce(flips / sum(len(x) for x in batch.values())))

    @torch.no_grad()
    def attribute(self, learner, batch, reduce) -> None:
        """Leave-one-out: how much the trigger's flip rate drops without each expert's τ_i."""
        coefficients = learner.coefficients.detach()
        full = self.flip_rate(learner, coefficients, batch, reduce)
        drops = []
        for i in range(learner.encoder.num_experts):
            without = coefficients.clone()
            without[i] = 0
            drops.append(full - self.flip_rate(learner, without, batch, reduce))
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
