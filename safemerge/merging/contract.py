"""The contract of a merging method and of a post-merge defence: a small typed interface.

Every method (:class:`MergeMethod`) and defence (:class:`safemerge.defenses.Defense`) is a
:class:`Component`, written as a dataclass:

- **hyper-parameters** are its dataclass fields (typed, with defaults): they are the
  constructor's arguments (so the YAML options under ``init_args``), what ``report.json``
  records (:meth:`Component.describe`) and what a resumed run must match. Nothing else the
  object holds is. Checks go in :meth:`Component.check` (run after construction).
- **learned parts** are declared by :meth:`Component.parts`, by name: the learner registers each
  under that name, so the names are the keys of ``learned.safetensors`` and of the resume
  checkpoint.
- **stages** are :class:`Stage` objects: a number of steps, the bound method that takes one, and
  the optimizers (:class:`Optimize`) over declared parts that the step uses. The learner builds
  the optimizers from those declarations and hands each step its own stage's, by their
  declared names.
- what the steps record beside the tensors (plain types) goes in ``learner.notes``; it is saved
  in the resume checkpoint, and :meth:`Component.report_fields` turns it into ``report.json``
  fields.

A method is either static (:class:`~safemerge.merging.static.StaticMerge`: ``merge`` returns the
merged weights) or learned (:class:`~safemerge.merging.learned.LearnedMerge`); a class that is
neither is refused when it is defined.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Literal, Mapping

from torch import Tensor, nn

Kind = Literal["static", "learned"]


@dataclass(frozen=True)
class Optimize:
    """An Adam optimizer named ``name`` over the declared parts ``parts`` (paths in the
    learner: ``"coefficients"``, ``"mask"``, ``"defense_parts.masked_update.mask"``)."""

    name: str
    parts: tuple[str, ...]
    lr: float


@dataclass(frozen=True)
class Stage:
    """``steps`` steps of ``step(learner, index, batch, optimizers, reduce) -> losses`` (a bound
    method), with the optimizers it uses. ``name`` prefixes its losses in the logs."""

    name: str
    steps: int
    step: Callable[..., dict[str, float]]
    optimizers: tuple[Optimize, ...] = ()


class Component:
    """What methods and defences share: ``name`` (the config's and the report's), declared
    hyper-parameters, learned parts and stages. Subclasses are dataclasses."""

    name: ClassVar[str]
    # report.json keeps a defence's hyper-parameters under "params", a method's beside its name
    params_nested: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """A one-line :class:`~safemerge.errors.ConfigError` for a bad hyper-parameter."""

    def hyperparameters(self) -> dict[str, Any]:
        """The declared hyper-parameters and their values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> dict[str, Any]:
        """The name and hyper-parameters, as ``report.json`` records them."""
        params = self.hyperparameters()
        return {"name": self.name, "params": params} if self.params_nested else {"name": self.name, **params}

    # ------------------------------------------------------------------ what learns (none by default)

    def parts(self, learner) -> dict[str, nn.Module | Tensor]:
        """The learned parts, by name (an ``nn.Parameter`` is learned, another tensor a buffer)."""
        return {}

    def stages(self) -> list[Stage]:
        return []

    def resumed(self, learner) -> None:
        """After the learned state and notes are loaded: re-derive what a step changed that they
        do not hold (frozen tensors edited in place, non-persistent buffers)."""

    def report_fields(self, learner, experts: Mapping[str, str]) -> dict[str, Any]:
        """Extra ``report.json`` fields (``build_report`` keywords) from ``learner.notes``;
        ``experts`` maps each task to its expert's reference."""
        return {}

    def statistics(self, learner) -> dict[str, float]:
        """Values to log (λ, masks, triggers)."""
        return {}


class MergeMethod(Component):
    """Base of all merging methods; ``kind`` says static or learned."""

    kind: ClassVar[Kind]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and getattr(cls, "kind", None) not in ("static", "learned"):
            raise TypeError(
                f"{cls.__name__}: a merging method derives from StaticMerge (merge returns the weights) or "
                "LearnedMerge (the learner trains its parts)"
            )
