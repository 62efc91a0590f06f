"""DAM's variants (issue 17): the expert-label performance term, the expert label as the safety
term's clean label, and SAU's shared adversarial examples as the simulated trigger — each step
pinned against a hand computation of its gradient on the toy learner of test_merging.py, and
checked to differ from what the step would do with the other labels or without the term."""

import pytest
import torch
import torch.nn.functional as F

from safemerge.merging import DAMAdaMerging, DAMTaskArithmetic, entropy
from safemerge.merging.masks import product
from tests.test_merging import _batch, _learner


def _randomise_masks(learner):
    """Distinct, non-zero mask logits, so the gradients of different losses differ."""
    with torch.no_grad():
        for mask in learner.method.concrete_masks(learner):
            for logits in mask.logits:
                logits.copy_(0.3 * torch.randn(logits.shape))


def _sgd(learner, name, parts):
    """Plain SGD with lr 1 in place of an Adam optimizer, so a step moves by minus the gradient."""
    optimizers = learner.make_optimizers()
    optimizers[name] = torch.optim.SGD([p for part in parts for p in part.parameters()], lr=1.0)
    return optimizers


def _samples(learner, logits_per_mask, step=0):
    """The masks' relaxed samples of ``step`` from the given logits (the concrete formula, by hand)."""
    generator = learner.generator(step)
    samples = []
    for logits in logits_per_mask:
        mask = []
        for l in logits:
            u = torch.rand(l.shape, generator=generator).logit(1e-6)
            mask.append(torch.sigmoid((l + u) / learner.method.temperature))
        samples.append(mask)
    return samples


def _expert_labels_by_hand(learner, batch):
    """Task i's images labelled by θ_0 + 1·τ_i (the merge with a one-hot λ), not by expert_weights."""
    labels = {}
    for i, (task, images) in enumerate(batch.items()):
        one_hot = torch.zeros(learner.encoder.num_experts)
        one_hot[i] = 1.0
        with torch.no_grad():
            labels[task] = learner.logits(learner.encoder.weights(one_hot), {task: images})[task].argmax(-1)
    return labels


def _differ(a, b):
    return not all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


def test_expert_labels_differ_from_the_merged_models_on_the_toy():
    # the precondition of every swap below: otherwise "the other labels" would be the same labels
    learner = _learner(DAMTaskArithmetic(steps=1))
    batch = _batch(0)
    merged = learner.pseudo_labels(learner.encoder.weights(learner.coefficients), batch)
    experts = _expert_labels_by_hand(learner, batch)
    assert any((merged[t] != experts[t]).any() for t in batch)
    assert all(torch.equal(a, b) for a, b in zip(learner.expert_pseudo_labels(batch).values(), experts.values()))


def test_the_mask_step_descends_the_cross_entropy_against_the_expert_labels():
    method = DAMTaskArithmetic(steps=1, performance_loss="expert_labels", adv_weight=0.0, perturbation_lr=0.05)
    learner = _learner(method)
    _randomise_masks(learner)
    before = [p.detach().clone() for p in learner.mask.logits]
    batch = _batch(0)
    learner.training_step(0, batch, _sgd(learner, "mask", [learner.mask]))
    moved = [b - p.detach() for b, p in zip(before, learner.mask.logits)]

    logits = [b.clone().requires_grad_() for b in before]
    weights = learner.encoder.weights(learner.coefficients.detach(), _samples(learner, [logits])[0], rescale=True)
    clean = learner.logits(weights, batch)
    experts = _expert_labels_by_hand(learner, batch)
    expected = torch.autograd.grad(sum(F.cross_entropy(clean[t], experts[t]) for t in batch), logits, retain_graph=True)
    for got, want in zip(moved, expected):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    merged = {t: l.argmax(-1).detach() for t, l in clean.items()}  # the merged model's own labels instead
    assert _differ(moved, torch.autograd.grad(sum(F.cross_entropy(clean[t], merged[t]) for t in batch), logits))


def test_the_inner_and_the_adamerging_steps_descend_the_cross_entropy_against_the_expert_labels():
    method = DAMAdaMerging(
        granularity="task", steps=1, adamerging_steps=1, performance_loss="expert_labels", adv_weight=0.0
    )
    learner = _learner(method)
    _randomise_masks(learner)
    initial = learner.initial_coefficients.clone()
    optimizers = learner.make_optimizers()
    for name in ("inner", "coefficients"):
        optimizers[name] = torch.optim.SGD([learner.coefficients], lr=1.0)
    batch = _batch(0)
    experts = _expert_labels_by_hand(learner, batch)

    def expert_ce_gradient(mask, rescale):
        lam = initial.clone().requires_grad_()
        logits = learner.logits(learner.encoder.weights(lam, mask, rescale=rescale), batch)
        ce = torch.autograd.grad(sum(F.cross_entropy(logits[t], experts[t]) for t in batch), lam, retain_graph=True)
        return ce[0], torch.autograd.grad(sum(entropy(l) for l in logits.values()), lam)[0]

    # the inner step: from λ reset to its initial value, with the step's mask sample detached
    sample = [s.detach() for s in product(*_samples(learner, [[p.detach() for p in learner.mask.logits]]))]
    ce, ent = expert_ce_gradient(sample, rescale=True)
    learner.training_step(0, batch, optimizers)
    inner_moved = initial - learner.coefficients.detach()
    assert torch.allclose(inner_moved, ce, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(inner_moved, ent, atol=1e-6)  # entropy's step would be another one

    # the AdaMerging stage: from λ reset again, with the final (fixed) mask
    ce, ent = expert_ce_gradient([m.detach() for m in method.fixed_mask(learner)], rescale=False)
    learner.training_step(1, batch, optimizers)
    stage_moved = initial - learner.coefficients.detach()
    assert torch.allclose(stage_moved, ce, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(stage_moved, ent, atol=1e-6)


def test_the_consistency_term_keeps_the_expert_label_under_the_trigger():
    """Dual masks: m2 moves by −α ∂CE(f(x + δ), expert label)/∂m2 — not the merged model's label."""
    method = DAMTaskArithmetic(
        steps=1,
        masks="dual",
        performance_loss="expert_labels",
        safety_loss="consistency",
        adv_weight=0.5,
        perturbation_lr=0.05,
        perturbation_eps=0.3,
    )
    learner = _learner(method)
    _randomise_masks(learner)
    before = [[p.detach().clone() for p in m.logits] for m in (learner.mask, learner.safety_mask)]
    batch = _batch(0)
    learner.training_step(0, batch, _sgd(learner, "mask", [learner.mask, learner.safety_mask]))
    moved = [b - p.detach() for b, p in zip(before[1], learner.safety_mask.logits)]

    logits1, logits2 = ([b.clone().requires_grad_() for b in bs] for bs in before)
    weights = learner.encoder.weights(
        learner.coefficients.detach(), product(*_samples(learner, [logits1, logits2])), rescale=True
    )
    clean = learner.logits(weights, batch)
    triggered = learner.logits(weights, {t: learner.perturbation.apply(x, t).detach() for t, x in batch.items()})
    experts = _expert_labels_by_hand(learner, batch)

    def safety_gradient(labels):
        safety = sum(F.cross_entropy(triggered[t], labels[t]) for t in batch)
        return torch.autograd.grad(method.adv_weight * safety, logits2, retain_graph=True)

    assert any(m.abs().max() > 1e-6 for m in moved)  # the safety term is there
    for got, want in zip(moved, safety_gradient(experts)):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert _differ(moved, safety_gradient({t: l.argmax(-1).detach() for t, l in clean.items()}))


def _shared_by_hand(learner, current, reference, batch, labels, eps):
    """One signed step up log Σ_{c≠y} p(c) p_ref(c), the step 2.5 ε clipped to ε, then [0, 1]."""
    images = {t: x.clone().requires_grad_() for t, x in batch.items()}
    ours, theirs = learner.logits(current, images), learner.logits(reference, images)
    objective = 0.0
    for task in batch:
        joint = F.softmax(ours[task], -1) * F.softmax(theirs[task], -1)
        objective = objective + joint.scatter(-1, labels[task][:, None], 0.0).sum(-1).log().mean()
    grads = torch.autograd.grad(objective, list(images.values()))
    return {t: (x + (2.5 * eps * g.sign()).clamp(-eps, eps)).clamp(0, 1) for (t, x), g in zip(batch.items(), grads)}


def test_the_shared_trigger_unlearns_only_the_examples_both_merges_get_wrong_alike():
    eps = 0.3
    method = DAMTaskArithmetic(
        steps=1, masks="dual", trigger="shared", safety_loss="consistency", adv_weight=0.5, perturbation_eps=eps
    )
    learner = _learner(method)
    _randomise_masks(learner)
    assert "perturbation" not in learner.part_names  # nothing to learn: the examples are made per step
    before = [[p.detach().clone() for p in m.logits] for m in (learner.mask, learner.safety_mask)]
    batch = _batch(0)
    logs = learner.training_step(0, batch, _sgd(learner, "mask", [learner.mask, learner.safety_mask]))
    moved = [b - p.detach() for b, p in zip(before[1], learner.safety_mask.logits)]

    logits1, logits2 = ([b.clone().requires_grad_() for b in bs] for bs in before)
    lam = learner.coefficients.detach()
    weights = learner.encoder.weights(lam, product(*_samples(learner, [logits1, logits2])), rescale=True)
    current = {k: v.detach() for k, v in weights.items()}
    labels = learner.pseudo_labels(current, batch)
    reference = learner.encoder.weights(lam)  # the merge without the mask
    adversarial = _shared_by_hand(learner, current, reference, batch, labels, eps)
    on_reference = learner.pseudo_labels(reference, adversarial)
    triggered = learner.logits(weights, adversarial)
    shared = {t: (l.argmax(-1) == on_reference[t]) & (on_reference[t] != labels[t]) for t, l in triggered.items()}
    count = sum(int(s.sum()) for s in shared.values())
    assert 0 < count < sum(len(x) for x in batch.values())  # some shared, some not: the toy tells them apart
    assert logs["shared_fraction"] == pytest.approx(count / sum(len(x) for x in batch.values()))

    def safety_gradient(keep):
        safety = sum(
            (F.cross_entropy(triggered[t], labels[t], reduction="none") * keep[t]).sum() / len(triggered[t])
            for t in batch
        )
        return torch.autograd.grad(method.adv_weight * safety, logits2, retain_graph=True)

    for got, want in zip(moved, safety_gradient(shared)):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert _differ(moved, safety_gradient({t: torch.ones_like(s) for t, s in shared.items()}))  # all counted


def test_the_shared_trigger_attributes_the_flips_by_leaving_each_expert_out():
    method = DAMTaskArithmetic(steps=1, trigger="shared", safety_loss="consistency", perturbation_eps=0.3)
    learner = _learner(method)
    batch = _batch(0)
    learner.training_step(0, batch, learner.make_optimizers())
    attribution = learner.notes["attribution"]

    lam = learner.coefficients.detach()
    mask = [m.detach() for m in method.fixed_mask(learner)]
    full = learner.encoder.weights(lam, mask)
    adversarial = _shared_by_hand(
        learner, full, learner.encoder.weights(lam), batch, learner.pseudo_labels(full, batch), 0.3
    )

    def flips(coefficients):
        weights = learner.encoder.weights(coefficients, mask)
        clean, triggered = learner.pseudo_labels(weights, batch), learner.pseudo_labels(weights, adversarial)
        return sum(int((clean[t] != triggered[t]).sum()) for t in batch) / sum(len(x) for x in batch.values())

    assert attribution["flip_rate"] == pytest.approx(flips(lam)) and attribution["flip_rate"] > 0
    for i, task in enumerate(learner.tasks):
        without = lam.clone()
        without[i] = 0
        assert attribution["drop"][task] == pytest.approx(flips(lam) - flips(without))


def test_a_targeted_shared_trigger_is_a_one_line_config_error():
    from safemerge.errors import ConfigError

    with pytest.raises(ConfigError, match="targeted applies to the additive and patch triggers"):
        DAMTaskArithmetic(trigger="shared", targeted=True)
    with pytest.raises(ConfigError, match="performance_loss must be entropy or expert_labels"):
        DAMTaskArithmetic(performance_loss="labels")
