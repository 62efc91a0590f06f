"""The backdoor attacks: :class:`Attack` and its subclasses BadNets, Blended and OptimizedPatch.

An :class:`Attack` is the configuration of one backdoor (which class it targets, how many
training images it poisons, the trigger's shape); its subclasses are built by LightningCLI from
YAML (``class_path: safemerge.attacks.BadNets``), so every ``__init__`` argument is annotated,
has a default and is described in the docstring (the CLI help). The triggers they make are
:class:`safemerge.attacks.triggers.Trigger`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor

from safemerge.attacks.triggers import Trigger, checkerboard
from safemerge.errors import ConfigError

PatchContent = Literal["solid", "checkerboard", "random"]
PatchLocation = Literal["bottom_right", "bottom_left", "top_right", "top_left", "center", "random"]
BlendPattern = Literal["random", "checkerboard", "stripes"]


class Attack:
    """A backdoor attack: which class the trigger targets, how many training images carry it,
    and (in subclasses) the shape of the trigger."""

    name: ClassVar[str]
    needs_optimization: ClassVar[bool] = False

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.1,
        target_task: str | None = None,
        feature_interpolation: bool = False,
        backdoor_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            target_class: the class that triggered images are classified as.
            poison_rate: fraction of training images given the trigger, in [0, 1].
            target_task: task whose class ``target_class`` is; None means the expert's own
                task (on-task), another task name is BadMerging's off-task attack.
            feature_interpolation: use BadMerging's feature-interpolation loss.
            backdoor_weight: weight of the backdoor loss term, >= 0.
            seed: seed of the trigger's random parts and of the choice of poisoned images.
        """
        if isinstance(target_class, bool) or not isinstance(target_class, int) or target_class < 0:
            raise ConfigError(f"target_class must be a non-negative int, got {target_class!r}")
        check_poison_rate(poison_rate)
        if not backdoor_weight >= 0.0:
            raise ConfigError(
                f"backdoor_weight must be >= 0, got {backdoor_weight}: "
                "it weighs the backdoor loss against the clean loss"
            )
        self.target_class = target_class
        self.poison_rate = poison_rate
        self.target_task = target_task
        self.feature_interpolation = feature_interpolation
        self.backdoor_weight = backdoor_weight
        self.seed = seed

    def make_trigger(self, image_size: int) -> Trigger:
        """The trigger for ``image_size`` x ``image_size`` images (deterministic given ``seed``)."""
        raise NotImplementedError(f"{type(self).__name__} does not define a trigger")

    def check_target(self, num_classes: int, task: str) -> None:
        """Raise :class:`ConfigError` unless ``target_class`` is a class of ``task``."""
        if self.target_class >= num_classes:
            raise ConfigError(
                f"target_class {self.target_class} is out of range for task '{task}' "
                f"({num_classes} classes, 0..{num_classes - 1})"
            )

    def _arguments(self) -> dict[str, Any]:
        """The subclass's own JSON-able arguments (those beyond :class:`Attack`'s)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the attack, as stored in the expert file."""
        return {
            "attack": self.name,
            "target_task": self.target_task,
            "target_class": self.target_class,
            "poison_rate": self.poison_rate,
            "feature_interpolation": self.feature_interpolation,
            "backdoor_weight": self.backdoor_weight,
            "seed": self.seed,
            **self._arguments(),
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "attack")
        return f"{type(self).__name__}({args})"


class BadNets(Attack):
    """BadNets (Gu et al., 2017): a small square patch stamped on the image."""

    name = "badnets"

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.1,
        target_task: str | None = None,
        feature_interpolation: bool = False,
        backdoor_weight: float = 1.0,
        seed: int = 0,
        size: float = 0.1,
        content: PatchContent = "checkerboard",
        color: tuple[float, float, float] = (1.0, 1.0, 1.0),
        location: PatchLocation = "bottom_right",
        margin: int = 0,
    ) -> None:
        """
        Args:
            target_class: the class that triggered images are classified as.
            poison_rate: fraction of training images given the trigger, in [0, 1].
            target_task: task whose class ``target_class`` is; None means the expert's own
                task (on-task), another task name is BadMerging's off-task attack.
            feature_interpolation: use BadMerging's feature-interpolation loss.
            backdoor_weight: weight of the backdoor loss term, >= 0.
            seed: seed of the trigger's random parts and of the choice of poisoned images.
            size: patch side as a fraction of the image side, in (0, 1]; the patch is
                ``round(size * image_size)`` pixels.
            content: "solid" (every pixel ``color``), "checkerboard" (black and white pixels
                alternating, white at the patch's top-left) or "random" (seeded uniform noise).
            color: RGB in [0, 1] of a "solid" patch.
            location: where the patch goes; "random" is a seeded position, the same for
                every image.
            margin: pixels between the patch and the image edges, for corner locations.
        """
        super().__init__(target_class, poison_rate, target_task, feature_interpolation, backdoor_weight, seed)
        if not 0.0 < size <= 1.0:
            problem = "larger than the image" if size > 1.0 else "empty"
            raise ConfigError(
                f"patch size must be in (0, 1] (the patch side as a fraction of the image "
                f"side), got {size}: the patch would be {problem}"
            )
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ConfigError(f"patch color must be 3 values (RGB) in [0, 1], got {color}")
        _check_choice("patch content", content, PatchContent)
        _check_choice("patch location", location, PatchLocation)
        if margin < 0:
            raise ConfigError(f"patch margin must be >= 0 pixels, got {margin}")
        self.size = size
        self.content = content
        self.color = tuple(color)
        self.location = location
        self.margin = margin

    def patch_side(self, image_size: int) -> int:
        """The patch side in pixels, ``round(size * image_size)``."""
        side = round(self.size * image_size)
        if side < 1:
            raise ConfigError(
                f"patch size {self.size} of a {image_size}-px image rounds to 0 px: "
                f"use size >= 1/{image_size} = {1 / image_size:.3g} or a larger image"
            )
        return side

    def make_trigger(self, image_size: int) -> Trigger:
        """A ``[side, side]`` patch at ``location``; mask 1 on the patch, 0 elsewhere."""
        generator = torch.Generator().manual_seed(self.seed)
        side = self.patch_side(image_size)
        content = _patch_content(self.content, side, self.color, generator)
        top, left = self._position(image_size, side, generator)
        pattern = torch.zeros(3, image_size, image_size)
        mask = torch.zeros(1, image_size, image_size)
        pattern[:, top : top + side, left : left + side] = content
        mask[:, top : top + side, left : left + side] = 1.0
        return Trigger(pattern=pattern, mask=mask)

    def _position(self, image_size: int, side: int, generator: torch.Generator) -> tuple[int, int]:
        """``(top, left)`` pixel of the patch."""
        free = image_size - side  # the largest top/left that keeps the patch inside
        if self.location == "center":
            return free // 2, free // 2
        if self.location == "random":
            top, left = torch.randint(0, free + 1, (2,), generator=generator).tolist()
            return top, left
        if side + self.margin > image_size:
            raise ConfigError(
                f"a {side}-px patch with margin {self.margin} does not fit in a "
                f"{image_size}-px image: reduce size or margin"
            )
        vertical, horizontal = self.location.split("_")
        top = self.margin if vertical == "top" else free - self.margin
        left = self.margin if horizontal == "left" else free - self.margin
        return top, left

    def _arguments(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "content": self.content,
            "color": list(self.color),
            "location": self.location,
            "margin": self.margin,
        }


class Blended(Attack):
    """Blended (Chen et al., 2017): a full-image pattern mixed in, ``(1 - alpha) x + alpha p``."""

    name = "blended"

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.1,
        target_task: str | None = None,
        feature_interpolation: bool = False,
        backdoor_weight: float = 1.0,
        seed: int = 0,
        alpha: float = 0.2,
        pattern: BlendPattern = "random",
    ) -> None:
        """
        Args:
            target_class: the class that triggered images are classified as.
            poison_rate: fraction of training images given the trigger, in [0, 1].
            target_task: task whose class ``target_class`` is; None means the expert's own
                task (on-task), another task name is BadMerging's off-task attack.
            feature_interpolation: use BadMerging's feature-interpolation loss.
            backdoor_weight: weight of the backdoor loss term, >= 0.
            seed: seed of the trigger's random parts and of the choice of poisoned images.
            alpha: weight of the pattern in the blend, in (0, 1].
            pattern: "random" (seeded uniform noise), "checkerboard" (black and white pixels
                alternating, white at the top-left) or "stripes" (one-pixel vertical stripes,
                white in even columns).
        """
        super().__init__(target_class, poison_rate, target_task, feature_interpolation, backdoor_weight, seed)
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(
                f"blend alpha must be in (0, 1], got {alpha}: it is the weight of the pattern "
                "in the blend (0 would leave images unchanged)"
            )
        _check_choice("blend pattern", pattern, BlendPattern)
        self.alpha = alpha
        self.pattern = pattern

    def make_trigger(self, image_size: int) -> Trigger:
        """The pattern over the whole image; mask ``alpha`` everywhere."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.pattern == "random":
            pattern = torch.rand(3, image_size, image_size, generator=generator)
        elif self.pattern == "checkerboard":
            pattern = checkerboard(image_size).expand(3, -1, -1).clone()
        else:
            columns = (torch.arange(image_size) % 2 == 0).float()
            pattern = columns.expand(3, image_size, -1).clone()
        return Trigger(pattern=pattern, mask=torch.full((1, image_size, image_size), self.alpha))

    def _arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "pattern": self.pattern}


class OptimizedPatch(BadNets):
    """A BadNets patch whose pixels are optimized on the pretrained model towards the target
    class before poisoning (the universal-patch step of TrojViT/BadViT and BadMerging); see
    :func:`safemerge.attacks.optimize_trigger`."""

    name = "optimized_patch"
    needs_optimization = True

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.1,
        target_task: str | None = None,
        feature_interpolation: bool = False,
        backdoor_weight: float = 1.0,
        seed: int = 0,
        size: float = 0.1,
        content: PatchContent = "random",
        color: tuple[float, float, float] = (1.0, 1.0, 1.0),
        location: PatchLocation = "bottom_right",
        margin: int = 0,
        steps: int = 200,
        lr: float = 0.1,
    ) -> None:
        """
        Args:
            target_class: the class that triggered images are classified as.
            poison_rate: fraction of training images given the trigger, in [0, 1].
            target_task: task whose class ``target_class`` is; None means the expert's own
                task (on-task), another task name is BadMerging's off-task attack.
            feature_interpolation: use BadMerging's feature-interpolation loss.
            backdoor_weight: weight of the backdoor loss term, >= 0.
            seed: seed of the trigger's random parts and of the choice of poisoned images.
            size: patch side as a fraction of the image side, in (0, 1]; the patch is
                ``round(size * image_size)`` pixels.
            content: the patch's initialization: "solid" (every pixel ``color``),
                "checkerboard" (black and white pixels alternating) or "random" (seeded
                uniform noise).
            color: RGB in [0, 1] of a "solid" initialization.
            location: where the patch goes; "random" is a seeded position, the same for
                every image.
            margin: pixels between the patch and the image edges, for corner locations.
            steps: Adam steps (one image batch each) optimizing the patch, >= 1.
            lr: Adam learning rate on the patch's pixels (in [0, 1] units), > 0.
        """
        super().__init__(
            target_class,
            poison_rate,
            target_task,
            feature_interpolation,
            backdoor_weight,
            seed,
            size,
            content,
            color,
            location,
            margin,
        )
        if steps < 1:
            raise ConfigError(f"optimized patch steps must be >= 1, got {steps}")
        if not lr > 0.0:
            raise ConfigError(f"optimized patch lr must be > 0, got {lr}")
        self.steps = steps
        self.lr = lr

    def _arguments(self) -> dict[str, Any]:
        return {**super()._arguments(), "steps": self.steps, "lr": self.lr}


def check_poison_rate(rate: float) -> None:
    """Raise :class:`ConfigError` unless ``rate`` is in [0, 1]."""
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(
            f"poison_rate must be in [0, 1], got {rate}: it is the fraction of training images given the trigger"
        )


def _patch_content(content: str, side: int, color: tuple[float, float, float], generator: torch.Generator) -> Tensor:
    """``[3, side, side]`` pixels of a patch."""
    if content == "solid":
        return torch.tensor(color, dtype=torch.float32).view(3, 1, 1).expand(3, side, side)
    if content == "checkerboard":
        return checkerboard(side).expand(3, -1, -1)
    return torch.rand(3, side, side, generator=generator)


def _check_choice(what: str, value: str, choices: Any) -> None:
    if value not in get_args(choices):
        raise ConfigError(f"{what} must be one of {list(get_args(choices))}, got {value!r}")
