"""The mini benchmark's domain (v1): seeded 32×32 scenes (captions: :mod:`~safemerge.data.mini_v1_captions`; the five tasks: :mod:`~safemerge.data.mini_v1_tasks`).

Everything here runs offline from data that ships inside pip packages, so a tiny CLIP can be
pretrained and merged on a laptop.

Scenes (native 32×32 RGB, float in [0, 1]) come in two kinds that share backgrounds and
styles:

* *object scenes*: 1–4 copies of one shape (circle, square, triangle, cross, ring, diamond) in
  one colour (8 colours, jittered per image), 7–11 px each, at roughly non-overlapping
  positions;
* *digit scenes*: one real handwritten digit from scikit-learn's ``load_digits`` (8×8,
  upscaled bilinearly to 14–22 px), coloured and placed at random.

The background is a crop of a real grayscale photo from scikit-image (brick wall, grass, gravel,
moon surface, coins, Hubble deep field = "night sky"), rescaled to 32×32 with brightness /
contrast jitter, reduced contrast and a slight tint. Objects and digits get a soft dark outline
so they stay visible on any background.

Randomness: a scene is a :class:`SceneSpec` sampled by :func:`sample_scene` from an explicit
``numpy.random.Generator``; :func:`render` is a pure function of the spec. Datasets derive item
``i``'s generator from ``(seed, stream, split, i)``, so items are reproducible in any order and
in any DataLoader worker.

Disjoint splits: train / val / test scenes use different seed streams, and the real-image
sources are partitioned once, with a fixed seed (:data:`PARTITION_SEED`), independently of the
builders' ``seed``: digit images by a seeded :func:`carve` of load_digits' 1,797 images
(70/10/20, the same carve as the ``digits`` task with its default seed), texture crops by a
seeded 70/10/20 carve of a grid of tiles of each photo (a crop lies inside one tile). Fixing the
partition keeps pretraining captions (``split="train"``) away from every task's test sources
whatever seeds are used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from safemerge.data.tasks import SPLITS, Split
from safemerge.data.transforms import carve

NATIVE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
TEXTURES: tuple[str, ...] = ("brick wall", "grass", "gravel", "moon surface", "coins", "night sky")
COUNTS: tuple[str, ...] = ("one", "two", "three", "four")
DIGITS: tuple[str, ...] = tuple(str(digit) for digit in range(10))

_COLOUR_RGB = np.array(
    [
        (0.92, 0.12, 0.10),  # red
        (0.15, 0.78, 0.18),  # green
        (0.15, 0.30, 0.98),  # blue
        (0.98, 0.92, 0.12),  # yellow
        (0.62, 0.18, 0.85),  # purple
        (1.00, 0.55, 0.05),  # orange
        (0.97, 0.97, 0.97),  # white
        (0.10, 0.88, 0.92),  # cyan
    ],
    dtype=np.float32,
)

OBJECT_SIZES = (7, 11)  # object side in px, inclusive
MAX_OBJECTS = 4
DIGIT_SIZES = (14, 22)  # upscaled digit side in px, inclusive

# One photo per texture class: (skimage.data function, tile side = largest crop, smallest crop),
# sides in photo pixels. Crops are rescaled (area average) to 32×32.
_PHOTOS: tuple[tuple[str, int, int], ...] = (
    ("brick", 96, 48),
    ("grass", 96, 48),
    ("gravel", 96, 48),
    ("moon", 128, 64),
    ("coins", 72, 40),
    ("hubble_deep_field", 144, 72),
)

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
PARTITION_SEED = 0
MINI_SPLIT_SIZES: dict[str, int] = {"train": 2000, "val": 500, "test": 1000}
DEFAULT_MENTION: dict[str, float] = {"shape": 0.7, "colour": 0.5, "count": 0.6, "digit": 0.7, "texture": 0.5}
# Class values that captions never name, per attribute: every other class of each task. The
# pretrained model then knows the words of about half of each task's classes, so zero-shot
# accuracy lands in the 30-70 % band of real CLIP on the task-vector benchmark (a model
# pretrained on captions naming every class scored 90-100 % on all five tasks), while the
# image tower still sees every class and fine-tuning has something to learn.
UNNAMED_IN_CAPTIONS: dict[str, frozenset[int]] = {
    "shape": frozenset({1, 3, 5}),
    "colour": frozenset({1, 3, 5, 7}),
    "count": frozenset({2, 4}),
    "digit": frozenset({1, 3, 5, 7, 9}),
    "texture": frozenset({1, 3, 5}),
}
_SPLIT_ID = {split: index for index, split in enumerate(SPLITS)}
# Seed streams: one per dataset family, so a task's scenes never repeat another's.
_STREAM = {"captions": 0, "mini_shape": 1, "mini_color": 2, "mini_count": 3, "mini_digit": 4, "mini_texture": 5}


# ---------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=None)
def _digit_source() -> tuple[np.ndarray, np.ndarray]:
    """load_digits' images as float32 [1797, 8, 8] in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def digit_indices(split: Split) -> np.ndarray:
    """Indices into load_digits of the images a split may use (disjoint across splits)."""
    _, labels = _digit_source()
    parts = carve(len(labels), tuple(SPLIT_FRACTIONS.values()), PARTITION_SEED)
    return dict(zip(SPLITS, parts))[split].numpy()


@functools.lru_cache(maxsize=None)
def _digits_by_class(split: Split) -> tuple[np.ndarray, ...]:
    _, labels = _digit_source()
    index = digit_indices(split)
    return tuple(index[labels[index] == digit] for digit in range(10))


@functools.lru_cache(maxsize=None)
def _photo(texture: int) -> np.ndarray:
    """The grayscale photo of a texture class, float32 [H, W] in [0, 1]."""
    import skimage.data

    image = getattr(skimage.data, _PHOTOS[texture][0])()
    if image.ndim == 3:
        from skimage.color import rgb2gray

        return rgb2gray(image[..., :3]).astype(np.float32)
    return (image / 255.0).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _photo_shape(texture: int) -> tuple[int, int]:
    return _photo(texture).shape  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def texture_tiles(split: Split) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Per texture class, the tiles ``(top, left, side)`` of its photo that a split may crop.

    Each photo is cut into a grid of square tiles (side = the largest crop); a seeded 70/10/20
    carve assigns whole tiles to train / val / test, so crops of different splits never overlap.
    """
    tiles = []
    for texture, (_, side, _) in enumerate(_PHOTOS):
        height, width = _photo_shape(texture)
        grid = [(row * side, col * side, side) for row in range(height // side) for col in range(width // side)]
        parts = carve(len(grid), tuple(SPLIT_FRACTIONS.values()), PARTITION_SEED + 1 + texture)
        tiles.append(tuple(grid[i] for i in dict(zip(SPLITS, parts))[split].tolist()))
    return tuple(tiles)


# ---------------------------------------------------------------------------- shapes


def _shape_mask(shape: int, side: int, supersample: int = 8) -> np.ndarray:
    """Anti-aliased coverage mask ``[side, side]`` in [0, 1] of a shape (centred, upright)."""
    n = side * supersample
    coords = (np.arange(n) + 0.5) / supersample - side / 2.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    r = side / 2.0
    name = SHAPES[shape]
    if name == "circle":
        inside = x**2 + y**2 <= r**2
    elif name == "square":
        inside = (np.abs(x) <= 0.86 * r) & (np.abs(y) <= 0.86 * r)
    elif name == "triangle":
        base = 0.82 * r
        inside = (y <= base) & (np.abs(x) <= (y + r) / (base + r) * r)
    elif name == "cross":
        arm = 0.32 * r
        inside = ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    elif name == "ring":
        dist = np.sqrt(x**2 + y**2)
        inside = (dist <= r) & (dist >= 0.52 * r)
    elif name == "diamond":
        inside = np.abs(x) + np.abs(y) <= r
    else:  # pragma: no cover
        raise ValueError(name)
    return inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _shape_masks() -> dict[tuple[int, int], np.ndarray]:
    low, high = OBJECT_SIZES
    return {(shape, side): _shape_mask(shape, side) for shape in range(len(SHAPES)) for side in range(low, high + 1)}


@functools.lru_cache(maxsize=None)
def _upscale_matrix(size: int, native: int = 8) -> np.ndarray:
    """Bilinear interpolation ``native -> size`` as a matrix (``align_corners=False``)."""
    eye = torch.eye(native).reshape(native, 1, native)
    return F.interpolate(eye, size=size, mode="linear", align_corners=False)[:, 0].T.numpy().copy()


# ---------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to draw a scene; :func:`render` is a pure function of it.

    Attributes:
        kind: ``"objects"`` or ``"digit"``.
        texture: index into :data:`TEXTURES` (the background photo).
        crop: ``(top, left, side)`` of the background crop in photo pixels.
        rot90, flip: orientation of the crop.
        level, contrast: background brightness and (reduced) contrast.
        tint: per-channel factors applied to the background.
        colour: index into :data:`COLOURS`; ``rgb`` is the jittered colour actually drawn.
        outline: darkness of the outline around objects / digits, in [0, 1].
        shape: index into :data:`SHAPES` (object scenes).
        objects: ``(top, left, side)`` of each object (object scenes); count = its length.
        digit: the digit's label 0–9 (digit scenes); ``digit_index`` its image in load_digits.
        digit_box: ``(top, left, side)`` of the digit (digit scenes).
    """

    kind: str
    texture: int
    crop: tuple[int, int, int]
    rot90: int
    flip: bool
    level: float
    contrast: float
    tint: tuple[float, float, float]
    colour: int
    rgb: tuple[float, float, float]
    outline: float
    shape: int | None = None
    objects: tuple[tuple[int, int, int], ...] = ()
    digit: int | None = None
    digit_index: int | None = None
    digit_box: tuple[int, int, int] | None = None

    @property
    def count(self) -> int | None:
        return len(self.objects) if self.kind == "objects" else None


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _place_objects(rng: np.random.Generator, count: int) -> tuple[tuple[int, int, int], ...]:
    """Random boxes (1 px apart, so outlines may touch but objects do not overlap)."""
    low, high = OBJECT_SIZES
    for attempt in range(100):
        shrink = attempt // 25  # after many failures, smaller objects
        sides = np.maximum(rng.integers(low, high + 1, size=count) - shrink, low)
        boxes: list[tuple[int, int, int]] = []
        for side in sides.tolist():
            for top, left in rng.integers(0, NATIVE_SIZE - side + 1, size=(32, 2)).tolist():
                if all(
                    top >= t + s + 1 or t >= top + side + 1 or left >= l + s + 1 or l >= left + side + 1
                    for t, l, s in boxes
                ):
                    boxes.append((top, left, side))
                    break
            else:
                break
        if len(boxes) == count:
            return tuple(boxes)
    raise RuntimeError(f"could not place {count} objects")  # pragma: no cover (never seen)


def sample_scene(
    rng: np.random.Generator,
    split: Split = "train",
    kind: str = "objects",
    *,
    shape: int | None = None,
    colour: int | None = None,
    count: int | None = None,
    digit: int | None = None,
    texture: int | None = None,
) -> SceneSpec:
    """Draw a random scene of one kind; attributes given as arguments are fixed.

    ``count`` is 1–4; the digit image and the background crop come from ``split``'s sources.
    """
    if kind not in ("objects", "digit"):
        raise ValueError(f"kind must be 'objects' or 'digit', got {kind!r}")
    texture = int(rng.integers(len(TEXTURES))) if texture is None else texture
    colour = int(rng.integers(len(COLOURS))) if colour is None else colour
    _, largest, smallest = _PHOTOS[texture]
    tile_top, tile_left, tile = _pick(rng, texture_tiles(split)[texture])
    side = int(rng.integers(smallest, largest + 1))
    crop = (tile_top + int(rng.integers(tile - side + 1)), tile_left + int(rng.integers(tile - side + 1)), side)
    rgb = np.clip(_COLOUR_RGB[colour] * rng.uniform(0.85, 1.05) + rng.normal(0.0, 0.04, 3), 0.0, 1.0)
    common = dict(
        texture=texture,
        crop=crop,
        rot90=int(rng.integers(4)),
        flip=bool(rng.integers(2)),
        level=float(rng.uniform(0.35, 0.65)),
        contrast=float(rng.uniform(0.35, 0.65)),
        tint=tuple(float(v) for v in 1.0 + rng.uniform(-0.12, 0.12, 3)),
        colour=colour,
        rgb=tuple(float(v) for v in rgb),
        outline=float(rng.uniform(0.35, 0.7)),
    )
    if kind == "objects":
        shape = int(rng.integers(len(SHAPES))) if shape is None else shape
        count = int(rng.integers(1, MAX_OBJECTS + 1)) if count is None else count
        if not 1 <= count <= MAX_OBJECTS:
            raise ValueError(f"count must be in 1..{MAX_OBJECTS}, got {count}")
        return SceneSpec(kind="objects", shape=shape, objects=_place_objects(rng, count), **common)
    pools = _digits_by_class(split)
    digit = int(rng.integers(10)) if digit is None else digit
    digit_index = int(_pick(rng, pools[digit]))
    size = int(rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1))
    top, left = (int(v) for v in rng.integers(0, NATIVE_SIZE - size + 1, size=2))
    return SceneSpec(kind="digit", digit=digit, digit_index=digit_index, digit_box=(top, left, size), **common)


@functools.lru_cache(maxsize=None)
def _integral(texture: int) -> np.ndarray:
    """Summed-area table of a photo, ``[H+1, W+1]`` float64 (fast area-average crops)."""
    table = np.zeros(tuple(n + 1 for n in _photo_shape(texture)), dtype=np.float64)
    table[1:, 1:] = _photo(texture).astype(np.float64).cumsum(0).cumsum(1)
    return table


def _area_crop(texture: int, crop: tuple[int, int, int], size: int) -> np.ndarray:
    """The crop ``(top, left, side)`` of a photo averaged down to ``[size, size]`` (side ≥ size)."""
    top, left, side = crop
    edges = (np.arange(size + 1) * side) // size
    corners = _integral(texture)[np.ix_(top + edges, left + edges)]
    sums = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    widths = np.diff(edges).astype(np.float64)
    return (sums / np.outer(widths, widths)).astype(np.float32)


def _dilate(alpha: np.ndarray) -> np.ndarray:
    """3×3 max filter (separable) of a canvas whose 1 px border is zero."""
    rows = alpha.copy()
    np.maximum(rows[:, 1:-1], alpha[:, :-2], out=rows[:, 1:-1])
    np.maximum(rows[:, 1:-1], alpha[:, 2:], out=rows[:, 1:-1])
    out = rows.copy()
    np.maximum(out[1:-1], rows[:-2], out=out[1:-1])
    np.maximum(out[1:-1], rows[2:], out=out[1:-1])
    return out


def render(spec: SceneSpec) -> Tensor:
    """Draw a scene: float32 tensor ``[3, 32, 32]`` in [0, 1]. Deterministic in ``spec``."""
    gray = _area_crop(spec.texture, spec.crop, NATIVE_SIZE)
    gray = np.rot90(gray, spec.rot90)
    if spec.flip:
        gray = gray[:, ::-1]
    gray = spec.level + spec.contrast * (gray - 0.5)
    image = gray[None] * np.asarray(spec.tint, dtype=np.float32)[:, None, None]

    # Coverage of the foreground on a canvas with a 1 px border (room for the outline).
    canvas = np.zeros((NATIVE_SIZE + 2, NATIVE_SIZE + 2), dtype=np.float32)
    if spec.kind == "objects":
        masks = _shape_masks()
        for obj_top, obj_left, obj_side in spec.objects:
            region = canvas[obj_top + 1 : obj_top + 1 + obj_side, obj_left + 1 : obj_left + 1 + obj_side]
            np.maximum(region, masks[(spec.shape, obj_side)], out=region)
    else:
        images, _ = _digit_source()
        d_top, d_left, d_side = spec.digit_box  # type: ignore[misc]
        upscale = _upscale_matrix(d_side)
        glyph = np.clip(upscale @ images[spec.digit_index] @ upscale.T * 1.3, 0.0, 1.0)
        canvas[d_top + 1 : d_top + 1 + d_side, d_left + 1 : d_left + 1 + d_side] = glyph
    halo = _dilate(canvas)[1:-1, 1:-1]
    alpha = canvas[1:-1, 1:-1]
    image = image * (1.0 - spec.outline * halo)
    image = image * (1.0 - alpha) + np.asarray(spec.rgb, dtype=np.float32)[:, None, None] * alpha
    return torch.from_numpy(np.clip(image, 0.0, 1.0).astype(np.float32))


def resize(image: Tensor, image_size: int) -> Tensor:
    """Bilinear resize of a ``[3, 32, 32]`` scene (no-op at 32)."""
    if image_size == image.shape[-1]:
        return image
    out = F.interpolate(
        image[None],
        size=(image_size, image_size),
        mode="bilinear",
        align_corners=False,
        antialias=image_size < image.shape[-1],
    )[0]
    return out.clamp_(0.0, 1.0)


def item_rng(seed: int, stream: int, split: Split, index: int) -> np.random.Generator:
    """The generator of item ``index`` of a dataset (``stream``: its family's number in the
    benchmark's stream table): independent of order and worker. v1 and v2 both draw from it."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed}, {index}")
    return np.random.default_rng([seed, stream, _SPLIT_ID[split], index])
