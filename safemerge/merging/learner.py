"""One training loop for every learned merge: the learnable parts and their update steps.

:class:`MergeLearner` holds λ (coefficients), the concrete mask(s) and, for DAM, the per-task
perturbations, and runs one step of the method's current stage on an unlabeled batch per task
(DAM.md, "One training step"). It is pure torch: Lightning (or a benchmark) supplies the
optimizers and a ``reduce`` that averages gradients over processes, which keeps every learned
tensor identical on every rank. Gradients are taken with ``torch.autograd.grad`` for exactly
the tensors a phase updates, so no phase's gradient leaks into another's.

All tasks' batches of a phase share one forward pass: the merged tower is the same for every
task, only the heads differ.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safemerge.merging.masks import ConcreteMask, combine, mask_statistics, product
from safemerge.merging.merged import MergedEncoder
from safemerge.merging.methods import LearnedMerge, entropy
from safemerge.merging.perturbation import UniversalPerturbation

Batch = Mapping[str, Tensor]  # task -> unlabeled images in [0, 1]
Reduce = Callable[[Tensor], Tensor]


class Classifier(Protocol):
    """What the learner needs of a classifier: normalisation and a frozen head per task."""

    def normalize(self, images: Tensor) -> Tensor: ...

    def logits(self, features: Tensor, task: str) -> Tensor: ...


class MergeLearner(nn.Module):
    """The learned parts of a merge (``method``) over ``encoder``, and their training steps."""

    def __init__(
        self, encoder: MergedEncoder, classifier: Classifier, method: LearnedMerge,
        tasks: Sequence[str], image_size: int, seed: int = 0,
    ) -> None:
        super().__init__()
        self.encoder, self.method, self.tasks, self.seed = encoder, method, list(tasks), seed
        self._classifier = classifier  # not a submodule: the caller owns it
        initial = encoder.coefficients(method.granularity or "task", method.scaling_factor)
        self.register_buffer("initial_coefficients", initial.clone())
        if method.granularity is None:
            self.register_buffer("coefficients", initial)
        else:
            self.coefficients = nn.Parameter(initial)
        self.mask = self.safety_mask = self.perturbation = None
        if method.has_mask:
            self.mask = ConcreteMask(encoder.shapes, method.temperature)
            if getattr(method, "masks", "single") == "dual":
                self.safety_mask = ConcreteMask(encoder.shapes, method.temperature)
        if method.defense:
            self.perturbation = UniversalPerturbation(tasks, image_size, method.perturbation_eps)

    # ------------------------------------------------------------------ optimizers

    def make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam for each learned part, with the method's learning rates."""
        method, optimizers = self.method, {}
        if self.mask is not None:
            masks = [*self.mask.parameters(), *(self.safety_mask.parameters() if self.safety_mask else ())]
            optimizers["mask"] = torch.optim.Adam(masks, lr=method.mask_lr)
            if method.granularity is not None:
                optimizers["inner"] = torch.optim.Adam([self.coefficients], lr=method.inner_lr)
        if self.perturbation is not None:
            optimizers["perturbation"] = torch.optim.Adam(self.perturbation.parameters(), lr=method.perturbation_lr)
        if method.adamerging_steps:
            optimizers["coefficients"] = torch.optim.Adam([self.coefficients], lr=method.adamerging_lr)
        return optimizers

    # ------------------------------------------------------------------ the merged model

    def logits(self, weights: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Logits of every task's images under ``weights``, in one forward pass."""
        return dict(zip(batch, self._forward(weights, list(batch.items()))))

    def _forward(self, weights: Mapping[str, Tensor], pairs: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        classifier = self._classifier
        images = torch.cat([classifier.normalize(x) for _, x in pairs])
        features = F.normalize(self.encoder(images, weights), dim=-1).split([len(x) for _, x in pairs])
        return [classifier.logits(f, task) for (task, _), f in zip(pairs, features)]

    def final_mask(self) -> list[Tensor] | None:
        """The fixed mask (rescaled), as the method's ``final_mask`` says; None without a mask."""
        if self.mask is None:
            return None
        generator = self._generator(-1)
        parts = [self.mask.final(self.method.final_mask, generator)]
        if self.safety_mask is not None:
            parts.append(self.safety_mask.final(self.method.final_mask, generator))
        return combine(*parts)

    @torch.no_grad()
    def merged_weights(self) -> dict[str, Tensor]:
        """The weights to export: current λ and the fixed mask, detached."""
        return {k: v.detach() for k, v in self.encoder.weights(self.coefficients, self.final_mask()).items()}

    def _generator(self, step: int) -> torch.Generator:
        # The same mask sample on every rank, and a reproducible one for a given seed and step.
        digest = hashlib.sha256(f"{self.seed}:{step}".encode()).digest()
        device = self.initial_coefficients.device
        return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    # ------------------------------------------------------------------ training

    def training_step(
        self, step: int, batch: Batch, optimizers: Mapping[str, torch.optim.Optimizer],
        reduce: Reduce = lambda grad: grad,
    ) -> dict[str, float]:
        """One step of the method's current stage; returns the losses to log."""
        if self.method.stage(step) == "mask":
            return self._mask_stage_step(step, batch, optimizers, reduce)
        if step == self.method.steps and getattr(self.method, "reset_coefficients", False):
            with torch.no_grad():  # λ enters AdaMerging from its initial value, not the inner step's
                self.coefficients.copy_(self.initial_coefficients)
        weights = self.encoder.weights(self.coefficients, _detached(self.final_mask()))
        loss = _task_sum(entropy, self.logits(weights, batch))
        _update(optimizers["coefficients"], loss, [self.coefficients], reduce)
        return {"entropy": float(loss.detach())}

    def _mask_stage_step(self, step, batch, optimizers, reduce) -> dict[str, float]:
        method, logs = self.method, {}
        generator = self._generator(step)
        samples = [self.mask.sample(generator)]
        if self.safety_mask is not None:
            samples.append(self.safety_mask.sample(generator))

        fixed_mask = _detached(product(*samples))  # the sample without its graph (λ and δ steps)
        if method.granularity is not None:  # inner step on λ (performance), the mask detached
            if method.reset_coefficients:
                with torch.no_grad():
                    self.coefficients.copy_(self.initial_coefficients)
            weights = self.encoder.weights(self.coefficients, fixed_mask, rescale=True)
            loss = _task_sum(entropy, self.logits(weights, batch))
            _update(optimizers["inner"], loss, [self.coefficients], reduce)
            logs["inner_entropy"] = float(loss.detach())
        coefficients = self.coefficients.detach()

        if self.perturbation is not None:  # simulated trigger: maximise CE against own predictions
            with torch.no_grad():
                weights = self.encoder.weights(coefficients, fixed_mask, rescale=True)
                pseudo = {t: l.argmax(-1) for t, l in self.logits(weights, batch).items()}
            perturbed = {t: self.perturbation.apply(x, t) for t, x in batch.items()}
            loss = sum(F.cross_entropy(l.float(), pseudo[t]) for t, l in self.logits(weights, perturbed).items())
            _update(optimizers["perturbation"], -loss, list(self.perturbation.parameters()), reduce)
            self.perturbation.project_()
            logs["perturbation_loss"] = float(loss.detach())

        weights = self.encoder.weights(coefficients, product(*samples), rescale=True)
        if self.perturbation is None:
            loss = _task_sum(entropy, self.logits(weights, batch))
            _update(optimizers["mask"], loss, list(self.mask.parameters()), reduce)
            logs["entropy"] = float(loss.detach())
            return logs
        with torch.no_grad():
            perturbed = {t: self.perturbation.apply(x, t) for t, x in batch.items()}
        tasks = list(batch)
        logits = self._forward(weights, [*batch.items(), *perturbed.items()])
        clean, triggered = logits[: len(tasks)], logits[len(tasks):]
        performance = sum(entropy(l) for l in clean)
        if method.safety_loss == "entropy":
            safety = sum(entropy(l) for l in triggered)
        else:  # consistency: keep the clean prediction under the perturbation
            safety = sum(F.cross_entropy(p.float(), c.argmax(-1).detach()) for c, p in zip(clean, triggered))
        if self.safety_mask is None:
            _update(optimizers["mask"], performance + method.adv_weight * safety, list(self.mask.parameters()), reduce)
        else:  # dual: m1 by the performance loss, m2 by the safety loss, from one forward pass
            m1, m2 = list(self.mask.parameters()), list(self.safety_mask.parameters())
            grads = torch.autograd.grad(performance, m1, retain_graph=True)
            grads += torch.autograd.grad(method.adv_weight * safety, m2)
            _apply(optimizers["mask"], grads, m1 + m2, reduce)
        logs.update(entropy=float(performance.detach()), safety_loss=float(safety.detach()))
        return logs

    def learned_state(self) -> dict[str, Tensor]:
        """λ, the mask logits and the perturbations (everything but the frozen encoder)."""
        return {k: v.detach() for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """λ statistics, mask mean and sparsity, perturbation norms (for logging)."""
        lam = self.coefficients.detach()
        stats = {"lambda/mean": float(lam.mean()), "lambda/min": float(lam.min()), "lambda/max": float(lam.max())}
        for i in range(lam.shape[0]):
            stats[f"lambda/expert_{i}"] = float(lam[i].mean())
        if self.mask is not None:
            for key, value in mask_statistics(self.mask.expected()).items():
                stats[f"mask/{key}"] = value
            if self.safety_mask is not None:
                for key, value in mask_statistics(self.safety_mask.expected()).items():
                    stats[f"safety_mask/{key}"] = value
        if self.perturbation is not None:
            for task, norms in self.perturbation.norms().items():
                for key, value in norms.items():
                    stats[f"delta/{task}/{key}"] = value
        return stats


def _task_sum(loss: Callable[[Tensor], Tensor], logits: Mapping[str, Tensor]) -> Tensor:
    return sum(loss(l) for l in logits.values())


def _detached(tensors: Sequence[Tensor] | None) -> list[Tensor] | None:
    return None if tensors is None else [t.detach() for t in tensors]


def _update(optimizer, loss: Tensor, params: Sequence[Tensor], reduce: Reduce) -> None:
    _apply(optimizer, torch.autograd.grad(loss, params), params, reduce)


def _apply(optimizer, grads: Sequence[Tensor], params: Sequence[Tensor], reduce: Reduce) -> None:
    """Set the (rank-averaged) gradients and take one optimizer step."""
    for param, grad in zip(params, grads):
        param.grad = reduce(grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
