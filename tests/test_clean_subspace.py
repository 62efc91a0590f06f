"""Clean-subspace restriction (safemerge/merging/subspace.py): the input moments against a hand
computation, the basis against a hand-made spectrum, the restriction's direction (an update on
a direction clean inputs never take is removed, the clean part kept), and the merge option."""

import pytest
import torch
import torch.nn.functional as F
from quick_pool import quick_pool
from torch import nn

from safemerge.errors import ConfigError
from safemerge.experts import MINI_MODEL, MINI_WEIGHTS
from safemerge.io import read_expert
from safemerge.merging import ExpertLabelMerging, TaskArithmetic, task_arithmetic
from safemerge.merging.subspace import clean_bases, clean_basis, input_moments, restrict
from safemerge.models import load_clip
from safemerge.modules import MergeModule


class Tower(nn.Module):
    """A patch embedding, one self-attention block and an MLP: every kind of matrix the hooks see."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, kernel_size=2, stride=2, bias=False)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc = nn.Linear(6, 5)

    def forward(self, images):
        tokens = self.conv1(images).flatten(2).transpose(1, 2)  # [B, 4, 6]
        x = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.fc(torch.tanh(x)).mean(1)


def test_input_moments_are_the_mean_outer_products_of_each_matrixs_input():
    torch.manual_seed(0)
    tower = Tower().eval()
    weights = {k: v + 0.1 * torch.randn_like(v) for k, v in tower.state_dict().items()}  # not the module's own
    images = torch.randn(7, 3, 4, 4)
    moments = input_moments(tower, weights, images, batch_size=3)  # chunks of 3, 3, 1

    patches = F.unfold(images, 2, stride=2).transpose(1, 2).reshape(-1, 12)
    tokens = F.conv2d(images, weights["conv1.weight"], stride=2).flatten(2).transpose(1, 2)
    q, k, v = (
        tokens @ w.T + b for w, b in zip(weights["attn.in_proj_weight"].chunk(3), weights["attn.in_proj_bias"].chunk(3))
    )
    heads = lambda t: t.reshape(7, 4, 2, 3).transpose(1, 2)  # noqa: E731
    attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(7, 4, 6)
    x = tokens + attended @ weights["attn.out_proj.weight"].T + weights["attn.out_proj.bias"]
    hidden = torch.tanh(x).reshape(-1, 6)
    by_hand = {
        "conv1.weight": patches.T @ patches / len(patches),
        "attn.in_proj_weight": tokens.reshape(-1, 6).T @ tokens.reshape(-1, 6) / 28,
        "fc.weight": hidden.T @ hidden / 28,
    }
    assert set(moments) == set(by_hand)  # out_proj is used inside attention's functional call: not seen
    for name, expected in by_hand.items():
        torch.testing.assert_close(moments[name].float(), expected, rtol=1e-4, atol=1e-5)


def test_the_basis_is_the_fewest_leading_eigenvectors_holding_the_energy():
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    moment = rotation @ torch.diag(torch.tensor([0.4, 6.0, 3.0, 0.6])) @ rotation.T  # trace 10
    for energy, directions in (
        (0.5, [1]),
        (0.85, [1, 2]),
        (0.95, [1, 2, 3]),
        (0.99, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ):
        basis = clean_basis(moment, energy)
        assert basis.shape == (4, len(directions)), energy
        span = rotation[:, directions]
        torch.testing.assert_close(basis @ basis.T, span @ span.T, atol=1e-5, rtol=0)  # the same subspace


def test_an_update_on_a_direction_clean_inputs_never_take_is_removed_and_the_clean_part_kept():
    """The backdoor in miniature: clean inputs span e0, e1; the trigger adds e3. The expert's
    update answers both; restricted, it answers the clean inputs exactly as before and the
    trigger direction as the base does."""
    torch.manual_seed(0)
    clean = torch.zeros(200, 4)
    clean[:, :2] = torch.randn(200, 2)
    tower = nn.Linear(4, 3, bias=False)
    base = {"weight": torch.randn(3, 4)}
    clean_part, trigger_part = torch.zeros(3, 4), torch.zeros(3, 4)
    clean_part[:, :2], trigger_part[:, 3] = torch.randn(3, 2), torch.tensor([5.0, -5.0, 5.0])
    expert = {"weight": base["weight"] + clean_part + trigger_part}

    bases = clean_bases(tower, expert, clean, energy=0.99)
    restricted = base["weight"] + restrict(expert["weight"] - base["weight"], bases["weight"])
    torch.testing.assert_close(restricted, base["weight"] + clean_part, atol=1e-5, rtol=0)
    torch.testing.assert_close(clean @ restricted.T, clean @ expert["weight"].T, atol=1e-4, rtol=0)
    trigger = torch.tensor([0.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(restricted @ trigger, base["weight"] @ trigger, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def pool() -> list[str]:
    return quick_pool()


def test_the_merge_option_restricts_every_vector_before_a_static_merge(pool):
    clip = load_clip(MINI_MODEL, MINI_WEIGHTS)
    base = clip.visual.state_dict()
    experts = [read_expert(p).encoder for p in pool]
    module = MergeModule(pool, TaskArithmetic(0.4), output_dir=None, clean_subspace=0.9, clean_subspace_images=64)
    restricted = [module.encoder.edited_weights(i) for i in range(len(pool))]
    # a restricted matrix update is the expert's times a projector; 1-d tensors are untouched
    name = "transformer.resblocks.0.mlp.c_fc.weight"
    for expert, edited in zip(experts, restricted):
        update, kept = expert[name] - base[name], edited[name] - base[name]
        assert 0.05 < float((update - kept).norm() / update.norm()) < 0.95
        # τ P with P an orthogonal projector: what is kept and what is cut are orthogonal row by row
        torch.testing.assert_close(kept @ (update - kept).T, torch.zeros(len(update), len(update)), atol=1e-6, rtol=0)
        bias = "transformer.resblocks.0.mlp.c_fc.bias"
        torch.testing.assert_close(edited[bias], expert[bias])
    reference = task_arithmetic(base, restricted, 0.4)
    merged = module.merged_weights()
    assert all(torch.allclose(merged[k].float(), reference[k].float(), atol=1e-6) for k in reference)
    assert not torch.allclose(merged[name], task_arithmetic(base, experts, 0.4)[name])
    assert module.clean_subspace["energy"] == 0.9 and 0 < module.clean_subspace["dimensions_kept"] < 1


def test_a_learned_merge_restricts_the_vectors_but_labels_with_the_experts_as_fine_tuned(pool):
    module = MergeModule(
        pool, ExpertLabelMerging(steps=1), output_dir=None, clean_subspace=0.9, clean_subspace_images=64
    )
    expert = read_expert(pool[0]).encoder
    own, edited = module.encoder.expert_weights(0), module.encoder.edited_weights(0)
    assert all(torch.allclose(own[k].float(), expert[k].float(), atol=1e-5) for k in own)
    name = "transformer.resblocks.1.attn.in_proj_weight"
    assert not torch.allclose(edited[name], expert[name], atol=1e-4)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"clean_subspace": 0.0}, "energy fraction kept must be in"),
        ({"clean_subspace": 1.5}, "in \\(0, 1\\]"),
        ({"clean_subspace": 0.9, "clean_subspace_images": 1}, "clean_subspace_images must be >= 2"),
    ],
)
def test_bad_clean_subspace_options_are_config_errors(pool, options, message):
    with pytest.raises(ConfigError, match=message):
        MergeModule(pool, TaskArithmetic(0.3), output_dir=None, **options)
