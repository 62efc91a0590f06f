"""AWM's mask step on the toy of tests/defense_toys.py: its L1 term ``sparsity_weight · mean|1 − m|``
is in the gradient the mask is stepped with (the clean and perturbed terms are SAU's and DAM's
business elsewhere; here only what the sparsity term adds is pinned)."""

import defense_toys as toy
import pytest
import torch

from safemerge.defenses import AWM


def mask_gradient(sparsity_weight: float, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    learner = toy.learner(AWM(steps=1, perturbation_eps=0.25, sparsity_weight=sparsity_weight))
    toy.set_mask(learner, mask)
    record = toy.Recorder()
    learner.training_step(0, {"t": images}, learner.make_optimizers(), reduce=record)
    return record.grads[-1]  # the perturbation's gradient first, then the mask's


@pytest.mark.parametrize("sparsity_weight", [0.5, 3.0])
def test_the_sparsity_term_pulls_every_mask_entry_back_to_one_by_its_weight_over_the_mask_size(sparsity_weight):
    images, _ = toy.clean_images(n=8)
    mask = 0.2 + 0.6 * torch.rand(2, 12, generator=torch.Generator().manual_seed(0))  # inside (0, 1): |1 − m| is smooth
    without = mask_gradient(0.0, mask, images)
    added = mask_gradient(sparsity_weight, mask, images) - without
    # d/dm of w · mean|1 − m| = −w / N for every entry below 1
    assert torch.allclose(added, torch.full_like(mask, -sparsity_weight / mask.numel()), atol=1e-6), added


def test_with_a_large_sparsity_weight_awm_keeps_the_update_it_would_otherwise_mask():
    """Ten AWM steps on the backdoored toy: without the L1 term the trigger weight is switched
    off; with a sparsity weight that dominates, every mask entry stays at 1."""

    def trained_mask(sparsity_weight):
        learner = toy.learner(
            AWM(steps=10, mask_lr=0.05, perturbation_eps=0.25, perturbation_lr=0.1, sparsity_weight=sparsity_weight)
        )
        optimizers = learner.make_optimizers()
        for step in range(10):
            learner.training_step(step, {"t": toy.clean_images(seed=step)[0]}, optimizers)
        return toy.mask(learner).detach()

    assert trained_mask(0.0)[0, toy.TRIGGER] < 0.9
    assert torch.equal(trained_mask(1e4), torch.ones(2, 12))
