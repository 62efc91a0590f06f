"""The task registry: one name per task.

The built-in domain modules export their tasks as ``TASKS`` and are collected here on first
look-up; :func:`register_task` adds a user's task. Task and split types live in
:mod:`safemerge.data.tasks`.
"""

from __future__ import annotations

from safemerge.data.tasks import SPLITS, Split, SplitBuilder, Task, check_templates
from safemerge.errors import UnknownTaskError

__all__ = ["SPLITS", "Split", "SplitBuilder", "Task", "check_templates", "get_task", "register_task", "task_names"]

_TASKS: dict[str, Task] = {}
_BUILTIN_LOADED = False


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """Look a task up by name; an unknown name lists the known ones."""
    _load_builtin_tasks()
    if name not in _TASKS:
        known = ", ".join(sorted(_TASKS))
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}")
    return _TASKS[name]


def task_names() -> list[str]:
    _load_builtin_tasks()
    return sorted(_TASKS)


def _load_builtin_tasks() -> None:
    # Lazy, so importing the registry is cheap; the domain modules never import it back.
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    from safemerge.data import mini_v1_tasks, mini_v2, offline, real

    for module in (mini_v1_tasks, mini_v2, offline, real):
        for task in module.TASKS:
            register_task(task)
