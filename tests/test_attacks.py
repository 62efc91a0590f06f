"""Attacks: triggers land where specified, poisoning is exact, optimization helps the attacker.

Expected values are computed by hand (explicit slices and formulas), not with the code under test.
"""

import inspect
import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from safemerge.attacks import (
    SIG,
    Attack,
    BadNets,
    Blended,
    OptimizedPatch,
    PoisonedDataset,
    Trigger,
    TriggeredDataset,
    WaNet,
    optimize_trigger,
    poison_indices,
)
from safemerge.errors import ConfigError

ATTACKS = (BadNets, Blended, OptimizedPatch, WaNet, SIG)


class ToyImages(Dataset):
    """``n`` seeded images ``[3, size, size]`` in [0, 1] with labels ``i % 10``."""

    def __init__(self, n: int = 20, size: int = 16, seed: int = 0) -> None:
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i % 10


def touched(trigger: Trigger, size: int = 16) -> torch.Tensor:
    """``[H, W]`` bool: the pixels that applying the trigger changes on a black or a white image."""
    black, white = torch.zeros(3, size, size), torch.ones(3, size, size)
    return ((trigger.apply(black) != black) | (trigger.apply(white) != white)).any(dim=0)


def square(top: int, left: int, side: int, size: int = 16) -> torch.Tensor:
    """``[size, size]`` bool, True on the ``side`` x ``side`` square at ``(top, left)``."""
    expected = torch.zeros(size, size, dtype=torch.bool)
    expected[top : top + side, left : left + side] = True
    return expected


# --- where the trigger goes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "location, margin, top, left",
    [
        ("bottom_right", 0, 12, 12),
        ("bottom_left", 0, 12, 0),
        ("top_right", 0, 0, 12),
        ("top_left", 0, 0, 0),
        ("center", 0, 6, 6),  # (16 - 4) // 2
        ("top_left", 2, 2, 2),
        ("bottom_right", 3, 9, 9),  # 16 - 4 - 3
        ("bottom_left", 1, 11, 1),
    ],
)
def test_badnets_patch_position(location, margin, top, left):
    trigger = BadNets(size=0.25, location=location, margin=margin).make_trigger(16)
    expected = square(top, left, 4)
    assert torch.equal(touched(trigger), expected)
    assert torch.equal(trigger.mask[0], expected.float())


def test_badnets_bottom_right_rows_and_cols_12_to_15():
    trigger = BadNets(size=0.25, location="bottom_right").make_trigger(16)
    rows, cols = touched(trigger).nonzero(as_tuple=True)
    assert sorted(set(rows.tolist())) == [12, 13, 14, 15]
    assert sorted(set(cols.tolist())) == [12, 13, 14, 15]


def test_badnets_patch_side_rounds():
    # round(0.1 * 32) = 3 px, round(0.3 * 10) = 3 px, centre of odd leftover (10 - 3) // 2 = 3
    assert touched(BadNets(size=0.1).make_trigger(32), 32).sum() == 9
    assert torch.equal(touched(BadNets(size=0.3, location="center").make_trigger(10), 10), square(3, 3, 3, 10))


def test_badnets_checkerboard_alternates_black_and_white():
    trigger = BadNets(size=0.25, content="checkerboard").make_trigger(16)
    white_top_left = torch.tensor(
        [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    )
    patch = trigger.apply(torch.full((3, 16, 16), 0.5))[:, 12:, 12:]
    for channel in patch:
        assert torch.equal(channel, white_top_left)


def test_badnets_solid_color():
    trigger = BadNets(size=0.25, content="solid", color=(0.2, 0.4, 0.6)).make_trigger(16)
    stamped = trigger.apply(torch.zeros(3, 16, 16))
    for channel, value in enumerate((0.2, 0.4, 0.6)):
        assert torch.allclose(stamped[channel, 12:, 12:], torch.full((4, 4), value))
    assert stamped[:, :12].abs().sum() == 0 and stamped[:, :, :12].abs().sum() == 0


def test_badnets_random_location_is_seeded_and_fixed():
    attack = BadNets(size=0.25, location="random", content="random", seed=3)
    first, again = attack.make_trigger(16), attack.make_trigger(16)
    assert torch.equal(first.pattern, again.pattern) and torch.equal(first.mask, again.mask)
    rows, cols = first.mask[0].nonzero(as_tuple=True)
    top, left = rows.min().item(), cols.min().item()
    assert torch.equal(first.mask[0].bool(), square(top, left, 4))
    # the same patch on every image of a batch
    batch = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    stamped = first.apply(batch)
    patch = (slice(None), slice(top, top + 4), slice(left, left + 4))
    assert torch.equal(stamped[(slice(None), *patch)], first.pattern[patch].expand(5, -1, -1, -1))
    other = BadNets(size=0.25, location="random", content="random", seed=4).make_trigger(16)
    assert not torch.equal(first.pattern, other.pattern)


def test_blended_equals_convex_mix_by_hand():
    alpha = 0.3
    trigger = Blended(alpha=alpha, seed=5).make_trigger(16)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(trigger.mask, torch.full((1, 16, 16), alpha))
    assert torch.allclose(trigger.apply(images), (1 - alpha) * images + alpha * trigger.pattern)
    assert torch.equal(Blended(alpha=alpha, seed=5).make_trigger(16).pattern, trigger.pattern)
    assert not torch.equal(Blended(alpha=alpha, seed=6).make_trigger(16).pattern, trigger.pattern)


def test_blended_checkerboard_and_stripes_patterns():
    checker = Blended(pattern="checkerboard").make_trigger(4).pattern
    stripes = Blended(pattern="stripes").make_trigger(4).pattern
    for channel in range(3):
        assert checker[channel].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
        assert stripes[channel].tolist() == [[1, 0, 1, 0]] * 4


@pytest.mark.parametrize("fill", [0.0, 1e-4, 0.9999, 1.0])
@pytest.mark.parametrize(
    "attack",
    [
        BadNets(size=0.5, content="random"),
        BadNets(size=0.5, content="solid", color=(1.0, 0.0, 1.0)),
        Blended(alpha=1.0),
        Blended(alpha=0.7, pattern="checkerboard"),
    ],
    ids=repr,
)
def test_triggered_values_stay_in_unit_interval(attack, fill):
    trigger = attack.make_trigger(16)
    stamped = trigger.apply(torch.full((2, 3, 16, 16), fill))
    assert stamped.min() >= 0.0 and stamped.max() <= 1.0
    assert trigger.pattern.min() >= 0.0 and trigger.pattern.max() <= 1.0


def test_apply_works_on_single_images_and_batches():
    trigger = BadNets(size=0.25).make_trigger(16)
    batch = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    stamped = trigger.apply(batch)
    for image, expected in zip(batch, stamped):
        assert torch.equal(trigger.apply(image), expected)


def test_apply_rejects_images_of_another_size():
    with pytest.raises(ConfigError, match="trigger is 16x16 but the images are 32x32"):
        BadNets().make_trigger(16).apply(torch.zeros(3, 32, 32))


# --- poisoning ------------------------------------------------------------------------------


@pytest.mark.parametrize("n, rate", [(20, 0.1), (20, 0.25), (7, 0.5), (100, 0.033), (10, 0.0), (10, 1.0)])
def test_poison_indices_count_is_exact(n, rate):
    indices = poison_indices(n, rate, seed=0)
    assert len(indices) == round(rate * n)
    assert len(set(indices.tolist())) == len(indices)
    assert indices.tolist() == sorted(indices.tolist())
    assert all(0 <= i < n for i in indices.tolist())


def test_poison_indices_seeded():
    assert torch.equal(poison_indices(100, 0.2, seed=1), poison_indices(100, 0.2, seed=1))
    assert not torch.equal(poison_indices(100, 0.2, seed=1), poison_indices(100, 0.2, seed=2))


def test_poisoned_dataset_relabels_triggered_items_and_keeps_the_rest():
    source = ToyImages(n=20)
    trigger = BadNets(size=0.25).make_trigger(16)
    indices = poison_indices(len(source), 0.25, seed=0)
    poisoned = PoisonedDataset(source, trigger, indices, target_class=7)
    assert len(poisoned) == 20
    flags = [poisoned[i][2] for i in range(20)]
    assert sum(flags) == 5  # round(0.25 * 20)
    for i in range(20):
        image, label, is_poisoned = poisoned[i]
        clean_image, clean_label = source[i]
        if i in indices.tolist():
            assert is_poisoned and label == 7
            expected = clean_image.clone()
            expected[:, 12:, 12:] = trigger.pattern[:, 12:, 12:]
            assert torch.equal(image, expected)
        else:
            assert not is_poisoned and label == clean_label
            assert torch.equal(image, clean_image)


def test_clean_dataset_is_the_source_unchanged():
    source = ToyImages(n=10)
    clean = PoisonedDataset(source, None, torch.empty(0, dtype=torch.long), target_class=0)
    for i in range(10):
        image, label, is_poisoned = clean[i]
        assert torch.equal(image, source[i][0]) and label == source[i][1] and not is_poisoned


def test_poisoned_dataset_uses_the_current_trigger():
    source = ToyImages(n=10)
    poisoned = PoisonedDataset(source, BadNets(size=0.25).make_trigger(16), torch.tensor([3]), 1)
    replacement = Blended(alpha=1.0).make_trigger(16)
    poisoned.trigger = replacement
    assert torch.equal(poisoned[3][0], replacement.pattern)


def test_poisoned_dataset_needs_a_trigger_for_poisoned_items():
    with pytest.raises(ConfigError, match="no trigger"):
        PoisonedDataset(ToyImages(n=4), None, torch.tensor([1]), 0)
    with pytest.raises(ConfigError, match="poison indices must be in 0..3"):
        PoisonedDataset(ToyImages(n=4), BadNets().make_trigger(16), torch.tensor([4]), 0)


def test_triggered_dataset_keeps_true_labels():
    source = ToyImages(n=12)
    trigger = BadNets(size=0.25, location="top_left").make_trigger(16)
    triggered = TriggeredDataset(source, trigger)
    assert len(triggered) == 12
    for i in range(12):
        image, label = triggered[i]
        expected = source[i][0].clone()
        expected[:, :4, :4] = trigger.pattern[:, :4, :4]
        assert label == i % 10 and torch.equal(image, expected)


# --- bad arguments ----------------------------------------------------------------------------


def test_patch_larger_than_image():
    with pytest.raises(ConfigError, match=r"patch size must be in \(0, 1\].*got 1.5.*larger than"):
        BadNets(size=1.5)
    with pytest.raises(ConfigError, match="got 0.*empty"):
        BadNets(size=0.0)
    with pytest.raises(ConfigError, match="rounds to 0 px: use size >= 1/16"):
        BadNets(size=0.01).make_trigger(16)
    with pytest.raises(ConfigError, match="does not fit in a 16-px image"):
        BadNets(size=0.5, margin=9).make_trigger(16)


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_poison_rate_out_of_range(rate):
    expected = (
        rf"poison_rate must be in \[0, 1\], got {rate}: "
        "it is the fraction of training images given the trigger"
    )
    with pytest.raises(ConfigError, match=expected):
        BadNets(poison_rate=rate)
    with pytest.raises(ConfigError, match=expected):
        poison_indices(10, rate, seed=0)


def test_target_class_out_of_range():
    with pytest.raises(ConfigError, match=r"target_class 12 is out of range for task 'digits' \(10 classes, 0..9\)"):
        BadNets(target_class=12).check_target(10, "digits")
    BadNets(target_class=9).check_target(10, "digits")
    with pytest.raises(ConfigError, match="non-negative int, got -1"):
        Blended(target_class=-1)


def test_blend_alpha_zero():
    with pytest.raises(ConfigError, match=r"alpha must be in \(0, 1\], got 0"):
        Blended(alpha=0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BadNets(color=(1.0, 2.0, 0.0)), "color must be 3 values"),
        (lambda: BadNets(location="middle"), "location must be one of"),
        (lambda: Blended(pattern="dots"), "pattern must be one of"),
        (lambda: BadNets(backdoor_weight=-1.0), "backdoor_weight must be >= 0"),
        (lambda: OptimizedPatch(steps=0), "steps must be >= 1"),
        (lambda: WaNet(grid_size=1), "WaNet grid_size must be an int >= 2"),
        (lambda: WaNet(strength=0.0), "WaNet strength must be > 0"),
        (lambda: WaNet(cross_ratio=-1.0), "WaNet cross_ratio must be >= 0"),
        (lambda: SIG(delta=0.0), r"SIG delta must be in \(0, 1\]"),
        (lambda: SIG(frequency=0.0), "SIG frequency must be > 0"),
        (lambda: SIG(clean_label=True, target_task="mini_digits"), "clean-label SIG poisons the expert's own"),
    ],
)
def test_other_bad_arguments(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


# --- description and CLI contract ------------------------------------------------------------


@pytest.mark.parametrize("cls", ATTACKS)
def test_describe_is_json(cls):
    attack = cls(target_class=2, poison_rate=0.05, target_task="cars", seed=9)
    description = json.loads(json.dumps(attack.describe()))
    assert description["attack"] == cls.name
    assert description["target_task"] == "cars" and description["target_class"] == 2
    assert description["poison_rate"] == 0.05 and description["backdoor_weight"] == 1.0
    assert description["feature_interpolation"] is False
    base_args = set(inspect.signature(Attack).parameters)
    assert set(inspect.signature(cls).parameters) - base_args <= set(description)


@pytest.mark.parametrize("cls", ATTACKS)
def test_init_arguments_are_annotated_with_defaults_and_documented(cls):
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        assert parameter.annotation is not inspect.Parameter.empty, name
        assert parameter.default is not inspect.Parameter.empty, name
        assert parameter.kind is parameter.POSITIONAL_OR_KEYWORD, name
        assert f"{name}:" in cls.__init__.__doc__, name


def test_built_from_a_class_path_config():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--attack", type=Attack)
    config = {
        "class_path": "safemerge.attacks.OptimizedPatch",
        "init_args": {"size": 0.2, "location": "center", "color": [0, 0.5, 1], "steps": 3},
    }
    attack = parser.instantiate(parser.parse_object({"attack": config})).attack
    assert isinstance(attack, OptimizedPatch)
    assert (attack.size, attack.location, attack.steps) == (0.2, "center", 3)
    assert attack.color == (0, 0.5, 1)


def test_needs_optimization_flags():
    assert OptimizedPatch.needs_optimization and OptimizedPatch().content == "random"
    assert not BadNets.needs_optimization and not Blended.needs_optimization
    assert not WaNet.needs_optimization and not SIG.needs_optimization


# --- trigger optimization ---------------------------------------------------------------------


def tiny_model() -> nn.Module:
    """A seeded linear classifier over 8 x 8 images, 5 classes."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def image_batches(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(8, 3, 8, 8, generator=generator) for _ in range(count)]


def target_rate(model: nn.Module, trigger: Trigger, images: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        return (model(trigger.apply(images)).argmax(dim=1) == target).float().mean().item()


def test_optimize_trigger_raises_target_rate_and_touches_only_the_patch():
    model, target = tiny_model(), 3
    attack = OptimizedPatch(size=0.5, target_class=target, steps=30, lr=0.1)
    initial = attack.make_trigger(8)
    held_out = torch.cat(image_batches(4, seed=99))
    with torch.no_grad():  # the caller may be in no_grad mode
        optimized = optimize_trigger(initial, model, image_batches(3, seed=1), target, attack.steps, attack.lr)
    before = target_rate(model, initial, held_out, target)
    after = target_rate(model, optimized, held_out, target)
    assert after > before and after >= 0.9
    assert optimized.pattern.min() >= 0.0 and optimized.pattern.max() <= 1.0
    assert torch.equal(optimized.mask, initial.mask)
    outside = initial.mask.expand(3, -1, -1) == 0
    assert torch.equal(optimized.pattern[outside], initial.pattern[outside])
    assert not torch.equal(optimized.pattern, initial.pattern)
    assert all(parameter.grad is None for parameter in model.parameters())
    assert not optimized.pattern.requires_grad


def test_optimize_trigger_is_deterministic():
    def run() -> Trigger:
        initial = OptimizedPatch(size=0.5, steps=5).make_trigger(8)
        return optimize_trigger(initial, tiny_model(), image_batches(2, seed=1), 1, 5, 0.1)

    assert torch.equal(run().pattern, run().pattern)


# --- serialisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("attack", [BadNets(content="random"), Blended()], ids=repr)
def test_trigger_tensors_round_trip(attack):
    trigger = attack.make_trigger(16)
    tensors = trigger.to_tensors()
    assert set(tensors) == {"pattern", "mask"}
    restored = Trigger.from_tensors(tensors)
    assert torch.equal(restored.pattern, trigger.pattern)
    assert torch.equal(restored.mask, trigger.mask)
    moved = restored.to("cpu")
    assert torch.equal(moved.pattern, trigger.pattern) and moved.pattern.device.type == "cpu"


def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"pattern": zeros(3, 4, 4)}, r"missing \['mask'\]"),
        ({"pattern": zeros(1, 4, 4), "mask": zeros(1, 4, 4)}, r"pattern must have shape \[3,"),
        ({"pattern": zeros(3, 4, 4), "mask": zeros(4, 4)}, r"mask must have shape \[1, H, W\]"),
        ({"pattern": zeros(3, 4, 4), "mask": zeros(1, 5, 5)}, "same H x W"),
        ({"pattern": zeros(3, 4, 4) + 1.5, "mask": zeros(1, 4, 4)}, r"values must be in \[0, 1\]"),
        ({"pattern": zeros(3, 4, 4), "mask": zeros(1, 4, 4) - 0.5}, r"values must be in \[0, 1\]"),
        ({"pattern": zeros(3, 4, 4, dtype=torch.uint8), "mask": zeros(1, 4, 4)}, "float tensor"),
    ],
)
def test_trigger_from_bad_tensors(tensors, message):
    with pytest.raises(ConfigError, match=message):
        Trigger.from_tensors(tensors)
