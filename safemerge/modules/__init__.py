"""LightningModules: the glue between the pure tensor code and Lightning."""

from safemerge.modules.finetune import FinetuneModule

__all__ = ["FinetuneModule"]
