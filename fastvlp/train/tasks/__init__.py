"""The five fine-tuning tasks of E2E-VLP (VQA, NLVR2, captioning, retrieval, detection); see :func:`get_task`."""
from fastvlp.train.tasks.registry import TASK_NAMES, get_task

__all__ = ["TASK_NAMES", "get_task"]
