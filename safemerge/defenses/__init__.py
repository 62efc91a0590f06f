"""Post-merge defences: pure torch, like :mod:`safemerge.merging`, and built on it.

A defence (:class:`AWM`, :class:`SAU`) is chosen by ``class_path`` in
``model.init_args.defense`` and applied on top of any merging method: it learns a mask over
the merged update on the same unlabeled adaptation batches, through the same training loop
(:class:`~safemerge.merging.learner.MergeLearner`), owning its step
(:mod:`safemerge.merging.contract`). The dependency runs one way: defences import merging's
primitives (the contract, masks, the simulated triggers of
:mod:`safemerge.merging.simulated_triggers`, shared with DAM), never the reverse. The simulated
triggers are re-exported here for the defences' users.
"""

from safemerge.defenses.awm import AWM
from safemerge.defenses.base import Defense, UpdateMask
from safemerge.defenses.sau import SAU
from safemerge.merging.simulated_triggers import (
    AdditiveTrigger,
    PatchTrigger,
    SimulatedTrigger,
    shared_wrong_log_probability,
    simulated_trigger,
)

__all__ = [
    "AWM",
    "AdditiveTrigger",
    "Defense",
    "PatchTrigger",
    "SAU",
    "SimulatedTrigger",
    "UpdateMask",
    "shared_wrong_log_probability",
    "simulated_trigger",
]
