"""State-dict algebra: task vectors, task arithmetic and weight averaging.

Only floating-point tensors are merged; other entries (integer buffers) are taken from the
base (or the first expert) unchanged.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

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


def task_arithmetic(base: StateDict, experts: Sequence[StateDict], scaling: float | Sequence[float] = 0.3) -> dict[str, Tensor]:
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
        name: torch.stack([e[name].float() for e in experts]).mean(0).to(t.dtype) if t.is_floating_point() else t.clone()
        for name, t in experts[0].items()
    }
