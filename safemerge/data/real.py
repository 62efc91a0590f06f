"""The real-dataset tasks of the task-vector literature, read from files under a user-given root.

Each task is one row of :data:`DATASETS`: which torchvision dataset reads it, which splits it
ships, how its files lie under ``root`` and where to get them. Splits are formed the same way
for every task:

* DTD ships train/val/test: used as they are (partition 1);
* the others ship train and test: test is used as it is, and validation is carved out of the
  training split with :func:`~safemerge.data.transforms.carve_val` (10 %, seeded; train is
  the remaining 90 %);
* no split at all (EuroSAT, SUN397, NWPU-RESISC45): train/val/test are carved 80/10/10 with
  :func:`~safemerge.data.transforms.carve` (seeded).

Nothing is downloaded unless ``download=True``; missing files raise
:class:`~safemerge.errors.DatasetNotFoundError` with the expected layout and how to get them.
Labels follow ``CLASSNAMES[task]`` (see :mod:`safemerge.data.templates` for the order).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from urllib.error import URLError

from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv

from safemerge.data.tasks import SPLITS, Split, Task
from safemerge.data.templates import CLASSNAMES, TEMPLATES
from safemerge.data.transforms import carve, carve_val, to_pixels
from safemerge.errors import ConfigError, DatasetNotFoundError
from safemerge.io import cache_dir

VAL_FRACTION = 0.1  # of the training split, for datasets that ship no validation split
CARVE_FRACTIONS = (0.8, 0.1, 0.1)  # train/val/test, for datasets that ship no split at all

FETCH_WITH_TORCHVISION = "set `download: true` (data.init_args.download) to let torchvision fetch it"

# (root, split or None for split-less datasets, image transform, download) -> dataset
Opener = Callable[[Path, Optional[str], Callable, bool], Dataset]


# ---------------------------------------------------------------------------- openers


def _train_flag(dataset_cls: type) -> Opener:
    """Datasets split by ``train=True/False`` (MNIST family, CIFAR)."""

    def open_split(root: Path, split: str | None, transform: Callable, download: bool) -> Dataset:
        return dataset_cls(root, train=split == "train", transform=transform, target_transform=int, download=download)

    return open_split


def _split_arg(dataset_cls: type, subdir: str = "", names: dict[str, str] | None = None) -> Opener:
    """Datasets split by a ``split=`` string; ``names`` renames ours to theirs (pets: trainval)."""

    def open_split(root: Path, split: str | None, transform: Callable, download: bool) -> Dataset:
        return dataset_cls(
            root / subdir,
            split=(names or {}).get(split, split),
            transform=transform,
            target_transform=int,
            download=download,
        )

    return open_split


def _whole(dataset_cls: type) -> Opener:
    """Datasets that ship one unsplit set (EuroSAT)."""

    def open_all(root: Path, split: str | None, transform: Callable, download: bool) -> Dataset:
        return dataset_cls(root, transform=transform, target_transform=int, download=download)

    return open_all


def _open_sun397(root: Path, split: str | None, transform: Callable, download: bool) -> Dataset:
    sun = tv.SUN397(root, transform=transform, target_transform=int, download=download)
    # torchvision lists the images with rglob, whose order is the filesystem's; carving must see
    # the same order on every machine, so present them sorted by path.
    return Subset(sun, sorted(range(len(sun)), key=lambda i: sun._image_files[i]))


def _open_cars(root: Path, split: str | None, transform: Callable, download: bool) -> Dataset:
    # Never pass download: torchvision's StanfordCars raises ValueError (its URL is gone).
    return tv.StanfordCars(root, split=split, transform=transform, target_transform=int)


class NamedClassFolders(tv.ImageFolder):
    """An ``ImageFolder`` whose class order is given, not taken from the sorted folder names.

    Folder ``folder_names[i]`` gets label ``i``; every folder must exist and hold images.
    """

    def __init__(self, root: Path, folder_names: tuple[str, ...], transform: Callable) -> None:
        self.folder_names = folder_names
        super().__init__(str(root), transform=transform)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self.folder_names), {name: i for i, name in enumerate(self.folder_names)}


def _open_resisc45(root: Path, split: str | None, transform: Callable, download: bool) -> Dataset:
    folders = tuple(name.replace(" ", "_") for name in CLASSNAMES["resisc45"])
    return NamedClassFolders(root / "NWPU-RESISC45", folders, transform)


# ------------------------------------------------------------ MNIST-family raw .gz files

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_root(task: str, folder: str, root: Path) -> Path:
    """A root torchvision's MNIST-family class can read offline.

    torchvision reads the *decompressed* files under ``root/<folder>/raw``. If they are not
    there but the ``.gz`` files are (directly in ``root``, as the Debian package installs them,
    or in ``root/<folder>/raw``), decompress them once into the safemerge cache and read that.
    """
    raw = root / folder / "raw"
    if all((raw / name).is_file() for name in IDX_FILES):
        return root
    for source in (root, raw):
        if all((source / f"{name}.gz").is_file() for name in IDX_FILES):
            cached = cache_dir() / task
            for name in IDX_FILES:
                _gunzip(source / f"{name}.gz", cached / folder / "raw" / name)
            return cached
    return root  # nothing usable: torchvision reports it (or downloads, if asked)


def _gunzip(source: Path, target: Path) -> None:
    """Decompress ``source`` to ``target`` unless an up-to-date copy is there.

    Written to a temporary file and renamed, so concurrent readers (dataloader workers, other
    ranks) never see a half-written file.
    """
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as out, gzip.open(source, "rb") as compressed:
            shutil.copyfileobj(compressed, out)
        os.chmod(partial, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _idx_opener(task: str, dataset_cls: type) -> Opener:
    """MNIST-family datasets, readable from torchvision's layout or from bare ``.gz`` files."""
    read = _train_flag(dataset_cls)

    def open_split(root: Path, split: str | None, transform: Callable, download: bool) -> Dataset:
        # torchvision names the folder after the class: <root>/MNIST, <root>/FashionMNIST.
        return read(_idx_root(task, dataset_cls.__name__, root), split, transform, download)

    return open_split


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class RealDataset:
    """How one task's files are read and split; calling it builds a split (a ``SplitBuilder``).

    Attributes:
        task: the task name.
        open: reads one shipped split (or the whole set, for split-less datasets).
        shipped: the splits the dataset itself ships, in our names: ``("train", "val", "test")``,
            ``("train", "test")`` or ``()``.
        layout: the files expected under ``root``.
        downloadable: whether torchvision can download the files.
        source: where else to get them (the only way when not ``downloadable``).
        default_root: used when ``root`` is None (data installed system-wide).
    """

    task: str
    open: Opener
    shipped: tuple[Split, ...]
    layout: str
    downloadable: bool = True
    source: str = ""
    default_root: Path | None = field(default=None)

    def __post_init__(self) -> None:
        if self.shipped not in (SPLITS, ("train", "test"), ()):
            raise ValueError(f"{self.task}: unsupported shipped splits {self.shipped}")

    @property
    def has_default_root(self) -> bool:
        # Read by the datamodule: a task with a default accepts root=None.
        return self.default_root is not None

    def how_to_get(self) -> str:
        ways = [FETCH_WITH_TORCHVISION] if self.downloadable else []
        return "; or ".join(ways + ([self.source] if self.source else []))

    def __call__(self, split: Split, *, root: Path | str | None, image_size: int, download: bool, seed: int) -> Dataset:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r} for task {self.task!r}; expected one of {SPLITS}")
        root = self._resolve_root(root, download)
        transform = to_pixels(image_size)
        if "val" in self.shipped or (split == "test" and "test" in self.shipped):
            return self._open(root, split, transform, download)
        if "train" in self.shipped:  # train and val both come out of the shipped train split
            return carve_val(self._open(root, "train", transform, download), split, VAL_FRACTION, seed)
        whole = self._open(root, None, transform, download)
        parts = dict(zip(SPLITS, carve(len(whole), CARVE_FRACTIONS, seed)))
        return Subset(whole, parts[split].tolist())

    def _resolve_root(self, root: Path | str | None, download: bool) -> Path:
        download = download and self.downloadable
        if root is None and self.default_root is not None:
            if self.default_root.is_dir() or not download:
                root = self.default_root
            else:  # the system-wide copy is absent and its folder is not ours to write
                root = cache_dir() / self.task
        if root is None:
            raise self.not_found(None, "no dataset root was given: set `root:` (data.init_args.root)")
        root = Path(root).expanduser()
        if not root.is_dir() and not download:
            raise self.not_found(root, "the root folder does not exist")
        return root

    def _open(self, root: Path, split: str | None, transform: Callable, download: bool) -> Dataset:
        try:
            return self.open(root, split, transform, download and self.downloadable)
        except FileNotFoundError as error:  # ImageFolder, or a partly extracted archive
            raise self.not_found(root, str(error)) from error
        except RuntimeError as error:  # torchvision: "Dataset not found[ or corrupted]..."
            if "not found" not in str(error).lower() and "download" not in str(error).lower():
                raise
            # Keep torchvision's diagnosis, not its advice (``download=True`` is its argument, not ours).
            raise self.not_found(root, str(error).splitlines()[0].split(". You can")[0]) from error
        except URLError as error:  # download=True without a network
            raise self.not_found(root, f"download failed: {error}") from error

    def not_found(self, root: Path | None, reason: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"task {self.task!r}: dataset not found under root {str(root) if root else None!r} "
            f"({reason.rstrip('.')}).\nExpected layout:\n{self.layout}\nTo get it: {self.how_to_get()}."
        )


def _layout(*lines: str) -> str:
    return "\n".join(f"  {line}" for line in lines)


_IDX_LAYOUT = "{train,t10k}-{images-idx3,labels-idx1}-ubyte"

DATASETS: tuple[RealDataset, ...] = (
    RealDataset(
        task="mnist",
        open=_idx_opener("mnist", tv.MNIST),
        shipped=("train", "test"),
        layout=_layout(f"<root>/MNIST/raw/{_IDX_LAYOUT}  (torchvision's layout)", f"  or <root>/{_IDX_LAYOUT}.gz"),
    ),
    RealDataset(
        task="svhn",
        # torchvision's SVHN keeps its .mat files directly in its root: give it a folder of its own.
        open=_split_arg(tv.SVHN, subdir="svhn"),
        shipped=("train", "test"),
        layout=_layout("<root>/svhn/train_32x32.mat", "<root>/svhn/test_32x32.mat"),
    ),
    RealDataset(
        task="gtsrb",
        open=_split_arg(tv.GTSRB),
        shipped=("train", "test"),
        layout=_layout(
            "<root>/gtsrb/GTSRB/Training/<00000..00042>/*.ppm",
            "<root>/gtsrb/GTSRB/Final_Test/Images/*.ppm",
            "<root>/gtsrb/GT-final_test.csv",
        ),
    ),
    RealDataset(
        task="eurosat",
        open=_whole(tv.EuroSAT),
        shipped=(),
        layout=_layout("<root>/eurosat/2750/<AnnualCrop|Forest|...|SeaLake>/*.jpg  (RGB EuroSAT)"),
    ),
    RealDataset(
        task="dtd",
        open=_split_arg(tv.DTD),  # partition 1 of DTD's ten train/val/test partitions
        shipped=("train", "val", "test"),
        layout=_layout("<root>/dtd/dtd/images/<texture>/*.jpg", "<root>/dtd/dtd/labels/{train,val,test}1.txt"),
    ),
    RealDataset(
        task="cars",
        open=_open_cars,
        shipped=("train", "test"),
        layout=_layout(
            "<root>/stanford_cars/devkit/{cars_meta.mat,cars_train_annos.mat}",
            "<root>/stanford_cars/cars_train/*.jpg",
            "<root>/stanford_cars/cars_test/*.jpg",
            "<root>/stanford_cars/cars_test_annos_withlabels.mat",
        ),
        downloadable=False,
        source=(
            "torchvision cannot download Stanford Cars (its original URL is gone); get "
            "car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat "
            "from a mirror (e.g. Kaggle's 'stanford-cars-dataset') and extract them into "
            "<root>/stanford_cars as shown"
        ),
    ),
    RealDataset(
        task="sun397",
        open=_open_sun397,
        shipped=(),
        layout=_layout("<root>/SUN397/ClassName.txt", "<root>/SUN397/<letter>/<category>/sun_*.jpg"),
    ),
    RealDataset(
        task="resisc45",
        open=_open_resisc45,
        shipped=(),
        layout=_layout(
            "<root>/NWPU-RESISC45/<class>/*.jpg  (the 45 class folders of NWPU-RESISC45.rar,",
            "  airplane, airport, baseball_diamond, ..., wetland; split 80/10/10 by seed)",
        ),
        downloadable=False,
        source=(
            "torchvision has no RESISC45 downloader; get NWPU-RESISC45.rar (Cheng et al., 2017; "
            "mirrored by TorchGeo) and extract it into <root> as shown"
        ),
    ),
    RealDataset(
        task="cifar10",
        open=_train_flag(tv.CIFAR10),
        shipped=("train", "test"),
        layout=_layout("<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
    ),
    RealDataset(
        task="cifar100",
        open=_train_flag(tv.CIFAR100),
        shipped=("train", "test"),
        layout=_layout("<root>/cifar-100-python/{train,test,meta}"),
    ),
    RealDataset(
        task="pets",
        open=_split_arg(tv.OxfordIIITPet, names={"train": "trainval"}),
        shipped=("train", "test"),  # our train = Oxford-IIIT Pet's trainval, minus the carved val
        layout=_layout("<root>/oxford-iiit-pet/images/*.jpg", "<root>/oxford-iiit-pet/annotations/{trainval,test}.txt"),
    ),
    RealDataset(
        task="fashion_mnist",
        open=_idx_opener("fashion_mnist", tv.FashionMNIST),
        shipped=("train", "test"),
        layout=_layout(
            f"<root>/{_IDX_LAYOUT}.gz  (as Debian's dataset-fashion-mnist installs them; "
            "default root /usr/share/datasets/fashion-mnist)",
            f"  or <root>/FashionMNIST/raw/{_IDX_LAYOUT}  (torchvision's layout)",
        ),
        source="install Debian's package: apt-get install dataset-fashion-mnist",
        default_root=Path("/usr/share/datasets/fashion-mnist"),
    ),
)

TASKS: tuple[Task, ...] = tuple(
    Task(
        name=_dataset.task,
        classnames=CLASSNAMES[_dataset.task],
        templates=TEMPLATES[_dataset.task],
        build=_dataset,
        needs_root=True,
        layout=_dataset.layout,
    )
    for _dataset in DATASETS
)
