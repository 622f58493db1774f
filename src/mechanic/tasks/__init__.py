"""Tasks: prompt sets with answers and a metric (the behaviour to locate, steer and improve)."""

from mechanic.tasks.task import Example, Task, TaskBatch

__all__ = ["Example", "Task", "TaskBatch"]
