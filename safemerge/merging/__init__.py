"""Merging as pure tensor code over ``dict[str, Tensor]`` state dicts (no Lightning, no I/O).

Functions for users who merge without Lightning: :func:`task_vectors`, :func:`weight_average`,
:func:`task_arithmetic`, :func:`ties_merging`. The learned methods' building blocks: the
:class:`MergedEncoder` (functional forward over ``θ_0 + Σ λ ⊙ m ⊙ τ``), :class:`ConcreteMask`
and the simulated triggers (:mod:`safemerge.defenses.triggers`); the methods themselves, which own
their training steps, are in :mod:`.methods`.
"""

from safemerge.merging.arithmetic import task_arithmetic, task_vectors, ties_merging, weight_average
from safemerge.merging.masks import ConcreteMask
from safemerge.merging.merged import MergedEncoder
from safemerge.merging.methods import (
    AdaMerging, ConcreteAdaMerging, ConcreteTaskArithmetic, DAMAdaMerging, DAMTaskArithmetic,
    LearnedMerge, MaskedMerge, MergeMethod, StaticMerge, TaskArithmetic, Ties, WeightAverage, entropy,
)

__all__ = [
    "AdaMerging", "ConcreteAdaMerging", "ConcreteMask", "ConcreteTaskArithmetic", "DAMAdaMerging",
    "DAMTaskArithmetic", "LearnedMerge", "MaskedMerge", "MergeMethod", "MergedEncoder", "StaticMerge",
    "TaskArithmetic", "Ties", "WeightAverage", "entropy", "task_arithmetic",
    "task_vectors", "ties_merging", "weight_average",
]
