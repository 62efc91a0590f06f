"""AWM, adversarial weight masking (Chai & Chen, 2022), label-free as the DAM authors ran it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from safemerge.defenses.base import Defense
from safemerge.errors import ConfigError
from safemerge.merging.contract import Optimize
from safemerge.merging.simulated_triggers import AdditiveTrigger, check_budget


@dataclass(eq=False)
class AWM(Defense):
    """Adversarial weight masking over the merged update: ``θ_0 + m ⊙ Δ``, ``m ∈ [0, 1]``.

    Per step, on one unlabeled batch per task with pseudo-labels ŷ (the merged model's clean
    predictions before the defence, or each task's expert's: ``pseudo_labels``):

    1. the universal perturbation δ_t of each task takes one step up ``CE(f(clamp(x + δ_t)), ŷ)``
       against the current masked model (``‖δ_t‖∞ ≤ perturbation_eps``);
    2. the mask takes one step down
       ``clean_weight · CE(f(x), ŷ) + adv_weight · CE(f(x + δ), ŷ) + sparsity_weight · mean|1 − m|``
       and is clipped to [0, 1].

    Coordinates of Δ that only the perturbation uses (a backdoor's) are switched off; those the
    clean predictions need are kept; the L1 term keeps everything else at 1.

    Args:
        steps: defence steps (after the method's).
        mask_lr: Adam learning rate of the mask.
        perturbation_eps: ℓ∞ budget of δ on pixels in [0, 1].
        perturbation_lr: Adam learning rate of δ.
        clean_weight: weight of the clean pseudo-label cross-entropy.
        adv_weight: weight of the perturbed-input cross-entropy.
        sparsity_weight: weight of the L1 term on ``1 − m``.
        pseudo_labels: ``merged`` or ``experts`` (:mod:`safemerge.defenses.base`).
    """

    name = "awm"
    steps: int = 200
    mask_lr: float = 1e-2
    perturbation_eps: float = 16 / 255
    perturbation_lr: float = 1e-2
    clean_weight: float = 1.0
    adv_weight: float = 1.0
    sparsity_weight: float = 1e-3
    pseudo_labels: str = "merged"

    def check(self) -> None:
        super().check()
        if min(self.clean_weight, self.adv_weight, self.sparsity_weight) < 0:
            raise ConfigError("awm: clean_weight, adv_weight and sparsity_weight must be >= 0")
        check_budget("awm", self.perturbation_eps)

    def parts(self, learner) -> dict[str, nn.Module]:
        parts = super().parts(learner)
        # straight-through clamp: the perturbation may light pixels that are black in every image
        trigger = AdditiveTrigger(learner.tasks, learner.image_size, self.perturbation_eps, straight_through=True)
        parts["defense_parts"].trigger = trigger.to(learner.encoder.vectors(0).device)
        return parts

    def optimizers(self) -> tuple[Optimize, ...]:
        return (*super().optimizers(), Optimize("defense_trigger", ("defense_parts.trigger",), self.perturbation_lr))

    def defense_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        parts = learner.defense_parts
        pseudo = self.clean_labels(learner, batch)
        with torch.no_grad():
            current = self.defended_weights(learner)
        perturbation_loss = learner.trigger_step(
            parts.trigger, current, batch, pseudo, optimizers["defense_trigger"], reduce
        )

        weights = self.defended_weights(learner)
        with torch.no_grad():
            triggered = {t: parts.trigger.apply(x, t) for t, x in batch.items()}
        logits = learner.forward_pairs(weights, [*batch.items(), *triggered.items()])
        tasks = list(batch) * 2
        losses = [F.cross_entropy(l.float(), pseudo[t]) for t, l in zip(tasks, logits)]
        clean, adversarial = sum(losses[: len(batch)]), sum(losses[len(batch) :])
        sparsity = parts.masked_update.sparsity_loss()
        loss = self.clean_weight * clean + self.adv_weight * adversarial + self.sparsity_weight * sparsity
        learner.update(optimizers["defense_mask"], loss, reduce)
        parts.masked_update.project_()
        return {
            "clean_loss": float(clean.detach()),
            "adversarial_loss": float(adversarial.detach()),
            "sparsity": float(sparsity.detach()),
            "perturbation_loss": perturbation_loss,
        }

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        stats = super().statistics(learner)
        stats.update({f"defense/delta/{k}": v for k, v in learner.defense_parts.trigger.statistics().items()})
        return stats
