"""Experiment tooling beside the algorithms: the tasks (`build_task`), the toy model and rewards,
the sentiment recipe's body, the TRPO-vs-PPO comparison, plotting, and the adapter that runs TRL's
PPO on the same task. Nothing in the core package imports from here."""

from .tasks import TASKS, Task, build_task, task_for_model

__all__ = ["TASKS", "Task", "build_task", "task_for_model"]
