"""The merged encoder: ``θ(λ, m) = θ_0 + Σ_i λ_i ⊙ m ⊙ τ_i`` as a functional forward.

The base tower is a frozen template; its weights are never overwritten. Task vectors are kept
as one ``[T, n]`` matrix per tensor, so forming a merged tensor is one matrix–vector product
(``λ[:, l] @ τ_l``), and back-propagating into ``λ`` and the mask is the same cheap
element-wise work. The mask is shared by all experts, so ``Σ_i λ_i ⊙ m ⊙ τ_i = m ⊙ Σ_i λ_i τ_i``.

Two options trade a little for memory at scale (bench/README.md, "Memory at scale"): task vectors
stored in bfloat16 (half their memory; merged weights are still formed in float32, so only τ's
rounding, 2^-9 relative, differs), and a checkpointed forward in chunks of images (only one
chunk's activations are alive at a time; the backward recomputes each chunk's forward once).
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from safemerge.merging.arithmetic import _check_same_keys, kth_magnitude, orthogonal_components
from safemerge.merging.masks import clamped_mean
from safemerge.merging.subspace import restrict

Granularity = Literal["task", "layer"]


class MergedEncoder(nn.Module):
    """A frozen image tower plus the task vectors of ``T`` experts fine-tuned from it.

    ``weights(coefficients, mask)`` builds the merged state dict (differentiable in both);
    ``forward(images, weights)`` runs the tower with those weights. Coefficients are
    ``[T]`` (task-wise) or ``[T, L]`` (layer-wise: one per expert per merged tensor, in the
    order of :attr:`names`); the mask is a list of tensors aligned with :attr:`names`.

    Every floating-point tensor of the tower's state dict is merged; other entries are the
    base's.

    Args:
        tower: the pretrained image tower (θ_0), used as a frozen template.
        experts: the experts' state dicts of the same tower.
        vector_dtype: storage dtype of the task vectors (``torch.bfloat16`` halves them).
        checkpoint_chunk: with gradients enabled, run the forward in checkpointed chunks of
            this many images (None: one plain forward).
    """

    def __init__(
        self,
        tower: nn.Module,
        experts: Sequence[Mapping[str, Tensor]],
        *,
        vector_dtype: torch.dtype = torch.float32,
        checkpoint_chunk: int | None = None,
    ) -> None:
        super().__init__()
        if not experts:
            raise ValueError("merging needs at least one expert")
        if not vector_dtype.is_floating_point:
            raise ValueError(f"task vectors must be stored in a floating-point dtype, got {vector_dtype}")
        if checkpoint_chunk is not None and checkpoint_chunk < 1:
            raise ValueError(f"checkpoint_chunk must be >= 1 image, got {checkpoint_chunk}")
        self.checkpoint_chunk = checkpoint_chunk
        self.tower = tower.requires_grad_(False)
        base = tower.state_dict()
        _check_same_keys(base, experts, "expert")
        self.names = [name for name, tensor in base.items() if tensor.is_floating_point()]
        self.shapes = [base[name].shape for name in self.names]
        self.num_experts = len(experts)
        self._unedited: dict[int, list[Tensor]] = {}  # expert -> task vector before edit_expert_
        for index, name in enumerate(self.names):
            # τ_i = θ_i − θ_0 one tensor at a time: never more than the [T, n] result at once
            stacked = torch.stack([e[name].flatten().float() for e in experts])
            stacked.sub_(base[name].flatten().float())
            self.register_buffer(f"_vectors_{index}", stacked.to(vector_dtype), persistent=False)

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

    def weights(
        self, coefficients: Tensor, mask: Sequence[Tensor] | None = None, rescale: bool = False
    ) -> dict[str, Tensor]:
        """The merged state dict ``θ_0 + m ⊙ Σ_i λ_i τ_i`` (``m / mean(m)`` per tensor with ``rescale``)."""
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
                if mask is not None:  # one node that keeps only λ, m and mean(m) for backward
                    state[name] = _MaskedMergeFunction.apply(
                        coefficients[:, index], self.vectors(index), state[name], mask[index], rescale
                    )
                    continue
                vectors = self.vectors(index)
                update = (
                    coefficients[:, index].to(_compute_dtype(vectors)) @ vectors.to(_compute_dtype(vectors))
                ).view(shape)
                state[name] = state[name] + update
        return state

    def expert_weights(self, expert: int) -> dict[str, Tensor]:
        """Expert ``expert``'s own weights, ``θ_0 + τ_i`` (as fine-tuned, even after an edit)."""
        if expert in self._unedited:
            state = self.base()
            for name, vector in zip(self.names, self._unedited[expert]):
                state[name] = state[name] + vector.to(state[name].device).view(state[name].shape)
            return state
        return self.edited_weights(expert)

    def edited_weights(self, expert: int) -> dict[str, Tensor]:
        """``θ_0 + τ_i`` with expert ``expert``'s task vector as the edits left it (what a merge
        uses; :meth:`expert_weights` is the expert as fine-tuned)."""
        coefficients = torch.zeros(self.num_experts, 1, device=self.vectors(0).device)
        coefficients[expert] = 1.0
        return self.weights(coefficients)

    @torch.no_grad()
    def restrict_(self, expert: int, bases: Mapping[str, Tensor]) -> None:
        """Restrict one expert's task vector, per matrix named in ``bases``, to the span of that
        matrix's basis (:func:`~safemerge.merging.subspace.restrict`); other tensors unchanged.
        The unedited vector is kept (on the CPU) for :meth:`expert_weights`."""
        self._unedited.setdefault(expert, [self.vectors(i)[expert].cpu().clone() for i in range(self.num_tensors)])
        for index, (name, shape) in enumerate(zip(self.names, self.shapes)):
            if name in bases:
                row = self.vectors(index)[expert]
                restricted = restrict(row.float().view(shape), bases[name].to(row.device))
                row.copy_(restricted.flatten().to(row.dtype))

    @torch.no_grad()
    def edit_expert_(self, expert: int, scale: float | None = None, trim: float | None = None) -> None:
        """Shrink one expert's task vector in every merge from now on: multiply it by ``scale``,
        or zero the fraction ``trim`` of its entries with the smallest magnitudes (over the
        whole vector, as TIES' trim). The unedited vector is kept (on the CPU) for
        :meth:`expert_weights`."""
        rows = [self.vectors(i)[expert] for i in range(self.num_tensors)]
        self._unedited.setdefault(expert, [row.cpu().clone() for row in rows])
        if scale is not None:
            for row in rows:
                row.mul_(scale)
        if trim:
            threshold = kth_magnitude(rows, max(1, round(trim * sum(row.numel() for row in rows))))
            for row in rows:
                row.masked_fill_(row.abs() <= threshold, 0.0)

    @torch.no_grad()
    def orthogonalise_(self) -> None:
        """Replace every expert's task vector by TSV's: per tensor of two or more dimensions,
        :func:`~safemerge.merging.arithmetic.orthogonal_components` of the experts' current
        vectors (other tensors unchanged). The vectors as fine-tuned stay what
        :meth:`expert_weights` returns."""
        for expert in range(self.num_experts):
            self._unedited.setdefault(expert, [self.vectors(i)[expert].cpu().clone() for i in range(self.num_tensors)])
        for index, shape in enumerate(self.shapes):
            if len(shape) >= 2:
                vectors = self.vectors(index)
                parts = orthogonal_components([row.float().view(shape[0], -1) for row in vectors])
                vectors.copy_(torch.stack([part.flatten() for part in parts]).to(vectors.dtype))

    def forward(self, images: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
        chunk = self.checkpoint_chunk
        if chunk is None or len(images) <= chunk or not torch.is_grad_enabled():
            return functional_call(self.tower, dict(weights), (images,))
        # Non-reentrant checkpointing follows the weights captured by the closure, so gradients
        # still reach λ and the mask; each chunk's activations are recomputed in the backward.
        run = lambda x: functional_call(self.tower, dict(weights), (x,))  # noqa: E731
        return torch.cat([checkpoint(run, x, use_reentrant=False) for x in images.split(chunk)])


def _compute_dtype(vectors: Tensor) -> torch.dtype:
    """Merged weights are formed in at least float32, whatever the task vectors are stored in."""
    return torch.promote_types(vectors.dtype, torch.float32)


class _MaskedMergeFunction(torch.autograd.Function):
    """``base + (m / c) ⊙ (λ @ V).view(m.shape)``; ``c = mean(m)`` with ``rescale``, else 1.

    Differentiable in λ and m. Backward recomputes ``λ @ V`` rather than keeping it, so the graph
    holds no model-sized tensor besides ``m`` (which the mask's sigmoid keeps anyway) and the
    output (which the tower's backward needs).
    """

    @staticmethod
    def forward(ctx, lam: Tensor, vectors: Tensor, base: Tensor, mask: Tensor, rescale: bool) -> Tensor:
        ctx.lam_dtype, ctx.rescale = lam.dtype, rescale
        lam = lam.to(_compute_dtype(vectors))
        update = (lam @ vectors.to(lam.dtype)).view(mask.shape)
        inv = 1.0 / clamped_mean(mask) if rescale else mask.new_ones(())
        if torch.result_type(update, mask) == update.dtype and torch.result_type(update, base) == update.dtype:
            out = update.mul_(mask).mul_(inv).add_(base)
        else:
            out = base + update * mask * inv
        ctx.save_for_backward(lam, vectors, mask, inv)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        lam, vectors, mask, inv = ctx.saved_tensors
        vectors = vectors.to(lam.dtype)  # a transient float32 copy of one tensor's vectors if stored in bf16
        grad_lam = grad_mask = None
        if ctx.needs_input_grad[0]:
            grad_lam = (vectors @ (grad * mask).flatten().to(vectors.dtype) * inv).to(ctx.lam_dtype)
        if ctx.needs_input_grad[3]:
            a = (lam @ vectors).view(mask.shape) * grad  # g ⊙ (λ @ V), recomputed
            if ctx.rescale:  # d/dm of m / mean(m): a / c − Σ(a ⊙ m) / (c² n)
                correction = torch.dot(a.flatten(), mask.flatten().to(a.dtype)) * inv * inv / mask.numel()
                a = a.mul_(inv).sub_(correction)
            grad_mask = a.to(mask.dtype)
        return grad_lam, None, None, grad_mask, None
