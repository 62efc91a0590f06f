"""The merging methods, as small strategy objects chosen in the config by ``class_path``.

Static methods (:class:`WeightAverage`, :class:`TaskArithmetic`, :class:`Ties`) compute the
merged weights directly. Learned methods register their learned parts on a
:class:`~safemerge.merging.learner.MergeLearner` and own their training steps; the learner's
loop only runs the schedule:

- a **mask stage** (``steps``, :meth:`MaskedMerge.mask_step`): a concrete mask over the merged
  update, trained on the prediction entropy of every task; AdaMerging variants first take an
  inner step on the coefficients λ (:meth:`ConcreteAdaMerging.inner_step`); DAM variants add a
  simulated-trigger step and a safety term (:class:`DefenseAwareMask`; DAM.md, "One training
  step");
- a **coefficient stage** (``adamerging_steps``, :meth:`LearnedMerge.coefficients_step`):
  AdaMerging on λ, with the mask fixed if there is one.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.defenses.triggers import PerturbationSpace, TriggerShape, check_budget, simulated_trigger
from safemerge.errors import ConfigError
from safemerge.merging.arithmetic import task_arithmetic, ties_merging, weight_average
from safemerge.merging.masks import ConcreteMask, FinalMask, combine, mask_statistics, product
from safemerge.merging.merged import Granularity

StateDict = Mapping[str, Tensor]
SafetyLoss = Literal["entropy", "consistency"]
Masks = Literal["single", "dual"]
Attribution = Literal["none", "cap", "trim"]


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy of the softmax predictions of a batch (AdaMerging's objective)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


class MergeMethod:
    """Base of all methods. ``name`` is the config name used in reports."""

    name: ClassVar[str]

    def describe(self) -> dict:
        """The method's name and hyper-parameters (recorded in ``report.json``)."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class StaticMerge(MergeMethod):
    """A method that learns nothing: ``merge`` returns the merged weights."""

    def merge(self, base: StateDict, experts: Sequence[StateDict]) -> dict[str, Tensor]:
        raise NotImplementedError


class WeightAverage(StaticMerge):
    """The element-wise mean of the experts' weights."""

    name = "weight_average"

    def merge(self, base, experts):
        return weight_average(experts)


class TaskArithmetic(StaticMerge):
    """``θ_0 + λ Σ_i τ_i``.

    Args:
        scaling_factor: λ (the literature picks it among 0.1–1.0 on validation data; 0.3).
    """

    name = "task_arithmetic"

    def __init__(self, scaling_factor: float = 0.3) -> None:
        self.scaling_factor = scaling_factor

    def merge(self, base, experts):
        return task_arithmetic(base, experts, self.scaling_factor)


class Ties(StaticMerge):
    """TIES-merging: trim, elect sign, disjoint mean (:func:`~safemerge.merging.ties_merging`).

    Args:
        k: fraction of each task vector's entries kept (0.2 keeps the top 20 % by magnitude).
        scaling_factor: λ applied to the merged task vector.
    """

    name = "ties"

    def __init__(self, k: float = 0.2, scaling_factor: float = 0.3) -> None:
        if not 0 < k <= 1:
            raise ConfigError(f"ties: k is the fraction of entries kept, in (0, 1]; got {k}")
        self.k = k
        self.scaling_factor = scaling_factor

    def merge(self, base, experts):
        return ties_merging(base, experts, self.k, self.scaling_factor)


class LearnedMerge(MergeMethod):
    """``θ_0 + Σ_i λ_i ⊙ m ⊙ τ_i`` with λ and/or the mask m learned (see the module docstring).

    ``granularity`` None keeps λ fixed at ``scaling_factor``. The base class owns λ and the
    coefficient stage (AdaMerging); :class:`MaskedMerge` adds the mask stage.
    """

    granularity: Granularity | None = None
    safety_aware: ClassVar[bool] = False  # trains against a simulated trigger (DAM)
    steps: int = 0
    adamerging_steps: int = 0

    def _check(self) -> None:
        for key in ("steps", "adamerging_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{self.name}: {key} must be >= 0, got {getattr(self, key)}")
        if self.steps + self.adamerging_steps == 0:
            raise ConfigError(f"{self.name}: nothing to train (steps and adamerging_steps are 0)")
        if self.granularity not in (None, "task", "layer"):
            raise ConfigError(f"{self.name}: granularity must be task or layer, got {self.granularity!r}")
        if getattr(self, "final_mask", "expected") not in ("expected", "discrete", "sample"):
            raise ConfigError(f"{self.name}: final_mask must be expected, discrete or sample")

    @property
    def has_mask(self) -> bool:
        return self.steps > 0

    @property
    def total_steps(self) -> int:
        return self.steps + self.adamerging_steps

    def stages(self) -> list[tuple[str, int]]:
        return [("mask", self.steps), ("coefficients", self.adamerging_steps)]

    # ------------------------------------------------------------------ parts and optimizers

    def build(self, learner) -> None:
        """Register λ on the learner: a parameter if learned, a buffer if fixed."""
        initial = learner.encoder.coefficients(self.granularity or "task", self.scaling_factor)
        learner.register_buffer("initial_coefficients", initial.clone())
        if self.granularity is None:
            learner.register_buffer("coefficients", initial)
        else:
            learner.coefficients = nn.Parameter(initial)

    def optimizers(self, learner) -> dict[str, torch.optim.Optimizer]:
        if not self.adamerging_steps:
            return {}
        return {"coefficients": torch.optim.Adam([learner.coefficients], lr=self.adamerging_lr)}

    def fixed_mask(self, learner) -> list[Tensor] | None:
        """The mask after training (rescaled), or None without one."""
        return None

    def resumed(self, learner) -> None:
        """λ and the masks are the learned state itself: nothing to re-derive."""

    def merged_weights(self, learner) -> dict[str, Tensor]:
        return learner.encoder.weights(learner.coefficients, self.fixed_mask(learner))

    # ------------------------------------------------------------------ steps

    def step(self, learner, stage: str, step: int, batch, optimizers, reduce) -> dict[str, float]:
        return getattr(self, f"{stage}_step")(learner, step, batch, optimizers, reduce)

    def coefficients_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        """AdaMerging: λ by entropy minimisation, the mask (if any) fixed."""
        mask = self.fixed_mask(learner)
        weights = learner.encoder.weights(learner.coefficients, None if mask is None else [m.detach() for m in mask])
        loss = sum(entropy(l) for l in learner.logits(weights, batch).values())
        learner.update(optimizers["coefficients"], loss, [learner.coefficients], reduce)
        return {"entropy": float(loss.detach())}

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        lam = learner.coefficients.detach()
        stats = {"lambda/mean": float(lam.mean()), "lambda/min": float(lam.min()), "lambda/max": float(lam.max())}
        for i in range(lam.shape[0]):
            stats[f"lambda/expert_{i}"] = float(lam[i].mean())
        return stats


class AdaMerging(LearnedMerge):
    """AdaMerging (Yang et al., 2024): λ learned by entropy minimisation on unlabeled batches.

    Args:
        granularity: ``task`` (one λ per expert) or ``layer`` (one per expert per tensor).
        scaling_factor: initial λ.
        adamerging_steps: optimisation steps (reference: 1000 task-wise / layer-wise).
        adamerging_lr: Adam learning rate for λ (reference: 1e-3).
    """

    name = "adamerging"

    def __init__(
        self, granularity: Granularity = "layer", scaling_factor: float = 0.3,
        adamerging_steps: int = 1000, adamerging_lr: float = 1e-3,
    ) -> None:
        self.granularity = granularity
        self.scaling_factor = scaling_factor
        self.adamerging_steps = adamerging_steps
        self.adamerging_lr = adamerging_lr
        self._check()


class MaskedMerge(LearnedMerge):
    """A learned method with a concrete mask: the mask stage's template step.

    One step samples the mask(s) (seeded by the step), takes the :meth:`inner_step` (λ, if the
    method learns it), then the :meth:`mask_update`. Subclasses override those two.
    """

    def build(self, learner) -> None:
        super().build(learner)
        if self.has_mask:
            learner.mask = ConcreteMask(learner.encoder.shapes, self.temperature)

    def masks(self, learner) -> list[ConcreteMask]:
        """The concrete masks whose product gates the update (one; DAM's dual mode: two)."""
        return [learner.mask] if self.has_mask else []

    def optimizers(self, learner) -> dict[str, torch.optim.Optimizer]:
        masks = self.masks(learner)
        optimizers = {"mask": torch.optim.Adam([p for m in masks for p in m.parameters()], lr=self.mask_lr)} if masks else {}
        return {**optimizers, **super().optimizers(learner)}

    def fixed_mask(self, learner) -> list[Tensor] | None:
        masks = self.masks(learner)
        if not masks:
            return None
        generator = learner.generator(-1)
        return combine(*(m.final(self.final_mask, generator) for m in masks))

    def mask_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        logs: dict[str, float] = {}
        generator = learner.generator(step)
        samples = [m.sample(generator) for m in self.masks(learner)]
        self.inner_step(learner, [t.detach() for t in product(*samples)], batch, optimizers, reduce, logs)
        self.mask_update(learner, step, samples, learner.coefficients.detach(), batch, optimizers, reduce, logs)
        return logs

    def inner_step(self, learner, mask, batch, optimizers, reduce, logs) -> None:
        """Before the mask update, with the mask sample detached (λ fixed here: nothing)."""

    def mask_update(self, learner, step, samples, coefficients, batch, optimizers, reduce, logs) -> None:
        """One step on the mask logits: the entropy of every task's predictions."""
        weights = learner.encoder.weights(coefficients, product(*samples), rescale=True)
        loss = sum(entropy(l) for l in learner.logits(weights, batch).values())
        learner.update(optimizers["mask"], loss, [p for m in self.masks(learner) for p in m.parameters()], reduce)
        logs["entropy"] = float(loss.detach())

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        stats = super().statistics(learner)
        for prefix, mask in zip(("mask", "safety_mask"), self.masks(learner)):
            stats.update({f"{prefix}/{k}": v for k, v in mask_statistics(mask.expected()).items()})
        return stats


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

    def __init__(
        self, scaling_factor: float = 0.3, steps: int = 2000, mask_lr: float = 1e-3,
        temperature: float = 0.5, final_mask: FinalMask = "expected",
    ) -> None:
        self.scaling_factor = scaling_factor
        self.steps = steps
        self.mask_lr = mask_lr
        self.temperature = temperature
        self.final_mask = final_mask
        self._check()


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

    def __init__(
        self, granularity: Granularity = "layer", scaling_factor: float = 0.3, steps: int = 1000,
        inner_lr: float = 1.0, reset_coefficients: bool = True, mask_lr: float = 1e-3,
        temperature: float = 0.5, final_mask: FinalMask = "expected",
        adamerging_steps: int = 1000, adamerging_lr: float = 1e-3,
    ) -> None:
        self.granularity = granularity
        self.scaling_factor = scaling_factor
        self.steps = steps
        self.inner_lr = inner_lr
        self.reset_coefficients = reset_coefficients
        self.mask_lr = mask_lr
        self.temperature = temperature
        self.final_mask = final_mask
        self.adamerging_steps = adamerging_steps
        self.adamerging_lr = adamerging_lr
        self._check()

    def optimizers(self, learner) -> dict[str, torch.optim.Optimizer]:
        inner = {"inner": torch.optim.Adam([learner.coefficients], lr=self.inner_lr)} if self.has_mask else {}
        return {**super().optimizers(learner), **inner}

    def _reset_coefficients(self, learner) -> None:
        if self.reset_coefficients:
            with torch.no_grad():
                learner.coefficients.copy_(learner.initial_coefficients)

    def inner_step(self, learner, mask, batch, optimizers, reduce, logs) -> None:
        """Performance step on λ with the mask sample detached (λ reset first, as the reference)."""
        self._reset_coefficients(learner)
        weights = learner.encoder.weights(learner.coefficients, mask, rescale=True)
        loss = sum(entropy(l) for l in learner.logits(weights, batch).values())
        learner.update(optimizers["inner"], loss, [learner.coefficients], reduce)
        logs["inner_entropy"] = float(loss.detach())

    def coefficients_step(self, learner, step, batch, optimizers, reduce) -> dict[str, float]:
        if step == 0 and self.has_mask:  # λ enters AdaMerging from its initial value, not the inner step's
            self._reset_coefficients(learner)
        return super().coefficients_step(learner, step, batch, optimizers, reduce)


def _entropy_safety(clean: Sequence[Tensor], triggered: Sequence[Tensor]) -> Tensor:
    # DAM's reference: confident predictions on triggered inputs (whatever the class)
    return sum(entropy(t) for t in triggered)


def _consistency_safety(clean: Sequence[Tensor], triggered: Sequence[Tensor]) -> Tensor:
    # AWM/SAU's ask: the clean prediction kept under the trigger
    return sum(F.cross_entropy(t.float(), c.argmax(-1).detach()) for c, t in zip(clean, triggered))


SAFETY_LOSSES = {"entropy": _entropy_safety, "consistency": _consistency_safety}


class DefenseAwareMask:
    """DAM's additions to a masked merge (mixed in before :class:`ConcreteTaskArithmetic` or
    :class:`ConcreteAdaMerging`): a simulated trigger, a safety term in the mask step, and
    the attribution of the trigger's effect to one expert.

    Per mask step, after the inner λ step: one step of the simulated trigger against the
    merged model's own clean predictions (:meth:`MergeLearner.attack_step`), then one mask
    step on ``Σ_t H(clean) + α · L_safe`` (single mask) or ``m1`` on the first term and ``m2``
    on the second (dual masks). After the last mask step the trigger's effect (the share of
    pseudo-labels it flips) is measured with each expert left out; the expert whose removal
    lowers it most is recorded, and capped or trimmed if ``attribution`` says so.
    """

    safety_aware = True

    def _dam_options(
        self, masks, safety_loss, adv_weight, perturbation_eps, perturbation_lr, perturbation_space, trigger,
        area_weight, patch_size, targeted, attribution, attribution_factor,
    ) -> None:
        self.masks_mode = masks
        self.safety_loss = safety_loss
        self.adv_weight = adv_weight
        self.perturbation_eps = perturbation_eps
        self.perturbation_lr = perturbation_lr
        self.perturbation_space = perturbation_space
        self.trigger = trigger
        self.area_weight = area_weight
        self.patch_size = patch_size
        self.targeted = targeted
        self.attribution = attribution
        self.attribution_factor = attribution_factor

    def _check(self) -> None:
        super()._check()
        choices = {"masks_mode": ("single", "dual"), "safety_loss": tuple(SAFETY_LOSSES),
                   "perturbation_space": ("pixel", "normalized"), "trigger": ("additive", "patch"),
                   "attribution": ("none", "cap", "trim")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                name = "masks" if key == "masks_mode" else key
                raise ConfigError(f"{self.name}: {name} must be {' or '.join(allowed)}; got {getattr(self, key)!r}")
        check_budget(self.name, self.perturbation_eps)
        if self.area_weight < 0:
            raise ConfigError(f"{self.name}: area_weight is a penalty on the trigger's area and must be >= 0, got {self.area_weight}")
        if self.perturbation_space == "normalized" and self.trigger != "additive":
            raise ConfigError(f"{self.name}: perturbation_space: normalized applies to the additive trigger only")
        if self.adv_weight < 0:
            raise ConfigError(f"{self.name}: adv_weight must be >= 0, got {self.adv_weight}")
        if not 0 <= self.attribution_factor <= 1:
            raise ConfigError(f"{self.name}: attribution_factor (cap factor / trimmed fraction) must be in [0, 1]")

    def describe(self) -> dict:
        described = super().describe()
        described["masks"] = described.pop("masks_mode")
        return described

    # ------------------------------------------------------------------ parts

    def build(self, learner) -> None:
        super().build(learner)
        if self.masks_mode == "dual":
            learner.safety_mask = ConcreteMask(learner.encoder.shapes, self.temperature)
        classifier = learner.classifier
        learner.perturbation = simulated_trigger(
            self.trigger, learner.tasks, learner.image_size, eps=self.perturbation_eps, space=self.perturbation_space,
            mean=classifier.mean.flatten().tolist(), std=classifier.std.flatten().tolist(),
            area_weight=self.area_weight, patch_size=self.patch_size, targeted=self.targeted,
        ).to(learner.encoder.vectors(0).device)

    def masks(self, learner) -> list[ConcreteMask]:
        return [*super().masks(learner), *([learner.safety_mask] if self.masks_mode == "dual" else [])]

    def optimizers(self, learner) -> dict[str, torch.optim.Optimizer]:
        trigger = torch.optim.Adam(learner.perturbation.parameters(), lr=self.perturbation_lr)
        return {**super().optimizers(learner), "perturbation": trigger}

    # ------------------------------------------------------------------ steps

    def mask_update(self, learner, step, samples, coefficients, batch, optimizers, reduce, logs) -> None:
        trigger = learner.perturbation
        with torch.no_grad():  # the simulated trigger is fitted against the merged weights, detached
            weights = learner.encoder.weights(coefficients, [t.detach() for t in product(*samples)], rescale=True)
        pseudo = learner.pseudo_labels(weights, batch)
        logs["perturbation_loss"] = learner.attack_step(trigger, weights, batch, pseudo, optimizers["perturbation"], reduce)

        weights = learner.encoder.weights(coefficients, product(*samples), rescale=True)
        with torch.no_grad():
            triggered = {t: trigger.apply(x, t) for t, x in batch.items()}
        logits = learner.forward_pairs(weights, [*batch.items(), *triggered.items()])
        clean, perturbed = logits[: len(batch)], logits[len(batch):]
        performance = sum(entropy(l) for l in clean)
        safety = SAFETY_LOSSES[self.safety_loss](clean, perturbed)
        masks = self.masks(learner)
        if len(masks) == 1:
            learner.update(optimizers["mask"], performance + self.adv_weight * safety, list(masks[0].parameters()), reduce)
        else:  # dual: m1 by the performance loss, m2 by the safety loss, from one forward pass
            m1, m2 = list(masks[0].parameters()), list(masks[1].parameters())
            grads = torch.autograd.grad(performance, m1, retain_graph=True)
            grads += torch.autograd.grad(self.adv_weight * safety, m2)
            learner.apply_gradients(optimizers["mask"], grads, m1 + m2, reduce)
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
        learner.attribution = {
            "flip_rate": full, "drop": dict(zip(learner.tasks, drops)), "expert": learner.tasks[top],
            "action": self.attribution, "factor": self.attribution_factor,
        }
        self.edit_attributed(learner)

    @staticmethod
    def edit_attributed(learner) -> None:
        """Cap or trim the attributed expert's task vector, as ``learner.attribution`` records."""
        attribution = learner.attribution
        top = learner.tasks.index(attribution["expert"])
        if attribution["action"] == "cap":
            learner.encoder.edit_expert_(top, scale=attribution["factor"])
        elif attribution["action"] == "trim":
            learner.encoder.edit_expert_(top, trim=attribution["factor"])

    def resumed(self, learner) -> None:
        """The attribution edits the frozen task vectors: a resumed run edits them again."""
        super().resumed(learner)
        if learner.attribution is not None:
            self.edit_attributed(learner)

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        stats = super().statistics(learner)
        stats.update({f"delta/{k}": v for k, v in learner.perturbation.statistics().items()})
        return stats


_DEFENSE_DOC = """
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
            effect (leave-one-out, recorded in ``report.json``); ``cap`` scales that expert's
            τ by ``attribution_factor``, ``trim`` zeroes the ``attribution_factor`` fraction
            of its smallest-magnitude entries (as TIES' trim), ``none`` only records.
        attribution_factor: the cap factor, or the trimmed fraction, in [0, 1].
"""


class DAMTaskArithmetic(DefenseAwareMask, ConcreteTaskArithmetic):
    __doc__ = """DAM over task arithmetic: λ fixed, the mask trained on entropy plus a safety loss
    against a per-task simulated trigger (DAM.md).

    Args:
        scaling_factor, steps, mask_lr, temperature, final_mask: as :class:`ConcreteTaskArithmetic`.""" + _DEFENSE_DOC

    name = "dam_task_arithmetic"

    def __init__(
        self, scaling_factor: float = 0.3, steps: int = 2000, mask_lr: float = 1e-3,
        temperature: float = 0.5, final_mask: FinalMask = "expected", masks: Masks = "single",
        safety_loss: SafetyLoss = "entropy", adv_weight: float = 0.1,
        perturbation_eps: float = 16 / 255, perturbation_lr: float = 1e-4,
        perturbation_space: PerturbationSpace = "pixel", trigger: TriggerShape = "additive",
        area_weight: float = 1e-3, patch_size: int | None = None, targeted: bool = False,
        attribution: Attribution = "none", attribution_factor: float = 0.5,
    ) -> None:
        self._dam_options(
            masks, safety_loss, adv_weight, perturbation_eps, perturbation_lr, perturbation_space, trigger,
            area_weight, patch_size, targeted, attribution, attribution_factor,
        )
        super().__init__(scaling_factor, steps, mask_lr, temperature, final_mask)


class DAMAdaMerging(DefenseAwareMask, ConcreteAdaMerging):
    __doc__ = """DAM over AdaMerging (task-wise or layer-wise): the mask stage of DAM with an inner
    λ step, then AdaMerging with the mask fixed (DAM.md).

    Args:
        granularity, scaling_factor, steps, inner_lr, reset_coefficients, mask_lr, temperature,
        final_mask, adamerging_steps, adamerging_lr: as :class:`ConcreteAdaMerging`.""" + _DEFENSE_DOC

    name = "dam_adamerging"

    def __init__(
        self, granularity: Granularity = "layer", scaling_factor: float = 0.3, steps: int = 1000,
        inner_lr: float = 1.0, reset_coefficients: bool = True, mask_lr: float = 1e-3,
        temperature: float = 0.5, final_mask: FinalMask = "expected",
        adamerging_steps: int = 1000, adamerging_lr: float = 1e-3, masks: Masks = "single",
        safety_loss: SafetyLoss = "entropy", adv_weight: float = 0.1,
        perturbation_eps: float = 16 / 255, perturbation_lr: float = 1e-4,
        perturbation_space: PerturbationSpace = "pixel", trigger: TriggerShape = "additive",
        area_weight: float = 1e-3, patch_size: int | None = None, targeted: bool = False,
        attribution: Attribution = "none", attribution_factor: float = 0.5,
    ) -> None:
        self._dam_options(
            masks, safety_loss, adv_weight, perturbation_eps, perturbation_lr, perturbation_space, trigger,
            area_weight, patch_size, targeted, attribution, attribution_factor,
        )
        super().__init__(
            granularity, scaling_factor, steps, inner_lr, reset_coefficients, mask_lr, temperature,
            final_mask, adamerging_steps, adamerging_lr,
        )
