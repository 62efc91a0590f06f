"""A prototype of a leaner masked merge, benchmarked as the ``ours_fused`` variant of merged_step.py.

Same maths as ``MergedEncoder.weights(λ, combine(mask.sample(generator)))``:

    s = sigmoid((logits + logit(u)) / temperature),  u ~ U(0, 1) clamped to [1e-6, 1 − 1e-6]
    θ = θ0 + (s / mean(s)) ⊙ (λ @ V)

but (1) the logistic noise is one ``logit_`` in place instead of ``log(u) − log1p(−u)`` and the
sample is formed in place, and (2) the rescale and the masked update are one autograd Function
that saves only ``s`` (which the sigmoid keeps anyway), λ and the mean, and recomputes
``λ @ V`` in backward, instead of keeping ``s / mean(s)`` and ``λ @ V`` alive (two extra copies of
the model) until the backward pass. Not used by safemerge; see bench/README.md ("Proposed change").
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample(mask, generator: torch.Generator | None = None) -> list[Tensor]:
    """``ConcreteMask.sample`` with fewer passes (identical values up to rounding)."""
    out = []
    for logits in mask.logits:
        noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        noise.logit_(1e-6)  # clamp to [eps, 1 − eps], then log(u) − log(1 − u)
        out.append((logits + noise).div_(mask.temperature).sigmoid_())
    return out


class _MaskedUpdate(torch.autograd.Function):
    """``base + (s / mean(s)) ⊙ (λ @ V).view(shape)``; differentiable in λ and s."""

    @staticmethod
    def forward(ctx, lam: Tensor, vectors: Tensor, base: Tensor, s: Tensor) -> Tensor:
        inv = 1.0 / s.mean().clamp_min(torch.finfo(s.dtype).tiny)
        out = (lam.to(vectors.dtype) @ vectors).view(s.shape)
        out.mul_(s).mul_(inv).add_(base)
        ctx.save_for_backward(lam, vectors, s, inv)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        lam, vectors, s, inv = ctx.saved_tensors
        grad_lam = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_lam = (vectors @ (grad * s).flatten()).mul_(inv).to(lam.dtype)
        if ctx.needs_input_grad[3]:
            a = (lam.to(vectors.dtype) @ vectors).view(s.shape).mul_(grad)  # g ⊙ u, u recomputed
            correction = torch.dot(a.flatten(), s.flatten()) * inv * inv / s.numel()
            grad_s = a.mul_(inv).sub_(correction)
        return grad_lam, None, None, grad_s


def weights(encoder, coefficients: Tensor, mask: list[Tensor] | None) -> dict[str, Tensor]:
    """``encoder.weights(coefficients, combine(mask))`` for an unrescaled ``mask`` (one part)."""
    if mask is None:
        return encoder.weights(coefficients)
    coefficients = coefficients.reshape(encoder.num_experts, -1).expand(encoder.num_experts, encoder.num_tensors)
    state = encoder.base()
    for index, name in enumerate(encoder.names):
        state[name] = _MaskedUpdate.apply(coefficients[:, index], encoder.vectors(index), state[name], mask[index])
    return state
