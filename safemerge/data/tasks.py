"""What a task is: class names, prompt templates and a builder of its splits.

Every dataset builder returns a ``torch.utils.data.Dataset`` of ``(image, label)`` pairs where
``image`` is a float tensor in [0, 1] of shape ``[3, image_size, image_size]`` and ``label`` an
``int`` — pixel space, as everywhere in safemerge. Domain modules (``mini_v1``, ``mini_v2``,
``offline``, ``real``) each export their tasks as ``TASKS``; :mod:`safemerge.data.registry`
collects them, so no domain module imports the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

from torch.utils.data import Dataset

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class SplitBuilder(Protocol):
    def __call__(self, split: Split, *, root: Path | None, image_size: int, download: bool, seed: int) -> Dataset: ...


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


def check_templates(templates: Sequence[Callable[[str], str]]) -> None:
    for template in templates:
        if not isinstance(template("x"), str):
            raise TypeError("a template must map a class name to a prompt string")
