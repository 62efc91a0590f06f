"""The source data of the v2 mini tasks that no PyPI package ships, inside the package.

``pip install -r requirements.txt`` must be the whole set-up, so two sources live under
``safemerge/data/assets/`` (written by ``python -m safemerge.data.mini_assets``, a maintainer
step on a machine with Debian's ``dataset-fashion-mnist``, ``fonts-dejavu-core`` and
``fonts-dejavu-extra``):

* ``fashion_mnist_subset.npz``: the labels of both Fashion-MNIST files (MIT licence), so the
  per-class pools keep their lengths and order, and the images that the task's splits draw
  for the split seeds and sizes of :data:`COVERED`, under their original indices. Any other
  image (another ``split_seed``, larger splits, pretraining captions) is read from the full
  files at :data:`FASHION_ROOT`, or the error says where to put them.
* ``dejavu_glyphs.npz``: the coverage bitmap of each letter in each font that ``mini_letters``
  draws (pre-rendered, so no font or FreeType version on the machine can change an image).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np

from safemerge.errors import DatasetNotFoundError

ASSETS = Path(__file__).parent / "assets"
FASHION_ASSET = ASSETS / "fashion_mnist_subset.npz"
GLYPH_ASSET = ASSETS / "dejavu_glyphs.npz"
# Full Fashion-MNIST, for images outside the shipped subset (where Debian's package puts it).
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"))
# split_seed -> items per split whose Fashion-MNIST images ship: seed 0 at the default sizes is
# what every expert and merge uses; a few items of seed 1 serve the tests that change the seed.
COVERED: dict[int, dict[str, int]] = {
    0: {"train": 2000, "val": 500, "test": 1000},
    1: {"train": 64, "val": 64, "test": 64},
}
FILES = ("train", "test")  # Fashion-MNIST's two files: train (train and val splits) and t10k


def _missing_asset(path: Path) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{path} is missing from the safemerge package (a broken install?); reinstall safemerge, "
        "or regenerate it with: python -m safemerge.data.mini_assets"
    )


def read_fashion_file(root: Path, file: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole Fashion-MNIST file pair: uint8 images ``[N, 28, 28]`` and int64 labels ``[N]``."""
    prefix = "train" if file == "train" else "t10k"
    images_file, labels_file = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.is_file() or not labels_file.is_file():
        raise DatasetNotFoundError(f"missing {images_file.name} or {labels_file.name} in {root}")
    with gzip.open(images_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


class FashionImages:
    """One Fashion-MNIST file's images by original index: shipped ones first, else the full file."""

    def __init__(self, file: str, indices: np.ndarray, images: np.ndarray) -> None:
        self.file = file
        self._row = {int(index): row for row, index in enumerate(indices.tolist())}
        self._images = images

    def __getitem__(self, index: int) -> np.ndarray:
        row = self._row.get(int(index))
        return self._images[row] if row is not None else _full_fashion_file(self.file)[int(index)]

    def require(self, indices) -> None:
        """Fail now, with the fix, if any of these images is neither shipped nor readable."""
        if any(int(i) not in self._row for i in indices):
            _full_fashion_file(self.file)


@functools.lru_cache(maxsize=None)
def _full_fashion_file(file: str) -> np.ndarray:
    try:
        return read_fashion_file(FASHION_ROOT, file)[0]
    except DatasetNotFoundError as err:
        raise DatasetNotFoundError(
            f"mini_fashion: safemerge ships the Fashion-MNIST images of split_seed {sorted(COVERED)} at the default "
            f"split sizes; other seeds, sizes and pretraining captions need the full files ({err}): put "
            f"{'train' if file == 'train' else 't10k'}-{{images-idx3,labels-idx1}}-ubyte.gz in {FASHION_ROOT} "
            "(apt-get install dataset-fashion-mnist puts them there)"
        ) from None


@functools.lru_cache(maxsize=None)
def fashion_file(file: str) -> tuple[FashionImages, np.ndarray]:
    """The images (lazily, by index) and every label of one Fashion-MNIST file."""
    if not FASHION_ASSET.is_file():
        raise _missing_asset(FASHION_ASSET)
    with np.load(FASHION_ASSET) as asset:
        images = FashionImages(file, asset[f"{file}_indices"], asset[f"{file}_images"])
        return images, asset[f"{file}_labels"].astype(np.int64)


@functools.lru_cache(maxsize=None)
def glyphs() -> dict[tuple[str, str], np.ndarray]:
    """``(letter, font file name) -> uint8 coverage [H, W]`` of every glyph ``mini_letters`` draws."""
    if not GLYPH_ASSET.is_file():
        raise _missing_asset(GLYPH_ASSET)
    with np.load(GLYPH_ASSET) as asset:
        return {tuple(key.split(":", 1)): asset[key] for key in asset.files}  # type: ignore[misc]


# ---------------------------------------------------------------------------- maintainer step


def render_glyph(letter: str, font: str) -> np.ndarray:
    """A letter's coverage in a DejaVu font from the system's fonts (64 px font, tight box + 4 px)."""
    from PIL import Image, ImageDraw, ImageFont

    path = next((folder / font for folder in FONT_DIRS if (folder / font).is_file()), None)
    if path is None:
        raise DatasetNotFoundError(
            f"{font} not found in {', '.join(map(str, FONT_DIRS))} (apt-get install fonts-dejavu-core fonts-dejavu-extra)"
        )
    face = ImageFont.truetype(str(path), 64)
    box = face.getbbox(letter)
    image = Image.new("L", (box[2] - box[0] + 8, box[3] - box[1] + 8), 0)
    ImageDraw.Draw(image).text((4 - box[0], 4 - box[1]), letter, fill=255, font=face)
    return np.asarray(image, dtype=np.uint8).copy()


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safemerge.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def build() -> None:
    """Write both assets from the system's Fashion-MNIST and DejaVu fonts."""
    from safemerge.data import mini_v2, mini_v2_render

    files = {file: read_fashion_file(FASHION_ROOT, file) for file in FILES}
    # First the labels alone (a valid asset: every image then comes from the full files), from
    # which the task's pools, and so the images its covered splits draw, follow.
    arrays = {f"{file}_labels": labels.astype(np.uint8) for file, (_, labels) in files.items()}
    for file in FILES:
        arrays[f"{file}_indices"], arrays[f"{file}_images"] = np.zeros(0, np.int32), np.zeros((0, 28, 28), np.uint8)
    _write(FASHION_ASSET, arrays)
    fashion_file.cache_clear()
    mini_v2_render._fashion_by_class.cache_clear()
    for file, (images, _) in files.items():
        used = sorted(
            {
                index
                for seed, sizes in COVERED.items()
                for split, n in sizes.items()
                if (split == "test") == (file == "test")
                for index in mini_v2.fashion_indices(split, seed, n)
            }
        )
        arrays[f"{file}_indices"], arrays[f"{file}_images"] = np.asarray(used, dtype=np.int32), images[used]
    _write(FASHION_ASSET, arrays)
    _write(
        GLYPH_ASSET,
        {
            f"{letter}:{font}": render_glyph(letter, font)
            for font in mini_v2_render.FONTS
            for letter in mini_v2_render.LETTERS
        },
    )
    for path in (FASHION_ASSET, GLYPH_ASSET):
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    build()
