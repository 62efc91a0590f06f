"""The five tasks of mini benchmark v1 over its scenes (:mod:`safemerge.data.mini_v1`): one
attribute each (shape, colour, count, digit, texture), rendered lazily, registered in
:data:`TASKS`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from safemerge.data.mini_v1 import (
    _STREAM,
    COLOURS,
    COUNTS,
    DIGITS,
    MINI_SPLIT_SIZES,
    NATIVE_SIZE,
    SHAPES,
    TEXTURES,
    SceneSpec,
    item_rng,
    render,
    resize,
    sample_scene,
)
from safemerge.data.tasks import SPLITS, Split, Task
from safemerge.data.templates import TEMPLATES, _templates


@dataclass(frozen=True)
class _MiniTaskDef:
    classnames: tuple[str, ...]
    templates: tuple
    attribute: str  # which scene attribute is the label
    digit_fraction: float  # share of digit scenes


_MINI_TASKS: dict[str, _MiniTaskDef] = {
    "mini_shape": _MiniTaskDef(
        SHAPES,
        _templates("a photo of a {}.", "a drawing of a {} shape.", "a picture of {} shapes.", "a {} shape."),
        "shape",
        0.0,
    ),
    "mini_color": _MiniTaskDef(
        COLOURS,
        _templates("a photo of {} objects.", "something coloured {}.", "a photo of {} shapes.", "{} coloured things."),
        "colour",
        0.0,
    ),
    "mini_count": _MiniTaskDef(
        COUNTS,
        _templates("a photo of {} objects.", "{} shapes.", "a picture with {} things.", "a photo of {} items."),
        "count",
        0.0,
    ),
    "mini_digit": _MiniTaskDef(DIGITS, TEMPLATES["mnist"], "digit", 1.0),
    "mini_texture": _MiniTaskDef(
        TEXTURES,
        _templates("a photo of {} texture.", "a background of {}.", "a close-up photo of {}.", "a texture of {}."),
        "texture",
        0.3,
    ),
}


def mini_task_names() -> list[str]:
    """The five mini tasks, in a fixed order."""
    return list(_MINI_TASKS)


class MiniTaskDataset(Dataset):
    """One split of a mini task, rendered lazily: item ``i`` from ``(task, split, seed, i)``.

    Labels cycle through the classes (``label = i mod C``), so every split is balanced; the
    other attributes are random. A rendered image is kept (12 KB at 32 px): fine-tuning reads
    each image many times, and rendering costs more than the tower's forward pass.
    """

    def __init__(
        self, task: str, split: Split, seed: int = 0, image_size: int = NATIVE_SIZE, num_samples: int | None = None
    ) -> None:
        if task not in _MINI_TASKS:
            raise ValueError(f"unknown mini task {task!r}; known: {mini_task_names()}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.task, self.split, self.seed, self.image_size = task, split, seed, image_size
        self.num_samples = MINI_SPLIT_SIZES[split] if num_samples is None else num_samples
        self._def = _MINI_TASKS[task]
        self._rendered: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> int:
        return index % len(self._def.classnames)

    def scene(self, index: int) -> SceneSpec:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        definition, label = self._def, self.label(index)
        rng = item_rng(self.seed, _STREAM[self.task], self.split, index)
        kind = "digit" if definition.digit_fraction >= 1.0 or rng.random() < definition.digit_fraction else "objects"
        fixed = {"count": label + 1} if definition.attribute == "count" else {definition.attribute: label}
        return sample_scene(rng, self.split, kind, **fixed)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self._rendered.get(index)
        if image is None:
            image = self._rendered[index] = resize(render(self.scene(index)), self.image_size)
        return image, self.label(index)


def build_mini(task: str, split: Split, *, root: Path | None, image_size: int, download: bool, seed: int) -> Dataset:
    """Registry builder of a mini task (``root`` and ``download`` are unused: nothing to read)."""
    return MiniTaskDataset(task, split, seed=seed, image_size=image_size)


TASKS: tuple[Task, ...] = tuple(
    Task(
        name=_name,
        classnames=_definition.classnames,
        templates=_definition.templates,
        build=functools.partial(build_mini, _name),
        needs_root=False,
        layout="(built in: rendered by safemerge.data.mini_v1)",
    )
    for _name, _definition in _MINI_TASKS.items()
)
