"""Task registry, dataset builders and datamodules."""

from safemerge.data.captions import CaptionDataModule
from safemerge.data.datamodule import TaskDataModule
from safemerge.data.merge import MergeDataModule
from safemerge.data.registry import Task, get_task, register_task, task_names

__all__ = ["CaptionDataModule", "MergeDataModule", "Task", "TaskDataModule", "get_task", "register_task", "task_names"]
