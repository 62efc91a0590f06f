"""The merging methods, as small strategy objects chosen in the config by ``class_path``.

Static methods (:class:`WeightAverage`, :class:`TaskArithmetic`, :class:`Ties`) compute the
merged weights directly. Learned methods describe what
:class:`~safemerge.modules.MergeModule` trains on unlabeled adaptation batches, with one
training loop for all of them:

- a **mask stage** (``steps``): a concrete mask over the merged update, trained on the
  prediction entropy of every task; AdaMerging variants first take an inner step on the
  coefficients λ; DAM variants add the simulated-trigger perturbation and a safety term
  (DAM.md, "One training step");
- a **coefficient stage** (``adamerging_steps``): AdaMerging on λ, with the mask fixed if there
  is one.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from safemerge.errors import ConfigError
from safemerge.merging.arithmetic import task_arithmetic, ties_merging, weight_average
from safemerge.merging.masks import FinalMask
from safemerge.merging.merged import Granularity

StateDict = Mapping[str, Tensor]
Stage = Literal["mask", "coefficients"]
SafetyLoss = Literal["entropy", "consistency"]
Masks = Literal["single", "dual"]


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

    Attributes read by the merge module: ``granularity`` (None: λ fixed at
    ``scaling_factor``), ``steps`` (mask stage; 0: no mask), ``adamerging_steps``, ``defense``.
    """

    granularity: Granularity | None = None
    defense: ClassVar[bool] = False
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
        if getattr(self, "safety_loss", "entropy") not in ("entropy", "consistency"):
            raise ConfigError(f"{self.name}: safety_loss must be entropy or consistency")
        if getattr(self, "masks", "single") not in ("single", "dual"):
            raise ConfigError(f"{self.name}: masks must be single or dual")
        eps = getattr(self, "perturbation_eps", 0.1)
        if not 0 < eps <= 1:
            raise ConfigError(f"{self.name}: perturbation_eps is an ℓ∞ budget on pixels in [0, 1]; got {eps}")

    @property
    def has_mask(self) -> bool:
        return self.steps > 0

    @property
    def total_steps(self) -> int:
        return self.steps + self.adamerging_steps

    def stage(self, step: int) -> Stage:
        return "mask" if step < self.steps else "coefficients"


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


class ConcreteTaskArithmetic(LearnedMerge):
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


class ConcreteAdaMerging(LearnedMerge):
    """AdaMerging inside a learned concrete mask: mask stage with an inner λ step, then
    AdaMerging with the mask fixed.

    Args:
        granularity: ``task`` or ``layer`` coefficients.
        scaling_factor: initial λ.
        steps: mask-stage steps (reference: 1000).
        inner_lr: Adam learning rate of the inner λ step (reference: 1).
        reset_coefficients: reset λ to ``scaling_factor`` before each inner step (reference).
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


_DEFENSE_DOC = """
        masks: ``single`` (one mask trained by both losses, as the released code) or ``dual``
            (m = m1 ⊙ m2: m1 trained by the performance loss, m2 by the safety loss).
        safety_loss: ``entropy`` (entropy on perturbed inputs, the reference) or
            ``consistency`` (cross-entropy of perturbed inputs against the clean prediction).
        adv_weight: α, the weight of the safety loss (reference: 0.1).
        perturbation_eps: ℓ∞ budget of the simulated trigger δ, on pixels in [0, 1].
        perturbation_lr: Adam learning rate of δ (reference: 1e-4).
"""


class DAMTaskArithmetic(ConcreteTaskArithmetic):
    __doc__ = """DAM over task arithmetic: λ fixed, the mask trained on entropy plus a safety loss
    against a per-task universal perturbation (DAM.md).

    Args:
        scaling_factor, steps, mask_lr, temperature, final_mask: as :class:`ConcreteTaskArithmetic`.""" + _DEFENSE_DOC

    name = "dam_task_arithmetic"
    defense = True

    def __init__(
        self, scaling_factor: float = 0.3, steps: int = 2000, mask_lr: float = 1e-3,
        temperature: float = 0.5, final_mask: FinalMask = "expected", masks: Masks = "single",
        safety_loss: SafetyLoss = "entropy", adv_weight: float = 0.1,
        perturbation_eps: float = 16 / 255, perturbation_lr: float = 1e-4,
    ) -> None:
        self.masks = masks
        self.safety_loss = safety_loss
        self.adv_weight = adv_weight
        self.perturbation_eps = perturbation_eps
        self.perturbation_lr = perturbation_lr
        super().__init__(scaling_factor, steps, mask_lr, temperature, final_mask)


class DAMAdaMerging(ConcreteAdaMerging):
    __doc__ = """DAM over AdaMerging (task-wise or layer-wise): the mask stage of DAM with an inner
    λ step, then AdaMerging with the mask fixed (DAM.md).

    Args:
        granularity, scaling_factor, steps, inner_lr, reset_coefficients, mask_lr, temperature,
        final_mask, adamerging_steps, adamerging_lr: as :class:`ConcreteAdaMerging`.""" + _DEFENSE_DOC

    name = "dam_adamerging"
    defense = True

    def __init__(
        self, granularity: Granularity = "layer", scaling_factor: float = 0.3, steps: int = 1000,
        inner_lr: float = 1.0, reset_coefficients: bool = True, mask_lr: float = 1e-3,
        temperature: float = 0.5, final_mask: FinalMask = "expected",
        adamerging_steps: int = 1000, adamerging_lr: float = 1e-3, masks: Masks = "single",
        safety_loss: SafetyLoss = "entropy", adv_weight: float = 0.1,
        perturbation_eps: float = 16 / 255, perturbation_lr: float = 1e-4,
    ) -> None:
        self.masks = masks
        self.safety_loss = safety_loss
        self.adv_weight = adv_weight
        self.perturbation_eps = perturbation_eps
        self.perturbation_lr = perturbation_lr
        super().__init__(
            granularity, scaling_factor, steps, inner_lr, reset_coefficients, mask_lr, temperature,
            final_mask, adamerging_steps, adamerging_lr,
        )
