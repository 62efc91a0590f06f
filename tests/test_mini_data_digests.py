"""The mini tasks' images are pinned: a digest of every split of each v2 task.

Published figures and cached experts (whose keys do not include the images) depend on these
images, so any change to them — a new data source, a new library version drawing differently —
must show up here. The digests were computed from the code that read Debian's Fashion-MNIST and
DejaVu fonts, before the sources moved into the package; they are checked here with those
system files hidden, so the package alone must give the same images. The digits and terrain
digests were re-pinned when their upsampling moved to float64 (``mini_v2_render._resample``):
in float32 the product's rounding depended on the BLAS kernel OpenBLAS picks for the CPU
(Haswell and SkylakeX kernels drew different images); the new ones are the same under the
Haswell, SkylakeX, Zen and Sandybridge kernels (``OPENBLAS_CORETYPE``).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from safemerge.data import mini_assets
from safemerge.data.mini_v2 import SPLIT_SIZES, DomainTaskDataset

# split_seed 0 at the default split sizes (what every expert and merge uses); split_seed 1 on a
# few items (what the tests use to check that a seed changes the images).
SIZES = {0: SPLIT_SIZES, 1: {"train": 64, "val": 64, "test": 64}}
DIGESTS = {
    ("mini_shapes", "train", 0): "3d4c1dff14de1782a05e747a6aec7fba",
    ("mini_shapes", "val", 0): "7c27efa138b8579dc74197791fb1fbba",
    ("mini_shapes", "test", 0): "90419d68c87b52cf4fb971bf40d2dc24",
    ("mini_digits", "train", 0): "dbfc6e2539ed2bce6ca2996f383a9d3c",
    ("mini_digits", "val", 0): "f49158421b548bc4cc902a71376a56ed",
    ("mini_digits", "test", 0): "58663b7dd4efe2abe561ac808d191f1f",
    ("mini_fashion", "train", 0): "fd99626069b5f7571978db8628ba3db2",
    ("mini_fashion", "val", 0): "47bf3367dca33174f49c5e36d0997c9b",
    ("mini_fashion", "test", 0): "220960c5038bba9b686da1909e09c16d",
    ("mini_textures", "train", 0): "44be6ebbb0db76fc347596165371eeac",
    ("mini_textures", "val", 0): "1ccdf96e23c04874e3f66d473929dbf7",
    ("mini_textures", "test", 0): "5c2750d92b63899d515f111d4b445e6a",
    ("mini_letters", "train", 0): "d6f989f853f41d68017c70b0752631ca",
    ("mini_letters", "val", 0): "2cc45f0b897c9eb33bac758113be0087",
    ("mini_letters", "test", 0): "8c079969d9976fd60387abac6360f4c0",
    ("mini_terrain", "train", 0): "2f895b389e44af46273ad0876d366f1d",
    ("mini_terrain", "val", 0): "0e2c16e80518ae900f94409373f713b4",
    ("mini_terrain", "test", 0): "e25ee22ac76f2fed4eb99358cb9a7273",
    ("mini_shapes", "train", 1): "c7b94e2cb6dac3c7933105da5fc4c865",
    ("mini_shapes", "val", 1): "46b7ea676e1fb4653a173e4faa6cbec8",
    ("mini_shapes", "test", 1): "4ebbca827f9e3942ecf9092162a98f56",
    ("mini_digits", "train", 1): "6b00a32e17cfe08a839a1e7807493ed3",
    ("mini_digits", "val", 1): "f4d74472a032e56f17264e8da7fd0163",
    ("mini_digits", "test", 1): "ed77a233b4ff3e08c8610fcdaf2d5b27",
    ("mini_fashion", "train", 1): "252ebfc41fc1a161dcb82505401196cb",
    ("mini_fashion", "val", 1): "1a2121c4126777fd11197d7607e8cf95",
    ("mini_fashion", "test", 1): "3a53d0c3f5a06d79417b3d862032a163",
    ("mini_textures", "train", 1): "33a81bdc434535db8c24993aac46a003",
    ("mini_textures", "val", 1): "e0b02a5254b150edc93d265a7993f7fd",
    ("mini_textures", "test", 1): "f72ea609b999ab33f4a93529cc108fda",
    ("mini_letters", "train", 1): "02528ce199d8ba09b480206deb87c599",
    ("mini_letters", "val", 1): "12ab0f51af9f3dad40c27fa8178a1264",
    ("mini_letters", "test", 1): "2dcc3ac4d6bb6dff6cf9fca538329bbf",
    ("mini_terrain", "train", 1): "f81228bcbc1852e4c49e6b5d101e69e7",
    ("mini_terrain", "val", 1): "a257d1637d94b2323fb3b0b09a88bfa0",
    ("mini_terrain", "test", 1): "b12114a2ce8d55dc6afa96ec489f9c57",
}


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch, tmp_path):
    """As on a machine with only the pip packages: no Debian Fashion-MNIST, no system fonts."""
    monkeypatch.setattr(mini_assets, "FASHION_ROOT", tmp_path / "fashion-mnist")
    monkeypatch.setattr(mini_assets, "FONT_DIRS", (tmp_path / "fonts",))
    mini_assets._full_fashion_file.cache_clear()
    yield
    mini_assets._full_fashion_file.cache_clear()


def split_digest(task: str, split: str, seed: int) -> str:
    """sha256 of a split's float32 images (32 px) and int64 labels, in item order."""
    dataset = DomainTaskDataset(task, split, seed=seed, num_samples=SIZES[seed][split])
    images = torch.stack([dataset.image(i) for i in range(len(dataset))])
    labels = torch.tensor([dataset.label(i) for i in range(len(dataset))], dtype=torch.int64)
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:32]


@pytest.mark.parametrize("task, split, seed", list(DIGESTS))
def test_every_split_of_every_mini_task_draws_the_published_images(task, split, seed):
    assert split_digest(task, split, seed) == DIGESTS[task, split, seed]
