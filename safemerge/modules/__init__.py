"""LightningModules: the glue between the pure tensor code and Lightning."""

from safemerge.modules.finetune import FinetuneModule
from safemerge.modules.merge import MergeModule
from safemerge.modules.pretrain import PretrainModule

__all__ = ["FinetuneModule", "MergeModule", "PretrainModule"]
