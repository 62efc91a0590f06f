"""An expert pool: the expert directories a merge reads, checked, and the backdoors they record.

The one home of pool reading and validation (the merge module, the scripts and the benchmarks
read pools through it). Public names, stable:

- ``read_pool(references, model=None, pretrained=None) -> Pool``: read every expert directory
  (``~`` expanded; ``mini:`` references must be resolved first, by
  :func:`safemerge.experts.resolve_experts`), find the pretrained model they share (``model`` /
  ``pretrained``, if given, must be theirs). The experts are checked by :func:`check_pool` once
  the base tower is loaded.
- ``check_pool(pool, base)``: every expert, in order: a known task, its number of classes, one
  expert per task, the base tower's tensors, finite values.
- ``backdoors_of(experts, tasks) -> (list[Backdoor], list[dict])``: the backdoors recorded in
  ``(reference, Expert)`` pairs whose target task is among ``tasks`` (the others cannot be
  measured: no head; skipped with a warning), with their triggers, and one plain record per
  backdoor (``expert``, ``attack``, ``target_task``, ``target_class``) for ``report.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from torch import Tensor

from safemerge.attacks import Trigger
from safemerge.data.registry import get_task
from safemerge.errors import CheckpointError, ConfigError, SafemergeError
from safemerge.evaluation import Backdoor
from safemerge.io import TRIGGER_FILE, Expert, check_weights, read_expert

log = logging.getLogger(__name__)


@dataclass
class Pool:
    """Experts read from their references, in order, and the pretrained model they share."""

    experts: list[tuple[str, Expert]]
    model: str
    pretrained: str | None

    @property
    def references(self) -> list[str]:
        return [ref for ref, _ in self.experts]

    @property
    def tasks(self) -> list[str]:
        return [expert.task for _, expert in self.experts]

    @property
    def encoders(self) -> list[dict[str, Tensor]]:
        return [expert.encoder for _, expert in self.experts]


def read_expert_reference(reference: str) -> Expert:
    """One expert directory; a one-line error naming the reference if it is not one."""
    if reference.startswith("mini:"):
        raise ConfigError(
            f"expert {reference!r} is a mini-pool reference: resolve it into a directory first "
            "(safemerge.experts.resolve_experts; the CLI does this before building the module)"
        )
    try:
        return read_expert(Path(reference).expanduser())
    except CheckpointError as err:
        raise CheckpointError(f"expert {reference!r}: {err}") from None


def read_pool(references: Sequence[str], model: str | None = None, pretrained: str | None = None) -> Pool:
    """Read the experts and find their common base (see the module docstring)."""
    if not references:
        raise ConfigError("no experts to merge: list expert directories (or mini:<task>) under model.init_args.experts")
    experts = [(ref, read_expert_reference(ref)) for ref in references]
    model, pretrained = _common_base(experts, model, pretrained)
    return Pool(experts, model, pretrained)


def _common_base(pool: list[tuple[str, Expert]], model: str | None, pretrained: str | None) -> tuple[str, str | None]:
    """The pretrained model every expert was fine-tuned from (and the base, if given, is)."""
    first_ref, first = pool[0]
    explicit = model is not None or pretrained is not None
    base = (model or first.info["model"], pretrained if pretrained is not None else first.info.get("pretrained"))
    for ref, expert in pool:
        origin = (expert.info["model"], expert.info.get("pretrained"))
        if origin == base:
            continue
        if explicit:
            raise ConfigError(
                f"expert {ref!r} was fine-tuned from {origin[0]} ({origin[1]}), but the base is {base[0]} ({base[1]}): "
                "task vectors only make sense against the experts' own pretrained model"
            )
        raise ConfigError(
            f"the experts come from different pretrained models: {ref!r} from {origin[0]} ({origin[1]}), "
            f"{first_ref!r} from {base[0]} ({base[1]}); merge experts fine-tuned from one pretrained model"
        )
    return base


def check_pool(pool: Pool, base: dict[str, Tensor]) -> None:
    """Every expert: a known task, one expert per task, the base's tensors, finite values."""
    seen: dict[str, str] = {}
    for ref, expert in pool.experts:
        info = expert.info
        try:
            task = get_task(info["task"])
        except SafemergeError as err:
            raise ConfigError(f"expert {ref!r}: {err}") from None
        if info["num_classes"] != task.num_classes:
            raise ConfigError(
                f"expert {ref!r} has {info['num_classes']} classes but task {task.name} has {task.num_classes}"
            )
        if task.name in seen:
            raise ConfigError(
                f"experts {seen[task.name]!r} and {ref!r} are both for task {task.name}: keep one per task"
            )
        seen[task.name] = ref
        check_weights(expert.encoder, base, f"expert {ref!r}")


def backdoors_of(experts: Iterable[tuple[str, Expert]], tasks: Sequence[str]) -> tuple[list[Backdoor], list[dict]]:
    """The backdoors recorded in the experts, with their triggers (see the module docstring)."""
    backdoors, infos = [], []
    for ref, expert in experts:
        backdoor = expert.backdoor
        if not backdoor:
            continue
        target = backdoor.get("target_task") or expert.task
        if target not in tasks:
            log.warning(
                "expert %s: its backdoor targets task %s, which is not merged; its ASR is not measured", ref, target
            )
            continue
        if expert.trigger is None:
            raise CheckpointError(
                f"expert {ref!r} records a backdoor but has no trigger.safetensors: its ASR cannot be measured"
            )
        try:
            trigger = Trigger.from_tensors(expert.trigger)
        except ConfigError as err:  # name the file: the tensors alone do not say where they came from
            raise ConfigError(f"expert {ref!r}: {Path(ref).expanduser() / TRIGGER_FILE}: {err}") from None
        backdoors.append(Backdoor(trigger, target, int(backdoor["target_class"])))
        infos.append(
            {
                "expert": ref,
                "attack": backdoor.get("attack"),
                "target_task": target,
                "target_class": int(backdoor["target_class"]),
            }
        )
    return backdoors, infos
