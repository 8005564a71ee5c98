"""Task names to task objects, imported lazily so that one task's dependencies never load another's."""
from __future__ import annotations

import importlib

from fastvlp.train.tasks.base import Task

_MODULES = {
    "vqa": "fastvlp.train.tasks.vqa:VqaTask",
    "nlvr2": "fastvlp.train.tasks.nlvr2:Nlvr2Task",
    "caption": "fastvlp.train.tasks.caption:CaptionTask",
    "retrieval": "fastvlp.train.tasks.retrieval:RetrievalTask",
    "detection": "fastvlp.train.tasks.detection:DetectionTask",
}
TASK_NAMES = tuple(_MODULES)


def get_task(name: str) -> Task:
    """A fresh task object for ``name`` (one of :data:`TASK_NAMES`)."""
    if name not in _MODULES:
        raise ValueError(f"task: expected one of {list(TASK_NAMES)}, got {name!r}")
    module, attribute = _MODULES[name].split(":")
    return getattr(importlib.import_module(module), attribute)()
