"""State-dict algebra: task vectors, task arithmetic, weight averaging, TIES-merging and TSV's
orthogonal task vectors.

Only floating-point tensors are merged; other entries (integer buffers) are taken from the
base (or the first expert) unchanged.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from safemerge.errors import ConfigError

StateDict = Mapping[str, Tensor]


def _check_same_keys(reference: StateDict, others: Sequence[StateDict], what: str) -> None:
    for i, other in enumerate(others):
        if other.keys() != reference.keys():
            missing = sorted(reference.keys() - other.keys())[:3]
            extra = sorted(other.keys() - reference.keys())[:3]
            raise ValueError(f"{what} {i} does not match: missing {missing}, unexpected {extra}")
        for name, tensor in reference.items():
            if other[name].shape != tensor.shape:
                raise ValueError(
                    f"{what} {i}: tensor {name!r} has shape {tuple(other[name].shape)}, expected {tuple(tensor.shape)}"
                )


def task_vectors(base: StateDict, experts: Sequence[StateDict]) -> list[dict[str, Tensor]]:
    """``τ_i = θ_i − θ_0`` for every floating-point tensor (Ilharco et al., 2023)."""
    _check_same_keys(base, experts, "expert")
    return [
        {name: expert[name].float() - tensor.float() for name, tensor in base.items() if tensor.is_floating_point()}
        for expert in experts
    ]


def task_arithmetic(
    base: StateDict, experts: Sequence[StateDict], scaling: float | Sequence[float] = 0.3
) -> dict[str, Tensor]:
    """``θ = θ_0 + Σ_i λ_i τ_i``; ``scaling`` is one λ for all experts or one per expert."""
    vectors = task_vectors(base, experts)
    lambdas = [float(scaling)] * len(vectors) if isinstance(scaling, (int, float)) else [float(s) for s in scaling]
    if len(lambdas) != len(vectors):
        raise ValueError(f"{len(lambdas)} scaling factors for {len(vectors)} experts")
    merged = {}
    for name, tensor in base.items():
        if tensor.is_floating_point():
            update = sum(λ * vector[name] for λ, vector in zip(lambdas, vectors))
            merged[name] = (tensor.float() + update).to(tensor.dtype)
        else:
            merged[name] = tensor.clone()
    return merged


def weight_average(experts: Sequence[StateDict]) -> dict[str, Tensor]:
    """The element-wise mean of the experts' weights (model soup / simple averaging)."""
    if not experts:
        raise ValueError("weight_average needs at least one expert")
    _check_same_keys(experts[0], experts[1:], "expert")
    return {
        name: torch.stack([e[name].float() for e in experts]).mean(0).to(t.dtype)
        if t.is_floating_point()
        else t.clone()
        for name, t in experts[0].items()
    }


def check_fraction_kept(owner: str, k: float) -> None:
    """A one-line error unless ``k``, the fraction of a task vector's entries TIES keeps, is in (0, 1]."""
    if not 0 < k <= 1:
        raise ConfigError(f"{owner}: k is the fraction of entries kept, in (0, 1]; got {k}")


def kth_magnitude(tensors: Sequence[Tensor], k: int) -> Tensor:
    """The ``k``-th smallest magnitude over all entries of ``tensors`` (one threshold for a
    whole task vector: TIES' trim and the attribution's trim)."""
    return torch.cat([t.flatten().abs() for t in tensors]).kthvalue(k).values


def ties_merging(
    base: StateDict, experts: Sequence[StateDict], k: float = 0.2, scaling: float = 0.3
) -> dict[str, Tensor]:
    """TIES-merging (Yadav et al., 2023): ``θ = θ_0 + scaling · τ_m`` where ``τ_m`` comes from

    1. **trim**: keep each task vector's top-``k`` fraction of entries by magnitude, over the
       whole vector (``k=0.2`` keeps 20 %; ties at the threshold are kept), zero the rest;
    2. **elect**: per entry, the sign of the summed trimmed values (the sign with more mass);
    3. **disjoint mean**: per entry, the mean over the experts whose trimmed value is non-zero
       and agrees with the elected sign (0 where none does).
    """
    check_fraction_kept("ties_merging", k)
    vectors = task_vectors(base, experts)
    if not vectors:
        raise ValueError("ties_merging needs at least one expert")
    names = list(vectors[0])
    trimmed = []
    for vector in vectors:
        size = sum(vector[name].numel() for name in names)
        keep = max(1, round(k * size))
        threshold = kth_magnitude([vector[name] for name in names], size - keep + 1)
        trimmed.append({name: torch.where(vector[name].abs() >= threshold, vector[name], 0.0) for name in names})
    merged = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            merged[name] = tensor.clone()
            continue
        stack = torch.stack([t[name] for t in trimmed])
        elected = torch.sign(stack.sum(0))
        agrees = (torch.sign(stack) == elected) & (stack != 0)
        count = agrees.sum(0)
        mean = torch.where(agrees, stack, 0.0).sum(0) / count.clamp_min(1)
        merged[name] = (tensor.float() + scaling * mean).to(tensor.dtype)
    return merged


def orthogonal_components(matrices: Sequence[Tensor]) -> list[Tensor]:
    """TSV's decorrelation of ``T`` tasks' updates of one matrix (Gargiulo et al., CVPR 2025,
    "Task Singular Vectors"): each task's top ``k = max(1, min(m, n) // T)`` singular components
    ``U_i S_i V_iᵀ``; the stacked ``[U_1 … U_T]`` and ``[V_1 … V_T]`` are replaced by their nearest
    matrices with orthonormal columns (the polar factor ``P Qᵀ`` of ``P Σ Qᵀ``), so no two tasks'
    updates share an input or an output direction; task ``i`` keeps its own singular values.
    ``[m, n]`` matrices in, the same shapes out (float32)."""
    k = max(1, min(matrices[0].shape) // len(matrices))
    left, values, right = [], [], []
    for matrix in matrices:
        u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
        left.append(u[:, :k])
        values.append(s[:k])
        right.append(vh[:k].T)
    u, v = _nearest_orthonormal(torch.cat(left, 1)), _nearest_orthonormal(torch.cat(right, 1))
    blocks = [slice(i * k, (i + 1) * k) for i in range(len(matrices))]
    return [(u[:, b] * s) @ v[:, b].T for b, s in zip(blocks, values)]


def _nearest_orthonormal(a: Tensor) -> Tensor:
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def orthogonal_task_vectors(vectors: Sequence[StateDict]) -> list[dict[str, Tensor]]:
    """Every expert's task vector with each tensor of two or more dimensions (as ``[shape[0], -1]``)
    replaced by its :func:`orthogonal_components`; other tensors (biases, norms) unchanged."""
    out: list[dict[str, Tensor]] = [{} for _ in vectors]
    for name, first in vectors[0].items():
        if first.ndim < 2:
            for o, vector in zip(out, vectors):
                o[name] = vector[name].float().clone()
            continue
        parts = orthogonal_components([vector[name].reshape(first.shape[0], -1) for vector in vectors])
        for o, part in zip(out, parts):
            o[name] = part.reshape(first.shape)
    return out


def tsv_merging(base: StateDict, experts: Sequence[StateDict], scaling: float = 1.0) -> dict[str, Tensor]:
    """TSV-M: ``θ_0 + scaling · Σ_i τ̃_i`` over the matrices (:func:`orthogonal_task_vectors`),
    ``θ_0 + scaling · mean_i τ_i`` over the other tensors (as the reference merges them)."""
    vectors = task_vectors(base, experts)
    orthogonal = orthogonal_task_vectors(vectors)
    merged = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            merged[name] = tensor.clone()
            continue
        if tensor.ndim < 2:
            update = sum(v[name] for v in vectors) / len(vectors)
        else:
            update = sum(o[name] for o in orthogonal)
        merged[name] = (tensor.float() + scaling * update).to(tensor.dtype)
    return merged
