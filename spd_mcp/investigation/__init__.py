"""Investigation task directories: events, research log, explanations, summary, artifacts."""

from .taskdir import Event, TaskDir, TaskInfo, create_task, investigations_root, list_tasks

__all__ = ["Event", "TaskDir", "TaskInfo", "create_task", "investigations_root", "list_tasks"]
