"""The registry of tasks: a new task is one module (see ``task.Task`` and docs/harness.md) and one
line here. The first task is the default: a data SPEC that no other task claims goes to it."""

from __future__ import annotations

from typing import Any

from .image_task import ImageClassification
from .task import Task
from .text_task import SentenceClassification, Translation

TASKS: tuple[type[Task], ...] = (
    ImageClassification,
    SentenceClassification,
    Translation,
)


def for_spec(spec: str | None) -> type[Task]:
    """The task of a data SPEC (``--data``)."""
    for task in TASKS[1:]:
        if spec and task.claims(spec):
            return task
    return TASKS[0]


def for_config(cfg: Any) -> type[Task]:
    """The task that trains ``cfg``: its data's, or else the first whose config class it is."""
    task = for_spec(cfg.data)
    return task if isinstance(cfg, task.config) else next(t for t in TASKS if isinstance(cfg, t.config))


def for_protocol(name: str) -> type[Task] | None:
    return next((t for t in TASKS if name in t.protocols), None)
