"""task_vectors checkpoints -> safemerge experts: the tensors collected from the inert stand-ins that
:mod:`safemerge.convert.restricted_pickle` reads, renamed to today's open_clip image tower and heads.

The parameters and persistent buffers are collected from the stand-ins' ``_parameters`` /
``_buffers`` / ``_modules`` exactly as ``nn.Module.state_dict`` walks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from safemerge.convert.restricted_pickle import StandIn, load
from safemerge.errors import CheckpointError

# ----------------------------------------------------------------------------- from stand-ins to tensors


def module_state(obj: StandIn, prefix: str = "", out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Parameters and persistent buffers of a stand-in module tree, as ``nn.Module.state_dict`` names them."""
    out = {} if out is None else out
    state = obj.state if isinstance(obj.state, dict) else {}
    for name, tensor in (state.get("_parameters") or {}).items():
        if tensor is not None:
            out[prefix + name] = tensor
    transient = state.get("_non_persistent_buffers_set") or set()
    for name, tensor in (state.get("_buffers") or {}).items():
        if tensor is not None and name not in transient:
            out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, StandIn):
            module_state(child, f"{prefix}{name}.", out)
    return out


def _child(obj: StandIn, path: str) -> StandIn | None:
    for name in path.split("."):
        modules = obj.state.get("_modules") if isinstance(obj.state, dict) else None
        obj = (modules or {}).get(name)
        if not isinstance(obj, StandIn):
            return None
    return obj


def image_tower(obj: Any, source: str) -> tuple[dict[str, Tensor], str | None]:
    """The image tower's state dict (today's open_clip ``visual.*`` names, without the prefix) and its
    activation (``quick_gelu``, ``gelu`` or None if unknown) from an ``ImageEncoder`` / ``CLIP`` / state dict.

    open_clip 2.0.2's ``VisualTransformer`` names its tensors as today's ``VisionTransformer``
    does; the architecture check that follows refuses any that differ.
    """
    if isinstance(obj, StandIn):
        root = {"src.modeling.ImageEncoder": "model.visual", "open_clip.model.CLIP": "visual"}.get(obj.qualname)
        visual = _child(obj, root) if root else None
        if visual is None:
            raise CheckpointError(
                f"{source} holds a {obj.qualname}, not a task_vectors ImageEncoder (or an open_clip CLIP)"
            )
        gelu = _child(visual, "transformer.resblocks.0.mlp.gelu")
        activation = None if gelu is None else "quick_gelu" if gelu.qualname.endswith("QuickGELU") else "gelu"
        return {k: v.clone() for k, v in module_state(visual).items()}, activation
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        for prefix in ("model.visual.", "visual.", ""):
            state = {k[len(prefix) :]: v.clone() for k, v in obj.items() if k.startswith(prefix)}
            if state and (prefix or "conv1.weight" in state):
                return state, None
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a task_vectors image encoder or a state dict")


def classification_head(obj: Any, source: str) -> Tensor:
    """A ``ClassificationHead`` as safemerge's head: ``normalize(features) @ head.T`` are its logits."""
    if not isinstance(obj, StandIn) or obj.qualname != "src.modeling.ClassificationHead":
        raise CheckpointError(
            f"{source} holds a {getattr(obj, 'qualname', type(obj).__name__)}, not a task_vectors ClassificationHead"
        )
    state = module_state(obj)
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or weight.ndim != 2 or not weight.is_floating_point():
        raise CheckpointError(f"{source}: the head has no [classes, width] weight")
    if not obj.state.get("normalize", False):
        raise CheckpointError(
            f"{source}: the head does not normalise its input; safemerge's heads do (logits = normalize(x) @ W.T)"
        )
    if bias is not None and bool(bias.abs().max() > 0):
        raise CheckpointError(f"{source}: the head has a non-zero bias, which safemerge's heads do not have")
    return weight.clone().float()


# ----------------------------------------------------------------------------- the conversion


def convert_task_vectors(
    source: Path, out: Path, task: str, model: str, pretrained: str, head: Path | None = None
) -> Path:
    """``task-vectors``: ``finetuned.pt`` (and ``head_<task>.pt``) -> a safemerge expert directory against
    the open_clip ``model`` / ``pretrained`` base; everything is read and checked before anything is written."""
    from safemerge.data.registry import get_task
    from safemerge.errors import UnknownTaskError
    from safemerge.io import Expert, check_weights, expert_info, write_expert
    from safemerge.models.loading import load_clip

    try:
        known = get_task(task)
    except UnknownTaskError as err:
        raise UnknownTaskError(f"--task for {source}: {err}") from None
    encoder, activation = image_tower(load(source), str(source))
    head_tensor = classification_head(load(head), str(head)) if head is not None else None
    pretrained = str(Path(pretrained).resolve()) if Path(pretrained).is_file() else pretrained
    base = load_clip(model, pretrained)
    ours = "quick_gelu" if type(base.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu"
    if activation is not None and activation != ours:
        raise CheckpointError(
            f"{source}'s tower uses {activation} but --model {model} builds {ours}: give the architecture it was "
            f"trained with (e.g. {model.removesuffix('-quickgelu')}-quickgelu for OpenAI's weights)"
        )
    check_weights(encoder, base.visual.state_dict(), f"{source} (as --model {model})")
    if head_tensor is not None:
        if head_tensor.shape[0] != known.num_classes:
            raise CheckpointError(
                f"{head} has {head_tensor.shape[0]} classes but task {known.name} has {known.num_classes}"
            )
        if head_tensor.shape[1] != base.visual.output_dim:
            raise CheckpointError(
                f"{head} has width {head_tensor.shape[1]} but --model {model} embeds into {base.visual.output_dim}"
            )
    info = expert_info(
        model=model,
        pretrained=pretrained,
        task=known.name,
        num_classes=known.num_classes,
        backdoor=None,
        metrics={"accuracy": None, "asr": None},
        image_size=base.image_size,
    )
    return write_expert(out, Expert(encoder=encoder, info=info, head=head_tensor))
