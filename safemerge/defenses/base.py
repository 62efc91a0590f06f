"""What every post-merge defence shares: a soft mask over the merged update, and its slot in
the learner's schedule.

A defence starts from the merged weights θ the method produced (static or learned) and
learns a mask ``m ∈ [0, 1]`` (one entry per parameter scalar, initialised to 1) over the merged
update ``Δ = θ − θ_0``: the defended model is ``θ_0 + m ⊙ Δ``. It owns its step
(:meth:`Defense.step`, one :class:`~safemerge.merging.contract.Stage`); the learner runs it after
the method's stages.
Pseudo-labels are the clean predictions of the merged model *before* the defence (frozen), so
they do not drift while the mask moves (``pseudo_labels: merged``, the DAM authors' adaptation),
or each task's images labelled by that task's own expert (``pseudo_labels: experts``): still
label-free, and as accurate on clean images as the experts, where the merged model's own
predictions carry its merging errors into the clean loss.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from safemerge.errors import ConfigError
from safemerge.merging.contract import Component, Optimize, Stage
from safemerge.merging.masks import mask_statistics


class UpdateMask(nn.Module):
    """A soft mask over a merged update: ``θ_0 + clamp(m, 0, 1) ⊙ Δ``.

    ``Δ`` is a frozen, non-persistent buffer per tensor, filled by :meth:`start_` when the
    defence starts (the merged weights are known only then).
    """

    def __init__(self, shapes: Sequence[torch.Size]) -> None:
        super().__init__()
        self.mask = nn.ParameterList(nn.Parameter(torch.ones(tuple(shape))) for shape in shapes)
        for index, shape in enumerate(shapes):
            self.register_buffer(f"_update_{index}", torch.zeros(tuple(shape)), persistent=False)
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def update(self, index: int) -> Tensor:
        return getattr(self, f"_update_{index}")

    @torch.no_grad()
    def start_(self, base: Mapping[str, Tensor], merged: Mapping[str, Tensor], names: Sequence[str]) -> None:
        for index, name in enumerate(names):
            self.update(index).copy_(merged[name].float() - base[name].float())
        self.started.fill_(True)

    def weights(self, base: Mapping[str, Tensor], names: Sequence[str], masked: bool = True) -> dict[str, Tensor]:
        """The defended state dict (``masked=False``: the merged weights before the defence)."""
        state = dict(base)
        for index, name in enumerate(names):
            update = self.update(index) * self.mask[index] if masked else self.update(index)
            state[name] = base[name] + update.to(base[name].dtype)
        return state

    @torch.no_grad()
    def project_(self) -> None:
        for mask in self.mask:
            mask.clamp_(0, 1)

    def sparsity_loss(self) -> Tensor:
        """Mean of ``|1 − m|`` over all entries (the L1 term that keeps the update)."""
        total = sum(m.numel() for m in self.mask)
        return sum((1 - m).abs().sum() for m in self.mask) / total

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        return mask_statistics(list(self.mask))


PSEUDO_LABELS = ("merged", "experts")


class Defense(Component):
    """Base of post-merge defences (chosen by ``class_path`` in ``model.init_args.defense``).

    A subclass is a dataclass: ``name``, its hyper-parameters as fields (``steps`` and
    ``pseudo_labels`` among them), :meth:`parts` (its learned parts under ``defense_parts``,
    whose ``masked_update`` is the :class:`UpdateMask`), :meth:`optimizers` and
    :meth:`defense_step`.
    """

    params_nested = True
    steps: int
    pseudo_labels: str

    def check(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"{self.name}: steps must be >= 1, got {self.steps}")
        if self.pseudo_labels not in PSEUDO_LABELS:
            raise ConfigError(
                f"{self.name}: pseudo_labels must be one of {', '.join(PSEUDO_LABELS)}, got {self.pseudo_labels!r}"
            )

    def clean_labels(self, learner, batch, merged: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The pseudo-labels ŷ of a clean batch (see the module's docstring); ``merged``: the
        pre-defence weights, if the caller has them already."""
        if self.pseudo_labels == "experts":
            return learner.expert_pseudo_labels(batch)
        return learner.pseudo_labels(
            merged if merged is not None else self.defended_weights(learner, masked=False), batch
        )

    def parts(self, learner) -> dict[str, nn.Module]:
        parts = nn.Module()
        parts.masked_update = UpdateMask(learner.encoder.shapes)
        return {"defense_parts": parts.to(learner.encoder.vectors(0).device)}

    def optimizers(self) -> tuple[Optimize, ...]:
        """The defence stage's optimizers over its declared parts."""
        return (Optimize("defense_mask", ("defense_parts.masked_update.mask",), self.mask_lr),)

    def stages(self) -> list[Stage]:
        return [Stage("defense", self.steps, self.step, self.optimizers())]

    def started(self, learner) -> bool:
        return bool(learner.defense_parts.masked_update.started)

    def step(self, learner, step: int, batch, optimizers, reduce) -> dict[str, float]:
        if step == 0:  # the method's stages are over: its merged weights are what we defend
            learner.defense_parts.masked_update.start_(
                learner.encoder.base(), learner.method_weights(), learner.encoder.names
            )
        return self.defense_step(learner, step, batch, optimizers, reduce)

    def defense_step(self, learner, step: int, batch, optimizers, reduce) -> dict[str, float]:
        raise NotImplementedError

    def resumed(self, learner) -> None:
        """The merged update Δ is not stored: a defence resumed after its start derives it again."""
        if self.started(learner):
            learner.defense_parts.masked_update.start_(
                learner.encoder.base(), learner.method_weights(), learner.encoder.names
            )

    def defended_weights(self, learner, masked: bool = True) -> dict[str, Tensor]:
        return learner.defense_parts.masked_update.weights(learner.encoder.base(), learner.encoder.names, masked)

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        return {f"defense/mask/{k}": v for k, v in learner.defense_parts.masked_update.statistics().items()}
