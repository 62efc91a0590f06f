"""One training loop for every learned merge and defence: it orchestrates, the classes step.

:class:`MergeLearner` holds the frozen merged encoder and the learned parts that the method
(and, optionally, a post-merge defence) registers on it, and runs the training schedule: the
method's stages (e.g. DAM's mask stage, then AdaMerging's coefficient stage), then the
defence's. Each step is delegated to the class that owns the stage
(``owner.step(learner, stage, step, batch, optimizers, reduce)``); the loop has no per-method
branches. The learner offers the steps their shared vocabulary: logits of every task's batch
in one forward pass (the merged tower is the same for every task, only the heads differ),
:meth:`update` (gradients with ``torch.autograd.grad`` for exactly the tensors a phase
updates, averaged over processes by ``reduce``, then one optimizer step) and
:meth:`attack_step` (one update of a simulated trigger against pseudo-labels).

It is pure torch: Lightning (or a benchmark) supplies the optimizers and a ``reduce`` that
averages gradients over processes, which keeps every learned tensor identical on every rank.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.merging.merged import MergedEncoder

Batch = Mapping[str, Tensor]  # task -> unlabeled images in [0, 1]
Reduce = Callable[[Tensor], Tensor]
Optimizers = Mapping[str, torch.optim.Optimizer]


class Classifier(Protocol):
    """What the learner needs of a classifier: normalisation and a frozen head per task."""

    mean: Tensor
    std: Tensor

    def normalize(self, images: Tensor) -> Tensor: ...

    def logits(self, features: Tensor, task: str) -> Tensor: ...


class Trainable(Protocol):
    """A learned method or defence: it registers its parts, makes their optimizers, owns its steps."""

    def stages(self) -> list[tuple[str, int]]: ...

    def build(self, learner: "MergeLearner") -> None: ...

    def optimizers(self, learner: "MergeLearner") -> dict[str, torch.optim.Optimizer]: ...

    def step(self, learner: "MergeLearner", stage: str, step: int, batch: Batch, optimizers: Optimizers,
             reduce: Reduce) -> dict[str, float]: ...

    def resumed(self, learner: "MergeLearner") -> None:
        """After :meth:`MergeLearner.resume`: re-derive what a step changed but the learned state
        does not hold (frozen tensors edited in place, non-persistent buffers)."""


class MergeLearner(nn.Module):
    """The learned parts of a merge over ``encoder`` and the schedule that trains them.

    Args:
        encoder: the frozen base tower and the experts' task vectors.
        classifier: normalisation and the frozen heads (not a submodule: the caller owns it).
        method: a :class:`~safemerge.merging.LearnedMerge`, or a static method whose merged
            weights are ``static_weights`` (then only a defence learns).
        tasks: task names, in the encoder's expert order.
        image_size: side of the images (for image-sized simulated triggers).
        seed: seeds mask samples (per step, the same on every rank).
        defense: an optional post-merge defence (:mod:`safemerge.defenses`), trained after the
            method on the merged weights the method produced.
    """

    def __init__(
        self, encoder: MergedEncoder, classifier: Classifier, method, tasks: Sequence[str], image_size: int,
        seed: int = 0, defense=None, static_weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.method, self.defense = encoder, method, defense
        self.tasks, self.image_size, self.seed = list(tasks), image_size, seed
        # Not a submodule (the caller owns it): its frozen tower and heads are no part of the
        # learner's state, so neither learned.safetensors nor a resume checkpoint holds them.
        object.__setattr__(self, "_classifier", classifier)
        self.static_weights = static_weights
        self.owners: list[Trainable] = [o for o in (method, defense) if hasattr(o, "stages")]
        self.schedule: list[tuple[str, int, Trainable]] = [
            (name, steps, owner) for owner in self.owners for name, steps in owner.stages() if steps > 0
        ]
        self.attribution: dict | None = None  # set by a method that attributes the simulated trigger
        # The schedule's position: part of the learned state, so a resumed run knows where it is.
        self.register_buffer("completed_steps", torch.zeros((), dtype=torch.long))
        for owner in self.owners:
            owner.build(self)

    @property
    def classifier(self) -> Classifier:
        return self._classifier

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps, _ in self.schedule)

    def stage(self, step: int) -> tuple[str, int, Trainable]:
        """The stage a global step belongs to, the step's index inside it, and its owner."""
        start = 0
        for name, steps, owner in self.schedule:
            if step < start + steps:
                return name, step - start, owner
            start += steps
        raise IndexError(f"step {step} is past the schedule ({self.total_steps} steps)")

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers of every learned part, named (the method's, then the defence's)."""
        optimizers = {}
        for owner in self.owners:
            optimizers.update(owner.optimizers(self))
        return optimizers

    def training_step(self, step: int, batch: Batch, optimizers: Optimizers, reduce: Reduce = lambda g: g) -> dict[str, float]:
        """One step of the stage ``step`` falls in; returns the losses to log."""
        if step != int(self.completed_steps):
            raise RuntimeError(f"step {step} is not the learner's next step ({int(self.completed_steps)})")
        name, local, owner = self.stage(step)
        losses = owner.step(self, name, local, batch, optimizers, reduce)
        self.completed_steps += 1
        return losses

    # ------------------------------------------------------------------ the merged model

    def logits(self, weights: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Logits of every task's images under ``weights``, in one forward pass."""
        return dict(zip(batch, self.forward_pairs(weights, list(batch.items()))))

    def forward_pairs(self, weights: Mapping[str, Tensor], pairs: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        """Logits of several ``(task, images)`` pairs (a task may repeat) in one forward pass."""
        classifier = self._classifier
        images = torch.cat([classifier.normalize(x) for _, x in pairs])
        features = F.normalize(self.encoder(images, weights), dim=-1).split([len(x) for _, x in pairs])
        return [classifier.logits(f, task) for (task, _), f in zip(pairs, features)]

    @torch.no_grad()
    def pseudo_labels(self, weights: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """The model's own clean predictions: the labels a label-free defender has."""
        return {t: l.argmax(-1) for t, l in self.logits(weights, batch).items()}

    @torch.no_grad()
    def expert_pseudo_labels(self, batch: Batch) -> dict[str, Tensor]:
        """Each task's images labelled by that task's own expert (``θ_0 + τ_i``, as fine-tuned):
        label-free too, and as accurate on clean images as the experts are."""
        experts = {task: index for index, task in enumerate(self.tasks)}
        return {t: self.logits(self.encoder.expert_weights(experts[t]), {t: x})[t].argmax(-1) for t, x in batch.items()}

    def method_weights(self) -> dict[str, Tensor]:
        """The method's merged weights now (before any defence), detached."""
        if self.static_weights is not None:
            return {k: v.to(self.encoder.vectors(0).device) for k, v in self.static_weights.items()}
        return {k: v.detach() for k, v in self.method.merged_weights(self).items()}

    @torch.no_grad()
    def merged_weights(self) -> dict[str, Tensor]:
        """The weights to export: the method's, with the defence applied once it has started."""
        if self.defense is not None and self.defense.started(self):
            return {k: v.detach() for k, v in self.defense.defended_weights(self).items()}
        return self.method_weights()

    def generator(self, step: int) -> torch.Generator:
        """A generator seeded by (seed, step): the same samples on every rank, reproducible."""
        digest = hashlib.sha256(f"{self.seed}:{step}".encode()).digest()
        device = self.encoder.vectors(0).device
        return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    # ------------------------------------------------------------------ shared steps

    def update(self, optimizer: torch.optim.Optimizer, loss: Tensor, params: Sequence[Tensor], reduce: Reduce) -> None:
        """Gradients of ``loss`` for ``params`` only, averaged over processes, one optimizer step."""
        self.apply_gradients(optimizer, torch.autograd.grad(loss, params), params, reduce)

    @staticmethod
    def apply_gradients(optimizer, grads: Sequence[Tensor], params: Sequence[Tensor], reduce: Reduce) -> None:
        """Set the (rank-averaged) gradients and take one optimizer step."""
        for param, grad in zip(params, grads):
            param.grad = reduce(grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def attack_step(
        self, trigger, weights: Mapping[str, Tensor], batch: Batch, pseudo_labels: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer, reduce: Reduce,
    ) -> float:
        """One optimizer step of a simulated trigger against ``weights`` (detached) and the
        pseudo-labels; returns the cross-entropy of the triggered images before the step."""
        logits = self.logits(weights, {t: trigger.apply(x, t) for t, x in batch.items()})
        self.update(optimizer, trigger.attack_loss(logits, pseudo_labels), list(trigger.parameters()), reduce)
        trigger.project_()
        return float(sum(F.cross_entropy(l.detach().float(), pseudo_labels[t]) for t, l in logits.items()))

    def learned_state(self) -> dict[str, Tensor]:
        """Everything learned (λ, mask logits, triggers, defence masks, the step count), not the
        frozen encoder (re-derived from the experts)."""
        return {k: v.detach() for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def resume(self, state: Mapping[str, Tensor], attribution: dict | None = None) -> None:
        """Load a :meth:`learned_state` (same keys and shapes: the caller checks) and what the
        steps recorded beside it, then let every owner re-derive the rest (:meth:`Trainable.resumed`)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        left = [k for k in missing if not k.startswith("encoder.")]
        if left or unexpected:
            raise KeyError(f"learned state: missing {left[:3]}, unexpected {unexpected[:3]}")
        self.attribution = attribution
        for owner in self.owners:
            owner.resumed(self)

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """λ statistics, masks, triggers (for logging), from every owner."""
        stats = {}
        for owner in self.owners:
            stats.update(owner.statistics(self))
        return stats

