"""Merging by expert labels: λ trained by cross-entropy against each task's own expert's
predictions, pinned against the formula written out by hand."""

import pytest
import torch
import torch.nn.functional as F
from test_merging import ImageTower as Tower

from safemerge.errors import ConfigError
from safemerge.merging import ExpertLabelMerging, MergedEncoder, expert_label_loss
from safemerge.merging.learner import MergeLearner
from safemerge.models import ImageClassifier

TASKS = {"x": 3, "y": 5}


def _pool():
    torch.manual_seed(0)
    tower = Tower()
    generator = torch.Generator().manual_seed(1)
    base = {k: v.clone() for k, v in tower.state_dict().items()}
    experts = [{k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in base.items()} for _ in TASKS]
    heads = {t: F.normalize(torch.randn(c, 6, generator=generator), dim=-1) * 20 for t, c in TASKS.items()}
    return tower, base, experts, heads


def _learner(method):
    tower, _, experts, heads = _pool()
    classifier = ImageClassifier(tower, heads, [0.5] * 3, [0.25] * 3)
    return MergeLearner(MergedEncoder(tower, experts), classifier, method, list(TASKS), image_size=4)


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {t: torch.rand(12, 3, 4, 4, generator=generator) for t in TASKS}


def _plain_logits(weights, head, images):
    """The tower and the classifier written out: normalised features against the head."""
    x = ((images - 0.5) / 0.25).flatten(1)
    h = torch.tanh(x @ weights["proj.weight"].T + weights["proj.bias"])
    features = F.normalize(h @ weights["out.weight"].T + weights["out.bias"], dim=-1)
    return features @ head.T


def test_expert_label_loss_is_the_cross_entropy_against_the_confident_experts_argmax():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 3.0]])
    expert = torch.tensor([[0.0, 4.0, 0.0], [0.1, 0.0, 0.2], [0.0, 0.0, 5.0]])  # labels 1, 2, 2
    log_p = logits.log_softmax(-1)
    every = -(log_p[0, 1] + log_p[1, 2] + log_p[2, 2]) / 3
    assert torch.isclose(expert_label_loss(logits, expert), every)
    # image 1's expert is unsure (max probability ~0.37): the filter drops it
    confident = -(log_p[0, 1] + log_p[2, 2]) / 2
    assert torch.isclose(expert_label_loss(logits, expert, confidence=0.5), confident)
    assert float(expert_label_loss(logits, expert, confidence=0.999)) == 0.0  # nothing kept: no signal


def test_one_step_moves_every_coefficient_down_the_expert_label_cross_entropy():
    """Adam's first step moves each λ by −lr·sign(g); g recomputed here from the plain formula
    ``CE(f(θ_0 + Σ_i λ_i τ_i), argmax f(θ_0 + τ_t))`` for each task t (labels swapped to the
    other task's expert, or the sign flipped, fails)."""
    method = ExpertLabelMerging(granularity="layer", scaling_factor=0.3, steps=1, lr=1e-2)
    learner = _learner(method)
    _, base, experts, heads = _pool()
    batch = _batch()
    names = list(base)

    lam = torch.full((len(experts), len(names)), 0.3, requires_grad=True)
    merged = {
        n: base[n] + sum(lam[i, j] * (experts[i][n] - base[n]) for i in range(len(experts)))
        for j, n in enumerate(names)
    }
    loss = 0.0
    for index, (task, images) in enumerate(batch.items()):
        labels = _plain_logits(experts[index], heads[task], images).argmax(-1)
        loss = loss + F.cross_entropy(_plain_logits(merged, heads[task], images), labels)
    (grad,) = torch.autograd.grad(loss, lam)
    assert (grad.abs() > 1e-6).all()

    before = learner.coefficients.detach().clone()
    learner.training_step(0, batch, learner.make_optimizers())
    moved = learner.coefficients.detach() - before
    assert torch.allclose(moved, -1e-2 * grad.sign(), atol=1e-5)


def test_the_labels_are_the_experts_not_the_merges_own():
    """The merge's own predictions as labels give the entropy-like self-training signal; the
    expert labels differ on these images, so the losses differ."""
    learner = _learner(ExpertLabelMerging(steps=1))
    batch = _batch()
    merged = learner.logits(learner.encoder.weights(learner.coefficients, None), batch)
    experts = learner.expert_logits(batch)
    assert any((experts[t].argmax(-1) != merged[t].argmax(-1)).any() for t in batch)
    ours = {t: expert_label_loss(merged[t], experts[t]) for t in batch}
    self_labels = {t: expert_label_loss(merged[t], merged[t]) for t in batch}
    assert sum(ours.values()) > sum(self_labels.values())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"granularity": "tensor"}, "granularity must be task or layer"),
        ({"confidence": 1.0}, "confidence is a softmax probability"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        ExpertLabelMerging(**options)


def test_expert_logits_are_each_experts_own_and_each_image_goes_through_its_expert_once(monkeypatch):
    learner = _learner(ExpertLabelMerging(steps=1))
    _, base, experts, heads = _pool()
    batch = _batch()
    calls = []
    expert_weights = learner.encoder.expert_weights
    monkeypatch.setattr(learner.encoder, "expert_weights", lambda i: calls.append(i) or expert_weights(i))

    first = learner.expert_logits(batch)
    for index, (task, images) in enumerate(batch.items()):
        assert torch.allclose(first[task], _plain_logits(experts[index], heads[task], images), atol=1e-5)
    assert sorted(calls) == [0, 1]
    # the same images in another order, with 4 new ones: only the new ones are computed
    new = _batch(seed=5)
    mixed = {t: torch.cat([x.flip(0), new[t][:4]]) for t, x in batch.items()}
    counted = []
    logits = learner.logits
    monkeypatch.setattr(learner, "logits", lambda w, b: counted.append(sum(len(x) for x in b.values())) or logits(w, b))
    second = learner.expert_logits(mixed)
    assert counted == [4, 4]
    for index, (task, images) in enumerate(mixed.items()):
        assert torch.allclose(second[task], _plain_logits(experts[index], heads[task], images), atol=1e-5)
