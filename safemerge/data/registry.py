"""The task registry: one name per task, with its class names, prompt templates and splits.

A task is data (:class:`Task`); registering one is a single :func:`register_task` call. Every
dataset builder returns a ``torch.utils.data.Dataset`` of ``(image, label)`` pairs where
``image`` is a float tensor in [0, 1] of shape ``[3, image_size, image_size]`` and ``label`` an
``int`` — pixel space, as everywhere in safemerge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

from torch.utils.data import Dataset

from safemerge.errors import UnknownTaskError

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class SplitBuilder(Protocol):
    def __call__(
        self, split: Split, *, root: Path | None, image_size: int, download: bool, seed: int
    ) -> Dataset: ...


@dataclass(frozen=True)
class Task:
    """A classification task.

    Attributes:
        name: registry key, e.g. ``"mnist"``.
        classnames: human-readable class names, index = label.
        templates: prompt templates, each a callable ``classname -> prompt``
            (CLIP's published lists, as the task-vector literature uses them).
        build: returns one split as a dataset of ``([3, S, S] float in [0, 1], int)`` pairs.
        needs_root: whether the task reads files from a user-given root (real datasets)
            or is built from data that ships with Python packages.
        layout: how the files under ``root`` must look; shown when they are missing.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[Callable[[str], str], ...]
    build: SplitBuilder
    needs_root: bool = True
    layout: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self, classname: str) -> list[str]:
        return [template(classname) for template in self.templates]


_TASKS: dict[str, Task] = {}


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
    # Importing the modules registers their tasks; kept lazy so importing the registry is cheap.
    from safemerge.data import mini, offline, real  # noqa: F401


def check_templates(templates: Sequence[Callable[[str], str]]) -> None:
    for template in templates:
        if not isinstance(template("x"), str):
            raise TypeError("a template must map a class name to a prompt string")
