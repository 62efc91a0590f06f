"""Static merging methods: they learn nothing, ``merge`` returns the merged weights.

Adding one is one dataclass here (or anywhere) and one YAML under ``configs/method/``::

    @dataclass(eq=False)
    class Scaled(StaticMerge):
        \"\"\"``θ_0 + λ τ_0``: the first expert's task vector only.\"\"\"

        name = "scaled"
        scaling_factor: float = 1.0  # a hyper-parameter: an init_arg, in the report

        def merge(self, base, experts):
            return task_arithmetic(base, experts[:1], self.scaling_factor)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

from torch import Tensor

from safemerge.merging.arithmetic import check_fraction_kept, task_arithmetic, ties_merging, tsv_merging, weight_average
from safemerge.merging.contract import Kind, MergeMethod

StateDict = Mapping[str, Tensor]


class StaticMerge(MergeMethod):
    """A method that learns nothing: ``merge`` returns the merged weights."""

    kind: ClassVar[Kind] = "static"

    def merge(self, base: StateDict, experts: Sequence[StateDict]) -> dict[str, Tensor]:
        raise NotImplementedError


@dataclass(eq=False)
class WeightAverage(StaticMerge):
    """The element-wise mean of the experts' weights."""

    name = "weight_average"

    def merge(self, base, experts):
        return weight_average(experts)


@dataclass(eq=False)
class TaskArithmetic(StaticMerge):
    """``θ_0 + λ Σ_i τ_i``.

    Args:
        scaling_factor: λ (the literature picks it among 0.1–1.0 on validation data; 0.3).
    """

    name = "task_arithmetic"
    scaling_factor: float = 0.3

    def merge(self, base, experts):
        return task_arithmetic(base, experts, self.scaling_factor)


@dataclass(eq=False)
class Ties(StaticMerge):
    """TIES-merging: trim, elect sign, disjoint mean (:func:`~safemerge.merging.ties_merging`).

    Args:
        k: fraction of each task vector's entries kept (0.2 keeps the top 20 % by magnitude).
        scaling_factor: λ applied to the merged task vector.
    """

    name = "ties"
    k: float = 0.2
    scaling_factor: float = 0.3

    def check(self) -> None:
        check_fraction_kept(self.name, self.k)

    def merge(self, base, experts):
        return ties_merging(base, experts, self.k, self.scaling_factor)


@dataclass(eq=False)
class TSVMerging(StaticMerge):
    """TSV-M (Gargiulo et al., CVPR 2025): each matrix's task updates cut to their top singular
    components and decorrelated across tasks (:func:`~safemerge.merging.arithmetic.tsv_merging`).

    Args:
        scaling_factor: α on the merged update (the reference: 1.0; chosen on validation data).
    """

    name = "tsv_merging"
    scaling_factor: float = 1.0

    def merge(self, base, experts):
        return tsv_merging(base, experts, self.scaling_factor)
