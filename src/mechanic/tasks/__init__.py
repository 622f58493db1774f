"""Tasks: prompt sets with answers and a metric (the behaviour to locate, steer and improve)."""

from mechanic.tasks.builtin import list_tasks, load_task
from mechanic.tasks.io import from_csv, from_jsonl, load_file, to_jsonl
from mechanic.tasks.task import Example, Task, TaskBatch, TaskError

__all__ = ["Example", "Task", "TaskBatch", "TaskError", "list_tasks", "load_task", "from_jsonl", "from_csv",
           "load_file", "to_jsonl"]
