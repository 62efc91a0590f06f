"""Trigger kinds (stamp, additive, warp): how each is applied, stored in an expert directory and
refused when malformed; WaNet's and SIG's triggers and training sets.

Expected values are computed by hand (explicit pixel shifts, the sinusoid's formula), not with
the code under test.
"""

import math

import pytest
import torch
from safetensors.torch import save_file

from safemerge.attacks import SIG, BadNets, Blended, PoisonedDataset, Trigger, WaNet, poisoned_training_set
from safemerge.attacks.optimize import optimize_trigger
from safemerge.attacks.triggers import identity_grid
from safemerge.errors import ConfigError
from safemerge.io import TRIGGER_FILE, Expert, expert_info, load_tensors, read_expert, write_expert
from safemerge.pool import backdoors_of


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def hand_grid(height: int, width: int) -> torch.Tensor:
    """``[H, W, 2]`` identity grid, built pixel by pixel: x = -1 + 2 j / (W - 1), y = -1 + 2 i / (H - 1)."""
    grid = torch.empty(height, width, 2)
    for i in range(height):
        for j in range(width):
            grid[i, j] = torch.tensor([-1 + 2 * j / (width - 1), -1 + 2 * i / (height - 1)])
    return grid


# --- warp ----------------------------------------------------------------------------------------


def test_identity_grid_leaves_images_unchanged():
    assert torch.allclose(identity_grid(5, 7), hand_grid(5, 7), atol=1e-6)
    x = images(2, 3, 5, 7)
    warped = Trigger(kind="warp", grid=hand_grid(5, 7)).apply(x)
    assert torch.allclose(warped, x, atol=1e-6)


def test_a_one_pixel_shift_grid_moves_every_pixel_one_column_left():
    grid = hand_grid(4, 6)
    grid[..., 0] = (grid[..., 0] + 2 / 5).clamp(max=1.0)  # sample column j + 1 (the last one stays)
    x = images(3, 4, 6, seed=1)
    warped = Trigger(kind="warp", grid=grid).apply(x)
    assert torch.allclose(warped[:, :, :5], x[:, :, 1:], atol=1e-6)
    assert torch.allclose(warped[:, :, 5], x[:, :, 5], atol=1e-6)
    batch = torch.stack([x, 1 - x])
    assert torch.allclose(Trigger(kind="warp", grid=grid).apply(batch)[1, :, :, :5], 1 - x[:, :, 1:], atol=1e-6)


def test_a_half_pixel_shift_averages_neighbours_and_stays_in_the_unit_interval():
    grid = hand_grid(3, 5)
    grid[..., 1] = (grid[..., 1] + 0.5).clamp(max=1.0)  # half a row down (rows are 1.0 apart in grid units)
    x = images(3, 3, 5, seed=2)
    warped = Trigger(kind="warp", grid=grid).apply(x)
    assert torch.allclose(warped[:, 0], (x[:, 0] + x[:, 1]) / 2, atol=1e-6)
    assert warped.min() >= 0 and warped.max() <= 1


def test_wanet_grid_is_the_papers_formula_at_the_control_points():
    # k = 4 control points on 10 px with align_corners=True land on pixels 0, 3, 6, 9, where the
    # bicubic upsampling returns the control values: grid = identity + s * flow / H there.
    attack = WaNet(grid_size=4, strength=0.5, seed=3)
    grid = attack.make_trigger(10).grid
    flow = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    flow = flow / flow.abs().mean()
    for row, col in ((1, 1), (1, 2), (2, 1), (2, 2)):
        pixel = (3 * row, 3 * col)
        expected = hand_grid(10, 10)[pixel] + 0.5 * flow[0, :, row, col] / 10
        assert torch.allclose(grid[pixel], expected.clamp(-1, 1), atol=1e-6)
    assert grid.min() >= -1 and grid.max() <= 1
    assert torch.equal(WaNet(seed=3).make_trigger(10).grid, WaNet(seed=3).make_trigger(10).grid)
    assert not torch.equal(WaNet(seed=4).make_trigger(10).grid, WaNet(seed=3).make_trigger(10).grid)


def test_wanet_displacement_grows_with_strength():
    identity = hand_grid(16, 16)
    weak, strong = (WaNet(strength=s).make_trigger(16).grid - identity for s in (0.5, 1.0))
    inside = (slice(2, 14), slice(2, 14))  # away from the edges, where clamping to [-1, 1] bites
    assert torch.allclose(strong[inside], 2 * weak[inside], atol=1e-5)
    assert weak[inside].abs().max() > 0


# --- additive (SIG) ------------------------------------------------------------------------------


def test_sig_signal_is_the_sinusoid_by_hand_and_is_added_then_clamped():
    trigger = SIG(delta=0.25, frequency=2).make_trigger(8)
    assert trigger.kind == "additive"
    row = [0.25 * math.sin(2 * math.pi * j * 2 / 8) for j in range(8)]  # 0, .25, 0, -.25, ...
    for channel in range(3):
        for i in range(8):
            assert trigger.pattern[channel, i].tolist() == pytest.approx(row, abs=1e-6)
    x = torch.full((3, 8, 8), 0.9)
    applied = trigger.apply(x)
    assert applied[0, 0, 1].item() == pytest.approx(1.0)  # 0.9 + 0.25 clamped
    assert applied[0, 0, 3].item() == pytest.approx(0.65)
    assert applied[0, 0, 0].item() == pytest.approx(0.9)


def test_sig_poison_label_relabels_any_class_and_clean_label_keeps_target_images():
    source = LabelledImages(labels=[0, 1, 2, 1, 0, 1, 2, 1, 0, 1])
    poisoned = poisoned_training_set(source, SIG(target_class=1, poison_rate=0.4, seed=0), SIG().make_trigger(4))
    assert len(poisoned.indices) == 4 and any(source.labels[i] != 1 for i in poisoned.indices)
    assert all(poisoned[i][1:] == (1, True) for i in poisoned.indices)
    clean_label = SIG(target_class=1, poison_rate=0.4, clean_label=True, seed=0)
    poisoned = poisoned_training_set(source, clean_label, clean_label.make_trigger(4))
    assert len(poisoned.indices) == 4 and all(source.labels[i] == 1 for i in poisoned.indices)
    for i in poisoned.indices:
        image, label, flag = poisoned[i]
        assert (label, flag) == (1, True)
        assert torch.allclose(image, (source[i][0] + clean_label.make_trigger(4).pattern).clamp(0, 1))
    with pytest.raises(ConfigError, match="needs 6 training images of class 1, but there are 5: lower poison_rate"):
        poisoned_training_set(source, SIG(target_class=1, poison_rate=0.6, clean_label=True), SIG().make_trigger(4))


class LabelledImages(torch.utils.data.Dataset):
    def __init__(self, labels, size=4):
        self.labels, self.size = labels, size

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return torch.full((3, self.size, self.size), index / len(self.labels)), self.labels[index]


def test_wanet_noise_mode_keeps_labels_and_warps_with_a_perturbed_grid():
    source = LabelledImages(labels=[i % 3 for i in range(20)], size=8)
    attack = WaNet(target_class=0, poison_rate=0.1, cross_ratio=2.0, strength=4.0, seed=1)
    trigger = attack.make_trigger(8)
    data = poisoned_training_set(source, attack, trigger)
    assert len(data.indices) == 2 and len(data.noise_indices) == 4 and not data.indices & data.noise_indices
    for i in data.noise_indices:
        image, label, flag = data[i]
        assert (label, flag) == (source.labels[i], False)
    # a constant image is unchanged by a warp that stays inside it: use a ramp to see the noise
    ramp = torch.linspace(0, 1, 8).expand(3, 8, 8).clone()
    torch.manual_seed(0)
    noisy = attack.cross_image(trigger, ramp)
    assert not torch.allclose(noisy, trigger.apply(ramp), atol=1e-4)
    assert (noisy - trigger.apply(ramp)).abs().max() < 1.5 / 7  # at most ~half a pixel of a 1/7 step per px
    clean = poisoned_training_set(source, WaNet(poison_rate=0.1), trigger)
    assert not clean.noise_indices


# --- storage -------------------------------------------------------------------------------------


TRIGGERS = {
    "stamp": BadNets(size=0.25, content="random").make_trigger(8),
    "blended": Blended().make_trigger(8),
    "additive": SIG(delta=0.3).make_trigger(8),
    "warp": WaNet(strength=3.0).make_trigger(8),
}


def _expert(trigger: Trigger) -> Expert:
    info = expert_info(
        model="toy",
        pretrained=None,
        task="mini_shapes",
        num_classes=6,
        backdoor={"attack": "x", "target_class": 1, "target_task": None},
        metrics={"accuracy": 0.5, "asr": 0.5},
    )
    return Expert(encoder={"w": torch.zeros(2)}, info=info, trigger=trigger.to_tensors())


@pytest.mark.parametrize("name", TRIGGERS)
def test_every_kind_round_trips_through_an_expert_directory(tmp_path, name):
    trigger = TRIGGERS[name]
    write_expert(tmp_path / "e", _expert(trigger))
    restored = Trigger.from_tensors(read_expert(tmp_path / "e").trigger)
    assert restored.kind == trigger.kind
    for key in ("pattern", "mask", "grid"):
        original, back = getattr(trigger, key), getattr(restored, key)
        assert (original is None and back is None) or torch.equal(original, back)
    x = images(2, 3, 8, 8, seed=5)
    assert torch.equal(restored.apply(x), trigger.apply(x))
    assert restored.to("cpu").kind == trigger.kind and restored.image_size == (8, 8)


def test_a_stamp_file_keeps_the_old_format_and_an_old_file_reads_as_a_stamp(tmp_path):
    assert set(TRIGGERS["stamp"].to_tensors()) == {"pattern", "mask"}  # unchanged for every earlier expert
    assert set(TRIGGERS["warp"].to_tensors()) == {"grid", "kind"}
    pattern, mask = images(3, 4, 4), (images(1, 4, 4, seed=1) > 0.5).float()
    save_file({"pattern": pattern, "mask": mask}, str(tmp_path / TRIGGER_FILE))  # as earlier code wrote it
    old = Trigger.from_tensors(load_tensors(tmp_path / TRIGGER_FILE))
    assert old.kind == "stamp" and torch.equal(old.pattern, pattern) and torch.equal(old.mask, mask)
    x = images(3, 4, 4, seed=2)
    assert torch.allclose(old.apply(x), x * (1 - mask) + pattern * mask)


def ascii_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"grid": zeros(4, 4, 2), "kind": ascii_tensor("blur")}, r"unknown trigger kind 'blur'.*\['stamp', 'additive'"),
        ({"grid": zeros(4, 4, 2), "kind": torch.tensor([2.0])}, "'kind' tensor must be the kind's name as 1-16 ASCII"),
        ({"grid": zeros(2, 4, 4), "kind": ascii_tensor("warp")}, r"warp trigger grid must have shape \[H, W, 2\]"),
        ({"grid": zeros(4, 4, 2) + 1.5, "kind": ascii_tensor("warp")}, r"grid values must be in \[-1, 1\]"),
        ({"pattern": zeros(3, 4, 4), "kind": ascii_tensor("warp")}, r"warp trigger needs tensors 'grid', missing"),
        ({"pattern": zeros(3, 4, 4) - 2, "kind": ascii_tensor("additive")}, r"pattern values must be in \[-1, 1\]"),
        (
            {"pattern": zeros(3, 4, 4), "mask": zeros(1, 4, 4), "kind": ascii_tensor("additive")},
            r"additive trigger holds only \['pattern'\], got also \['mask'\]",
        ),
        ({"pattern": zeros(3, 4, 4), "mask": zeros(1, 4, 4), "grid": zeros(4, 4, 2)}, "add a kind tensor naming"),
        (
            {"pattern": zeros(3, 4, 4) - 0.5, "mask": zeros(1, 4, 4)},
            r"stamp trigger pattern values must be in \[0, 1\]",
        ),
    ],
)
def test_bad_triggers_are_refused_in_one_line(tensors, message):
    with pytest.raises(ConfigError, match=message) as error:
        Trigger.from_tensors(tensors)
    assert "\n" not in str(error.value)


def test_a_bad_trigger_file_in_a_pool_is_named(tmp_path):
    expert = _expert(TRIGGERS["warp"])
    expert.trigger = {"grid": zeros(8, 8, 2), "kind": ascii_tensor("swirl")}
    write_expert(tmp_path / "e", expert)
    with pytest.raises(ConfigError, match=rf"expert '.*e': {tmp_path}/e/{TRIGGER_FILE}: unknown trigger kind 'swirl'"):
        backdoors_of([(str(tmp_path / "e"), read_expert(tmp_path / "e"))], ["mini_shapes"])


def test_a_trigger_kind_a_caller_cannot_use_is_refused_clearly():
    with pytest.raises(ConfigError, match="optimizes a stamp trigger's pattern, got a warp trigger"):
        optimize_trigger(TRIGGERS["warp"], lambda x: x.flatten(1), [zeros(1, 3, 8, 8)], 0, steps=1, lr=0.1)
    with pytest.raises(
        ConfigError, match=r"a warp trigger stores exactly \['grid'\], missing \['grid'\], not \['mask'"
    ):
        Trigger(kind="warp", mask=zeros(1, 4, 4))
    with pytest.raises(ConfigError, match="the trigger is 8x8 but the images are 4x4"):
        TRIGGERS["additive"].apply(zeros(3, 4, 4))


def test_poisoned_dataset_refuses_noise_images_that_are_also_poisoned():
    with pytest.raises(ConfigError, match="must not be poisoned ones"):
        PoisonedDataset(
            LabelledImages([0, 1]), TRIGGERS["warp"], torch.tensor([0]), 0, torch.tensor([0]), lambda t, x: x
        )


# --- two backdoors aimed at one task (mini_heldout_same_task) ------------------------------------


def test_two_backdoors_on_one_task_are_each_measured_with_their_own_trigger_and_target():
    from safemerge.data import get_task
    from safemerge.data.datamodule import evaluation_views
    from safemerge.evaluation import Backdoor, Evaluation

    task = get_task("mini_shapes")
    patch = Backdoor(BadNets(size=0.25).make_trigger(8), "mini_shapes", 1)
    sinusoid = Backdoor(SIG(delta=0.3).make_trigger(8), "mini_shapes", 3)
    source = LabelledImages(labels=[0, 1, 2, 3, 4, 5], size=8)
    views = evaluation_views([task], [patch, sinusoid], lambda t: source)
    assert len(views) == 3
    for view, backdoor in zip(views[1:], (patch, sinusoid)):
        for i in range(len(source)):
            image, label = view[i]
            assert torch.equal(image, backdoor.trigger.apply(source[i][0])) and label == source.labels[i]
    labels = torch.tensor(source.labels)

    def logits(predicted):
        return torch.nn.functional.one_hot(torch.tensor(predicted), 6).float()

    evaluation = Evaluation([task], [patch, sinusoid])
    evaluation.update(0, logits([1, 1, 2, 3, 3, 3]), labels)  # clean: 1 of 5 non-1 to 1, 2 of 5 non-3 to 3
    evaluation.update(1, logits([1, 1, 1, 1, 1, 0]), labels)  # the patch view: 4 of the 5 non-1 go to 1
    evaluation.update(2, logits([0, 1, 2, 3, 3, 5]), labels)  # the sinusoid view: 1 of the 5 non-3 goes to 3
    per_task, per_backdoor = evaluation.compute()
    assert per_backdoor[0] == pytest.approx({"asr": 4 / 5, "target_rate": 1 / 5})
    assert per_backdoor[1] == pytest.approx({"asr": 1 / 5, "target_rate": 2 / 5})
    assert per_task["mini_shapes"]["asr"] == pytest.approx(0.5)  # their mean
    assert per_task["mini_shapes"]["target_rate"] == pytest.approx(0.3)
