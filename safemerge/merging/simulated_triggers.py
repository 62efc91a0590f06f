"""Simulated triggers: what a defender optimises in place of the unknown backdoor trigger.

A simulated trigger holds one learnable trigger per task and turns clean images into
"triggered" ones. It is optimised against the merged model's own clean predictions (the
pseudo-labels ŷ): untargeted, it maximises ``CE(f(x'), ŷ)``; targeted, it minimises the
cross-entropy toward the class that is easiest to reach. :meth:`SimulatedTrigger.attack_loss`
is the loss its optimiser *minimises* (so the sign lives in one place).

- :class:`AdditiveTrigger` (DAM's, and AWM's universal perturbation): ``clamp(x + δ_t, 0, 1)``
  with ``‖δ_t‖∞ ≤ ε`` in pixel space, or — to reproduce the released DAM code —
  ``clamp(normalize(x) + δ_t, 0, 1)`` with δ unbounded (``space="normalized"``).
- :class:`PatchTrigger` (Neural Cleanse): ``x' = (1 − m) ⊙ x + m ⊙ p`` with a mask
  ``m = sigmoid(·)`` of shape ``[1, H, W]``, a pattern ``p = sigmoid(·)`` ``[3, H, W]`` and an
  area penalty ``area_weight · mean(m)``.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.errors import ConfigError

PerturbationSpace = Literal["pixel", "normalized"]
TriggerShape = Literal["additive", "patch"]


def check_budget(owner: str, eps: float) -> None:
    """A one-line error unless ``eps`` is an ℓ∞ budget on pixels in [0, 1] (every method and
    defence that perturbs images checks its ``perturbation_eps`` here)."""
    if not 0 < eps <= 1:
        raise ConfigError(f"{owner}: perturbation_eps is an ℓ∞ budget on pixels in [0, 1]; got {eps}")


def check_area_weight(owner: str, area_weight: float) -> None:
    """A one-line error unless the patch trigger's area penalty ``area_weight`` is >= 0."""
    if area_weight < 0:
        raise ConfigError(
            f"{owner}: area_weight is a penalty on the trigger's area and must be >= 0, got {area_weight}"
        )


def clamp_pixels(images: Tensor, straight_through: bool = False) -> Tensor:
    """``clamp(images, 0, 1)``; with ``straight_through`` the gradient passes the clamp as if it
    were the identity. A plain clamp has no gradient at 0 and 1, so a perturbation that starts
    at zero can never light a black pixel (or darken a white one): the straight-through clamp
    lets it, while the forward pass still sees valid pixels."""
    clamped = images.clamp(0, 1)
    return images + (clamped - images).detach() if straight_through else clamped


def shared_wrong_log_probability(logits: Tensor, reference_logits: Tensor, labels: Tensor) -> Tensor:
    """``mean log Σ_{c ≠ y} p(c) · p_ref(c)``: how likely both models agree on the same wrong class."""
    joint = F.softmax(logits.float(), -1) * F.softmax(reference_logits.float(), -1)
    wrong = joint.scatter(-1, labels[:, None], 0.0).sum(-1)
    return wrong.clamp_min(1e-12).log().mean()


PerturbationNorm = Literal["linf", "l2"]


def check_l2_radius(owner: str, eps: float) -> None:
    """A one-line error unless ``eps`` (``l2_eps``) is a positive ℓ2 radius over an image's pixels."""
    if not eps > 0:
        raise ConfigError(f"{owner}: l2_eps is an l2 radius over the image's pixels and must be > 0; got {eps}")


def shared_adversarial_examples(
    learner,
    current,
    reference,
    batch: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    eps: float,
    steps: int = 1,
    norm: PerturbationNorm = "linf",
) -> dict[str, Tensor]:
    """SAU's shared adversarial examples: per image, ``steps`` steps up
    :func:`shared_wrong_log_probability` of the weights ``current`` and ``reference`` — inputs
    that fool both toward the same wrong class — within the ``norm`` ball of radius ``eps``:
    ℓ∞, signed-gradient steps of ``2.5 · eps / steps``; ℓ2, normalised-gradient steps of that
    size, projected back onto the ball. An ℓ2 ball spends its budget where the gradient is: a
    radius of a few pixels' worth holds a stamped patch, a blend or a sinusoid, which a small
    ℓ∞ ball does not."""
    return shared_adversarial_ascent(learner, current, reference, batch, labels, eps, steps, norm)[0]


def shared_adversarial_ascent(
    learner,
    current,
    reference,
    batch: Mapping[str, Tensor],
    labels: Mapping[str, Tensor],
    eps: float,
    steps: int = 1,
    norm: PerturbationNorm = "linf",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """:func:`shared_adversarial_examples`, and ``current``'s logits on the clean batch (the
    ascent's first point, where every perturbation is zero) with their graph kept: a caller
    whose ``current`` carries the gradient of what it learns gets its clean forward pass free."""
    size = 2.5 * eps / steps
    with torch.enable_grad():
        deltas = {t: torch.zeros_like(x, requires_grad=True) for t, x in batch.items()}
        for step in range(steps):
            images = {t: clamp_pixels(x + deltas[t], straight_through=True) for t, x in batch.items()}
            ours, theirs = learner.logits(current, images), learner.logits(reference, images)
            if step == 0:
                clean_logits = ours
            objective = sum(shared_wrong_log_probability(ours[t], theirs[t], labels[t]) for t in batch)
            grads = torch.autograd.grad(objective, list(deltas.values()), retain_graph=step == 0)
            with torch.no_grad():
                for delta, grad in zip(deltas.values(), grads):
                    if norm == "linf":
                        delta.add_(size * grad.sign()).clamp_(-eps, eps)
                    else:
                        delta.add_(size * grad / _norms(grad).clamp_min(1e-12))
                        delta.mul_((eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0))
    return {t: (x + deltas[t]).clamp(0, 1).detach() for t, x in batch.items()}, clean_logits


def _norms(rows: Tensor) -> Tensor:
    """Each row's ℓ2 norm, shaped to broadcast against the rows."""
    return rows.flatten(1).norm(dim=1).view(-1, *[1] * (rows.dim() - 1))


class SimulatedTrigger(nn.Module):
    """Base: one trigger per task, ``apply`` in pixel space, ``attack_loss`` to minimise."""

    def __init__(self, tasks: Sequence[str], targeted: bool = False) -> None:
        super().__init__()
        self.tasks, self.targeted = list(tasks), targeted

    def apply(self, images: Tensor, task: str) -> Tensor:
        raise NotImplementedError

    def penalty(self) -> Tensor:
        """A regulariser added to the attack loss (0 unless the trigger has one)."""
        return torch.zeros((), device=next(self.parameters()).device)

    def attack_loss(self, logits: Mapping[str, Tensor], pseudo_labels: Mapping[str, Tensor]) -> Tensor:
        """The loss the trigger's optimiser minimises, summed over tasks.

        Untargeted: ``−CE(logits, ŷ)``. Targeted: ``CE(logits, c_t)`` toward the class ``c_t``
        that the triggered images are already closest to (the lowest mean cross-entropy), so a
        trigger that moves predictions somewhere keeps moving them there.
        """
        loss = self.penalty()
        for task, l in logits.items():
            l = l.float()
            if self.targeted:
                with torch.no_grad():
                    target = (-F.log_softmax(l, -1)).mean(0).argmin()
                loss = loss + F.cross_entropy(l, target.expand(len(l)))
            else:
                loss = loss - F.cross_entropy(l, pseudo_labels[task])
        return loss

    @torch.no_grad()
    def project_(self) -> None:
        """Bring the trigger back into its constraint set after an optimiser step."""

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        return {}


class AdditiveTrigger(SimulatedTrigger):
    """Per-task universal perturbations ``δ_t`` of shape ``[3, image_size, image_size]``, zero-initialised.

    Args:
        tasks: task names (one δ each).
        image_size: side of the images.
        eps: ℓ∞ budget on pixels in [0, 1] (``space="pixel"``; enforced by :meth:`project_`).
        space: ``pixel`` (``clamp(x + δ, 0, 1)``) or ``normalized`` (the released DAM code:
            δ added to the normalised image, then ``clamp(·, 0, 1)``, δ unbounded; ``mean`` and
            ``std`` map the result back to pixels so the classifier's own normalisation
            reproduces it exactly).
        straight_through: let the gradient through the pixel clamp (:func:`clamp_pixels`);
            False is DAM's (and the released code's) plain clamp.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        image_size: int,
        eps: float,
        space: PerturbationSpace = "pixel",
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        targeted: bool = False,
        straight_through: bool = False,
    ) -> None:
        super().__init__(tasks, targeted)
        check_budget("additive trigger", eps)
        if space not in ("pixel", "normalized"):
            raise ConfigError(f"perturbation_space must be pixel or normalized, got {space!r}")
        self.eps, self.space, self.straight_through = eps, space, straight_through
        self.deltas = nn.ParameterList(nn.Parameter(torch.zeros(3, image_size, image_size)) for _ in tasks)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def delta(self, task: str) -> Tensor:
        return self.deltas[self.tasks.index(task)]

    def apply(self, images: Tensor, task: str) -> Tensor:
        if self.space == "pixel":
            return clamp_pixels(images + self.delta(task), self.straight_through)
        normalized = ((images - self.mean) / self.std + self.delta(task)).clamp(0, 1)
        return normalized * self.std + self.mean  # pixels whose normalisation is ``normalized``

    @torch.no_grad()
    def project_(self) -> None:
        if self.space == "pixel":  # the released code's δ is unbounded
            for delta in self.deltas:
                delta.clamp_(-self.eps, self.eps)

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        stats = {}
        for task, d in zip(self.tasks, self.deltas):
            stats[f"{task}/linf"], stats[f"{task}/l2"] = float(d.abs().max()), float(d.norm())
        return stats


class PatchTrigger(SimulatedTrigger):
    """Neural-Cleanse-style triggers: per task a mask ``m`` ``[1, H, W]`` and a pattern ``p`` ``[3, H, W]``.

    Args:
        tasks: task names (one mask and pattern each).
        image_size: side of the images.
        area_weight: weight of the area penalty ``mean(m)`` (per task, summed).
        patch_size: None: the mask may cover the whole image; else the side of the square
            window (at the bottom-right corner) it is confined to.
        targeted: minimise CE toward a class instead of maximising it against ŷ.
        init_mask_logit: initial mask logit (−3: about 5 % of each pixel replaced).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        image_size: int,
        area_weight: float = 1e-3,
        patch_size: int | None = None,
        targeted: bool = False,
        init_mask_logit: float = -3.0,
    ) -> None:
        super().__init__(tasks, targeted)
        check_area_weight("patch trigger", area_weight)
        if patch_size is not None and not 0 < patch_size <= image_size:
            raise ConfigError(
                f"patch_size {patch_size} is larger than the image ({image_size}x{image_size} pixels) or not positive"
            )
        self.area_weight, self.patch_size = area_weight, patch_size
        self.mask_logits = nn.ParameterList(
            nn.Parameter(torch.full((1, image_size, image_size), float(init_mask_logit))) for _ in tasks
        )
        self.pattern_logits = nn.ParameterList(nn.Parameter(torch.zeros(3, image_size, image_size)) for _ in tasks)
        window = torch.ones(1, image_size, image_size)
        if patch_size is not None:
            window.zero_()[..., image_size - patch_size :, image_size - patch_size :] = 1
        self.register_buffer("window", window, persistent=False)

    def mask(self, task: str) -> Tensor:
        return torch.sigmoid(self.mask_logits[self.tasks.index(task)]) * self.window

    def pattern(self, task: str) -> Tensor:
        return torch.sigmoid(self.pattern_logits[self.tasks.index(task)])

    def apply(self, images: Tensor, task: str) -> Tensor:
        mask = self.mask(task)
        return (1 - mask) * images + mask * self.pattern(task)

    def penalty(self) -> Tensor:
        return self.area_weight * sum(self.mask(t).mean() for t in self.tasks)

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        return {f"{t}/area": float(self.mask(t).mean()) for t in self.tasks}


def simulated_trigger(
    shape: TriggerShape,
    tasks: Sequence[str],
    image_size: int,
    *,
    eps: float,
    space: PerturbationSpace = "pixel",
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    area_weight: float = 1e-3,
    patch_size: int | None = None,
    targeted: bool = False,
) -> SimulatedTrigger:
    """The simulated trigger a config names (``trigger: additive | patch``)."""
    if shape == "additive":
        return AdditiveTrigger(tasks, image_size, eps, space, mean, std, targeted)
    if shape == "patch":
        return PatchTrigger(tasks, image_size, area_weight, patch_size, targeted)
    raise ConfigError(f"trigger must be additive or patch, got {shape!r}")
