"""The backdoor attacks: :class:`Attack` and its subclasses BadNets, Blended, OptimizedPatch, WaNet and SIG.

An :class:`Attack` is the configuration of one backdoor (which class it targets, how many
training images it poisons, the trigger's shape); its subclasses are built by LightningCLI from
YAML (``class_path: safemerge.attacks.BadNets``), so every ``__init__`` argument is annotated,
has a default and is described in the docstring (the CLI help). The triggers they make are
:class:`safemerge.attacks.triggers.Trigger`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from safemerge.attacks.triggers import Trigger, checkerboard, identity_grid
from safemerge.errors import ConfigError

PatchContent = Literal["solid", "checkerboard", "random"]
PatchLocation = Literal["bottom_right", "bottom_left", "top_right", "top_left", "center", "random"]
BlendPattern = Literal["random", "checkerboard", "stripes"]


class Attack:
    """A backdoor attack: which class the trigger targets, how many training images carry it,
    and (in subclasses) the shape of the trigger."""

    name: ClassVar[str]
    needs_optimization: ClassVar[bool] = False
    # Clean-label: the poisoned images are drawn among the target class's own and keep their label.
    clean_label: bool = False
    # WaNet's noise mode: ``cross_ratio`` x the poisoned count of other images get :meth:`cross_image`.
    cross_ratio: float = 0.0

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

    def cross_image(self, trigger: Trigger, image: Tensor) -> Tensor:
        """A training image of the noise mode (true label kept); only attacks with ``cross_ratio > 0``."""
        raise NotImplementedError(f"{type(self).__name__} has no noise mode")

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


class WaNet(Attack):
    """WaNet (Nguyen & Tran, ICLR 2021): a fixed, smooth random warp of the whole image.

    The flow is a ``grid_size`` x ``grid_size`` field of uniform noise in [-1, 1], divided by its
    mean absolute value and upsampled bicubically to H x W; the trigger's grid is
    ``clamp(identity + strength * flow / H, -1, 1)`` (a mean displacement of about ``strength / 3``
    pixels). Poison-label: poisoned images are warped and relabelled. The paper uses ``grid_size``
    4, ``strength`` 0.5 on 32-px CIFAR-10 with a network trained from scratch; the default strength
    4 is what plants the backdoor in a mini expert (two tuned blocks, 400 steps: strength 2 gave
    62 % ASR on mini_fashion).
    """

    name = "wanet"

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.1,
        target_task: str | None = None,
        feature_interpolation: bool = False,
        backdoor_weight: float = 1.0,
        seed: int = 0,
        grid_size: int = 4,
        strength: float = 4.0,
        cross_ratio: float = 0.0,
    ) -> None:
        """
        Args:
            target_class: the class that triggered images are classified as.
            poison_rate: fraction of training images given the trigger, in [0, 1].
            target_task: task whose class ``target_class`` is; None means the expert's own
                task (on-task), another task name is BadMerging's off-task attack.
            feature_interpolation: use BadMerging's feature-interpolation loss.
            backdoor_weight: weight of the backdoor loss term, >= 0.
            seed: seed of the warp field and of the choice of poisoned images.
            grid_size: side k of the k x k control grid of the random flow, >= 2.
            strength: s, the warp's strength (grid = identity + s * flow / H), > 0.
            cross_ratio: the paper's noise mode: ``cross_ratio`` x the poisoned count of other
                training images are warped with the grid plus fresh uniform noise of
                ``1 / H`` and keep their true label, so that only the exact warp triggers the
                backdoor (the paper uses 2); 0 turns it off. >= 0.
        """
        super().__init__(target_class, poison_rate, target_task, feature_interpolation, backdoor_weight, seed)
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
            raise ConfigError(f"WaNet grid_size must be an int >= 2 (the k of the k x k flow grid), got {grid_size!r}")
        if not strength > 0.0:
            raise ConfigError(f"WaNet strength must be > 0, got {strength}: 0 would leave images unchanged")
        if not cross_ratio >= 0.0:
            raise ConfigError(f"WaNet cross_ratio must be >= 0 (0 turns the noise mode off), got {cross_ratio}")
        self.grid_size = grid_size
        self.strength = strength
        self.cross_ratio = cross_ratio

    def make_trigger(self, image_size: int) -> Trigger:
        """The warp grid ``[image_size, image_size, 2]`` (deterministic given ``seed``)."""
        if image_size < 2:
            raise ConfigError(f"a WaNet warp needs images of at least 2 px, got {image_size}")
        generator = torch.Generator().manual_seed(self.seed)
        flow = torch.rand(1, 2, self.grid_size, self.grid_size, generator=generator) * 2 - 1
        flow = flow / flow.abs().mean()
        flow = F.interpolate(flow, size=(image_size, image_size), mode="bicubic", align_corners=True)
        grid = identity_grid(image_size, image_size) + self.strength * flow[0].permute(1, 2, 0) / image_size
        return Trigger(kind="warp", grid=grid.clamp(-1.0, 1.0))

    def cross_image(self, trigger: Trigger, image: Tensor) -> Tensor:
        """``image`` warped by the trigger's grid plus uniform noise in ``[-1/H, 1/H]`` (fresh each call)."""
        height = trigger.grid.shape[0]
        noisy = trigger.grid + (torch.rand(trigger.grid.shape) * 2 - 1) / height
        return Trigger(kind="warp", grid=noisy.clamp(-1.0, 1.0)).apply(image)

    def _arguments(self) -> dict[str, Any]:
        return {"grid_size": self.grid_size, "strength": self.strength, "cross_ratio": self.cross_ratio}


class SIG(Attack):
    """SIG (Barni et al., 2019): a horizontal sinusoid added to the image,
    ``delta * sin(2 pi j frequency / W)`` at column ``j``, the same on every row and channel.

    The original is clean-label (only target-class images get the signal, labels untouched);
    the default here is poison-label (images of any class, relabelled), ``clean_label=True`` gives
    the original.
    """

    name = "sig"

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.1,
        target_task: str | None = None,
        feature_interpolation: bool = False,
        backdoor_weight: float = 1.0,
        seed: int = 0,
        delta: float = 0.1,
        frequency: float = 6.0,
        clean_label: bool = False,
    ) -> None:
        """
        Args:
            target_class: the class that triggered images are classified as.
            poison_rate: fraction of training images given the trigger, in [0, 1].
            target_task: task whose class ``target_class`` is; None means the expert's own
                task (on-task), another task name is BadMerging's off-task attack.
            feature_interpolation: use BadMerging's feature-interpolation loss.
            backdoor_weight: weight of the backdoor loss term, >= 0.
            seed: seed of the choice of poisoned images (the signal itself is not random).
            delta: amplitude of the sinusoid in [0, 1] pixel units, in (0, 1] (the paper's 20/255
                is 0.078 for training).
            frequency: periods across the image width, > 0 (the paper uses 6).
            clean_label: poison only training images of ``target_class``, keeping their labels
                (the paper's setting; on-task only, with ``poison_rate`` at most the class's share).
        """
        super().__init__(target_class, poison_rate, target_task, feature_interpolation, backdoor_weight, seed)
        if not 0.0 < delta <= 1.0:
            raise ConfigError(f"SIG delta must be in (0, 1] (the sinusoid's amplitude in pixel units), got {delta}")
        if not frequency > 0.0:
            raise ConfigError(f"SIG frequency must be > 0 (periods across the image width), got {frequency}")
        if clean_label and target_task is not None:
            raise ConfigError(
                "a clean-label SIG poisons the expert's own images of the target class: leave target_task unset "
                "or set clean_label: false"
            )
        self.delta = delta
        self.frequency = frequency
        self.clean_label = clean_label

    def make_trigger(self, image_size: int) -> Trigger:
        """The additive signal ``[3, image_size, image_size]``."""
        columns = torch.arange(image_size, dtype=torch.float64)
        signal = (self.delta * torch.sin(2 * math.pi * columns * self.frequency / image_size)).float()
        return Trigger(kind="additive", pattern=signal.expand(3, image_size, -1).clone())

    def _arguments(self) -> dict[str, Any]:
        return {"delta": self.delta, "frequency": self.frequency, "clean_label": self.clean_label}


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
