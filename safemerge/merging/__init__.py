"""Merging as pure tensor code over ``dict[str, Tensor]`` state dicts (no Lightning, no I/O)."""

from safemerge.merging.arithmetic import task_arithmetic, task_vectors, weight_average

__all__ = ["task_arithmetic", "task_vectors", "weight_average"]
