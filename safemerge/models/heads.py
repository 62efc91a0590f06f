"""Frozen zero-shot classification heads built from the text tower."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from safemerge.errors import CheckpointError
from safemerge.io import cache_dir, load_tensors, save_tensors
from safemerge.models.loading import CLIPModel

if TYPE_CHECKING:
    from safemerge.data.registry import Task


@torch.no_grad()
def zero_shot_head(clip: CLIPModel, classnames: Sequence[str], prompts: Sequence[Sequence[str]]) -> Tensor:
    """The ``[num_classes, embed_dim]`` head of a task, logit scale included.

    For each class, every prompt (class name × template) is embedded by the text tower and
    L2-normalised; the embeddings are averaged and renormalised; the result is multiplied by
    the model's logit scale, so ``normalize(image_features) @ head.T`` are CLIP's logits.
    ``prompts[i]`` are the prompts of class ``classnames[i]``.
    """
    model = clip.model
    device = next(model.parameters()).device
    rows = []
    for class_prompts in prompts:
        tokens = clip.tokenizer(list(class_prompts), context_length=clip.context_length).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(rows) * model.logit_scale.exp().float()


def text_fingerprint(clip: CLIPModel) -> str:
    """A hash of every weight outside the image tower (text tower and logit scale) and of the
    text tower's activations: the same weights under GELU and QuickGELU embed differently."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(clip.model.state_dict().items()):
        if name.startswith("visual."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for name, module in clip.model.named_modules():
        if not name.startswith("visual") and not list(module.children()) and not list(module.parameters(recurse=False)):
            digest.update(f"{name}:{type(module).__name__}".encode())  # parameter-free leaves: activations
    return digest.hexdigest()


def cached_zero_shot_head(
    clip: CLIPModel,
    task: str,
    classnames: Sequence[str],
    prompts: Sequence[Sequence[str]],
    *,
    fingerprint: str | None = None,
) -> Tensor:
    """:func:`zero_shot_head`, cached on disk keyed by model, text weights, task and prompts.

    ``fingerprint`` is :func:`text_fingerprint` of ``clip``, when the caller already has it
    (it hashes every text weight: compute it once per model, not once per task).
    """
    key_source = json.dumps(
        {
            "model": clip.name,
            "weights": fingerprint or text_fingerprint(clip),
            "task": task,
            "classnames": list(classnames),
            "prompts": [list(p) for p in prompts],
        }
    )
    key = hashlib.sha256(key_source.encode()).hexdigest()[:32]
    path = cache_dir("heads", f"{task}-{key}.safetensors")
    if path.is_file():
        return load_tensors(path)["head"]
    head = zero_shot_head(clip, classnames, prompts)
    save_tensors(path, {"head": head})
    return head


def cached_task_heads(
    clip: CLIPModel, tasks: Iterable[Task], given: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The cached zero-shot head of each task (class names × the task's templates), except for
    the tasks in ``given``: an expert's own head (``head.safetensors``, e.g. a converted
    task_vectors head), used as it is, so a pool merges with the heads it was evaluated with."""
    given = dict(given or {})
    tasks = list(tasks)
    fingerprint = text_fingerprint(clip) if any(t.name not in given for t in tasks) else None
    heads = {}
    for task in tasks:
        if task.name in given:
            heads[task.name] = _checked_head(clip, task, given[task.name])
        else:
            heads[task.name] = cached_zero_shot_head(
                clip, task.name, task.classnames, [task.prompts(c) for c in task.classnames], fingerprint=fingerprint
            )
    return heads


def _checked_head(clip: CLIPModel, task: Task, head: Tensor) -> Tensor:
    embed_dim = clip.visual.output_dim
    if tuple(head.shape) != (task.num_classes, embed_dim):
        raise CheckpointError(
            f"the head given for task {task.name} has shape {tuple(head.shape)}; the task and model need "
            f"({task.num_classes}, {embed_dim}) (classes x embedding width)"
        )
    return head.float()
