"""open_clip loading, zero-shot heads and the pixel-space classifier."""

from safemerge.models.classifier import ImageClassifier
from safemerge.models.heads import cached_task_heads, cached_zero_shot_head, zero_shot_head
from safemerge.models.loading import CLIPModel, load_clip, register_architecture

__all__ = [
    "CLIPModel",
    "ImageClassifier",
    "cached_task_heads",
    "cached_zero_shot_head",
    "load_clip",
    "register_architecture",
    "zero_shot_head",
]
