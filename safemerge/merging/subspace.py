"""Clean-subspace restriction: each expert's task vector kept only where its own task's clean
inputs lie.

A weight matrix ``W`` (``[out, in]``) acts on an input ``a``: a linear layer's input, an
attention block's query/key/value input (``in_proj_weight``), a patch embedding's flattened
patches. For one expert, ``C = E[a aᵀ]`` over unlabeled images of its own task, run through the
expert as fine-tuned. With ``C = Q Λ Qᵀ`` and ``Q_k`` the leading eigenvectors that hold the
fraction ``energy`` of ``tr C``, the expert's update ``τ = W − W_0`` becomes ``τ Q_k Q_kᵀ``.
On clean images of its task the restricted expert computes nearly what it did (their inputs lie
almost wholly in that subspace); on inputs outside it, which is where a trigger's features fall
when clean images never produce them, the layer acts as the pretrained one. A backdoor is thus
cut from its expert without a trigger, a label or another expert, before any merge.

The restriction covers the matrices whose input a forward hook sees: ``nn.Linear`` layers that
are called as modules, ``nn.MultiheadAttention``'s packed input projection (self-attention),
and a ``Conv2d`` patch embedding (stride = kernel, no padding). Matrices used only inside a
functional call (open_clip's attention ``out_proj``, the final ``proj`` parameter) and every
tensor of one dimension (biases, norms, embeddings) keep their update unchanged.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from safemerge.errors import ConfigError


def check_energy(owner: str, energy: float) -> None:
    if not 0 < energy <= 1:
        raise ConfigError(f"{owner}: the energy fraction kept must be in (0, 1], got {energy}")


def _is_patch_embedding(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and tuple(module.stride) == tuple(module.kernel_size)
        and all(p == 0 for p in module.padding)
    )


@torch.no_grad()
def input_moments(
    tower: nn.Module, weights: Mapping[str, Tensor], images: Tensor, batch_size: int = 256
) -> dict[str, Tensor]:
    """``E[a aᵀ]`` (float64, ``[in, in]``) of the input of every matrix a hook sees (see the
    module docstring), keyed by the matrix's name in ``weights``, over ``images`` (already
    normalised for ``tower``) through ``tower`` with ``weights``."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def add(name: str, inputs: Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).double()
        sums[name] = sums.get(name, 0) + rows.T @ rows
        counts[name] = counts.get(name, 0) + len(rows)

    def linear(name):
        return lambda module, args: add(name, args[0])

    def attention(name):
        def hook(module, args, kwargs):
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key", query)
            value = args[2] if len(args) > 2 else kwargs.get("value", key)
            if key is query and value is query:  # self-attention: one input for q, k and v
                add(name, query)

        return hook

    def patches(name, module):
        size, stride = module.kernel_size, module.stride
        return lambda m, args: add(name, F.unfold(args[0], size, stride=stride).transpose(1, 2))

    hooks = []
    for prefix, module in tower.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, nn.Linear) and f"{dot}weight" in weights:
            hooks.append(module.register_forward_pre_hook(linear(f"{dot}weight")))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            hooks.append(module.register_forward_pre_hook(attention(f"{dot}in_proj_weight"), with_kwargs=True))
        elif _is_patch_embedding(module) and f"{dot}weight" in weights:
            hooks.append(module.register_forward_pre_hook(patches(f"{dot}weight", module)))
    try:
        for chunk in images.split(batch_size):
            functional_call(tower, dict(weights), (chunk,))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: s / counts[name] for name, s in sums.items()}


def clean_basis(moment: Tensor, energy: float) -> Tensor:
    """``Q_k`` (``[in, k]``, float32): the fewest leading eigenvectors of ``moment`` whose
    eigenvalues hold at least the fraction ``energy`` of its trace."""
    values, vectors = torch.linalg.eigh(moment.double())
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    total = values.sum()
    if total <= 0:  # an input that is always zero: nothing of the update acts on clean data
        return vectors[:, :0].float()
    k = int((values.cumsum(0) < energy * total).sum()) + 1
    return vectors[:, : min(k, len(values))].float()


def restrict(update: Tensor, basis: Tensor) -> Tensor:
    """``τ Q Qᵀ``: the update (``[out, ...]``, flattened to ``[out, in]``) restricted to the span of ``basis``."""
    matrix = update.reshape(update.shape[0], -1).float()
    return ((matrix @ basis) @ basis.T).reshape(update.shape)


def clean_bases(tower: nn.Module, weights: Mapping[str, Tensor], images: Tensor, energy: float) -> dict[str, Tensor]:
    """One expert's :func:`clean_basis` per matrix, from its own task's (normalised) images."""
    check_energy("clean subspace", energy)
    return {name: clean_basis(m, energy) for name, m in input_moments(tower, weights, images).items()}
