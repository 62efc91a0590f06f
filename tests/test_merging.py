"""Merging functions against hand computations."""

import pytest
import torch

from safemerge.merging import task_arithmetic, task_vectors, weight_average

BASE = {"w": torch.tensor([1.0, 2.0, 3.0]), "steps": torch.tensor(7)}
A = {"w": torch.tensor([2.0, 2.0, 1.0]), "steps": torch.tensor(7)}
B = {"w": torch.tensor([1.0, 4.0, 3.5]), "steps": torch.tensor(7)}


def test_task_vectors_are_differences_of_float_tensors():
    tau_a, tau_b = task_vectors(BASE, [A, B])
    assert torch.equal(tau_a["w"], torch.tensor([1.0, 0.0, -2.0]))
    assert torch.equal(tau_b["w"], torch.tensor([0.0, 2.0, 0.5]))
    assert "steps" not in tau_a  # integer buffers are not merged


def test_task_arithmetic_by_hand():
    merged = task_arithmetic(BASE, [A, B], scaling=0.5)
    # 1 + .5*(1+0), 2 + .5*(0+2), 3 + .5*(-2+.5)
    assert torch.allclose(merged["w"], torch.tensor([1.5, 3.0, 2.25]))
    assert merged["steps"].item() == 7
    per_expert = task_arithmetic(BASE, [A, B], scaling=[1.0, 0.0])
    assert torch.equal(per_expert["w"], A["w"])


def test_weight_average_by_hand():
    assert torch.allclose(weight_average([A, B])["w"], torch.tensor([1.5, 3.0, 2.25]))


def test_mismatched_experts_are_rejected():
    with pytest.raises(ValueError, match="tensor 'w' has shape"):
        task_vectors(BASE, [{"w": torch.zeros(2), "steps": torch.tensor(7)}])
    with pytest.raises(ValueError, match="missing \\['steps'\\]"):
        task_vectors(BASE, [{"w": torch.zeros(3)}])


# ----------------------------------------------------------------------------- TIES


def test_ties_trims_over_the_whole_vector_elects_by_mass_and_takes_the_disjoint_mean():
    from safemerge.merging import ties_merging

    base = {"a": torch.ones(2), "b": torch.ones(2), "step": torch.tensor(3)}

    def expert(values):
        return {"a": 1 + torch.tensor(values[:2]), "b": 1 + torch.tensor(values[2:]), "step": torch.tensor(3)}

    # Task vectors; k = 0.5 keeps each vector's 2 largest magnitudes of 4 (over both tensors:
    # A keeps 3 and -2.5, both in "a"; a per-tensor trim would keep 0.5 in "b").
    a = expert([3.0, -2.5, 0.5, -0.1])  # trimmed [3, -2.5, 0, 0]
    b = expert([-4.0, -2.0, 4.0, 1.0])  # trimmed [-4, 0, 4, 0]
    c = expert([2.0, 1.0, -0.2, -3.0])  # trimmed [2, 0, 0, -3]
    # elected signs from the sums [1, -2.5, 4, -3]: + - + -
    # disjoint means: (3 + 2) / 2 (B disagrees), -2.5, 4, -3
    merged = ties_merging(base, [a, b, c], k=0.5, scaling=0.5)
    assert torch.allclose(merged["a"], torch.tensor([1 + 0.5 * 2.5, 1 - 0.5 * 2.5]))
    assert torch.allclose(merged["b"], torch.tensor([1 + 0.5 * 4.0, 1 - 0.5 * 3.0]))
    assert merged["step"].item() == 3


def test_ties_with_everything_kept_and_no_conflict_is_the_mean_task_vector():
    from safemerge.merging import ties_merging

    merged = ties_merging(BASE, [A, A], k=1.0, scaling=1.0)
    assert torch.allclose(merged["w"], A["w"])
    with pytest.raises(ValueError, match="fraction"):
        ties_merging(BASE, [A], k=0.0)


# ----------------------------------------------------------------------------- merged encoder


class Tower(torch.nn.Module):
    """A small tower with a buffer, to check the functional forward against a plain one."""

    def __init__(self):
        super().__init__()
        self.layer1 = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.layer2 = torch.nn.Linear(5, 4)
        self.register_buffer("count", torch.tensor(0))

    def forward(self, x):
        return self.layer2(torch.relu(self.norm(self.layer1(x.flatten(1)))))


def _experts(tower, n=3, scale=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = tower.state_dict()
    return [
        {
            k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        for _ in range(n)
    ]


def test_merged_weights_equal_task_arithmetic_and_layerwise_and_masked_by_hand():
    from safemerge.merging import MergedEncoder

    torch.manual_seed(0)
    tower = Tower()
    base = {k: v.clone() for k, v in tower.state_dict().items()}
    experts = _experts(tower)
    encoder = MergedEncoder(tower, experts)
    assert encoder.names == [k for k, v in base.items() if v.is_floating_point()]
    taskwise = encoder.weights(torch.tensor([0.2, 0.3, 0.5]))
    reference = task_arithmetic(base, experts, [0.2, 0.3, 0.5])
    for name in base:
        assert torch.allclose(taskwise[name], reference[name], atol=1e-6)

    layerwise = torch.rand(3, encoder.num_tensors)
    mask = [torch.rand(shape) for shape in encoder.shapes]
    merged = encoder.weights(layerwise, mask)
    for index, name in enumerate(encoder.names):
        update = sum(layerwise[i, index] * (experts[i][name] - base[name]) for i in range(3))
        assert torch.allclose(merged[name], base[name] + mask[index] * update, atol=1e-6)
    assert torch.equal(merged["count"], base["count"])
    for name in base:  # the template tower is never written
        assert torch.equal(tower.state_dict()[name], base[name])
    expert = encoder.expert_weights(1)
    assert all(torch.allclose(expert[n], experts[1][n], atol=1e-6) for n in base)


def test_functional_forward_matches_a_plain_tower_loaded_with_the_merged_weights():
    from safemerge.merging import MergedEncoder

    torch.manual_seed(1)
    tower = Tower()
    encoder = MergedEncoder(tower, _experts(tower))
    weights = encoder.weights(torch.rand(3, encoder.num_tensors))
    images = torch.rand(7, 6)
    plain = Tower()
    plain.load_state_dict({k: v.detach() for k, v in weights.items()})
    assert torch.allclose(encoder(images, weights), plain(images), atol=1e-5)


# ----------------------------------------------------------------------------- masks, perturbations


def test_concrete_mask_samples_expectation_and_rescaling():
    from safemerge.merging import ConcreteMask
    from safemerge.merging.masks import combine, rescale

    mask = ConcreteMask([torch.Size([50, 40]), torch.Size([7])], temperature=0.5)
    samples = mask.sample(torch.Generator().manual_seed(3))
    again = mask.sample(torch.Generator().manual_seed(3))
    assert all(torch.equal(s, t) for s, t in zip(samples, again))  # a seeded sample is reproducible
    assert all(((s > 0) & (s < 1)).all() for s in samples)
    # logits 0: each entry is sigmoid(logistic noise / T), symmetric around 0.5
    assert abs(float(samples[0].detach().mean()) - 0.5) < 0.05
    assert all(torch.allclose(m, torch.full_like(m, 0.5)) for m in mask.expected())
    assert all(not m.any() for m in mask.discrete())  # logits 0 are not > 0
    for m in combine(samples, samples):
        assert torch.allclose(m.mean(), torch.tensor(1.0))
    s = samples[0]
    assert torch.allclose(combine(samples, samples)[0], rescale(s * s))
    assert torch.equal(rescale(torch.zeros(3)), torch.zeros(3))


def test_additive_trigger_stays_within_budget_and_pixel_range():
    from safemerge.defenses import AdditiveTrigger
    from safemerge.errors import ConfigError

    perturbation = AdditiveTrigger(["a", "b"], image_size=8, eps=0.05)
    optimizer = torch.optim.SGD(perturbation.parameters(), lr=10.0)
    images = torch.rand(4, 3, 8, 8)
    for _ in range(3):
        loss = -perturbation.apply(images, "a").sum() + perturbation.apply(images, "b").sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        perturbation.project_()
    for task in ("a", "b"):
        assert float(perturbation.delta(task).detach().abs().max()) == pytest.approx(0.05)
        out = perturbation.apply(images, task)
        assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ConfigError, match="budget"):
        AdditiveTrigger(["a"], 8, eps=0.0)


def test_normalized_space_clamps_the_normalised_image_with_an_unbounded_delta():
    """The released code's trigger: ``clamp(normalize(x) + δ, 0, 1)`` is what the tower sees."""
    from safemerge.defenses import AdditiveTrigger

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    trigger = AdditiveTrigger(["a"], image_size=4, eps=0.01, space="normalized", mean=mean, std=std)
    with torch.no_grad():
        trigger.delta("a").fill_(3.0)  # far outside any pixel budget
    trigger.project_()
    assert float(trigger.delta("a").detach().min()) == 3.0  # not projected
    images = torch.rand(2, 3, 4, 4)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    seen = (trigger.apply(images, "a") - m) / s  # what the classifier's normalisation gives
    assert torch.allclose(seen, ((images - m) / s + 3.0).clamp(0, 1), atol=1e-6)
    pixel = AdditiveTrigger(["a"], image_size=4, eps=0.1)
    with torch.no_grad():
        pixel.delta("a").fill_(0.1)
    assert torch.allclose(pixel.apply(images, "a"), (images + 0.1).clamp(0, 1))


# ----------------------------------------------------------------------------- learner


class ImageTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 8)
        self.out = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x.flatten(1))))


def _learner(method, seed=0):
    from safemerge.merging import MergedEncoder
    from safemerge.merging.learner import MergeLearner
    from safemerge.models import ImageClassifier

    torch.manual_seed(0)
    tower = ImageTower()
    experts = _experts(tower, n=2, scale=0.3)
    heads = {t: torch.nn.functional.normalize(torch.randn(c, 6), dim=-1) * 20 for t, c in (("x", 3), ("y", 5))}
    classifier = ImageClassifier(tower, heads, [0.5] * 3, [0.25] * 3)
    encoder = MergedEncoder(tower, experts)
    return MergeLearner(encoder, classifier, method, ["x", "y"], image_size=4, seed=seed)


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {t: torch.rand(6, 3, 4, 4, generator=generator) for t in ("x", "y")}


def test_gradients_reach_the_coefficients_and_the_mask_and_nothing_else():
    from safemerge.merging import DAMAdaMerging

    learner = _learner(DAMAdaMerging(granularity="layer", steps=5, adamerging_steps=0))
    tower = learner.encoder.tower
    sample = learner.mask.sample(torch.Generator().manual_seed(0))
    from safemerge.merging.masks import combine

    weights = learner.encoder.weights(learner.coefficients, combine(sample))
    loss = sum(l.logsumexp(-1).sum() for l in learner.logits(weights, _batch()).values())
    loss.backward()
    with_grad = {name for name, p in learner.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"coefficients", *(f"mask.logits.{i}" for i in range(learner.encoder.num_tensors))}
    assert all(not p.requires_grad and p.grad is None for p in tower.parameters())
    assert all(p.grad is None for p in learner.perturbation.parameters())


def test_every_learned_method_trains_its_own_parts_deterministically():
    from safemerge.merging import (
        AdaMerging,
        ConcreteAdaMerging,
        ConcreteTaskArithmetic,
        DAMAdaMerging,
        DAMTaskArithmetic,
    )

    methods = [
        AdaMerging(granularity="task", adamerging_steps=3),
        ConcreteTaskArithmetic(steps=3),
        ConcreteAdaMerging(granularity="layer", steps=2, adamerging_steps=2),
        DAMTaskArithmetic(steps=3, safety_loss="consistency", perturbation_eps=0.02, perturbation_lr=0.1),
        DAMAdaMerging(granularity="task", steps=2, adamerging_steps=1, masks="dual", perturbation_eps=0.02),
    ]
    for method in methods:
        runs = []
        for _ in range(2):
            learner = _learner(method)
            initial = {k: v.detach().clone() for k, v in learner.state_dict().items()}
            optimizers = learner.make_optimizers()
            for step in range(method.total_steps):
                learner.training_step(step, _batch(step), optimizers)
            runs.append(learner.state_dict())
        changed = {k for k in runs[0] if not torch.equal(runs[0][k], initial[k])}
        learns_lambda = method.granularity is not None
        assert ("coefficients" in changed) == learns_lambda, method
        assert any(k.startswith("mask.") for k in changed) == method.has_mask, method
        assert any(k.startswith("perturbation.") for k in changed) == method.safety_aware, method
        assert any(k.startswith("safety_mask.") for k in changed) == (getattr(method, "masks", "") == "dual"), method
        assert not any(k.startswith("encoder.") for k in changed), method
        assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]), f"{method.name} is not reproducible"
        if method.safety_aware:
            assert all(float(d.abs().max()) <= method.perturbation_eps + 1e-7 for d in learner.perturbation.deltas)


def test_final_mask_choices():
    from safemerge.merging import ConcreteTaskArithmetic

    learner = _learner(ConcreteTaskArithmetic(steps=1, final_mask="discrete"))
    with torch.no_grad():
        for logits in learner.mask.logits:
            logits.copy_(torch.randn(logits.shape))
    discrete = learner.method.fixed_mask(learner)
    for logits, mask in zip(learner.mask.logits, discrete):
        kept = logits > 0
        assert torch.allclose(mask[kept], torch.full_like(mask[kept], 1 / kept.float().mean()))
        assert not mask[~kept].any()
    learner.method.final_mask = "sample"
    assert all(
        torch.equal(a, b) for a, b in zip(learner.method.fixed_mask(learner), learner.method.fixed_mask(learner))
    )
    learner.method.final_mask = "expected"
    for logits, mask in zip(learner.mask.logits, learner.method.fixed_mask(learner)):
        expected = torch.sigmoid(logits)
        assert torch.allclose(mask, expected / expected.mean())


def test_method_arguments_are_checked():
    from safemerge.errors import ConfigError
    from safemerge.merging import AdaMerging, DAMTaskArithmetic, Ties

    with pytest.raises(ConfigError, match="granularity"):
        AdaMerging(granularity="row")
    with pytest.raises(ConfigError, match="safety_loss"):
        DAMTaskArithmetic(safety_loss="kl")
    with pytest.raises(ConfigError, match="perturbation_eps"):
        DAMTaskArithmetic(perturbation_eps=2.0)
    with pytest.raises(ConfigError, match="nothing to train"):
        AdaMerging(adamerging_steps=0)
    with pytest.raises(ConfigError, match="k is the fraction"):
        Ties(k=1.5)


def test_fused_masked_update_has_the_gradients_of_the_plain_formula():
    """``weights(..., rescale=True)`` runs one custom autograd node; its λ and mask gradients
    must be those of ``θ0 + (m / mean m) ⊙ Σ λ_i τ_i`` written with ordinary ops."""
    from safemerge.merging import MergedEncoder

    torch.manual_seed(2)
    tower = Tower().double()
    experts = _experts(tower)
    encoder = MergedEncoder(tower, experts)
    lam = torch.rand(3, encoder.num_tensors, dtype=torch.float64, requires_grad=True)
    mask = [torch.rand(shape, dtype=torch.float64, requires_grad=True) for shape in encoder.shapes]
    probe = {name: torch.randn(shape, dtype=torch.float64) for name, shape in zip(encoder.names, encoder.shapes)}

    def loss(weights):
        return sum((weights[name] * probe[name]).sum() for name in encoder.names)

    fused = torch.autograd.grad(loss(encoder.weights(lam, mask, rescale=True)), [lam, *mask])
    base = tower.state_dict()
    plain = {}
    for index, name in enumerate(encoder.names):
        update = sum(lam[i, index] * (experts[i][name].double() - base[name]) for i in range(3))
        plain[name] = base[name] + mask[index] / mask[index].mean() * update
    reference = torch.autograd.grad(loss(plain), [lam, *mask])
    for got, want in zip(fused, reference):
        assert torch.allclose(got, want, atol=1e-10)
    values = encoder.weights(lam, mask, rescale=True)
    assert all(torch.allclose(values[n], plain[n], atol=1e-12) for n in encoder.names)


# ----------------------------------------------------------------------------- DAM's steps, pinned


def test_mask_samples_follow_the_concrete_formula_with_their_noise_and_temperature():
    from safemerge.merging import ConcreteMask

    mask = ConcreteMask([torch.Size([4, 5]), torch.Size([3])], temperature=0.7)
    with torch.no_grad():
        for logits in mask.logits:
            logits.copy_(torch.randn(logits.shape))
    samples = mask.sample(torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(11)
    for logits, sample in zip(mask.logits, samples):
        u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
        expected = torch.sigmoid((logits + u.log() - (1 - u).log()) / 0.7)
        assert torch.allclose(sample, expected, atol=1e-6)


def _ce_of_triggered(learner, weights, batch, pseudo):
    triggered = {t: learner.perturbation.apply(x, t) for t, x in batch.items()}
    with torch.no_grad():
        return sum(
            float(torch.nn.functional.cross_entropy(l, pseudo[t]))
            for t, l in learner.logits(weights, triggered).items()
        )


def _step_weights(learner, step):
    """The (detached) merged weights DAM's trigger step of ``step`` attacks, and their pseudo-labels."""
    from safemerge.merging.masks import product

    samples = [m.sample(learner.generator(step)) for m in learner.method.concrete_masks(learner)]
    with torch.no_grad():
        return learner.encoder.weights(
            learner.coefficients.detach(), [s.detach() for s in product(*samples)], rescale=True
        )


@pytest.mark.parametrize(
    "options",
    [
        {"trigger": "additive", "perturbation_lr": 0.01, "perturbation_eps": 0.1},
        {"trigger": "additive", "perturbation_space": "normalized", "perturbation_lr": 0.01},
        {"trigger": "patch", "perturbation_lr": 0.05, "area_weight": 1e-3},
    ],
    ids=["additive", "normalized", "patch"],
)
def test_one_trigger_step_of_dam_raises_the_cross_entropy_against_the_pseudo_labels(options):
    from safemerge.merging import DAMTaskArithmetic

    learner = _learner(DAMTaskArithmetic(steps=2, **options))
    batch = _batch(0)
    weights = _step_weights(learner, 0)
    pseudo = learner.pseudo_labels(weights, batch)
    before = _ce_of_triggered(learner, weights, batch, pseudo)
    learner.training_step(0, batch, learner.make_optimizers())
    assert _ce_of_triggered(learner, weights, batch, pseudo) > before + 1e-4


def test_one_targeted_trigger_inversion_step_lowers_the_cross_entropy_toward_its_class():
    from safemerge.merging import DAMTaskArithmetic

    learner = _learner(
        DAMTaskArithmetic(steps=2, trigger="patch", targeted=True, perturbation_lr=0.05, area_weight=0.0)
    )
    batch = _batch(0)
    weights = _step_weights(learner, 0)

    def cross_entropy_to(targets=None):
        with torch.no_grad():
            logits = learner.logits(weights, {t: learner.perturbation.apply(x, t) for t, x in batch.items()})
        if targets is None:  # the class the triggered images are already closest to, per task
            targets = {t: int((-torch.log_softmax(l, -1)).mean(0).argmin()) for t, l in logits.items()}
        ce = sum(
            float(torch.nn.functional.cross_entropy(l, torch.full((len(l),), targets[t]))) for t, l in logits.items()
        )
        return ce, targets

    before, targets = cross_entropy_to()
    learner.training_step(0, batch, learner.make_optimizers())
    assert cross_entropy_to(targets)[0] < before - 1e-4


def test_patch_trigger_replaces_pixels_under_its_mask_and_penalises_its_area():
    from safemerge.defenses import PatchTrigger
    from safemerge.errors import ConfigError

    trigger = PatchTrigger(["a"], image_size=4, area_weight=0.5, patch_size=2)
    with torch.no_grad():
        trigger.mask_logits[0].fill_(20.0)  # mask ~1 inside the window
        trigger.pattern_logits[0].fill_(-20.0)  # pattern ~0
    images = torch.ones(1, 3, 4, 4)
    out = trigger.apply(images, "a")
    assert torch.allclose(out[..., 2:, 2:], torch.zeros(1, 3, 2, 2), atol=1e-6)  # the window: the pattern
    assert torch.equal(out[..., :2, :], images[..., :2, :])  # outside it: untouched
    assert float(trigger.penalty()) == pytest.approx(0.5 * 4 / 16, abs=1e-6)
    with pytest.raises(ConfigError, match="larger than the image"):
        PatchTrigger(["a"], image_size=4, patch_size=5)
    with pytest.raises(ConfigError, match="area_weight"):
        PatchTrigger(["a"], image_size=4, area_weight=-1.0)


def _trained_mask(method, steps=3):
    learner = _learner(method)
    optimizers = learner.make_optimizers()
    for step in range(steps):
        learner.training_step(step, _batch(step), optimizers)
    return [p.detach().clone() for p in learner.mask.logits]


def test_dam_without_its_safety_term_learns_exactly_what_its_ablation_learns():
    from safemerge.merging import ConcreteTaskArithmetic, DAMTaskArithmetic

    ablation = _trained_mask(ConcreteTaskArithmetic(steps=3, mask_lr=0.1))
    dam = _trained_mask(DAMTaskArithmetic(steps=3, mask_lr=0.1, adv_weight=0.0, perturbation_lr=0.1))
    assert any(m.abs().max() > 0.05 for m in ablation)  # the masks moved
    for a, d in zip(ablation, dam):
        assert torch.allclose(a, d, atol=1e-6)


def test_entropy_and_consistency_safety_losses_learn_different_masks():
    from safemerge.merging import DAMTaskArithmetic

    common = {"steps": 3, "mask_lr": 0.1, "adv_weight": 1.0, "perturbation_lr": 0.1, "perturbation_eps": 0.3}
    entropy_mask = _trained_mask(DAMTaskArithmetic(safety_loss="entropy", **common))
    consistency_mask = _trained_mask(DAMTaskArithmetic(safety_loss="consistency", **common))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(entropy_mask, consistency_mask))


def test_dual_masks_each_receive_only_their_own_losses_gradient():
    """m1 moves by −∂(performance)/∂m1, m2 by −α ∂(safety)/∂m2 (plain SGD, lr 1, one step)."""
    from safemerge.merging import DAMTaskArithmetic, entropy
    from safemerge.merging.masks import product

    method = DAMTaskArithmetic(steps=1, masks="dual", adv_weight=0.5, perturbation_lr=0.05, perturbation_eps=0.3)
    learner = _learner(method)
    with torch.no_grad():  # distinct, non-zero logits so the two gradients differ
        for mask in (learner.mask, learner.safety_mask):
            for logits in mask.logits:
                logits.copy_(0.3 * torch.randn(logits.shape))
    before = [[p.detach().clone() for p in m.logits] for m in (learner.mask, learner.safety_mask)]
    optimizers = learner.make_optimizers()
    optimizers["mask"] = torch.optim.SGD([*learner.mask.parameters(), *learner.safety_mask.parameters()], lr=1.0)
    batch = _batch(0)
    learner.training_step(0, batch, optimizers)
    moved = [
        [b - p.detach() for b, p in zip(bs, m.logits)] for bs, m in zip(before, (learner.mask, learner.safety_mask))
    ]

    # the same step by hand, from the logits before it and the trigger after its own update
    logits1 = [b.clone().requires_grad_() for b in before[0]]
    logits2 = [b.clone().requires_grad_() for b in before[1]]
    generator = learner.generator(0)
    samples = []
    for logits in (logits1, logits2):
        mask = []
        for l in logits:
            u = torch.rand(l.shape, generator=generator).logit(1e-6)
            mask.append(torch.sigmoid((l + u) / method.temperature))
        samples.append(mask)
    weights = learner.encoder.weights(learner.coefficients.detach(), product(*samples), rescale=True)
    clean = learner.logits(weights, batch)
    triggered = learner.logits(weights, {t: learner.perturbation.apply(x, t).detach() for t, x in batch.items()})
    performance = sum(entropy(l) for l in clean.values())
    safety = sum(entropy(l) for l in triggered.values())
    expected1 = torch.autograd.grad(performance, logits1, retain_graph=True)
    expected2 = torch.autograd.grad(method.adv_weight * safety, logits2, retain_graph=True)
    for got, want in zip(moved[0] + moved[1], list(expected1) + list(expected2)):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    swapped = torch.autograd.grad(method.adv_weight * safety, logits1)  # what m1 would get if swapped
    assert not all(torch.allclose(g, w, atol=1e-6) for g, w in zip(moved[0], swapped))
