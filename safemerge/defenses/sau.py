"""SAU, shared adversarial unlearning (Wei et al., 2023), label-free and cheap."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.defenses.base import Defense
from safemerge.errors import ConfigError
from safemerge.merging.contract import Optimize
from safemerge.merging.simulated_triggers import (
    PatchTrigger,
    check_area_weight,
    check_budget,
    check_l2_radius,
    shared_adversarial_ascent,
)


@dataclass(eq=False)
class SAU(Defense):
    """Shared adversarial unlearning over the merged update: a mask ``m ∈ [0, 1]`` on ``Δ``.

    The reference is the merged model before the defence (frozen); ŷ its clean predictions (or
    each task's expert's: ``pseudo_labels``).
    Per step:

    1. **shared adversarial examples**: per image, ``attack_steps`` signed-gradient steps
       (ℓ∞ ball ``perturbation_eps``, step ``2.5 · eps / attack_steps``) up
       :func:`shared_wrong_log_probability` of the masked model and the reference — inputs
       that fool both in the same way, which is what a backdoor does to a model and its
       defended copy alike;
    2. **unlearning**: one mask step down ``CE(f(x), ŷ) + adv_weight · CE(f(x̃), ŷ)`` over the
       examples that are shared (both models predict the same class ≠ ŷ), then clipped to [0, 1].

    With ``l2_weight > 0``, also **shared adversarial examples in an ℓ2 ball** of radius
    ``l2_eps`` over the image's pixels (normalised-gradient steps, the same ascent), unlearned as
    the ℓ∞ ones are, with weight ``l2_weight``: an ℓ2 ball can spend its budget on a few pixels,
    so it holds a stamped patch, a blend, a sinusoid or a small warp's change, which the ℓ∞ ball
    of SAU as published (every pixel moved by at most ε) does not.

    With ``alternate``, both kinds of example take turns: the ℓ∞ set on even steps, the ℓ2 set on
    odd ones, each with its weight; one ascent per step, as with one kind alone.

    With ``patch_weight > 0``, also **unlearning on an inverted patch**: a per-task
    Neural-Cleanse trigger (mask and pattern, area penalty ``patch_area_weight``), one Adam step
    per defence step toward the class its images are closest to, against the current defended
    model — it finds a stamped patch (what BadMerging and BadNets plant, which no small ℓ∞
    perturbation reaches); the mask step adds ``patch_weight · CE(f(patch(x)), ŷ)``.

    Args:
        steps: defence steps (after the method's).
        mask_lr: Adam learning rate of the mask.
        perturbation_eps: ℓ∞ budget of the per-image perturbations, on pixels in [0, 1].
        attack_steps: signed-gradient steps per batch (cost: two forward/backward each).
        adv_weight: weight of the unlearning term of the ℓ∞ examples (0: none, not computed).
        pseudo_labels: ``merged`` or ``experts`` (:mod:`safemerge.defenses.base`).
        patch_weight: weight of the inverted-patch unlearning term (0: none, SAU as published).
        patch_lr: Adam learning rate of the inverted patch's mask and pattern logits.
        patch_area_weight: the inverted patch's area penalty (``· mean(mask)``).
        l2_weight: weight of the ℓ2 examples' unlearning term (0: none, SAU as published).
        l2_eps: the ℓ2 examples' radius, over the image's 3·H·W pixels in [0, 1] (6 on the
            mini benchmark's 32-px images is the energy of a 4 x 4 patch changed by ~0.9).
        alternate: with ``adv_weight`` and ``l2_weight`` both > 0, one kind of example per step,
            in turn (ℓ∞ on even steps), instead of both every step.
    """

    name = "sau"
    steps: int = 200
    mask_lr: float = 1e-2
    perturbation_eps: float = 16 / 255
    attack_steps: int = 2
    adv_weight: float = 1.0
    pseudo_labels: str = "merged"
    patch_weight: float = 0.0
    patch_lr: float = 0.1
    patch_area_weight: float = 1e-3
    l2_weight: float = 0.0
    l2_eps: float = 6.0
    alternate: bool = False

    def check(self) -> None:
        super().check()
        if self.attack_steps < 1:
            raise ConfigError(f"sau: attack_steps must be >= 1, got {self.attack_steps}")
        for key in ("adv_weight", "patch_weight", "patch_lr", "l2_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"sau: {key} must be >= 0, got {getattr(self, key)}")
        if self.alternate and not (self.adv_weight > 0 and self.l2_weight > 0):
            raise ConfigError(
                "sau: alternate takes turns between the l-inf and l2 examples, so it needs adv_weight > 0 "
                f"and l2_weight > 0 (got {self.adv_weight} and {self.l2_weight}); drop alternate or set both"
            )
        check_budget("sau", self.perturbation_eps)
        check_l2_radius("sau", self.l2_eps)
        check_area_weight("sau", self.patch_area_weight)

    def parts(self, learner) -> dict[str, nn.Module]:
        parts = super().parts(learner)
        if self.patch_weight > 0:
            patch = PatchTrigger(learner.tasks, learner.image_size, self.patch_area_weight, targeted=True)
            parts["defense_parts"].patch = patch.to(learner.encoder.vectors(0).device)
        return parts

    def optimizers(self) -> tuple[Optimize, ...]:
        patch = (Optimize("defense_patch", ("defense_parts.patch",), self.patch_lr),) if self.patch_weight > 0 else ()
        return (*super().optimizers(), *patch)

    def defense_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        parts = learner.defense_parts
        reference = self.defended_weights(learner, masked=False)
        pseudo = self.clean_labels(learner, batch, reference)
        weights = self.defended_weights(learner)
        current = {name: w.detach() for name, w in weights.items()}
        budgets = {
            "adversarial": (self.adv_weight, self.perturbation_eps, "linf"),
            "l2": (self.l2_weight, self.l2_eps, "l2"),
        }
        if self.alternate:  # one kind per step, in turn
            del budgets["l2" if step % 2 == 0 else "adversarial"]
        unlearned = {}  # name -> (weight, examples); a set of weight 0 is not computed
        clean_logits = None  # the clean forward pass of the masked model, from the first ascent
        for name, (weight, eps, norm) in budgets.items():
            if weight > 0:  # only the first ascent needs the mask's gradient (for its clean logits)
                examples, logits = shared_adversarial_ascent(
                    learner,
                    weights if clean_logits is None else current,
                    reference,
                    batch,
                    pseudo,
                    eps,
                    self.attack_steps,
                    norm,
                )
                unlearned[name] = (weight, examples)
                if clean_logits is None:
                    clean_logits = logits
        # an adversarial image can count only where it fools the frozen reference (see below),
        # so only those go through the masked model again
        reference_predictions = {name: learner.pseudo_labels(reference, x) for name, (_, x) in unlearned.items()}
        fooled = {
            name: {t: (predicted[t] != pseudo[t]).nonzero().squeeze(1) for t in batch}
            for name, predicted in reference_predictions.items()
        }
        logs: dict[str, float] = {}
        patched: dict[str, Tensor] = {}
        if self.patch_weight > 0:  # the inverted patch takes its step against the current defended model
            logs["patch_inversion_loss"] = learner.trigger_step(
                parts.patch, current, batch, pseudo, optimizers["defense_patch"], reduce
            )
            with torch.no_grad():
                patched = {t: parts.patch.apply(x, t) for t, x in batch.items()}

        pairs = [] if clean_logits is not None else [*batch.items()]
        for name, (_, examples) in unlearned.items():
            pairs += [(t, x[fooled[name][t]]) for t, x in examples.items()]
        pairs += patched.items()
        logits = learner.forward_pairs(weights, pairs) if any(len(x) for _, x in pairs) else []
        if clean_logits is None:
            clean_logits, logits = dict(zip(batch, logits)), logits[len(batch) :]
        clean = sum(F.cross_entropy(clean_logits[t].float(), pseudo[t]) for t in batch)
        loss, shared_count, n = clean, 0, len(batch)
        for index, (name, (weight, _)) in enumerate(unlearned.items()):
            unlearn = 0.0
            for task, a in zip(batch, logits[index * n : (index + 1) * n]):
                chosen = fooled[name][task]
                predicted = reference_predictions[name][task][chosen]
                shared = a.argmax(-1) == predicted  # both predict the same class ≠ ŷ
                per_image = F.cross_entropy(a.float(), pseudo[task][chosen], reduction="none")
                unlearn = unlearn + (per_image * shared).sum() / len(batch[task])
                shared_count += int(shared.sum())
            loss = loss + weight * unlearn
            logs["unlearning_loss" if name == "adversarial" else f"{name}_unlearning_loss"] = float(
                torch.as_tensor(unlearn).detach()
            )
        if patched:
            first = len(unlearned) * n
            patch_unlearning = sum(F.cross_entropy(p.float(), pseudo[t]) for t, p in zip(patched, logits[first:]))
            loss = loss + self.patch_weight * patch_unlearning
            logs["patch_unlearning_loss"] = float(patch_unlearning.detach())
        learner.update(optimizers["defense_mask"], loss, reduce)
        parts.masked_update.project_()
        return {
            "clean_loss": float(clean.detach()),
            "shared_fraction": shared_count / max(1, len(unlearned) * sum(len(x) for x in batch.values())),
            **logs,
        }

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        stats = super().statistics(learner)
        if self.patch_weight > 0:
            stats.update({f"defense/patch/{k}": v for k, v in learner.defense_parts.patch.statistics().items()})
        return stats
