"""The captions of mini benchmark v1 (:mod:`safemerge.data.mini_v1`): a varied caption
vocabulary, :func:`caption` and the :class:`CaptionedScenes` pretraining corpus."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from safemerge.data.mini_v1 import (
    _STREAM,
    COLOURS,
    DEFAULT_MENTION,
    NATIVE_SIZE,
    SHAPES,
    TEXTURES,
    UNNAMED_IN_CAPTIONS,
    SceneSpec,
    _pick,
    item_rng,
    render,
    resize,
    sample_scene,
)
from safemerge.data.tasks import SPLITS, Split

# ---------------------------------------------------------------------------- captions

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Count phrases; "{}" takes the rest of the noun phrase.
_COUNT_PHRASES: dict[int, tuple[str, ...]] = {
    1: ("one", "1", "a single", "just one", "only one"),
    2: ("two", "2", "a pair of", "a couple of"),
    3: ("three", "3", "a trio of"),
    4: ("four", "4"),
}
# Per shape: (singular, plural) synonyms. Used by tests to parse captions, keep unambiguous.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("dot", "dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "ring": (("ring", "rings"), ("hoop", "hoops"), ("donut", "donuts")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
}
_GENERIC_NOUNS = (
    ("shape", "shapes"),
    ("object", "objects"),
    ("thing", "things"),
    ("figure", "figures"),
    ("item", "items"),
    ("mark", "marks"),
)
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "scarlet"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "white": ("white",),
    "cyan": ("cyan", "turquoise", "aqua"),
}
TEXTURE_WORDS: dict[str, tuple[str, ...]] = {
    "brick wall": ("a brick wall", "bricks", "brickwork", "a wall of bricks"),
    "grass": ("grass", "a lawn", "turf", "a patch of grass"),
    "gravel": ("gravel", "pebbles", "loose stones", "a gravel path"),
    "moon surface": ("the moon's surface", "the lunar surface", "moon craters", "the surface of the moon"),
    "coins": ("coins", "a pile of coins", "old coins", "a coin collection"),
    "night sky": ("the night sky", "stars", "deep space", "a starry sky", "galaxies"),
}
_SIZE_WORDS = ("", "", "", "small ", "little ", "tiny ")
_PREPOSITIONS = ("on", "over", "against", "in front of", "on top of", "above")
_PREFIXES = ("", "", "", "an image of ", "a rendering of ", "a scene with ", "a snapshot showing ", "a view of ")
_DIGIT_NOUNS = ("digit", "number", "numeral")
_HANDWRITTEN = ("handwritten", "hand-drawn", "scrawled", "hand-written", "scribbled")
_NO_TEXTURE = ("", "", "", " on a textured background", " on a background", " on some surface")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou8" else "a"


def _object_phrase(spec: SceneSpec, rng: np.random.Generator, say: dict[str, bool]) -> str:
    count = spec.count or 1
    plural = count > 1
    if say["shape"]:
        noun = _pick(rng, SHAPE_WORDS[SHAPES[spec.shape]])[plural]  # type: ignore[index]
    else:
        noun = _pick(rng, _GENERIC_NOUNS)[plural]
    colour = _pick(rng, COLOUR_WORDS[COLOURS[spec.colour]]) if say["colour"] else None
    size = _pick(rng, _SIZE_WORDS)
    # Colour before the noun, or after it ("rings in red", "rings coloured red").
    colour_after = colour is not None and rng.random() < 0.3
    core = f"{size}{colour + ' ' if colour and not colour_after else ''}{noun}"
    if colour_after:
        core += _pick(rng, (f" in {colour}", f" coloured {colour}", f", all {colour}" if plural else f", {colour}"))
    if say["count"]:
        if plural and rng.random() < 0.2:  # "red triangles, three of them"
            return f"{core}, {_pick(rng, (_NUMBER_WORDS[count], str(count)))} of them"
        return f"{_pick(rng, _COUNT_PHRASES[count])} {core}"
    if plural:
        return _pick(rng, ("", "some ", "several ", "a few ", "a group of ")) + core
    return f"{_article(core)} {core}"


def _digit_phrase(spec: SceneSpec, rng: np.random.Generator, say: dict[str, bool]) -> str:
    colour = _pick(rng, COLOUR_WORDS[COLOURS[spec.colour]]) if say["colour"] else None
    hand = _pick(rng, _HANDWRITTEN)
    if say["digit"]:
        value = _pick(rng, (_NUMBER_WORDS[spec.digit], str(spec.digit)))  # type: ignore[index]
        form = int(rng.integers(4))
        if form == 0:  # "a blue handwritten seven"
            core = f"{colour + ' ' if colour else ''}{hand} {value}"
            return f"{_article(core)} {core}"
        if form == 1:  # "the digit 7 in blue"
            text = f"the {_pick(rng, _DIGIT_NOUNS)} {value}, {hand}"
        elif form == 2:
            text = f"{_article(value)} {value} written by hand"
        else:
            text = f"{_article(hand)} {hand} {value}"
        return text + (_pick(rng, (f" in {colour}", f", coloured {colour}", f", drawn in {colour}")) if colour else "")
    core = f"{colour + ' ' if colour else ''}{hand} {_pick(rng, _DIGIT_NOUNS)}"
    return f"{_article(core)} {core}"


def caption(spec: SceneSpec, rng: np.random.Generator, mention: Mapping[str, float] | None = None) -> str:
    """A varied natural-language caption of a scene, naming only its true attributes.

    Each attribute is mentioned with its probability in ``mention`` (keys ``shape``, ``colour``,
    ``count``, ``digit``, ``texture``; defaults :data:`DEFAULT_MENTION`); at least one is, where
    any can be. Values in :data:`UNNAMED_IN_CAPTIONS` are never named.
    """
    probs = {**DEFAULT_MENTION, **(mention or {})}
    keys = ("shape", "colour", "count", "texture") if spec.kind == "objects" else ("digit", "colour", "texture")
    values = {
        "shape": spec.shape,
        "colour": spec.colour,
        "count": spec.count,
        "digit": spec.digit,
        "texture": spec.texture,
    }
    nameable = [key for key in keys if values[key] not in UNNAMED_IN_CAPTIONS[key]]
    say = {key: key in nameable and bool(rng.random() < probs[key]) for key in keys}
    candidates = [key for key in nameable if probs[key] > 0]
    if not any(say.values()) and candidates:
        say[_pick(rng, candidates)] = True
    say.update({key: False for key in ("shape", "colour", "count", "digit", "texture") if key not in say})
    subject = _object_phrase(spec, rng, say) if spec.kind == "objects" else _digit_phrase(spec, rng, say)
    if not say["texture"]:
        text = _pick(rng, _PREFIXES) + subject + _pick(rng, _NO_TEXTURE)
    else:
        background = _pick(rng, TEXTURE_WORDS[TEXTURES[spec.texture]])
        form = int(rng.integers(5))
        if form <= 1:  # "three red triangles over a brick wall"
            text = f"{_pick(rng, _PREFIXES)}{subject} {_pick(rng, _PREPOSITIONS)} {background}"
        elif form == 2:  # "gravel, with two green rings"
            text = f"{background}{_pick(rng, (' with ', ', with ', ' behind ', ' under '))}{subject}"
        elif form == 3:  # "a background of grass; a blue 7 on it"
            text = f"{subject}{_pick(rng, (', background: ', ' - the background is ', '; behind it, ' if spec.count in (None, 1) else '; behind them, '))}{background}"
        else:
            text = f"{_pick(rng, ('a texture of ', 'a backdrop of ', 'a close-up of '))}{background} and {subject}"
    text = " ".join(text.split())
    return text[0].upper() + text[1:] if rng.random() < 0.3 else text


# ---------------------------------------------------------------------------- datasets


class CaptionedScenes(Dataset):
    """Scenes with captions for contrastive pretraining: item ``i`` = ``(image, caption)``.

    Item ``i`` is a pure function of ``(seed, split, i)``; ``digit_fraction`` of the scenes are
    digit scenes. Images are ``[3, image_size, image_size]`` float32 in [0, 1].
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        split: Split = "train",
        image_size: int = NATIVE_SIZE,
        digit_fraction: float = 0.3,
        mention: Mapping[str, float] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.num_samples, self.seed, self.split = num_samples, seed, split
        self.image_size, self.digit_fraction = image_size, digit_fraction
        self.mention = {**DEFAULT_MENTION, **(mention or {})}

    def __len__(self) -> int:
        return self.num_samples

    def _spec_and_rng(self, index: int) -> tuple[SceneSpec, np.random.Generator]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = item_rng(self.seed, _STREAM["captions"], self.split, index)
        kind = "digit" if rng.random() < self.digit_fraction else "objects"
        return sample_scene(rng, self.split, kind), rng

    def scene(self, index: int) -> SceneSpec:
        return self._spec_and_rng(index)[0]

    def describe(self, index: int) -> tuple[SceneSpec, str]:
        """Item ``index``'s scene and caption, without rendering the image."""
        spec, rng = self._spec_and_rng(index)
        return spec, caption(spec, rng, self.mention)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        spec, text = self.describe(index)
        return resize(render(spec), self.image_size), text
