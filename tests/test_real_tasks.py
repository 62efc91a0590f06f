"""The real-dataset tasks: registration, prompts, missing-data errors, split carving, loading.

Offline and fast: nothing is downloaded (any download attempt fails the test); datasets are
tiny fakes written under ``tmp_path``, except Fashion-MNIST from Debian's package when it is
installed.
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets  # noqa: F401  (loads the modules whose downloaders are disabled below)
from PIL import Image

from safemerge.data.registry import SPLITS, get_task
from safemerge.data.templates import CLASSNAMES, TEMPLATES
from safemerge.errors import ConfigError, DatasetNotFoundError

NUM_CLASSES = {
    "mnist": 10,
    "svhn": 10,
    "gtsrb": 43,
    "eurosat": 10,
    "dtd": 47,
    "cars": 196,
    "sun397": 397,
    "resisc45": 45,
    "cifar10": 10,
    "cifar100": 100,
    "pets": 37,
    "fashion_mnist": 10,
}
REAL_TASKS = sorted(NUM_CLASSES)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DOWNLOADERS = ("download_url", "download_and_extract_archive", "download_file_from_google_drive")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Cache under tmp, and make every torchvision downloader fail loudly."""
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to download: {args} {kwargs}")

    for name, module in list(sys.modules.items()):
        if name.startswith("torchvision.datasets"):
            for downloader in DOWNLOADERS:
                if hasattr(module, downloader):
                    monkeypatch.setattr(module, downloader, refuse)


def build(name: str, split: str, root, *, image_size: int = 8, seed: int = 0):
    return get_task(name).build(split, root=root, image_size=image_size, download=False, seed=seed)


def check_samples(dataset, num_classes: int, image_size: int = 8) -> None:
    for index in range(min(len(dataset), 5)):
        image, label = dataset[index]
        assert image.dtype == torch.float32 and image.shape == (3, image_size, image_size)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert type(label) is int and 0 <= label < num_classes


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", REAL_TASKS)
def test_task_is_registered_with_its_classes_and_prompts(name):
    task = get_task(name)
    assert task.needs_root and task.layout
    assert task.num_classes == NUM_CLASSES[name] == len(set(task.classnames))
    assert task.classnames == CLASSNAMES[name] and task.templates == TEMPLATES[name]
    assert len(task.templates) > 0
    for classname in task.classnames:
        prompts = task.prompts(classname)
        assert all(isinstance(prompt, str) and classname in prompt for prompt in prompts)


def test_label_order_follows_torchvision():
    # The two lists re-ordered from CLIP's published order (see templates.py).
    assert CLASSNAMES["eurosat"][0] == "annual crop land" and CLASSNAMES["eurosat"][-1] == "lake or sea"
    assert CLASSNAMES["pets"][:3] == ("Abyssinian", "american bulldog", "american pit bull terrier")
    assert list(CLASSNAMES["pets"]) == sorted(CLASSNAMES["pets"], key=str.lower)
    assert TEMPLATES["mnist"][0]("7") == 'a photo of the number: "7".'


# ---------------------------------------------------------------------------- missing data


@pytest.mark.parametrize("name", REAL_TASKS)
def test_missing_root_explains_layout_and_download(name, tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as caught:
        build(name, "train", root)
    message = str(caught.value)
    task = get_task(name)
    assert repr(name) in message and str(root) in message
    assert task.layout in message and "download" in message
    # Only tasks torchvision can fetch suggest the download switch.
    assert ("`download: true`" in message) == task.build.downloadable
    assert not root.exists()


@pytest.mark.parametrize("name", REAL_TASKS)
def test_empty_root_is_reported_not_downloaded(name, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DatasetNotFoundError) as caught:
        build(name, "val", root)
    assert get_task(name).layout in str(caught.value)
    assert list(root.iterdir()) == []  # nothing fetched or created


@pytest.mark.parametrize("name", [name for name in REAL_TASKS if name != "fashion_mnist"])
def test_no_root_is_reported(name):
    with pytest.raises(DatasetNotFoundError, match="root") as caught:
        build(name, "test", None)
    assert get_task(name).layout in str(caught.value)


def test_only_fashion_mnist_has_a_default_root():
    assert [name for name in REAL_TASKS if get_task(name).build.has_default_root] == ["fashion_mnist"]


def test_unknown_split_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="split"):
        build("cifar10", "dev", tmp_path)


# ---------------------------------------------------------------------------- RESISC45 image folders

PER_CLASS = 4


@pytest.fixture
def resisc45_root(tmp_path) -> Path:
    """NWPU-RESISC45 in miniature: 4 PNGs per class, red channel = 5 * label."""
    root = tmp_path / "data"
    for label, classname in enumerate(CLASSNAMES["resisc45"]):
        folder = root / "NWPU-RESISC45" / classname.replace(" ", "_")
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.new("RGB", (4, 4), (5 * label, 40 * i, 0)).save(folder / f"{folder.name}_{i:03d}.png")
    return root


def test_resisc45_loads_image_folders_with_named_labels(resisc45_root):
    num_classes = NUM_CLASSES["resisc45"]
    sizes = {}
    for split in SPLITS:
        dataset = build("resisc45", split, resisc45_root)
        check_samples(dataset, num_classes)
        sizes[split] = len(dataset)
        for index in range(0, len(dataset), 7):
            image, label = dataset[index]
            assert round(image[0, 0, 0].item() * 255 / 5) == label  # the folder's class, by name
    assert sizes == {"train": 144, "val": 18, "test": 18}  # 80/10/10 of 45 * 4


def test_carved_splits_are_disjoint_and_deterministic(resisc45_root):
    def indices(seed):
        return {split: build("resisc45", split, resisc45_root, seed=seed).indices for split in SPLITS}

    first, again, other = indices(0), indices(0), indices(1)
    assert first == again
    assert first != other
    together = [i for split in SPLITS for i in first[split]]
    assert sorted(together) == list(range(45 * PER_CLASS))  # disjoint and covering


def test_resisc45_missing_class_folder_is_reported(resisc45_root):
    for image in (resisc45_root / "NWPU-RESISC45" / "wetland").iterdir():
        image.unlink()
    with pytest.raises(DatasetNotFoundError, match="wetland"):
        build("resisc45", "train", resisc45_root)


# ---------------------------------------------------------------------------- MNIST-family idx files

TRAIN_SIZE, TEST_SIZE = 40, 12


def write_idx_files(folder: Path, *, gz: bool) -> None:
    """Tiny MNIST-format files; every image is one grey level, 20 * label."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", TRAIN_SIZE), ("t10k", TEST_SIZE)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        images = np.repeat(labels * 20, 28 * 28).reshape(count, 28, 28).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            # idx header: two zero bytes, type 0x08 (uint8), number of dimensions, then the sizes.
            data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
            data += array.tobytes()
            path = folder / f"{prefix}-{kind}-ubyte"
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
            else:
                path.write_bytes(data)


def check_idx_splits(name: str, root: Path) -> None:
    splits = {split: build(name, split, root) for split in SPLITS}
    assert len(splits["test"]) == TEST_SIZE
    assert len(splits["train"]) + len(splits["val"]) == TRAIN_SIZE
    assert len(splits["val"]) == round(0.1 * TRAIN_SIZE)
    assert not set(splits["train"].indices) & set(splits["val"].indices)
    assert splits["val"].indices == build(name, "val", root).indices  # same seed, same carve
    for dataset in splits.values():
        check_samples(dataset, 10)
        image, label = dataset[0]
        assert round(image.mean().item() * 255 / 20) == label


def test_mnist_reads_torchvision_layout_and_carves_val(tmp_path):
    write_idx_files(tmp_path / "MNIST" / "raw", gz=False)
    check_idx_splits("mnist", tmp_path)


def test_fashion_mnist_reads_raw_gz_files_through_the_cache(tmp_path):
    root = tmp_path / "debian-like"
    write_idx_files(root, gz=True)
    check_idx_splits("fashion_mnist", root)
    cached = tmp_path / "cache" / "fashion_mnist" / "FashionMNIST" / "raw"
    assert sorted(path.name for path in cached.iterdir()) == sorted(IDX_FILES)  # no temp leftovers
    assert sorted(path.name for path in root.iterdir()) == sorted(f"{name}.gz" for name in IDX_FILES)


def test_fashion_mnist_reads_torchvision_layout(tmp_path):
    write_idx_files(tmp_path / "FashionMNIST" / "raw", gz=False)
    check_idx_splits("fashion_mnist", tmp_path)
    assert not (tmp_path / "cache").exists()  # read in place, nothing decompressed


def test_fashion_mnist_from_debian_package():
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    train, val, test = (build("fashion_mnist", split, None, image_size=16) for split in SPLITS)
    assert len(test) == 10000 and len(train) + len(val) == 60000 and len(val) == 6000
    for dataset in (train, val, test):
        check_samples(dataset, 10, image_size=16)
