"""The merged encoder: ``θ(λ, m) = θ_0 + Σ_i λ_i ⊙ m ⊙ τ_i`` as a functional forward.

The base tower is a frozen template; its weights are never overwritten. Task vectors are kept
as one ``[T, n]`` matrix per tensor, so forming a merged tensor is one matrix–vector product
(``λ[:, l] @ τ_l``), and back-propagating into ``λ`` and the mask is the same cheap
element-wise work. The mask is shared by all experts, so ``Σ_i λ_i ⊙ m ⊙ τ_i = m ⊙ Σ_i λ_i τ_i``.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from safemerge.merging.arithmetic import task_vectors

Granularity = Literal["task", "layer"]


class MergedEncoder(nn.Module):
    """A frozen image tower plus the task vectors of ``T`` experts fine-tuned from it.

    ``weights(coefficients, mask)`` builds the merged state dict (differentiable in both);
    ``forward(images, weights)`` runs the tower with those weights. Coefficients are
    ``[T]`` (task-wise) or ``[T, L]`` (layer-wise: one per expert per merged tensor, in the
    order of :attr:`names`); the mask is a list of tensors aligned with :attr:`names`.

    Every floating-point tensor of the tower's state dict is merged; other entries are the
    base's.
    """

    def __init__(self, tower: nn.Module, experts: Sequence[Mapping[str, Tensor]]) -> None:
        super().__init__()
        if not experts:
            raise ValueError("merging needs at least one expert")
        self.tower = tower.requires_grad_(False)
        base = tower.state_dict()
        vectors = task_vectors(base, experts)
        self.names = list(vectors[0])
        self.shapes = [base[name].shape for name in self.names]
        self.num_experts = len(experts)
        for index, name in enumerate(self.names):
            stacked = torch.stack([v[name].flatten() for v in vectors])
            self.register_buffer(f"_vectors_{index}", stacked, persistent=False)

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    def vectors(self, index: int) -> Tensor:
        """``[T, n]``: the experts' task vectors for the merged tensor ``names[index]``."""
        return getattr(self, f"_vectors_{index}")

    def base(self) -> dict[str, Tensor]:
        """The base weights (the template tower's own tensors, not copies)."""
        return self.tower.state_dict(keep_vars=True)

    def coefficients(self, granularity: Granularity, value: float) -> Tensor:
        """Initial coefficients: ``[T, 1]`` task-wise or ``[T, L]`` layer-wise, all ``value``."""
        columns = 1 if granularity == "task" else self.num_tensors
        return torch.full((self.num_experts, columns), float(value), device=self.vectors(0).device)

    def weights(self, coefficients: Tensor, mask: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """The merged state dict ``θ_0 + m ⊙ Σ_i λ_i τ_i``."""
        coefficients = coefficients.reshape(self.num_experts, -1)
        if coefficients.shape[1] not in (1, self.num_tensors):
            raise ValueError(
                f"coefficients must be [T], [T, 1] or [T, {self.num_tensors}]; got {tuple(coefficients.shape)}"
            )
        coefficients = coefficients.expand(self.num_experts, self.num_tensors)
        state = self.base()
        # Weights are formed in full precision even under autocast; only the forward is cast.
        with torch.autocast(coefficients.device.type, enabled=False):
            for index, (name, shape) in enumerate(zip(self.names, self.shapes)):
                update = (coefficients[:, index].to(self.vectors(index).dtype) @ self.vectors(index)).view(shape)
                if mask is not None:
                    update = update * mask[index]
                state[name] = state[name] + update
        return state

    def expert_weights(self, expert: int) -> dict[str, Tensor]:
        """Expert ``expert``'s own weights, ``θ_0 + τ_i``."""
        coefficients = torch.zeros(self.num_experts, 1, device=self.vectors(0).device)
        coefficients[expert] = 1.0
        return self.weights(coefficients)

    def forward(self, images: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
        return functional_call(self.tower, dict(weights), (images,))
