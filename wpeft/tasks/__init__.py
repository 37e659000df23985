"""Downstream tasks on one API (``wpeft.tasks.base.Task``): importing registers them."""

from wpeft.tasks import downscaling, postprocessing, precipitation  # noqa: F401  (registration)
from wpeft.tasks.base import TASKS, Task, TaskBatch, TaskConfig, create_task, register_task

__all__ = ["TASKS", "Task", "TaskBatch", "TaskConfig", "create_task", "register_task"]
