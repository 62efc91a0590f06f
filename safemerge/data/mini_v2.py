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

from safemerge.data import mini_assets, mini_v1
from safemerge.data.tasks import SPLITS, Split, Task
from safemerge.data.templates import TEMPLATES, _templates
from safemerge.data.transforms import carve

SIZE = 32
# The shipped files the images are drawn from: the expert cache key digests them (safemerge.experts).
DATA_FILES = (mini_assets.FASHION_ASSET, mini_assets.GLYPH_ASSET)
SPLIT_SIZES: dict[str, int] = {"train": 2000, "val": 500, "test": 1000}
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
LETTERS = tuple("ABCDEFGHKM")
TERRAIN = ("forest", "sea", "river", "farmland", "desert", "residential area")
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansCondensed-Bold.ttf",
)

Image = np.ndarray  # float32 [3, SIZE, SIZE] in [0, 1]


def _rgb(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, 3).astype(np.float32)


def _fill(colour: np.ndarray) -> Image:
    return np.broadcast_to(colour[:, None, None], (3, SIZE, SIZE)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _upsample(native: int) -> np.ndarray:
    """Bilinear ``native -> SIZE`` interpolation matrix."""
    return mini_v1._upscale_matrix(SIZE, native)


def _smooth_noise(rng: np.random.Generator, octaves: tuple[int, ...] = (4, 8, 16)) -> np.ndarray:
    """Value noise ``[SIZE, SIZE]`` in roughly [0, 1]: random grids upsampled and summed."""
    total = np.zeros((SIZE, SIZE), dtype=np.float32)
    weight = 0.0
    for i, n in enumerate(octaves):
        up = _upsample(n)
        w = 0.5**i
        total += w * (up @ rng.random((n, n)).astype(np.float32) @ up.T)
        weight += w
    return total / weight


# ---------------------------------------------------------------------------- domains


def _shapes(label: int, rng: np.random.Generator, split: Split) -> Image:
    if rng.random() < 0.5:
        background = _fill(_rgb(rng, 0.05, 0.95))
    else:  # a linear gradient between two colours
        a, b = _rgb(rng, 0.05, 0.95), _rgb(rng, 0.05, 0.95)
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * np.linspace(0, 1, SIZE)[None, :] + np.sin(angle) * np.linspace(0, 1, SIZE)[:, None]
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        background = a[:, None, None] * (1 - ramp) + b[:, None, None] * ramp
    colour = _rgb(rng, 0.0, 1.0)
    while np.abs(colour - background.mean(axis=(1, 2))).sum() < 0.6:  # keep the shape visible
        colour = _rgb(rng, 0.0, 1.0)
    alpha = np.zeros((SIZE, SIZE), dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        side = int(rng.integers(10, 21))
        top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, size=2))
        np.maximum(
            alpha[top : top + side, left : left + side],
            mini_v1._shape_mask(label, side, 4),
            out=alpha[top : top + side, left : left + side],
        )
    return background * (1 - alpha) + colour[:, None, None] * alpha


def _digits(label: int, rng: np.random.Generator, split: Split) -> Image:
    images, _ = mini_v1._digit_source()
    pool = mini_v1._digits_by_class(split)[label]
    glyph_side = int(rng.integers(18, 29))
    up = mini_v1._upscale_matrix(glyph_side)
    glyph = np.clip(up @ images[int(pool[rng.integers(len(pool))])] @ up.T * rng.uniform(1.1, 1.5), 0, 1)
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    top, left = (int(v) for v in rng.integers(0, SIZE - glyph_side + 1, size=2))
    canvas[top : top + glyph_side, left : left + glyph_side] = glyph
    ink = 1.0 - _rgb(rng, 0.0, 0.15)  # nearly white, slightly tinted
    return np.clip(canvas[None] * ink[:, None, None] + rng.uniform(0, 0.06), 0, 1)


@functools.lru_cache(maxsize=None)
def _fashion_by_class(split: Split) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per class, the Fashion-MNIST images a split may use: val carved from the train file."""
    images, labels = mini_assets.fashion_file("test" if split == "test" else "train")
    index = np.arange(len(labels))
    if split != "test":
        train, val = carve(len(labels), (5 / 6, 1 / 6), mini_v1.PARTITION_SEED)
        index = (val if split == "val" else train).numpy()
    return tuple((images, index[labels[index] == c]) for c in range(len(FASHION_CLASSES)))


def _fashion_pick(label: int, rng: np.random.Generator, split: Split) -> tuple[mini_assets.FashionImages, int]:
    """The first draw of a Fashion-MNIST item: which image of its file it shows."""
    images, pool = _fashion_by_class(split)[label]
    return images, int(pool[rng.integers(len(pool))])


def fashion_indices(split: Split, seed: int, num_samples: int) -> list[int]:
    """The Fashion-MNIST images (indices into the split's file) that a split's items show."""
    classes = len(FASHION_CLASSES)
    rngs = (mini_v1.item_rng(seed, _STREAMS["mini_fashion"], split, i) for i in range(num_samples))
    return [_fashion_pick(i % classes, rng, split)[1] for i, rng in enumerate(rngs)]


def _fashion(label: int, rng: np.random.Generator, split: Split) -> Image:
    images, index = _fashion_pick(label, rng, split)
    item = images[index].astype(np.float32) / 255.0
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    top, left = (int(v) for v in rng.integers(0, SIZE - 28 + 1, size=2))
    canvas[top : top + 28, left : left + 28] = item[:, ::-1] if rng.random() < 0.5 else item
    return np.repeat(np.clip(canvas * rng.uniform(0.8, 1.1), 0, 1)[None], 3, axis=0)


def _textures(label: int, rng: np.random.Generator, split: Split) -> Image:
    _, largest, smallest = mini_v1._PHOTOS[label]
    tile_top, tile_left, tile = mini_v1._pick(rng, mini_v1.texture_tiles(split)[label])
    side = int(rng.integers(smallest, largest + 1))
    crop = (tile_top + int(rng.integers(tile - side + 1)), tile_left + int(rng.integers(tile - side + 1)), side)
    gray = np.rot90(mini_v1._area_crop(label, crop, SIZE), int(rng.integers(4)))
    gray = rng.uniform(0.4, 0.6) + rng.uniform(0.8, 1.2) * (gray - gray.mean())
    tint = 1.0 + rng.uniform(-0.15, 0.15, 3).astype(np.float32)
    return np.clip(gray[None] * tint[:, None, None], 0, 1)


@functools.lru_cache(maxsize=None)
def _glyph(letter: str, font: str) -> "object":
    """A letter's coverage as a PIL image (64 px tall font, tight box), from the shipped glyphs."""
    from PIL import Image as PILImage

    return PILImage.fromarray(mini_assets.glyphs()[letter, font])


def _letters(label: int, rng: np.random.Generator, split: Split) -> Image:
    from PIL import Image as PILImage

    glyph = _glyph(LETTERS[label], FONTS[int(rng.integers(len(FONTS)))])
    glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=PILImage.BILINEAR, expand=True)
    height = int(rng.integers(16, 27))
    width = max(4, min(SIZE, round(glyph.width * height / glyph.height * rng.uniform(0.85, 1.15))))
    small = np.asarray(glyph.resize((width, height), PILImage.BILINEAR), dtype=np.float32) / 255.0
    alpha = np.zeros((SIZE, SIZE), dtype=np.float32)
    top, left = int(rng.integers(0, SIZE - height + 1)), int(rng.integers(0, SIZE - width + 1))
    alpha[top : top + height, left : left + width] = small
    paper = 1.0 - _rgb(rng, 0.0, 0.25)
    ink = _rgb(rng, 0.0, 0.35)
    grain = (rng.random((SIZE, SIZE)).astype(np.float32) - 0.5) * 0.08
    image = paper[:, None, None] * (1 - alpha) + ink[:, None, None] * alpha + grain
    return np.clip(image, 0, 1)


def _terrain(label: int, rng: np.random.Generator, split: Split) -> Image:
    name = TERRAIN[label]
    noise, fine = _smooth_noise(rng), _smooth_noise(rng, (8, 16, 32))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    angle = rng.uniform(0, np.pi)
    along = np.cos(angle) * xx + np.sin(angle) * yy
    across = -np.sin(angle) * xx + np.cos(angle) * yy

    def shade(base: np.ndarray, field: np.ndarray, amount: float) -> Image:
        return base[:, None, None] * (1 + amount * (field[None] - 0.5))

    if name == "forest":
        image = shade(np.array([0.12, 0.35, 0.12]) * rng.uniform(0.8, 1.2), 0.6 * noise + 0.4 * fine, 1.4)
    elif name == "sea":
        waves = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(6, 12) * across + 3 * noise)
        image = shade(np.array([0.08, 0.25, 0.55]) * rng.uniform(0.8, 1.2), 0.7 * noise + 0.3 * waves, 0.5)
    elif name == "river":
        land = shade(np.array([0.30, 0.45, 0.20]) * rng.uniform(0.8, 1.2), noise, 0.8)
        course = 0.5 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * along + rng.uniform(0, 6))
        water = np.clip(1 - np.abs(across - course) / rng.uniform(0.05, 0.1), 0, 1)[None]
        image = land * (1 - water) + np.array([0.10, 0.25, 0.50])[:, None, None] * water
    elif name == "farmland":
        cells = int(rng.integers(2, 5))
        palette = np.array([[0.55, 0.60, 0.20], [0.35, 0.55, 0.15], [0.70, 0.60, 0.30], [0.50, 0.35, 0.20]])
        field_ids = (np.floor(along * cells * 1.5) * 7 + np.floor(across * cells)).astype(int) % 97
        colours = palette[rng.integers(len(palette), size=97)]
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 14 * across)
        image = colours[field_ids].transpose(2, 0, 1) * (0.85 + 0.15 * stripes)[None] * (0.9 + 0.2 * fine)[None]
    elif name == "desert":
        dunes = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * along + 4 * noise)
        image = shade(np.array([0.85, 0.72, 0.48]) * rng.uniform(0.85, 1.1), 0.6 * dunes + 0.4 * fine, 0.5)
    else:  # residential area: a street grid with small roofs
        image = shade(np.array([0.55, 0.55, 0.52]), fine, 0.4).copy()
        block = int(rng.integers(5, 9))
        offset = rng.integers(0, block, size=2)
        for top in range(-offset[0], SIZE, block):
            for left in range(-offset[1], SIZE, block):
                roof = np.array(
                    mini_v1._pick(rng, ((0.65, 0.25, 0.2), (0.8, 0.8, 0.78), (0.4, 0.35, 0.35), (0.3, 0.4, 0.55)))
                )
                t, l = max(top + 1, 0), max(left + 1, 0)
                image[:, t : max(top + block - 1, 0), l : max(left + block - 1, 0)] = roof[:, None, None]
        if rng.random() < 0.5:
            image = np.rot90(image, 1, axes=(1, 2))
    return np.clip(image, 0, 1).astype(np.float32)


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
            words=tuple((d, w) for d, w in zip(mini_v1.DIGITS, mini_v1._NUMBER_WORDS)),
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
            words=tuple(mini_v1.TEXTURE_WORDS[n] for n in mini_v1.TEXTURES),
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
