"""The merged encoder's memory options: bfloat16 task vectors and the checkpointed forward.

Both must learn what the default learns: bf16 vectors within bf16 rounding of the task vectors,
the checkpointed forward to float rounding (it recomputes the same forward)."""

import pytest
import torch

from safemerge.merging import ConcreteMask, MergedEncoder
from safemerge.models import load_clip


@pytest.fixture(scope="module")
def tower_and_experts():
    torch.manual_seed(0)
    tower = load_clip("TinyCLIP-ViT-32").visual.eval()
    base = tower.state_dict()
    experts = [
        {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()} for _ in range(3)
    ]
    return tower, experts


def _step(encoder: MergedEncoder, images: torch.Tensor):
    """Merged weights, features and the gradients of λ (layer-wise) and mask logits of one step."""
    torch.manual_seed(1)
    lam = torch.full((encoder.num_experts, encoder.num_tensors), 0.3, requires_grad=True)
    mask = ConcreteMask(encoder.shapes)
    with torch.no_grad():
        for logits in mask.logits:
            logits.normal_()
    sample = mask.sample(torch.Generator().manual_seed(2))
    weights = encoder.weights(lam, sample, rescale=True)
    features = encoder(images, weights)
    loss = features.square().mean()
    grads = torch.autograd.grad(loss, [lam, *mask.logits])
    return {k: v.detach() for k, v in weights.items()}, features.detach(), grads


def test_bf16_task_vectors_merge_the_same_weights_within_bf16_tolerance(tower_and_experts):
    tower, experts = tower_and_experts
    full = MergedEncoder(tower, experts)
    half = MergedEncoder(tower, experts, vector_dtype=torch.bfloat16)
    assert half.vectors(0).dtype == torch.bfloat16
    assert sum(half.vectors(i).nbytes for i in range(half.num_tensors)) * 2 == sum(
        full.vectors(i).nbytes for i in range(full.num_tensors)
    )
    images = torch.rand(4, 3, 32, 32)
    w_full, f_full, g_full = _step(full, images)
    w_half, f_half, g_half = _step(half, images)
    for name, weight in w_full.items():
        assert w_half[name].dtype == weight.dtype  # formed in float32
        update = (weight - tower.state_dict()[name]).abs().max()
        # only τ is rounded: 2^-9 relative of each update, a few ulps after summing 3 experts
        assert (w_half[name] - weight).abs().max() <= 3 * 2**-8 * update + 1e-7, name
    assert torch.allclose(f_half, f_full, rtol=1e-2, atol=1e-3)
    for a, b in zip(g_full, g_half):
        assert torch.allclose(a, b, rtol=5e-2, atol=1e-3 * a.abs().max().item())
    # and the plain task arithmetic path (no mask) too
    plain = half.weights(torch.tensor([0.2, 0.3, 0.5]))
    reference = full.weights(torch.tensor([0.2, 0.3, 0.5]))
    assert all(torch.allclose(plain[k], reference[k], atol=1e-3) for k in reference)


def test_checkpointed_forward_learns_exactly_what_the_plain_forward_learns(tower_and_experts):
    tower, experts = tower_and_experts
    images = torch.rand(10, 3, 32, 32)
    _, f_plain, g_plain = _step(MergedEncoder(tower, experts), images)
    _, f_chunk, g_chunk = _step(MergedEncoder(tower, experts, checkpoint_chunk=3), images)  # 3 + 3 + 3 + 1
    assert torch.allclose(f_chunk, f_plain, atol=1e-6)
    for a, b in zip(g_plain, g_chunk):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    assert not torch.equal(g_plain[0], torch.zeros_like(g_plain[0]))


def test_bad_memory_options_are_refused(tower_and_experts):
    tower, experts = tower_and_experts
    with pytest.raises(ValueError, match="floating-point"):
        MergedEncoder(tower, experts, vector_dtype=torch.int8)
    with pytest.raises(ValueError, match="checkpoint_chunk"):
        MergedEncoder(tower, experts, checkpoint_chunk=0)
