"""What every post-merge defence shares: a soft mask over the merged update, and its slot in
the learner's schedule.

A defence starts from the merged weights θ the method produced (static or learned) and
learns a mask ``m ∈ [0, 1]`` (one entry per parameter scalar, initialised to 1) over the merged
update ``Δ = θ − θ_0``: the defended model is ``θ_0 + m ⊙ Δ``. It owns its step
(:meth:`MaskedUpdateDefense.step`); the learner only runs it after the method's stages.
Pseudo-labels are the clean predictions of the merged model *before* the defence (frozen), so
they do not drift while the mask moves (``pseudo_labels: merged``, the DAM authors' adaptation),
or each task's images labelled by that task's own expert (``pseudo_labels: experts``): still
label-free, and as accurate on clean images as the experts, where the merged model's own
predictions carry its merging errors into the clean loss.
"""

from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from safemerge.errors import ConfigError


class MaskedUpdate(nn.Module):
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
        total = sum(m.numel() for m in self.mask)
        return {
            "mean": float(sum(m.sum() for m in self.mask) / total),
            "below_half": float(sum((m < 0.5).sum() for m in self.mask) / total),
        }


PSEUDO_LABELS = ("merged", "experts")


class Defense:
    """Base of post-merge defences (chosen by ``class_path`` in ``model.init_args.defense``).

    Subclasses set ``name``, keep their hyper-parameters as attributes (recorded in the report)
    and implement :meth:`build` (register learned parts on the learner under
    ``learner.defense_parts``), :meth:`optimizers` and :meth:`defense_step`.
    """

    name: ClassVar[str]
    steps: int

    def describe(self) -> dict:
        """``{"name": ..., "params": {...}}`` (recorded in ``report.json``)."""
        return {"name": self.name, "params": {k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def _check_options(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"{self.name}: steps must be >= 1, got {self.steps}")
        if self.pseudo_labels not in PSEUDO_LABELS:
            raise ConfigError(
                f"{self.name}: pseudo_labels must be one of {', '.join(PSEUDO_LABELS)}, got {self.pseudo_labels!r}")

    def clean_labels(self, learner, batch, merged: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The pseudo-labels ŷ of a clean batch (see the module's docstring); ``merged``: the
        pre-defence weights, if the caller has them already."""
        if self.pseudo_labels == "experts":
            return learner.expert_pseudo_labels(batch)
        return learner.pseudo_labels(merged if merged is not None else self.defended_weights(learner, masked=False), batch)

    def stages(self) -> list[tuple[str, int]]:
        return [("defense", self.steps)]

    def started(self, learner) -> bool:
        return bool(learner.defense_parts.masked_update.started)

    def step(self, learner, stage: str, step: int, batch, optimizers, reduce) -> dict[str, float]:
        if step == 0:  # the method's stages are over: its merged weights are what we defend
            learner.defense_parts.masked_update.start_(
                learner.encoder.base(), learner.method_weights(), learner.encoder.names)
        return self.defense_step(learner, step, batch, optimizers, reduce)

    def defense_step(self, learner, step: int, batch, optimizers, reduce) -> dict[str, float]:
        raise NotImplementedError

    def resumed(self, learner) -> None:
        """The merged update Δ is not stored: a defence resumed after its start derives it again."""
        if self.started(learner):
            learner.defense_parts.masked_update.start_(
                learner.encoder.base(), learner.method_weights(), learner.encoder.names)

    def defended_weights(self, learner, masked: bool = True) -> dict[str, Tensor]:
        return learner.defense_parts.masked_update.weights(learner.encoder.base(), learner.encoder.names, masked)

    @torch.no_grad()
    def statistics(self, learner) -> dict[str, float]:
        return {f"defense/mask/{k}": v for k, v in learner.defense_parts.masked_update.statistics().items()}
