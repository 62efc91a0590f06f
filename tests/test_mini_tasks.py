"""The mini benchmark: rendered scenes, captions and the five mini tasks (offline, fast)."""

from __future__ import annotations

import hashlib
import pickle
import re
from collections import Counter

import numpy as np
import pytest
import torch

from safemerge.data import mini_v1
from safemerge.data.mini_v1 import (
    COLOURS,
    MINI_SPLIT_SIZES,
    SHAPES,
    TEXTURES,
    UNNAMED_IN_CAPTIONS,
    digit_indices,
    render,
    sample_scene,
    texture_tiles,
)
from safemerge.data.mini_v1_captions import COLOUR_WORDS, SHAPE_WORDS, TEXTURE_WORDS, CaptionedScenes
from safemerge.data.mini_v1_tasks import mini_task_names
from safemerge.data.registry import SPLITS, get_task, task_names

NUM_CLASSES = {"mini_shape": 6, "mini_color": 8, "mini_count": 4, "mini_digit": 10, "mini_texture": 6}
TASKS = mini_task_names()
ATTRIBUTE = {
    "mini_shape": "shape",
    "mini_color": "colour",
    "mini_count": "count",
    "mini_digit": "digit",
    "mini_texture": "texture",
}


def build(name: str, split: str, seed: int = 0, image_size: int = 32):
    return get_task(name).build(split, root=None, image_size=image_size, download=False, seed=seed)


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------- registration


def test_tasks_are_registered():
    assert TASKS == list(NUM_CLASSES)
    assert set(TASKS) <= set(task_names())
    for name in TASKS:
        task = get_task(name)
        assert task.num_classes == NUM_CLASSES[name]
        assert not task.needs_root
        assert 1 <= len(task.templates) <= 6  # mini_digit: MNIST's single CLIP template
        prompts = task.prompts(task.classnames[0])
        assert all(isinstance(p, str) and task.classnames[0] in p for p in prompts)
        pickle.loads(pickle.dumps((task.templates, task.build)))  # workers, checkpoints
    assert get_task("mini_count").classnames == ("one", "two", "three", "four")
    assert get_task("mini_digit").classnames == tuple(str(d) for d in range(10))


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize("name", TASKS)
def test_items_are_images_with_valid_labels(name):
    for split in SPLITS:
        dataset = build(name, split)
        assert len(dataset) == MINI_SPLIT_SIZES[split]
        for index in (0, 1, 2, len(dataset) - 1):
            image, label = dataset[index]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert isinstance(label, int) and 0 <= label < NUM_CLASSES[name]
    image, _ = build(name, "test", image_size=64)[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0


@pytest.mark.parametrize("name", TASKS)
def test_classes_balanced_and_labels_match_scenes(name):
    for split in SPLITS:
        dataset = build(name, split)
        counts = Counter(dataset.label(i) for i in range(len(dataset)))
        assert set(counts) == set(range(NUM_CLASSES[name]))
        assert max(counts.values()) <= 2 * min(counts.values())
        for index in range(0, len(dataset), 7):
            scene = dataset.scene(index)
            value = getattr(scene, ATTRIBUTE[name])
            assert (value - 1 if name == "mini_count" else value) == dataset.label(index)
        assert dataset[5][1] == dataset.label(5)
    kinds = Counter(build("mini_texture", "train").scene(i).kind for i in range(600))
    assert 0.2 < kinds["digit"] / 600 < 0.4  # texture mixes both kinds of scene
    assert {build("mini_digit", "val").scene(i).kind for i in range(50)} == {"digit"}
    assert {build("mini_count", "val").scene(i).kind for i in range(50)} == {"objects"}


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_tensors(name):
    first, again, other = build(name, "train"), build(name, "train"), build(name, "train", seed=1)
    for index in (0, 3, 17, 1999):
        image, label = first[index]
        assert torch.equal(image, again[index][0]) and label == again[index][1]
        assert not torch.equal(image, other[index][0])
    # Order does not matter (shuffling, workers), and the dataset pickles.
    clone = pickle.loads(pickle.dumps(first))
    assert torch.equal(clone[17][0], first[17][0])


def test_captioned_scenes_deterministic():
    a, b, c = CaptionedScenes(100, seed=3), CaptionedScenes(100, seed=3), CaptionedScenes(100, seed=4)
    for index in (0, 1, 42, 99):
        (image, text), (image_b, text_b) = a[index], b[index]
        assert torch.equal(image, image_b) and text == text_b
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert not torch.equal(image, c[index][0])
    assert CaptionedScenes(4, seed=3, image_size=64)[0][0].shape == (3, 64, 64)
    with pytest.raises(IndexError):
        a[100]


def test_render_is_pure():
    spec = sample_scene(np.random.default_rng(0), "train", "digit")
    assert torch.equal(render(spec), render(spec))


# ---------------------------------------------------------------------------- disjoint splits


@pytest.mark.parametrize("name", TASKS)
def test_no_image_shared_between_train_and_test(name):
    train = {digest(build(name, "train")[i][0]) for i in range(300)}
    test = {digest(build(name, "test")[i][0]) for i in range(300)}
    assert len(train) == 300 and len(test) == 300
    assert not train & test


def test_source_partitions_are_disjoint():
    parts = {split: set(digit_indices(split).tolist()) for split in SPLITS}
    assert sum(len(p) for p in parts.values()) == 1797
    assert set.union(*parts.values()) == set(range(1797))
    assert len(parts["train"]) == round(0.7 * 1797)
    for first, second in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not parts[first] & parts[second]
        for texture in range(len(TEXTURES)):
            for t1, l1, s1 in texture_tiles(first)[texture]:
                for t2, l2, s2 in texture_tiles(second)[texture]:
                    overlap = t1 < t2 + s2 and t2 < t1 + s1 and l1 < l2 + s2 and l2 < l1 + s1
                    assert not overlap, (TEXTURES[texture], first, second)
    for split in SPLITS:
        assert all(len(tiles) >= 2 for tiles in texture_tiles(split))


def _inside_tile(scene, split) -> bool:
    top, left, side = scene.crop
    return any(
        t <= top and top + side <= t + s and l <= left and left + side <= l + s
        for t, l, s in texture_tiles(split)[scene.texture]
    )


def test_scenes_use_only_their_splits_sources():
    for split in SPLITS:
        digits = set(digit_indices(split).tolist())
        scenes = [build("mini_digit", split).scene(i) for i in range(200)]
        scenes += [build("mini_texture", split).scene(i) for i in range(200)]
        scenes += [CaptionedScenes(200, seed=0, split=split).scene(i) for i in range(200)]
        for scene in scenes:
            assert _inside_tile(scene, split)
            if scene.kind == "digit":
                assert scene.digit_index in digits
                assert mini_v1._digit_source()[1][scene.digit_index] == scene.digit


def test_object_scenes_are_well_formed():
    dataset = build("mini_count", "train")
    for index in range(400):
        scene = dataset.scene(index)
        assert scene.count == index % 4 + 1 and scene.kind == "objects"
        for i, (top, left, side) in enumerate(scene.objects):
            assert 7 <= side <= 11 and 0 <= top <= 32 - side and 0 <= left <= 32 - side
            for other_top, other_left, other_side in scene.objects[:i]:  # no overlap
                assert (
                    top >= other_top + other_side
                    or other_top >= top + side
                    or left >= other_left + other_side
                    or other_left >= left + side
                )


# ---------------------------------------------------------------------------- captions


def _pattern(phrases) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)) + r")\b", re.I)


_SHAPE_RE = {s: _pattern([w for pair in SHAPE_WORDS[s] for w in pair]) for s in SHAPES}
_COLOUR_RE = {c: _pattern(COLOUR_WORDS[c]) for c in COLOURS}
_TEXTURE_RE = {t: _pattern(TEXTURE_WORDS[t]) for t in TEXTURES}
_COUNT_RE = {
    1: _pattern(["one", "1", "single"]),
    2: _pattern(["two", "2", "pair", "couple"]),
    3: _pattern(["three", "3", "trio"]),
    4: _pattern(["four", "4"]),
}
_DIGIT_RE = {
    d: _pattern([w, str(d)])
    for d, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
}


def parse(text: str, kind: str) -> dict[str, set]:
    """The attribute values a caption names, per attribute of its kind of scene."""
    found = {
        "colour": {COLOURS.index(c) for c, r in _COLOUR_RE.items() if r.search(text)},
        "texture": {TEXTURES.index(t) for t, r in _TEXTURE_RE.items() if r.search(text)},
    }
    if kind == "objects":
        found["shape"] = {SHAPES.index(s) for s, r in _SHAPE_RE.items() if r.search(text)}
        found["count"] = {n for n, r in _COUNT_RE.items() if r.search(text)}
    else:
        found["digit"] = {d for d, r in _DIGIT_RE.items() if r.search(text)}
    return found


def test_captions_are_varied_and_true():
    dataset = CaptionedScenes(2000, seed=0)
    described = [dataset.describe(i) for i in range(2000)]
    texts = [text for _, text in described]
    assert len(set(texts)) >= 1000
    assert all(isinstance(t, str) and t.strip() == t and t for t in texts)
    mentioned = Counter()
    objects = sum(scene.kind == "objects" for scene, _ in described)
    assert 0.2 < 1 - objects / 2000 < 0.4  # digit_fraction 0.3
    for scene, text in described:
        for attribute, values in parse(text, scene.kind).items():
            assert values <= {getattr(scene, attribute)}, (text, scene)
            mentioned[attribute] += bool(values)
        assert "a photo of" not in text.lower()  # phrasings differ from the prompt templates
    # Half the shapes and textures are never named; the others with probability .7 and .5.
    assert 0.25 < mentioned["shape"] / objects < 0.5
    assert 0.15 < mentioned["texture"] / 2000 < 0.4
    # Items come out of __getitem__ with the same caption.
    assert dataset[7][1] == texts[7]


def test_mention_probabilities():
    everything = CaptionedScenes(
        300, seed=1, mention=dict.fromkeys(["shape", "colour", "count", "digit", "texture"], 1.0)
    )
    for index in range(300):
        scene, text = everything.describe(index)
        for attribute, values in parse(text, scene.kind).items():
            named = getattr(scene, attribute) not in UNNAMED_IN_CAPTIONS[attribute]
            assert values == ({getattr(scene, attribute)} if named else set()), (text, scene)
    only_texture = CaptionedScenes(300, seed=1, mention={"shape": 0, "colour": 0, "count": 0, "digit": 0, "texture": 1})
    for index in range(300):
        scene, text = only_texture.describe(index)
        found = parse(text, scene.kind)
        named = scene.texture not in UNNAMED_IN_CAPTIONS["texture"]
        assert found["texture"] == ({scene.texture} if named else set())
        assert not found.get("shape") and not found["colour"] and not found.get("count") and not found.get("digit"), (
            text
        )


def test_unnamed_classes_never_appear_in_captions():
    """Zero-shot difficulty comes from class names the captions never use."""
    dataset = CaptionedScenes(
        1500, seed=3, mention=dict.fromkeys(["shape", "colour", "count", "digit", "texture"], 1.0)
    )
    for index in range(1500):
        scene, text = dataset.describe(index)
        for attribute, values in parse(text, scene.kind).items():
            assert not values & UNNAMED_IN_CAPTIONS[attribute], (text, scene)
