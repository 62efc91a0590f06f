"""Post-merge defences and simulated triggers: pure torch, like :mod:`safemerge.merging`.

A defence (:class:`AWM`, :class:`SAU`) is chosen by ``class_path`` in
``model.init_args.defense`` and applied on top of any merging method: it learns a mask over
the merged update on the same unlabeled adaptation batches, through the same training loop
(:class:`~safemerge.merging.learner.MergeLearner`), owning its step. Simulated triggers
(:mod:`.triggers`) are shared with DAM.
"""

from safemerge.defenses.awm import AWM
from safemerge.defenses.base import Defense, MaskedUpdate
from safemerge.defenses.sau import SAU, shared_wrong_log_probability
from safemerge.defenses.triggers import AdditiveTrigger, PatchTrigger, SimulatedTrigger, simulated_trigger

__all__ = [
    "AWM", "AdditiveTrigger", "Defense", "MaskedUpdate", "PatchTrigger", "SAU", "SimulatedTrigger",
    "shared_wrong_log_probability", "simulated_trigger",
]
