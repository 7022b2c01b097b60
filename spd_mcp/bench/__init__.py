"""``spd-mcp bench``: tasks that ask an agent for a planted mechanism, graded by causal re-check
(docs/bench.md). Tasks are YAML files in ``bench/tasks/``; :func:`grade` checks one answer."""

from .grade import Answer, GradeResult, Scores, grade
from .tasks import BenchTask, TaskError, load_task, load_tasks

__all__ = ["Answer", "BenchTask", "GradeResult", "Scores", "TaskError", "grade", "load_task",
           "load_tasks"]
