"""Merging as pure tensor code over ``dict[str, Tensor]`` state dicts (no Lightning, no I/O).

Functions for users who merge without Lightning: :func:`task_vectors`, :func:`weight_average`,
:func:`task_arithmetic`, :func:`ties_merging`. The learned methods' building blocks: the
:class:`MergedEncoder` (functional forward over ``θ_0 + Σ λ ⊙ m ⊙ τ``), :class:`ConcreteMask`
and :class:`UniversalPerturbation`; the methods themselves are in :mod:`.methods`.
"""

from safemerge.merging.arithmetic import task_arithmetic, task_vectors, ties_merging, weight_average
from safemerge.merging.masks import ConcreteMask
from safemerge.merging.merged import MergedEncoder
from safemerge.merging.methods import (
    AdaMerging, ConcreteAdaMerging, ConcreteTaskArithmetic, DAMAdaMerging, DAMTaskArithmetic,
    LearnedMerge, MergeMethod, StaticMerge, TaskArithmetic, Ties, WeightAverage, entropy,
)
from safemerge.merging.perturbation import UniversalPerturbation

__all__ = [
    "AdaMerging", "ConcreteAdaMerging", "ConcreteMask", "ConcreteTaskArithmetic", "DAMAdaMerging",
    "DAMTaskArithmetic", "LearnedMerge", "MergeMethod", "MergedEncoder", "StaticMerge",
    "TaskArithmetic", "Ties", "UniversalPerturbation", "WeightAverage", "entropy", "task_arithmetic",
    "task_vectors", "ties_merging", "weight_average",
]
