"""Every defence masks the merged update Δ = merged − base, not the merged weights: on a toy
whose base tower is not zero (tests/defense_toys.py), the defended weights are θ_0 + m ⊙ Δ
with θ_0 the base, and a mask of zero gives back the base."""

import defense_toys as toy
import pytest
import torch

from safemerge.defenses import AWM, SAU

DEFENSES = {"awm": lambda: AWM(steps=3, mask_lr=0.05, perturbation_eps=0.25), "sau": lambda: SAU(steps=3, mask_lr=0.05)}


@pytest.mark.parametrize("make", DEFENSES.values(), ids=DEFENSES.keys())
def test_a_defence_masks_the_merged_update_over_a_non_zero_base(make):
    learner = toy.learner(make())
    assert torch.allclose(learner.merged_weights()[toy.NAME], toy.base_weight() + toy.update())  # the method's merge
    optimizers = learner.make_optimizers()
    for step in range(3):
        learner.training_step(step, {"t": toy.clean_images(seed=step)[0]}, optimizers)
    masked = learner.defense_parts.masked_update
    assert torch.allclose(masked.update(0), toy.update(), atol=1e-6)  # Δ = merged − base
    mask = toy.mask(learner).detach()
    assert not torch.equal(mask, torch.ones_like(mask))  # the mask moved
    assert torch.allclose(learner.merged_weights()[toy.NAME], toy.weights(mask), atol=1e-6)  # θ_0 + m ⊙ Δ
    toy.set_mask(learner, torch.zeros_like(mask))
    assert torch.allclose(learner.merged_weights()[toy.NAME], toy.base_weight(), atol=1e-6)  # nothing kept: the base
