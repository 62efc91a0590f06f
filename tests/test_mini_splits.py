"""The real image sources of the mini tasks (v2, safemerge.data.mini_v2) keep their splits apart
and draw items of the right class: Fashion-MNIST images, scikit-learn digits, texture tiles.

Each test records which source item (image index, or photo crop) the drawing code actually
uses for the items of every split, then checks it against the source itself: no source item
(by content, not by index or object identity) serves two splits, and the item's own label in
the source is the label the dataset gives the image.
"""

import itertools

import numpy as np

from safemerge.data import mini_assets
from safemerge.data import mini_v1 as mini
from safemerge.data import mini_v2_render as domains
from safemerge.data.mini_v2 import DomainTaskDataset

SPLITS = ("train", "val", "test")
ITEMS = 120  # per split: every class several times


class Recording:
    """An array that remembers which items were read from it."""

    def __init__(self, array):
        self.array, self.used = array, []

    def __getitem__(self, index):
        self.used.append(int(index))
        return self.array[index]

    def __len__(self):
        return len(self.array)


def _pairwise_disjoint(sets: dict[str, set]) -> None:
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], (a, b, len(sets[a] & sets[b]))


def test_fashion_splits_share_no_image_and_every_drawn_garment_has_its_label(monkeypatch):
    real = domains._fashion_by_class
    pools = {split: real(split) for split in SPLITS}
    # index pools: val carved from the train file, the test split reads the other file (t10k)
    sizes = {split: sum(len(pool) for _, pool in pools[split]) for split in SPLITS}
    assert sizes == {"train": 50000, "val": 10000, "test": 10000}
    # every shipped image a split may draw, by content (the package ships the ones the splits use)
    contents = {
        split: {images[i].tobytes() for images, pool in pools[split] for i in pool if int(i) in images._row}
        for split in SPLITS
    }
    _pairwise_disjoint(contents)

    for split in SPLITS:
        file_images, file_labels = mini_assets.fashion_file("test" if split == "test" else "train")
        recorded = Recording(file_images)
        monkeypatch.setattr(domains, "_fashion_by_class", lambda s, r=recorded: tuple((r, p) for _, p in real(s)))
        dataset = DomainTaskDataset("mini_fashion", split, num_samples=ITEMS)
        for index in range(ITEMS):
            before = len(recorded.used)
            image = dataset.image(index).numpy()
            (item,) = recorded.used[before:]
            assert file_labels[item] == dataset.label(index), (split, index)  # the garment's own label
            assert file_images[item].tobytes() in contents[split]
            _assert_contains(image[0], file_images[item].astype(np.float32) / 255.0)


def _assert_contains(gray: np.ndarray, item: np.ndarray) -> None:
    """The 28×28 garment (maybe mirrored, scaled in brightness) is what the 32×32 image shows."""
    best = 0.0
    for top, left in itertools.product(range(gray.shape[0] - 27), range(gray.shape[1] - 27)):
        window = gray[top : top + 28, left : left + 28]
        outside = gray.sum() - window.sum()
        for candidate in (item, item[:, ::-1]):
            unclipped = window < 0.999  # the image is clipped at 1
            a, b = window[unclipped], candidate[unclipped]
            if outside < 1e-4 and b.std() > 0:
                best = max(best, float(np.corrcoef(a, b)[0, 1]))
    assert best > 0.999, best


def test_digit_splits_share_no_image_and_every_drawn_digit_has_its_label(monkeypatch):
    from sklearn.datasets import load_digits

    digits = load_digits()
    source = (digits.images / 16.0).astype(np.float32)
    parts = {split: mini.digit_indices(split) for split in SPLITS}
    contents = {split: {source[i].tobytes() for i in parts[split]} for split in SPLITS}
    assert sum(len(c) for c in contents.values()) == len(source)  # every image in exactly one split
    _pairwise_disjoint(contents)

    real = mini._digit_source
    for split in SPLITS:
        recorded = Recording(real()[0])
        monkeypatch.setattr(mini, "_digit_source", lambda r=recorded: (r, real()[1]))
        dataset = DomainTaskDataset("mini_digits", split, num_samples=ITEMS)
        for index in range(ITEMS):
            before = len(recorded.used)
            dataset.image(index)
            (item,) = recorded.used[before:]
            assert digits.target[item] == dataset.label(index), (split, index)
            assert source[item].tobytes() in contents[split]


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (top_a, left_a, side_a), (top_b, left_b, side_b) = a, b
    return top_a < top_b + side_b and top_b < top_a + side_a and left_a < left_b + side_b and left_b < left_a + side_a


def test_texture_splits_crop_disjoint_tiles_of_their_own_class_photo(monkeypatch):
    tiles = {split: mini.texture_tiles(split) for split in SPLITS}
    for texture in range(len(mini._PHOTOS)):
        height, width = mini._photo_shape(texture)
        assert all(len(tiles[split][texture]) > 0 for split in SPLITS), texture
        for split in SPLITS:
            assert all(t + s <= height and left + s <= width for t, left, s in tiles[split][texture])
        for a, b in itertools.combinations(SPLITS, 2):
            assert not any(_overlap(x, y) for x in tiles[a][texture] for y in tiles[b][texture]), (texture, a, b)

    crops = []
    real = mini._area_crop

    def area_crop(texture, crop, size):
        crops.append((texture, crop))
        return real(texture, crop, size)

    monkeypatch.setattr(mini, "_area_crop", area_crop)
    for split in SPLITS:
        dataset = DomainTaskDataset("mini_textures", split, num_samples=ITEMS)
        for index in range(ITEMS):
            del crops[:]
            dataset.image(index)
            ((texture, crop),) = crops
            assert texture == dataset.label(index), (split, index)  # a crop of its own class's photo
            top, left, side = crop
            assert any(
                t <= top and top + side <= t + s and lft <= left and left + side <= lft + s
                for t, lft, s in tiles[split][texture]
            ), (split, crop)  # inside one of its split's tiles
