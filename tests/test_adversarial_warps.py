"""Shared adversarial warps (safemerge/merging/simulated_triggers.py) and SAU's warp term
(safemerge/defenses/sau.py), against independent computations.

The warp is pinned by hand-made shifts: a constant flow of +1 pixel in x samples each pixel's
right neighbour (zeros past the edge), half a pixel averages the two (bilinear), +1 in y
samples the pixel below. The ascent is one signed-gradient step of the flow. SAU's warp term is
recomputed on the toy of tests/defense_toys.py, where a warp that moves the trigger pixel onto a
lit signal pixel is a backdoor example both models share.
"""

import defense_toys as toy
import pytest
import torch
import torch.nn.functional as F

from safemerge.defenses import SAU
from safemerge.errors import ConfigError
from safemerge.merging.simulated_triggers import shared_adversarial_warps, shared_wrong_log_probability, warp_by_flow


def constant_flow(n, dx, dy, grid=4):
    flow = torch.zeros(n, 2, grid, grid)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def test_a_constant_flow_shifts_the_image_by_that_many_pixels_in_its_direction():
    images = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(warp_by_flow(images, constant_flow(2, 0.0, 0.0)), images, atol=1e-6)
    right = warp_by_flow(images, constant_flow(2, 1.0, 0.0))
    assert torch.allclose(right[..., :-1], images[..., 1:], atol=1e-5)  # each pixel shows its right neighbour
    assert torch.allclose(right[..., -1], torch.zeros_like(right[..., -1]), atol=1e-5)  # nothing past the edge
    half = warp_by_flow(images, constant_flow(2, 0.5, 0.0))
    assert torch.allclose(half[..., :-1], (images[..., :-1] + images[..., 1:]) / 2, atol=1e-5)
    down = warp_by_flow(images, constant_flow(2, 0.0, 1.0))
    assert torch.allclose(down[..., :-1, :], images[..., 1:, :], atol=1e-5)  # y is the row axis


def test_each_image_is_warped_by_its_own_flow():
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    flow = torch.cat([constant_flow(1, 1.0, 0.0), constant_flow(1, 0.0, 0.0)])
    warped = warp_by_flow(images, flow)
    assert torch.allclose(warped[1], images[1], atol=1e-6)
    assert torch.allclose(warped[0, :, :, :-1], images[0, :, :, 1:], atol=1e-5)


def toy_models():
    return toy.weights(torch.ones(2, 12)), toy.weights(mask_without_trigger())


def mask_without_trigger():
    mask = torch.ones(2, 12)
    mask[0, toy.SIGNAL_0] = 0.5
    return mask


def test_one_step_of_warp_ascent_is_the_signed_flow_gradient_within_the_pixel_budget():
    images, _ = toy.clean_images(n=8)
    reference, current = toy_models()
    learner = toy.learner(SAU(steps=1, warp_weight=1.0))
    pseudo = toy.logits(reference, images).argmax(-1)
    pixels = 0.8

    def objective(x):
        return shared_wrong_log_probability(toy.logits(current, x), toy.logits(reference, x), pseudo)

    flow = torch.zeros(8, 2, 4, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(objective(warp_by_flow(images, flow)), flow)
    expected = warp_by_flow(images, pixels * grad.sign())  # 2.5 · budget, clipped to the budget
    warped = shared_adversarial_warps(
        learner, {toy.NAME: current}, {toy.NAME: reference}, {"t": images}, {"t": pseudo}, pixels
    )["t"]
    assert torch.allclose(warped, expected, atol=1e-6)
    assert float(objective(warped)) > float(objective(images)) + 0.5  # up the shared objective
    # the budget binds: twice the pixels warps further than the budget allows
    wider = warp_by_flow(images, 2 * pixels * grad.sign())
    assert (wider - warped).abs().max() > 1e-2


def sau_gradient(mask, images, **options):
    learner = toy.learner(SAU(steps=1, mask_lr=0.01, attack_steps=1, **options))
    toy.set_mask(learner, mask)
    record = toy.Recorder()
    losses = learner.training_step(0, {"t": images}, learner.make_optimizers(), reduce=record)
    return record.grads[0], losses


def expected_warp_gradient(mask, images, warp_weight, pixels, keep=lambda shared: shared, labels=None):
    """The mask gradient of ``CE(f(x), ŷ) + w · CE(f(warp(x)), ŷ)`` over the shared warped images
    (adv_weight 0), recomputed with the toy's plain logits."""
    reference, current = toy.weights(torch.ones(2, 12)), toy.weights(mask)
    pseudo = toy.logits(reference, images).argmax(-1)
    learner = toy.learner(SAU(steps=1))
    warped = shared_adversarial_warps(
        learner, {toy.NAME: current}, {toy.NAME: reference}, {"t": images}, {"t": pseudo}, pixels
    )["t"]
    reference_predictions = toy.logits(reference, warped).argmax(-1)
    m = mask.clone().requires_grad_(True)
    clean, adversarial = toy.logits(toy.weights(m), images), toy.logits(toy.weights(m), warped)
    shared = keep((adversarial.argmax(-1) == reference_predictions) & (reference_predictions != pseudo))
    targets = pseudo if labels is None else labels(pseudo)
    unlearn = (F.cross_entropy(adversarial, targets, reduction="none") * shared).sum() / len(images)
    loss = F.cross_entropy(clean, pseudo) + warp_weight * unlearn
    return torch.autograd.grad(loss, m)[0], shared


def test_sau_unlearns_the_shared_adversarial_warps_toward_the_clean_labels():
    images, _ = toy.clean_images(n=8)
    mask, pixels = mask_without_trigger(), 1.0
    expected, shared = expected_warp_gradient(mask, images, 2.0, pixels)
    assert int(shared.sum()) > 0  # warps light the trigger: shared backdoor examples
    gradient, losses = sau_gradient(mask, images, adv_weight=0.0, warp_weight=2.0, warp_pixels=pixels)
    assert torch.allclose(gradient, expected, atol=1e-5), (gradient - expected).abs().max()
    assert losses["warp_unlearning_loss"] > 0
    # the toy tells the right term from a dropped one, a flipped sign and swapped labels
    for wrong in (
        expected_warp_gradient(mask, images, 0.0, pixels)[0],
        expected_warp_gradient(mask, images, -2.0, pixels)[0],
        expected_warp_gradient(mask, images, 2.0, pixels, labels=lambda y: 1 - y)[0],
        expected_warp_gradient(mask, images, 2.0, pixels, keep=lambda s: torch.ones_like(s))[0],
    ):
        assert (wrong - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options, message",
    [({"warp_pixels": 0.0}, "warp_pixels"), ({"warp_grid": 1}, "warp_grid"), ({"warp_weight": -1.0}, "warp_weight")],
)
def test_bad_warp_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        SAU(steps=1, **options).check()
