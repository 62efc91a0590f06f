"""One training loop for every learned merge and defence: it orchestrates, the classes step.

:class:`MergeLearner` holds the frozen merged encoder and the learned parts that the method
(and, optionally, a post-merge defence) declares (:meth:`Component.parts
<safemerge.merging.contract.Component.parts>`, registered under their declared names), and
runs the training schedule: the method's :class:`~safemerge.merging.contract.Stage` objects
(e.g. DAM's mask stage, then AdaMerging's coefficient stage), then the defence's. Each step is
the stage's bound step, given the optimizers the stage declares; the loop has no per-method
branches. The learner offers the steps their shared vocabulary: logits of every task's batch
in one forward pass (the merged tower is the same for every task, only the heads differ),
:meth:`update` (gradients with ``torch.autograd.grad`` for exactly the tensors an optimizer
updates, averaged over processes by ``reduce``, then one optimizer step) and
:meth:`trigger_step` (one update of a defender's simulated trigger against pseudo-labels).

It is pure torch: Lightning (or a benchmark) supplies the optimizers and a ``reduce`` that
averages gradients over processes, which keeps every learned tensor identical on every rank.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.merging.contract import Component, Stage
from safemerge.merging.merged import MergedEncoder
from safemerge.seeding import seeded_generator

Batch = Mapping[str, Tensor]  # task -> unlabeled images in [0, 1]
Reduce = Callable[[Tensor], Tensor]
Optimizers = Mapping[str, torch.optim.Optimizer]


class Classifier(Protocol):
    """What the learner needs of a classifier: normalisation and a frozen head per task."""

    mean: Tensor
    std: Tensor

    def normalize(self, images: Tensor) -> Tensor: ...

    def logits(self, features: Tensor, task: str) -> Tensor: ...


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
        self,
        encoder: MergedEncoder,
        classifier: Classifier,
        method,
        tasks: Sequence[str],
        image_size: int,
        seed: int = 0,
        defense=None,
        static_weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.method, self.defense = encoder, method, defense
        self.tasks, self.image_size, self.seed = list(tasks), image_size, seed
        # Not a submodule (the caller owns it): its frozen tower and heads are no part of the
        # learner's state, so neither learned.safetensors nor a resume checkpoint holds them.
        object.__setattr__(self, "_classifier", classifier)
        self.static_weights = static_weights
        # The components that learn: a learned method, a defence (a static method learns nothing).
        self.owners: list[Component] = [o for o in (method, defense) if o is not None and o.stages()]
        self.schedule: list[tuple[Stage, Component]] = [
            (stage, owner) for owner in self.owners for stage in owner.stages() if stage.steps > 0
        ]
        self.notes: dict[str, Any] = {}  # what the steps record beside the tensors (plain types)
        # each adaptation image's expert logits, once computed (:meth:`expert_logits`); not state
        self._expert_cache: dict[str, dict[tuple[float, float], Tensor]] = {}
        self._fingerprint_directions: Tensor | None = None
        # The schedule's position: part of the learned state, so a resumed run knows where it is.
        self.register_buffer("completed_steps", torch.zeros((), dtype=torch.long))
        self.part_names: list[str] = []
        for owner in self.owners:
            for name, part in owner.parts(self).items():
                self._register_part(name, part)

    def _register_part(self, name: str, part: nn.Module | Tensor) -> None:
        """A declared learned part under its declared name (its key in the learned state)."""
        if name in self.part_names or hasattr(self, name):
            raise ValueError(f"learned part {name!r} is declared twice, or clashes with the learner's own {name!r}")
        if isinstance(part, nn.Module):
            self.add_module(name, part)
        elif isinstance(part, nn.Parameter):
            self.register_parameter(name, part)
        else:
            self.register_buffer(name, part)
        self.part_names.append(name)

    @property
    def classifier(self) -> Classifier:
        return self._classifier

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage, _ in self.schedule)

    def stage(self, step: int) -> tuple[Stage, int, Component]:
        """The stage a global step belongs to, the step's index inside it, and its owner."""
        start = 0
        for stage, owner in self.schedule:
            if step < start + stage.steps:
                return stage, step - start, owner
            start += stage.steps
        raise IndexError(f"step {step} is past the schedule ({self.total_steps} steps)")

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers the stages declare, by their declared names, in schedule order: Adam
        over the parameters of the declared parts they name."""
        optimizers: dict[str, torch.optim.Optimizer] = {}
        for stage, _ in self.schedule:
            for spec in stage.optimizers:
                if spec.name in optimizers:
                    raise ValueError(f"two stages declare an optimizer named {spec.name!r}")
                optimizers[spec.name] = torch.optim.Adam(
                    [p for part in spec.parts for p in self._params(part)], lr=spec.lr
                )
        return optimizers

    def optimizer_names(self) -> list[str]:
        """The names of :meth:`make_optimizers`' optimizers, from the declarations alone."""
        return [spec.name for stage, _ in self.schedule for spec in stage.optimizers]

    def _params(self, path: str) -> list[nn.Parameter]:
        if path not in self.part_names and path.split(".")[0] not in self.part_names:
            raise ValueError(f"an optimizer names {path!r}, which is no declared learned part ({self.part_names})")
        try:
            return list(self.get_submodule(path).parameters())
        except AttributeError:
            return [self.get_parameter(path)]

    def training_step(
        self, step: int, batch: Batch, optimizers: Optimizers, reduce: Reduce = lambda g: g
    ) -> dict[str, float]:
        """One step of the stage ``step`` falls in, with that stage's optimizers; returns the losses to log."""
        if step != int(self.completed_steps):
            raise RuntimeError(f"step {step} is not the learner's next step ({int(self.completed_steps)})")
        stage, local, _ = self.stage(step)
        losses = stage.step(self, local, batch, {spec.name: optimizers[spec.name] for spec in stage.optimizers}, reduce)
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
    def expert_logits(self, batch: Batch) -> dict[str, Tensor]:
        """Each task's images classified by that task's own expert (``θ_0 + τ_i``, as fine-tuned).

        The experts are frozen and the adaptation stream revisits its images (a few hundred per
        task, thousands of draws), so each image's logits are computed once and kept, keyed by
        the task and a fingerprint of the image's pixels: only images not seen before go
        through their expert."""
        return {t: self._expert_logits(t, x) for t, x in batch.items()}

    def _expert_logits(self, task: str, images: Tensor) -> Tensor:
        cache = self._expert_cache.setdefault(task, {})
        keys = [tuple(k) for k in self._fingerprint(images).tolist()]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        if missing:
            weights = self.encoder.expert_weights(self.tasks.index(task))
            for i, row in zip(missing, self.logits(weights, {task: images[missing]})[task]):
                cache[keys[i]] = row
        return torch.stack([cache[key] for key in keys])

    def _fingerprint(self, images: Tensor) -> Tensor:
        """``[B, 2]`` float64 projections of each image's pixels on two fixed random directions:
        equal for equal images, and apart for any two different ones but with probability ~0."""
        flat = images.reshape(len(images), -1).double()
        if self._fingerprint_directions is None or self._fingerprint_directions.shape[0] != flat.shape[1]:
            generator = torch.Generator().manual_seed(0)
            directions = torch.rand(flat.shape[1], 2, generator=generator, dtype=torch.float64)
            self._fingerprint_directions = directions.to(flat.device)
        return torch.round((flat @ self._fingerprint_directions) * 1e6)  # bit noise of the matmul aside

    @torch.no_grad()
    def expert_pseudo_labels(self, batch: Batch) -> dict[str, Tensor]:
        """Each task's images labelled by that task's own expert: label-free too, and as
        accurate on clean images as the experts are."""
        return {t: l.argmax(-1) for t, l in self.expert_logits(batch).items()}

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
        return seeded_generator(self.seed, step, self.encoder.vectors(0).device)

    # ------------------------------------------------------------------ shared steps

    @staticmethod
    def optimized(optimizer: torch.optim.Optimizer) -> list[Tensor]:
        """The parameters an optimizer updates, in its order."""
        return [p for group in optimizer.param_groups for p in group["params"]]

    def update(self, optimizer: torch.optim.Optimizer, loss: Tensor, reduce: Reduce) -> None:
        """Gradients of ``loss`` for the optimizer's parameters only, averaged over processes, one step."""
        self.apply_gradients(optimizer, torch.autograd.grad(loss, self.optimized(optimizer)), reduce)

    def apply_gradients(self, optimizer, grads: Sequence[Tensor], reduce: Reduce) -> None:
        """Set the (rank-averaged) gradients of the optimizer's parameters, in its order, and step."""
        params = self.optimized(optimizer)
        if len(grads) != len(params):
            raise ValueError(f"{len(grads)} gradients for the optimizer's {len(params)} parameters")
        for param, grad in zip(params, grads):
            param.grad = reduce(grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def trigger_step(
        self,
        trigger,
        weights: Mapping[str, Tensor],
        batch: Batch,
        pseudo_labels: Mapping[str, Tensor],
        optimizer: torch.optim.Optimizer,
        reduce: Reduce,
    ) -> float:
        """One optimizer step of a defender's simulated trigger (``optimizer`` is over its
        parameters) against ``weights`` (detached) and the pseudo-labels; returns the
        cross-entropy of the triggered images before the step."""
        logits = self.logits(weights, {t: trigger.apply(x, t) for t, x in batch.items()})
        self.update(optimizer, trigger.attack_loss(logits, pseudo_labels), reduce)
        trigger.project_()
        return float(sum(F.cross_entropy(l.detach().float(), pseudo_labels[t]) for t, l in logits.items()))

    def learned_state(self) -> dict[str, Tensor]:
        """The declared learned parts (λ, mask logits, triggers, defence masks) and the step count,
        by their declared names; not the frozen encoder (re-derived from the experts)."""
        kept = {"completed_steps", *self.part_names}
        return {k: v.detach() for k, v in self.state_dict().items() if k.split(".")[0] in kept}

    def resume(self, state: Mapping[str, Tensor], notes: Mapping[str, Any]) -> None:
        """Load a :meth:`learned_state` (same keys and shapes: the caller checks) and the notes the
        steps recorded beside it, then let every owner re-derive the rest (``resumed``)."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        left = [k for k in missing if not k.startswith("encoder.")]
        if left or unexpected:
            raise KeyError(f"learned state: missing {left[:3]}, unexpected {unexpected[:3]}")
        self.notes = dict(notes)
        for owner in self.owners:
            owner.resumed(self)

    def report_fields(self, experts: Mapping[str, str]) -> dict[str, Any]:
        """The extra ``report.json`` fields every owner reports (``experts``: task -> reference)."""
        fields: dict[str, Any] = {}
        for owner in self.owners:
            fields.update(owner.report_fields(self, experts))
        return fields

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """λ statistics, masks, triggers (for logging), from every owner."""
        stats = {}
        for owner in self.owners:
            stats.update(owner.statistics(self))
        return stats
