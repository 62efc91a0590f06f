"""Backdoor attacks on expert encoders: triggers, poisoned data and trigger optimization.

Imports only torch: no Lightning, no I/O.
"""

from safemerge.attacks.backdoors import Attack, BadNets, Blended, OptimizedPatch
from safemerge.attacks.optimize import optimize_trigger
from safemerge.attacks.poison import PoisonedDataset, TriggeredDataset, poison_indices
from safemerge.attacks.triggers import Trigger

__all__ = [
    "Trigger",
    "Attack",
    "BadNets",
    "Blended",
    "OptimizedPatch",
    "optimize_trigger",
    "poison_indices",
    "PoisonedDataset",
    "TriggeredDataset",
]
