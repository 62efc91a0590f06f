"""Mini benchmark v2: six small tasks, each on its own image domain.

Task arithmetic works on the real benchmarks because each task vector mostly changes the model
on its own inputs (weight disentanglement); tasks that ask different questions about the same
images interfere by construction. So each v2 task has its own input distribution:

==================  =======  =====================================================================
task                classes  images (32×32 RGB, float in [0, 1])
==================  =======  =====================================================================
``mini_shapes``     6        1–3 flat coloured shapes on a plain or gradient background (rendered)
``mini_digits``     10       scikit-learn's real handwritten digits, light strokes on black
``mini_fashion``    10       real Fashion-MNIST articles (the images used ship in the package)
``mini_textures``   6        full-frame crops of real texture photos from scikit-image
``mini_letters``    10       capital letters in DejaVu fonts (shipped glyphs), ink on tinted paper
``mini_terrain``    6        procedural aerial views: forest, sea, river, farmland, desert, town
==================  =======  =====================================================================

Items are pure functions of ``(seed, task, split, index)``: label ``index mod C`` (balanced
splits), everything else drawn from the item's own generator. Real sources are partitioned once
with a fixed seed (digits and textures as in :mod:`safemerge.data.mini_v1`; Fashion-MNIST's val
comes from its train file, its test from its test file), so train / val / test never share a
source image and pretraining captions (train sources only) never see a test image.

:class:`DomainCaptions` draws captioned images from all six domains for contrastive
pretraining. Captions never name the classes in :data:`UNNAMED_IN_CAPTIONS` (every other class
of each task): the text tower never hears those names, which keeps zero-shot accuracy in the
band of real CLIP on the task-vector benchmark instead of near 100 %.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from safemerge.data import mini_assets, mini_v1, mini_v1_captions
from safemerge.data.mini_v2_render import (
    FASHION_CLASSES,
    LETTERS,
    SIZE,
    TERRAIN,
    Image,
    _digits,
    _fashion,
    _fashion_by_class,
    _fashion_pick,
    _letters,
    _shapes,
    _terrain,
    _textures,
)
from safemerge.data.tasks import SPLITS, Split, Task
from safemerge.data.templates import TEMPLATES, _templates

# The shipped files the images are drawn from: the expert cache key digests them (safemerge.experts).
DATA_FILES = (mini_assets.FASHION_ASSET, mini_assets.GLYPH_ASSET)
SPLIT_SIZES: dict[str, int] = {"train": 2000, "val": 500, "test": 1000}


def fashion_indices(split: Split, seed: int, num_samples: int) -> list[int]:
    """The Fashion-MNIST images (indices into the split's file) that a split's items show."""
    classes = len(FASHION_CLASSES)
    rngs = (mini_v1.item_rng(seed, _STREAMS["mini_fashion"], split, i) for i in range(num_samples))
    return [_fashion_pick(i % classes, rng, split)[1] for i, rng in enumerate(rngs)]


# ---------------------------------------------------------------------------- tasks and captions


@dataclass(frozen=True)
class Domain:
    """One v2 task: its classes, how to draw an item, and how captions speak of it."""

    task: str
    classnames: tuple[str, ...]
    templates: tuple[Callable[[str], str], ...]
    draw: Callable[[int, np.random.Generator, Split], Image]
    # Caption forms: "{}" takes the class phrase; ``anonymous`` describe the domain only.
    named: tuple[str, ...]
    anonymous: tuple[str, ...]
    words: tuple[tuple[str, ...], ...] = ()  # per class, the phrases captions may use


DOMAINS: dict[str, Domain] = {
    d.task: d
    for d in (
        Domain(
            "mini_shapes",
            mini_v1.SHAPES,
            _templates("a drawing of a {}.", "a flat {} shape.", "a simple {} icon.", "a clip art {}."),
            _shapes,
            named=(
                "a flat {} on a plain background",
                "clip art of a {}",
                "a coloured {} shape",
                "a simple {} icon",
                "an illustration of a {}",
            ),
            anonymous=("a flat geometric shape", "clip art on a plain background", "a simple coloured icon"),
            words=tuple((n, f"{n} shape") for n in mini_v1.SHAPES),
        ),
        Domain(
            "mini_digits",
            mini_v1.DIGITS,
            TEMPLATES["mnist"],
            _digits,
            named=(
                "a handwritten {}",
                "the digit {} written by hand",
                "a scribbled {} on black",
                "a white handwritten number {}",
            ),
            anonymous=("a handwritten digit", "a number written by hand on black", "a scribbled numeral"),
            words=tuple((d, w) for d, w in zip(mini_v1.DIGITS, mini_v1_captions._NUMBER_WORDS)),
        ),
        Domain(
            "mini_fashion",
            FASHION_CLASSES,
            TEMPLATES["fashion_mnist"],
            _fashion,
            named=(
                "a grayscale photo of a {}",
                "a {}, a fashion product",
                "a product photo of a {}",
                "a low resolution picture of a {}",
            ),
            anonymous=("a piece of clothing", "a grayscale fashion product", "an item from a clothing store"),
            words=tuple((n,) for n in FASHION_CLASSES),
        ),
        Domain(
            "mini_textures",
            mini_v1.TEXTURES,
            _templates(
                "a photo of a {} texture.", "a close-up photo of {}.", "a photo of the {} pattern.", "a texture of {}."
            ),
            _textures,
            named=("a close-up photo of {}", "a texture of {}", "{} filling the frame", "a grayscale photo of {}"),
            anonymous=("a close-up photo of a surface", "a texture photo", "a grayscale pattern"),
            words=tuple(mini_v1_captions.TEXTURE_WORDS[n] for n in mini_v1.TEXTURES),
        ),
        Domain(
            "mini_letters",
            LETTERS,
            _templates(
                'the letter "{}".', "a printed letter {}.", 'a photo of the character "{}".', "the capital letter {}."
            ),
            _letters,
            named=("the letter {} printed on paper", "a capital {} in ink", "the character {}", "a typed letter {}"),
            anonymous=("a printed letter on paper", "a character in some font", "ink on paper"),
            words=tuple((c, f"{c.lower()}") for c in LETTERS),
        ),
        Domain(
            "mini_terrain",
            TERRAIN,
            _templates(
                "a satellite photo of {}.",
                "an aerial view of {}.",
                "a centered satellite photo of {}.",
                "satellite imagery of {}.",
            ),
            _terrain,
            named=("a satellite photo of {}", "an aerial view of {}", "{} seen from above", "satellite imagery of {}"),
            anonymous=("a satellite photo", "an aerial view of the land", "land seen from above"),
            words=(
                ("forest", "woods"),
                ("sea", "the ocean"),
                ("river", "a river"),
                ("farmland", "fields"),
                ("desert", "sand dunes"),
                ("residential area", "houses", "a town"),
            ),
        ),
    )
}
# Class indices that captions never name: every other class of each task.
UNNAMED_IN_CAPTIONS: dict[str, frozenset[int]] = {
    task: frozenset(range(1, len(d.classnames), 2)) for task, d in DOMAINS.items()
}
NAME_PROBABILITY = 0.8  # share of captions of a nameable class that name it
_STREAMS = {"captions": 100, **{task: 101 + i for i, task in enumerate(DOMAINS)}}


def domain_task_names() -> list[str]:
    """The six v2 mini tasks, in a fixed order."""
    return list(DOMAINS)


def draw(task: str, label: int, rng: np.random.Generator, split: Split) -> Tensor:
    """One image of ``task`` with class ``label``: float32 ``[3, 32, 32]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(DOMAINS[task].draw(label, rng, split), dtype=np.float32))


def caption(task: str, label: int, rng: np.random.Generator) -> str:
    """A caption of an item; names its class unless the class is unnamed (or by chance)."""
    domain = DOMAINS[task]
    if label not in UNNAMED_IN_CAPTIONS[task] and rng.random() < NAME_PROBABILITY:
        words = domain.words[label] if domain.words else (domain.classnames[label],)
        text = mini_v1._pick(rng, domain.named).format(mini_v1._pick(rng, words))
    else:
        text = mini_v1._pick(rng, domain.anonymous)
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


class DomainTaskDataset(Dataset):
    """One split of a v2 task, drawn once on first use: item ``i`` from ``(task, split, seed, i)``."""

    def __init__(
        self, task: str, split: Split, seed: int = 0, image_size: int = SIZE, num_samples: int | None = None
    ) -> None:
        if task not in DOMAINS:
            raise ValueError(f"unknown mini task {task!r}; known: {domain_task_names()}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.task, self.split, self.seed, self.image_size = task, split, seed, image_size
        self.num_samples = SPLIT_SIZES[split] if num_samples is None else num_samples
        self._classes = len(DOMAINS[task].classnames)
        self._images: Tensor | None = None

    def __len__(self) -> int:
        return self.num_samples

    def check_sources(self) -> None:
        """Cheaply make sure every source image or glyph this split draws can be read."""
        if self.task == "mini_fashion":
            images, _ = _fashion_by_class(self.split)[0]
            images.require(fashion_indices(self.split, self.seed, self.num_samples))
        elif self.task == "mini_letters":
            mini_assets.glyphs()

    def label(self, index: int) -> int:
        return index % self._classes

    def image(self, index: int) -> Tensor:
        rng = mini_v1.item_rng(self.seed, _STREAMS[self.task], self.split, index)
        return mini_v1.resize(draw(self.task, self.label(index), rng, self.split), self.image_size)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self._images is None:  # drawing costs more than the tower's forward pass: keep them
            self._images = torch.stack([self.image(i) for i in range(self.num_samples)])
        return self._images[index], self.label(index)


class DomainCaptions(Dataset):
    """Captioned images from all v2 domains (train sources only unless ``split`` says otherwise)."""

    def __init__(self, num_samples: int, seed: int, split: Split = "train", image_size: int = SIZE) -> None:
        self.num_samples, self.seed, self.split, self.image_size = num_samples, seed, split, image_size
        self._tasks = domain_task_names()

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> tuple[str, int, np.random.Generator, str]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = mini_v1.item_rng(self.seed, _STREAMS["captions"], self.split, index)
        task = self._tasks[int(rng.integers(len(self._tasks)))]
        label = int(rng.integers(len(DOMAINS[task].classnames)))
        return task, label, rng, caption(task, label, rng)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        task, label, rng, text = self.describe(index)
        return mini_v1.resize(draw(task, label, rng, self.split), self.image_size), text


def build_domain_task(
    task: str, split: Split, *, root: Path | None, image_size: int, download: bool, seed: int
) -> Dataset:
    """Registry builder (``root`` and ``download`` unused: everything ships with the packages)."""
    dataset = DomainTaskDataset(task, split, seed=seed, image_size=image_size)
    dataset.check_sources()  # missing source data fails here, before anything runs
    return dataset


TASKS: tuple[Task, ...] = tuple(
    Task(
        name=task,
        classnames=domain.classnames,
        templates=domain.templates,
        build=functools.partial(build_domain_task, task),
        needs_root=False,
        layout="(built in: drawn by safemerge.data.mini_v2)",
    )
    for task, domain in DOMAINS.items()
)
