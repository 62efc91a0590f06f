"""Merging: pure tensor code over ``dict[str, Tensor]`` state dicts, and the methods (no Lightning, no I/O).

- :mod:`.arithmetic`: functions for users who merge without Lightning (:func:`task_vectors`,
  :func:`weight_average`, :func:`task_arithmetic`, :func:`ties_merging`);
- :mod:`.contract`: what a method (and a defence) declares: hyper-parameters, learned parts, stages;
- :mod:`.static`: the static methods; :mod:`.learned`: AdaMerging, merging by expert labels and the concrete-mask methods;
  :mod:`.dam`: DAM;
- the learned methods' building blocks: :class:`MergedEncoder` (functional forward over
  ``θ_0 + Σ λ ⊙ m ⊙ τ``, :mod:`.merged`), :class:`ConcreteMask` (:mod:`.masks`), the simulated
  triggers (:mod:`.simulated_triggers`), and the training loop (:mod:`.learner`).

Nothing here imports :mod:`safemerge.defenses` (which builds on these primitives).
"""

from safemerge.merging.arithmetic import task_arithmetic, task_vectors, ties_merging, weight_average
from safemerge.merging.contract import Component, MergeMethod, Optimize, Stage
from safemerge.merging.dam import DAMAdaMerging, DAMTaskArithmetic, DefenseAwareMask
from safemerge.merging.learned import (
    AdaMerging,
    ConcreteAdaMerging,
    ConcreteTaskArithmetic,
    ExpertLabelMerging,
    LearnedMerge,
    MaskedMerge,
    entropy,
    expert_label_loss,
)
from safemerge.merging.masks import ConcreteMask
from safemerge.merging.merged import MergedEncoder
from safemerge.merging.static import StaticMerge, TaskArithmetic, Ties, TSVMerging, WeightAverage

__all__ = [
    "AdaMerging",
    "Component",
    "ConcreteAdaMerging",
    "ConcreteMask",
    "ConcreteTaskArithmetic",
    "DAMAdaMerging",
    "DAMTaskArithmetic",
    "DefenseAwareMask",
    "ExpertLabelMerging",
    "LearnedMerge",
    "MaskedMerge",
    "MergeMethod",
    "MergedEncoder",
    "Optimize",
    "Stage",
    "StaticMerge",
    "TaskArithmetic",
    "Ties",
    "TSVMerging",
    "WeightAverage",
    "entropy",
    "expert_label_loss",
    "task_arithmetic",
    "task_vectors",
    "ties_merging",
    "weight_average",
]
