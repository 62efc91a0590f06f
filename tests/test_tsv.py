"""TSV's orthogonal task vectors (safemerge/merging/arithmetic.py), TSV-M, and merging by expert
labels over them, against independent computations: scipy's polar decomposition, hand-made
matrices whose answer is known, and the definition written out."""

import numpy as np
import pytest
import scipy.linalg
import torch
from test_merging import Tower, _batch, _experts, _learner

from safemerge.errors import ConfigError
from safemerge.merging import ExpertLabelMerging, MergedEncoder, TSVMerging, task_vectors
from safemerge.merging.arithmetic import orthogonal_components, orthogonal_task_vectors


def reference_components(matrices):
    """The definition in numpy and scipy: top-k SVD per task, the stacked singular vectors
    replaced by the unitary factor of scipy's polar decomposition."""
    k = max(1, min(matrices[0].shape) // len(matrices))
    svds = [np.linalg.svd(m.double().numpy(), full_matrices=False) for m in matrices]
    u = scipy.linalg.polar(np.concatenate([s[0][:, :k] for s in svds], 1))[0]
    v = scipy.linalg.polar(np.concatenate([s[2][:k].T for s in svds], 1))[0]
    return [(u[:, i * k : (i + 1) * k] * s[1][:k]) @ v[:, i * k : (i + 1) * k].T for i, s in enumerate(svds)]


def test_orthogonal_components_follow_the_definition_and_share_no_direction():
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(8, 2, generator=generator)  # both tasks lean on the same two output directions
    matrices = [shared @ torch.randn(2, 6, generator=generator) + 0.1 * torch.randn(8, 6, generator=generator)]
    matrices.append(shared @ torch.randn(2, 6, generator=generator) + 0.1 * torch.randn(8, 6, generator=generator))
    parts = orthogonal_components(matrices)
    for part, expected in zip(parts, reference_components(matrices)):
        assert np.allclose(part.numpy(), expected, atol=1e-4)
    a, b = parts
    assert float((a.T @ b).abs().max()) < 1e-4 and float((a @ b.T).abs().max()) < 1e-4  # no shared direction
    assert float((matrices[0].T @ matrices[1]).abs().max()) > 1  # the inputs did share them
    for part, matrix in zip(parts, matrices):  # each task keeps its own top-k singular values
        k = 6 // 2
        assert torch.allclose(torch.linalg.svdvals(part)[:k], torch.linalg.svdvals(matrix)[:k], atol=1e-4)


def test_tasks_already_apart_keep_their_truncated_updates_and_one_task_keeps_everything():
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    a[0, 1], a[1, 0] = 3.0, 2.0  # rows and columns 0-1
    b[2, 3], b[3, 2] = 5.0, 1.0  # rows and columns 2-3: already orthogonal to a
    for part, matrix in zip(orthogonal_components([a, b]), [a, b]):
        assert torch.allclose(part, matrix, atol=1e-5)
    (alone,) = orthogonal_components([a + b])  # k = min(m, n): the whole matrix
    assert torch.allclose(alone, a + b, atol=1e-5)


def test_tsv_merging_sums_the_orthogonal_matrices_and_averages_the_other_tensors():
    tower = Tower()
    base = {k: v.clone() for k, v in tower.state_dict().items()}
    experts = _experts(tower, n=3, scale=0.2)
    merged = TSVMerging(scaling_factor=0.7).merge(base, experts)
    vectors = task_vectors(base, experts)
    orthogonal = orthogonal_task_vectors(vectors)
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            assert torch.equal(merged[name], tensor)
        elif tensor.ndim >= 2:
            parts = reference_components([v[name] for v in vectors])
            expected = tensor.double().numpy() + 0.7 * sum(parts)
            assert np.allclose(merged[name].numpy(), expected, atol=1e-5), name
            assert all(
                torch.allclose(o[name], torch.from_numpy(p).float(), atol=1e-5) for o, p in zip(orthogonal, parts)
            )
        else:  # biases and norms: the mean task vector, not the sum
            assert torch.allclose(merged[name], tensor + 0.7 * sum(v[name] for v in vectors) / 3, atol=1e-6), name


def test_an_orthogonalised_encoder_merges_the_orthogonal_vectors_and_keeps_each_expert_as_fine_tuned():
    tower = Tower()
    base = {k: v.clone() for k, v in tower.state_dict().items()}
    experts = _experts(tower, n=3, scale=0.2)
    encoder = MergedEncoder(tower, experts)
    encoder.orthogonalise_()
    orthogonal = orthogonal_task_vectors(task_vectors(base, experts))
    lam = torch.tensor([0.5, 1.0, 2.0])
    merged = encoder.weights(lam)
    for name in encoder.names:
        expected = base[name] + sum(l * o[name] for l, o in zip(lam, orthogonal))
        assert torch.allclose(merged[name], expected, atol=1e-5), name
    for i, expert in enumerate(experts):
        assert all(torch.allclose(encoder.expert_weights(i)[n], expert[n], atol=1e-6) for n in encoder.names)


def test_merging_by_expert_labels_over_orthogonal_vectors_trains_lambda_on_them():
    method = ExpertLabelMerging(granularity="layer", steps=2, task_vectors="orthogonal")
    learner = _learner(method)
    plain = _learner(ExpertLabelMerging(granularity="layer", steps=2))
    matrix = next(i for i, s in enumerate(learner.encoder.shapes) if len(s) >= 2)
    assert not torch.allclose(learner.encoder.vectors(matrix), plain.encoder.vectors(matrix))
    orthogonal = orthogonal_components(
        [row.view(learner.encoder.shapes[matrix][0], -1) for row in plain.encoder.vectors(matrix)]
    )
    assert torch.allclose(learner.encoder.vectors(matrix), torch.stack([o.flatten() for o in orthogonal]), atol=1e-5)
    # the labels are the experts' as fine-tuned: the same as without the option
    batch = _batch(0)
    for task in batch:
        assert torch.equal(learner.expert_pseudo_labels(batch)[task], plain.expert_pseudo_labels(batch)[task])
    optimizers = learner.make_optimizers()
    before = learner.coefficients.detach().clone()
    learner.training_step(0, batch, optimizers)
    assert not torch.equal(learner.coefficients, before)
    with pytest.raises(ConfigError, match="task_vectors must be plain or orthogonal"):
        ExpertLabelMerging(task_vectors="tsv")
