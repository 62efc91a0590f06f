"""SAU (safemerge/defenses/sau.py) step by step against an independent computation on the toy
of tests/defense_toys.py (non-zero base, a trigger pixel wired to class 0).

One SAU step is recomputed here as plain tensor code: the pseudo-labels of the frozen
pre-defence model, one signed-gradient step up the shared-wrong log-probability (ε-bounded),
the shared examples (both models predict the same wrong class), and the gradient of
``CE(clean) + adv_weight · CE(shared adversarial)`` with respect to the mask. The toy is built
so that some adversarial images are NOT shared (the attack fails on class-0 images), and so
that the frozen reference and the current masked model disagree once the mask has moved.
"""

import dataclasses

import defense_toys as toy
import pytest
import torch
import torch.nn.functional as F

from safemerge.defenses import SAU
from safemerge.merging.simulated_triggers import shared_adversarial_examples

EPS = 0.3


def shared_wrong_log_probability(ours, theirs, labels):
    """log Σ_{c≠y} p(c) p_ref(c), written out for two classes: the one wrong class."""
    p, q = ours.softmax(-1), theirs.softmax(-1)
    wrong = 1 - labels
    return (p.gather(1, wrong[:, None]) * q.gather(1, wrong[:, None])).squeeze(1).log().mean()


def expected_gradient(mask, images, adv_weight=1.0, keep=lambda shared: shared, reference_mask=None):
    """The mask gradient of one SAU step with one attack step. ``keep`` and ``reference_mask``
    let the test show that the toy tells the right selection and reference from the wrong ones."""
    reference = toy.weights(torch.ones_like(mask) if reference_mask is None else reference_mask)
    current = toy.weights(mask)
    pseudo = toy.logits(reference, images).argmax(-1)
    x = images.clone().requires_grad_(True)
    objective = shared_wrong_log_probability(toy.logits(current, x), toy.logits(reference, x), pseudo)
    (grad,) = torch.autograd.grad(objective, x)
    adversarial = (images + EPS * grad.sign()).clamp(0, 1)  # one step of 2.5 ε, clipped to the ε ball
    reference_predictions = toy.logits(reference, adversarial).argmax(-1)
    m = mask.clone().requires_grad_(True)
    clean_logits, adv_logits = toy.logits(toy.weights(m), images), toy.logits(toy.weights(m), adversarial)
    shared = keep((adv_logits.argmax(-1) == reference_predictions) & (reference_predictions != pseudo))
    loss = F.cross_entropy(clean_logits, pseudo) + adv_weight * (
        F.cross_entropy(adv_logits, pseudo, reduction="none") * shared
    ).sum() / len(images)
    return torch.autograd.grad(loss, m)[0], shared


def sau_gradient(mask, images, adv_weight=1.0):
    learner = toy.learner(SAU(steps=1, mask_lr=0.01, perturbation_eps=EPS, attack_steps=1, adv_weight=adv_weight))
    toy.set_mask(learner, mask)
    record = toy.Recorder()
    losses = learner.training_step(0, {"t": images}, learner.make_optimizers(), reduce=record)
    assert len(record.grads) == 1  # one update: the mask
    return record.grads[0], losses


def moved_mask():
    """A mask that has damped class 0's signal and bias but not the trigger: the current model
    is easier to fool on class-0 images than the frozen reference, which the adversary fools
    only on class-1 images (through the trigger). So class-0 adversarial examples fool the
    current model alone: not shared, unless the reference were the current model."""
    mask = torch.ones(2, 12)
    mask[0, toy.SIGNAL_0] = 0.3
    mask[0, toy.BIAS] = 0.5
    return mask


@pytest.mark.parametrize("mask", [torch.ones(2, 12), moved_mask()], ids=["first-step", "moved-mask"])
def test_one_sau_step_unlearns_only_the_shared_adversarial_examples_against_the_frozen_reference(mask):
    images, _ = toy.clean_images(n=8)
    expected, shared = expected_gradient(mask, images)
    # the toy separates the right selection from the wrong ones
    assert 0 < int(shared.sum()) < len(images), shared  # some adversarial images are not shared
    every_image, _ = expected_gradient(mask, images, keep=lambda s: torch.ones_like(s))
    assert (every_image - expected).abs().max() > 1e-3
    if not torch.equal(mask, torch.ones_like(mask)):  # the reference is frozen, not the current masked model
        moving_reference, _ = expected_gradient(mask, images, reference_mask=mask)
        assert (moving_reference - expected).abs().max() > 1e-3

    gradient, losses = sau_gradient(mask, images)
    assert torch.allclose(gradient, expected, atol=1e-5), (gradient - expected).abs().max()
    assert losses["shared_fraction"] == pytest.approx(float(shared.float().mean()))


def test_the_unlearning_term_is_weighted_by_adv_weight():
    images, _ = toy.clean_images(n=8)
    mask = moved_mask()
    for adv_weight in (0.0, 2.5):
        gradient, _ = sau_gradient(mask, images, adv_weight)
        assert torch.allclose(gradient, expected_gradient(mask, images, adv_weight)[0], atol=1e-5), adv_weight


@pytest.mark.parametrize("attack_steps", [1, 3])
def test_shared_adversarial_examples_climb_the_shared_objective_inside_the_eps_ball(attack_steps):
    """The examples are signed-gradient ascent on the shared-wrong log-probability of the
    masked model and the reference: higher than on the clean images, no pixel moved by more
    than ε, pixels in [0, 1]; with one step, exactly x + ε · sign(∇)."""
    images, _ = toy.clean_images(n=8)
    defense = SAU(steps=1, perturbation_eps=EPS, attack_steps=attack_steps)
    learner = toy.learner(defense)
    mask = moved_mask()
    reference, current = toy.weights(torch.ones(2, 12)), toy.weights(mask)
    pseudo = toy.logits(reference, images).argmax(-1)
    adversarial = shared_adversarial_examples(
        learner, {toy.NAME: current}, {toy.NAME: reference}, {"t": images}, {"t": pseudo}, EPS, attack_steps
    )["t"]
    assert float((adversarial - images).abs().max()) <= EPS + 1e-6
    assert float((adversarial - images).abs().max()) >= EPS - 1e-6  # it uses its budget
    assert adversarial.min() >= 0 and adversarial.max() <= 1

    def objective(x):
        return float(shared_wrong_log_probability(toy.logits(current, x), toy.logits(reference, x), pseudo))

    assert objective(adversarial) > objective(images) + 0.5
    if attack_steps == 1:
        x = images.clone().requires_grad_(True)
        shared_wrong_log_probability(toy.logits(current, x), toy.logits(reference, x), pseudo).backward()
        assert torch.allclose(adversarial, (images + EPS * x.grad.sign()).clamp(0, 1))


def test_sau_with_one_attack_step_the_shipped_setting_switches_off_the_backdoor_and_keeps_the_clean_weights():
    defense = SAU(steps=60, mask_lr=0.05, perturbation_eps=0.5, attack_steps=1)
    learner = toy.learner(defense)
    optimizers = learner.make_optimizers()
    for step in range(defense.steps):
        learner.training_step(step, {"t": toy.clean_images(seed=step)[0]}, optimizers)
    mask = toy.mask(learner).detach()
    assert mask[0, toy.TRIGGER] < 0.1 and mask[0, toy.SIGNAL_0] > 0.9 and mask[1, toy.SIGNAL_1] > 0.9, mask
    images, labels = toy.clean_images(seed=99)
    weight = learner.merged_weights()[toy.NAME]
    assert torch.equal(toy.logits(weight, images).argmax(-1), labels)
    assert (toy.logits(weight, toy.triggered(images)).argmax(-1)[labels == 1] == 1).all()


def test_the_inverted_patch_term_unlearns_the_patched_images_against_their_clean_labels():
    """With ``patch_weight``, the mask gradient is that of ``CE(clean) + w · CE(patch(x), ŷ)``
    (adv_weight 0 here), with the patch as its own step left it, written out by hand; the patch
    term changes the gradient (dropping it, flipping its sign or its labels fails)."""
    images, _ = toy.clean_images(n=8)
    defense = SAU(steps=1, perturbation_eps=EPS, attack_steps=1, adv_weight=0.0, patch_weight=2.0, patch_lr=0.5)
    learner = toy.learner(defense)
    record = toy.Recorder()
    learner.training_step(0, {"t": images}, learner.make_optimizers(), reduce=record)
    assert len(record.grads) == 3  # the patch's mask and pattern logits, then the defence mask

    patch = learner.defense_parts.patch
    area, pattern = torch.sigmoid(patch.mask_logits[0]).detach(), torch.sigmoid(patch.pattern_logits[0]).detach()
    assert not torch.allclose(area, torch.full_like(area, torch.sigmoid(torch.tensor(-3.0))))  # it took its step
    patched = (1 - area) * images + area * pattern
    pseudo = toy.logits(toy.weights(torch.ones(2, 12)), images).argmax(-1)
    m = torch.ones(2, 12, requires_grad=True)
    clean = F.cross_entropy(toy.logits(toy.weights(m), images), pseudo)
    unlearning = F.cross_entropy(toy.logits(toy.weights(m), patched), pseudo)
    (expected,) = torch.autograd.grad(clean + 2.0 * unlearning, m, retain_graph=True)
    (clean_only,) = torch.autograd.grad(clean, m)
    assert torch.allclose(record.grads[-1], expected, atol=1e-6)
    assert not torch.allclose(expected, clean_only, atol=1e-3)


def test_the_inverted_patch_is_a_part_only_when_its_term_is_on():
    assert not hasattr(toy.learner(SAU(steps=1)).defense_parts, "patch")
    assert "defense_patch" in toy.learner(SAU(steps=1, patch_weight=1.0)).optimizer_names()
    with pytest.raises(Exception, match="patch_weight must be >= 0"):
        SAU(steps=1, patch_weight=-1.0)


@pytest.mark.parametrize("attack_steps", [1, 3])
def test_l2_shared_adversarial_examples_step_along_the_normalised_gradient_inside_the_l2_ball(attack_steps):
    """``norm="l2"``: each image moves along its own normalised gradient of the shared
    objective (one step: exactly x + ε · ∇ / ‖∇‖, clamped to pixels), never beyond ε in ℓ2, and
    climbs the objective; it is not the ℓ∞ (signed) step."""
    images, _ = toy.clean_images(n=8)
    eps = 0.6
    learner = toy.learner(SAU(steps=1))
    reference, current = toy.weights(torch.ones(2, 12)), toy.weights(moved_mask())
    pseudo = toy.logits(reference, images).argmax(-1)
    adversarial = shared_adversarial_examples(
        learner, {toy.NAME: current}, {toy.NAME: reference}, {"t": images}, {"t": pseudo}, eps, attack_steps, "l2"
    )["t"]
    assert float((adversarial - images).flatten(1).norm(dim=1).max()) <= eps + 1e-5

    def objective(x):
        return shared_wrong_log_probability(toy.logits(current, x), toy.logits(reference, x), pseudo)

    assert float(objective(adversarial)) > float(objective(images)) + 0.5
    if attack_steps == 1:
        x = images.clone().requires_grad_(True)
        objective(x).backward()
        norms = x.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        assert torch.allclose(adversarial, (images + eps * x.grad / norms).clamp(0, 1), atol=1e-6)
        assert not torch.allclose(adversarial, (images + eps * x.grad.sign()).clamp(0, 1), atol=1e-3)


def expected_l2_gradient(mask, images, l2_weight, eps, keep=lambda shared: shared, labels=lambda y: y):
    """The mask gradient of ``CE(f(x), ŷ) + w · CE(f(x̃), ŷ)`` over the shared ℓ2 examples x̃
    (adv_weight 0: the ℓ∞ term off), recomputed with the toy's plain logits: one normalised
    gradient step of ε."""
    reference, current = toy.weights(torch.ones(2, 12)), toy.weights(mask)
    pseudo = toy.logits(reference, images).argmax(-1)
    x = images.clone().requires_grad_(True)
    objective = shared_wrong_log_probability(toy.logits(current, x), toy.logits(reference, x), pseudo)
    (grad,) = torch.autograd.grad(objective, x)
    examples = (images + eps * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    reference_predictions = toy.logits(reference, examples).argmax(-1)
    m = mask.clone().requires_grad_(True)
    clean, adversarial = toy.logits(toy.weights(m), images), toy.logits(toy.weights(m), examples)
    shared = keep((adversarial.argmax(-1) == reference_predictions) & (reference_predictions != pseudo))
    unlearn = (F.cross_entropy(adversarial, labels(pseudo), reduction="none") * shared).sum() / len(images)
    return torch.autograd.grad(F.cross_entropy(clean, pseudo) + l2_weight * unlearn, m)[0], shared


def test_the_l2_term_unlearns_the_shared_l2_examples_toward_the_clean_labels():
    images, _ = toy.clean_images(n=8)
    mask, eps = moved_mask(), 0.8
    expected, shared = expected_l2_gradient(mask, images, 2.0, eps)
    assert 0 < int(shared.sum()) < len(images), shared
    learner = toy.learner(SAU(steps=1, mask_lr=0.01, attack_steps=1, adv_weight=0.0, l2_weight=2.0, l2_eps=eps))
    toy.set_mask(learner, mask)
    record = toy.Recorder()
    losses = learner.training_step(0, {"t": images}, learner.make_optimizers(), reduce=record)
    assert torch.allclose(record.grads[0], expected, atol=1e-5), (record.grads[0] - expected).abs().max()
    assert losses["l2_unlearning_loss"] > 0
    # the toy tells the right term from a dropped one, a flipped sign, swapped labels, every image
    for wrong in (
        expected_l2_gradient(mask, images, 0.0, eps)[0],
        expected_l2_gradient(mask, images, -2.0, eps)[0],
        expected_l2_gradient(mask, images, 2.0, eps, labels=lambda y: 1 - y)[0],
        expected_l2_gradient(mask, images, 2.0, eps, keep=lambda s: torch.ones_like(s))[0],
    ):
        assert (wrong - expected).abs().max() > 1e-3


def test_alternate_takes_the_linf_examples_on_even_steps_and_the_l2_examples_on_odd_ones():
    images, _ = toy.clean_images(n=8)
    mask, eps = moved_mask(), 0.8
    linf, _ = expected_gradient(mask, images, adv_weight=1.0)
    l2, _ = expected_l2_gradient(mask, images, 2.0, eps)
    both = linf + l2 - expected_gradient(mask, images, adv_weight=0.0)[0]  # the clean term once
    assert (linf - l2).abs().max() > 1e-3 and (both - linf).abs().max() > 1e-3 and (both - l2).abs().max() > 1e-3
    defense = SAU(steps=2, mask_lr=0.01, perturbation_eps=EPS, attack_steps=1, l2_weight=2.0, l2_eps=eps)
    for alternate, expected in ((True, (linf, l2)), (False, (both, both))):
        learner = toy.learner(dataclasses.replace(defense, alternate=alternate))
        optimizers, record = learner.make_optimizers(), toy.Recorder()
        for step in range(2):
            toy.set_mask(learner, mask)  # each step from the same mask, so each has its own expected gradient
            learner.training_step(step, {"t": images}, optimizers, reduce=record)
        for got, want in zip(record.grads, expected):
            assert torch.allclose(got, want, atol=1e-5), (alternate, (got - want).abs().max())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"l2_eps": 0.0}, "l2 radius"),
        ({"perturbation_eps": 2.0}, "budget on pixels"),
        ({"l2_weight": -1.0}, "l2_weight must be >= 0"),
        ({"alternate": True}, "alternate takes turns"),
    ],
)
def test_bad_perturbation_budgets_are_one_line_errors(options, message):
    from safemerge.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        SAU(steps=1, **options).check()
