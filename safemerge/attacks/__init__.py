"""Backdoor attacks on expert encoders: triggers, poisoned data and trigger optimization.

Imports only torch: no Lightning, no I/O.
"""

from safemerge.attacks.backdoors import SIG, Attack, BadNets, Blended, OptimizedPatch, WaNet
from safemerge.attacks.optimize import optimize_trigger
from safemerge.attacks.poison import PoisonedDataset, TriggeredDataset, poison_indices, poisoned_training_set
from safemerge.attacks.triggers import Trigger

__all__ = [
    "Trigger",
    "Attack",
    "BadNets",
    "Blended",
    "OptimizedPatch",
    "WaNet",
    "SIG",
    "optimize_trigger",
    "poison_indices",
    "poisoned_training_set",
    "PoisonedDataset",
    "TriggeredDataset",
]
