"""The image renderers of mini benchmark v2 (:mod:`safemerge.data.mini_v2`): one per domain.

Each ``_<domain>(label, rng, split)`` draws one float32 ``[3, 32, 32]`` image in [0, 1] of class
``label`` from the item's own generator, reading only ``split``'s share of a real source.
"""

from __future__ import annotations

import functools

import numpy as np

from safemerge.data import mini_assets, mini_v1
from safemerge.data.tasks import Split
from safemerge.data.transforms import carve

SIZE = 32
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


def _resample(up: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``up @ grid @ up.T`` computed in float64, returned in float32: the same pixels whatever
    BLAS kernel the machine picks (a float32 product's rounding depends on it: OpenBLAS's
    Haswell and SkylakeX kernels drew different digits and terrain images)."""
    up = up.astype(np.float64)
    return (up @ grid.astype(np.float64) @ up.T).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, octaves: tuple[int, ...] = (4, 8, 16)) -> np.ndarray:
    """Value noise ``[SIZE, SIZE]`` in roughly [0, 1]: random grids upsampled and summed."""
    total = np.zeros((SIZE, SIZE), dtype=np.float32)
    weight = 0.0
    for i, n in enumerate(octaves):
        up = _upsample(n)
        w = 0.5**i
        total += w * _resample(up, rng.random((n, n)).astype(np.float32))
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
    glyph = np.clip(_resample(up, images[int(pool[rng.integers(len(pool))])]) * rng.uniform(1.1, 1.5), 0, 1)
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
