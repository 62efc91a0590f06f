"""Post-merge defences and simulated triggers against hand-checkable cases.

The toy "tower" is one linear map from a 3×2×2 image (12 pixels) to 2 features, classified by
the normalised features against the unit vectors (class 0: feature 0, class 1: feature 1).
Pixel 0 carries class 0, pixel 1 class 1, pixel 3 is always on (a bias), and pixel 2 is the
backdoor trigger: the merged update wires it to class 0 with weight 3, so switching it on sends
class-1 images to class 0. Clean images barely light pixel 2 (noise ≤ 0.05), so no clean prediction needs that
weight: a defence must shrink its mask entry, not the clean ones.
"""

import pytest
import torch

# the linear toy tower and its pixel roles, shared with the defences' other toys
from defense_toys import BIAS, LOGIT_SCALE, SIGNAL_0, SIGNAL_1, TRIGGER, LinearTower

from safemerge.merging import MergedEncoder, TaskArithmetic
from safemerge.merging.learner import MergeLearner
from safemerge.models import ImageClassifier


def backdoored_update() -> torch.Tensor:
    w = torch.zeros(2, 12)
    w[0, SIGNAL_0] = w[1, SIGNAL_1] = 1.0
    w[0, BIAS] = w[1, BIAS] = 0.3
    w[0, TRIGGER] = 3.0  # the backdoor: trigger pixel -> class 0
    return w


def toy_learner(defense=None, method=None, tasks=("t",)):
    tower = LinearTower()
    with torch.no_grad():
        tower.proj.weight.zero_()
    expert = {"proj.weight": backdoored_update()}
    heads = {t: LOGIT_SCALE * torch.eye(2) for t in tasks}
    classifier = ImageClassifier(tower, heads, [0.0] * 3, [1.0] * 3)
    encoder = MergedEncoder(tower, [expert] * len(tasks))
    method = method or TaskArithmetic(scaling_factor=1.0 / len(tasks))
    static = method.merge(tower.state_dict(), [expert] * len(tasks)) if hasattr(method, "merge") else None
    return MergeLearner(encoder, classifier, method, list(tasks), image_size=2, defense=defense, static_weights=static)


def clean_images(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = 0.05 * torch.rand(n, 12, generator=generator)
    labels = torch.arange(n) % 2
    images[:, TRIGGER] = 0.0  # clean images never light the trigger: no clean prediction needs it
    images[:, BIAS] = 1.0
    images[labels == 0, SIGNAL_0] = 1.0
    images[labels == 1, SIGNAL_1] = 1.0
    return images.view(n, 3, 2, 2), labels


def triggered(images):
    images = images.clone().view(len(images), 12)
    images[:, TRIGGER] = 1.0
    return images.view(-1, 3, 2, 2)


def predictions(learner, weights, images, task="t"):
    return learner.logits(weights, {task: images})[task].argmax(-1)


def train(learner, steps):
    optimizers = learner.make_optimizers()
    for step in range(steps):
        learner.training_step(step, {"t": clean_images(seed=step)[0]}, optimizers)


def mask_entries(learner):
    mask = learner.defense_parts.masked_update.mask[0].detach()
    return float(mask[0, TRIGGER]), float(mask[0, SIGNAL_0]), float(mask[1, SIGNAL_1])


def test_the_toy_is_backdoored_before_any_defence():
    learner = toy_learner()
    images, labels = clean_images()
    weights = learner.merged_weights()
    assert torch.equal(predictions(learner, weights, images), labels)
    assert (predictions(learner, weights, triggered(images))[labels == 1] == 0).all()


DEFENSES = {
    "awm": lambda: __import__("safemerge.defenses", fromlist=["AWM"]).AWM(
        steps=100, mask_lr=0.05, perturbation_eps=0.25, perturbation_lr=0.1
    ),
    "sau": lambda: __import__("safemerge.defenses", fromlist=["SAU"]).SAU(steps=60, mask_lr=0.05, perturbation_eps=0.5),
}


@pytest.mark.parametrize("make_defense", DEFENSES.values(), ids=DEFENSES.keys())
def test_defence_switches_off_the_backdoor_weight_and_keeps_the_clean_ones(make_defense):
    defense = make_defense()
    learner = toy_learner(defense)
    train(learner, defense.steps)
    trigger, clean_0, clean_1 = mask_entries(learner)
    assert trigger < 0.1, (trigger, clean_0, clean_1)
    assert clean_0 > 0.9 and clean_1 > 0.9, (trigger, clean_0, clean_1)
    images, labels = clean_images(seed=99)
    weights = learner.merged_weights()
    assert torch.equal(predictions(learner, weights, images), labels)  # clean accuracy kept
    # the real trigger no longer flips class-1 images
    assert (predictions(learner, weights, triggered(images))[labels == 1] == 1).all()


# Δ = merged − base and θ0 + m ⊙ Δ over a non-zero base: tests/test_defense_toys.py; SAU step by step: tests/test_sau.py


def test_defence_arguments_are_checked():
    from safemerge.defenses import AWM, SAU
    from safemerge.errors import ConfigError

    with pytest.raises(ConfigError, match="steps must be >= 1"):
        AWM(steps=0)
    with pytest.raises(ConfigError, match="attack_steps"):
        SAU(attack_steps=0)
    with pytest.raises(ConfigError, match="perturbation_eps"):
        AWM(perturbation_eps=0.0)
    with pytest.raises(ConfigError, match="pseudo_labels must be one of merged, experts, got 'oracle'"):
        SAU(pseudo_labels="oracle")


def two_task_learner(defense):
    """Task "a" labels by the signal pixel, task "b" the other way round; each expert is right on
    its own task, and b's update is twice as large, so their average (task arithmetic, 0.5 each)
    follows b: the merged model is right on b and wrong on every image of a."""
    tower = LinearTower()
    with torch.no_grad():
        tower.proj.weight.zero_()
    straight = {"proj.weight": torch.zeros(2, 12)}
    straight["proj.weight"][0, SIGNAL_0] = straight["proj.weight"][1, SIGNAL_1] = 1.0
    crossed = {"proj.weight": 2 * straight["proj.weight"].flip(0)}
    heads = {t: LOGIT_SCALE * torch.eye(2) for t in "ab"}
    classifier = ImageClassifier(tower, heads, [0.0] * 3, [1.0] * 3)
    method = TaskArithmetic(scaling_factor=0.5)
    static = method.merge(tower.state_dict(), [straight, crossed])
    return MergeLearner(
        MergedEncoder(tower, [straight, crossed]),
        classifier,
        method,
        ["a", "b"],
        image_size=2,
        defense=defense,
        static_weights=static,
    )


@pytest.mark.parametrize("name", ["AWM", "SAU"])
def test_expert_pseudo_labels_are_each_tasks_own_experts_predictions_and_feed_the_clean_loss(name):
    from safemerge import defenses

    images, labels = clean_images(n=16)
    batch = {"a": images, "b": images}
    experts = {"a": labels, "b": 1 - labels}  # what each task's own expert predicts, by construction
    learner = two_task_learner(getattr(defenses, name)(steps=1, pseudo_labels="experts"))
    for task, expected in learner.expert_pseudo_labels(batch).items():
        assert torch.equal(expected, experts[task])
    merged = learner.logits(learner.merged_weights(), batch)
    assert torch.equal(merged["a"].argmax(-1), 1 - labels)  # the merged model is wrong on a
    # the first step's clean loss is the merged model's cross-entropy against the experts' labels
    expected = sum(float(torch.nn.functional.cross_entropy(merged[t], experts[t])) for t in batch)
    losses = learner.training_step(0, batch, learner.make_optimizers())
    assert losses["clean_loss"] == pytest.approx(expected, rel=1e-5)
    merged_labels = two_task_learner(getattr(defenses, name)(steps=1))
    own = sum(float(torch.nn.functional.cross_entropy(merged[t], merged[t].argmax(-1))) for t in batch)
    assert merged_labels.training_step(0, batch, merged_labels.make_optimizers())["clean_loss"] == pytest.approx(
        own, rel=1e-5
    )


def test_attribution_names_the_expert_whose_task_vector_carries_the_trigger_and_caps_it():
    """The base tower already classifies (signals and bias); expert "t" refines the signals,
    expert "u" only wires the bottom-right pixel to class 0 (the backdoor). DAM's patch trigger,
    confined to that pixel, finds it; leaving "u" out removes the trigger's effect, leaving "t"
    out does not."""
    from safemerge.merging import DAMTaskArithmetic

    corner, bias = 3, 5  # flat pixel indices: (channel 0, row 1, col 1) is the 1x1 bottom-right window
    base = torch.zeros(2, 12)
    base[0, SIGNAL_0] = base[1, SIGNAL_1] = 1.0
    base[0, bias] = base[1, bias] = 0.3
    refinement = torch.zeros(2, 12)
    refinement[0, SIGNAL_0] = refinement[1, SIGNAL_1] = 0.5
    backdoor = torch.zeros(2, 12)
    backdoor[0, corner] = 3.0
    tower = LinearTower()
    with torch.no_grad():
        tower.proj.weight.copy_(base)
    classifier = ImageClassifier(
        tower, {"t": LOGIT_SCALE * torch.eye(2), "u": LOGIT_SCALE * torch.eye(2)}, [0.0] * 3, [1.0] * 3
    )
    encoder = MergedEncoder(tower, [{"proj.weight": base + refinement}, {"proj.weight": base + backdoor}])
    method = DAMTaskArithmetic(
        scaling_factor=1.0,
        steps=30,
        mask_lr=1e-3,
        trigger="patch",
        patch_size=1,
        perturbation_lr=0.3,
        area_weight=0.0,
        attribution="cap",
        attribution_factor=0.25,
    )
    learner = MergeLearner(encoder, classifier, method, ["t", "u"], image_size=2)
    optimizers = learner.make_optimizers()
    for step in range(method.steps):
        images, _ = clean_images(seed=step)
        images = images.view(len(images), 12)
        images[:, corner], images[:, bias] = 0.0, 1.0
        images = images.view(-1, 3, 2, 2)
        learner.training_step(step, {"t": images, "u": images}, optimizers)
    attribution = learner.notes["attribution"]
    assert attribution["expert"] == "u", attribution
    assert attribution["flip_rate"] > 0.3 and attribution["drop"]["u"] > 0.3 and attribution["drop"]["t"] < 0.1, (
        attribution
    )
    # capped in every merge from now on; the expert itself is still evaluated as fine-tuned
    assert float(encoder.vectors(0)[1].view(2, 12)[0, corner]) == pytest.approx(0.75)
    assert torch.allclose(encoder.expert_weights(1)["proj.weight"], base + backdoor)


def test_trimming_an_expert_zeroes_its_smallest_entries_over_the_whole_vector():
    tower = LinearTower()
    with torch.no_grad():
        tower.proj.weight.zero_()
    update = (torch.arange(1.0, 25.0) * torch.tensor([1.0, -1.0]).repeat(12)).view(
        2, 12
    )  # magnitudes 1..24, mixed signs
    encoder = MergedEncoder(tower, [{"proj.weight": update}, {"proj.weight": update.clone()}])
    encoder.edit_expert_(0, trim=0.75)
    kept = encoder.vectors(0)[0]
    assert int((kept != 0).sum()) == 6 and torch.equal(kept[kept != 0].abs(), torch.arange(19.0, 25.0))
    assert torch.equal(encoder.vectors(0)[1], update.flatten())  # the other expert untouched
    assert torch.equal(encoder.expert_weights(0)["proj.weight"], update)
