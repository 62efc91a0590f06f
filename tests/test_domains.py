"""Mini benchmark v2: six tasks, each on its own image domain (safemerge.data.mini_v2)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from safemerge.data import mini_assets, mini_v2
from safemerge.data.mini_v2 import DOMAINS, UNNAMED_IN_CAPTIONS, DomainCaptions, DomainTaskDataset, domain_task_names
from safemerge.data.registry import get_task
from safemerge.errors import DatasetNotFoundError

TASKS = domain_task_names()
REAL_IMAGES = {"mini_digits", "mini_fashion", "mini_textures"}


def test_six_tasks_on_distinct_domains_three_of_them_real_images():
    assert TASKS == ["mini_shapes", "mini_digits", "mini_fashion", "mini_textures", "mini_letters", "mini_terrain"]
    assert REAL_IMAGES <= set(TASKS)
    for name in TASKS:
        task = get_task(name)
        assert task.classnames == DOMAINS[name].classnames and not task.needs_root
        assert all(isinstance(t("x"), str) for t in task.templates)


@pytest.mark.parametrize("name", TASKS)
def test_splits_are_balanced_deterministic_pixel_tensors(name):
    dataset = get_task(name).build("val", root=None, image_size=32, download=False, seed=0)
    assert len(dataset) == 500
    labels = [dataset[i][1] for i in range(len(dataset))]
    counts = Counter(labels)
    assert len(counts) == len(DOMAINS[name].classnames) and max(counts.values()) - min(counts.values()) <= 1
    image, _ = dataset[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    again = DomainTaskDataset(name, "val", seed=0, num_samples=8)
    assert torch.equal(again[7][0], image)  # a pure function of (seed, task, split, index)
    assert not torch.equal(DomainTaskDataset(name, "val", seed=1, num_samples=8)[7][0], image)
    assert get_task(name).build("val", root=None, image_size=48, download=False, seed=0)[0][0].shape == (3, 48, 48)


def _image_statistics(name: str, split: str, n: int) -> np.ndarray:
    """Colour, saturation, grey-level and edge histograms and a coarse layout of n images."""
    dataset = DomainTaskDataset(name, split, num_samples=n)
    images = torch.stack([dataset.image(i) for i in range(n)])
    gray = images.mean(1)
    edges = torch.cat(
        [(gray[:, :, 1:] - gray[:, :, :-1]).abs().flatten(1), (gray[:, 1:] - gray[:, :-1]).abs().flatten(1)], 1
    )
    saturation = images.max(1).values - images.min(1).values
    levels = torch.stack([((gray >= a) & (gray < a + 0.125)).float().mean((1, 2)) for a in np.arange(0, 1, 0.125)], 1)
    bins = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 2.0)
    edge_levels = torch.stack([((edges >= a) & (edges < b)).float().mean(1) for a, b in zip(bins, bins[1:])], 1)
    layout = torch.nn.functional.avg_pool2d(gray[:, None], 8).flatten(1)
    return torch.cat(
        [
            images.mean((2, 3)),
            images.std((2, 3)),
            saturation.mean((1, 2))[:, None],
            saturation.std((1, 2))[:, None],
            levels,
            edge_levels,
            layout,
        ],
        1,
    ).numpy()


def test_a_linear_probe_on_image_statistics_tells_the_domains_apart():
    """No two tasks share an input distribution: a linear classifier on simple image statistics
    names an image's domain (same-domain tasks, as in v1, would leave it at chance)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = np.concatenate([_image_statistics(name, "train", 100) for name in TASKS])
    test = np.concatenate([_image_statistics(name, "test", 50) for name in TASKS])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(train, np.repeat(np.arange(len(TASKS)), 100))
    assert probe.score(test, np.repeat(np.arange(len(TASKS)), 50)) >= 0.95


# The real sources' splits (Fashion-MNIST, scikit-learn digits, texture tiles) and their labels: tests/test_mini_splits.py


def _named_classes(task: str, text: str) -> set[int]:
    words = DOMAINS[task].words
    text = text.lower()
    return {
        c
        for c, options in enumerate(words)
        for w in options
        if re.search(rf"(?<![\w-]){re.escape(w.lower())}(?![\w-])", text)
    }


def test_captions_never_name_the_held_back_classes_and_name_only_the_true_one():
    captions = DomainCaptions(3000, seed=0)
    named_per_task: Counter = Counter()
    for index in range(len(captions)):
        task, label, _, text = captions.describe(index)
        named = _named_classes(task, text) - ({label} if task != "mini_letters" else set())
        if task == "mini_letters":  # single letters: compare the letter the caption spells out
            spelled = set(re.findall(r"\b(?:letter|capital|character) ([A-Z])\b", text)) | set(
                re.findall(r"\b([A-Z]) in ink", text)
            )
            assert spelled <= {mini_v2.LETTERS[label]}, text
            if spelled:
                assert label not in UNNAMED_IN_CAPTIONS[task]
                named_per_task[task] += 1
            continue
        assert not named, (task, label, text)
        if _named_classes(task, text):
            assert label not in UNNAMED_IN_CAPTIONS[task], (task, label, text)
            named_per_task[task] += 1
    assert set(named_per_task) == set(TASKS)  # every domain has named captions


def test_fashion_images_outside_the_shipped_subset_need_the_full_files(monkeypatch, tmp_path):
    """The package ships the images of split_seed 0 (the one every expert uses); another seed
    needs the full Fashion-MNIST, and building its split says so before anything is drawn."""
    monkeypatch.setattr(mini_assets, "FASHION_ROOT", tmp_path)
    mini_assets._full_fashion_file.cache_clear()
    try:
        get_task("mini_fashion").build("train", root=None, image_size=32, download=False, seed=0)
        with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
            get_task("mini_fashion").build("train", root=None, image_size=32, download=False, seed=7)
    finally:
        mini_assets._full_fashion_file.cache_clear()


def test_a_missing_asset_fails_when_the_split_is_built(monkeypatch, tmp_path):
    monkeypatch.setattr(mini_assets, "GLYPH_ASSET", tmp_path / "dejavu_glyphs.npz")
    mini_assets.glyphs.cache_clear()
    try:
        with pytest.raises(DatasetNotFoundError, match="dejavu_glyphs.npz is missing from the safemerge package"):
            get_task("mini_letters").build("val", root=None, image_size=32, download=False, seed=0)
    finally:
        mini_assets.glyphs.cache_clear()


def test_no_domain_module_imports_the_registry():
    package = Path(mini_v2.__file__).parent
    for module in ("mini_v2", "mini_v2_render", "mini_v1", "mini_v1_captions", "offline", "real", "tasks"):
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "safemerge.data.registry" not in imported, module
