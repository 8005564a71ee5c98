"""The training loop's ``--cuda-graph`` mode: each step's forward, backward and gradient clipping replayed from
one CUDA graph (:class:`~fastvlp.train.captured_step.CapturedTrainingStep`) where the batch fits the task's fixed
shapes, and run eagerly where it does not (counted). The loop keeps the optimizer step, the learning-rate
schedule, the non-finite check and the checkpoints as they are."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch

from fastvlp.train.captured_step import CapturedTrainingStep


def cuda_graph_problem(device: torch.device, grad_accum: int, world_size: int, matcher_backend: Optional[str],
                       has_fixed_shapes: bool = True) -> Optional[str]:
    """Why ``--cuda-graph`` cannot run with these settings, or None."""
    if device.type != "cuda":
        return f"cuda_graph: needs a CUDA device, got {device}"
    if grad_accum != 1:
        return f"cuda_graph: replays whole optimiser steps, so --grad-accum must be 1, got {grad_accum}"
    if world_size != 1:
        return f"cuda_graph: runs in one process, got a world of {world_size}"
    if matcher_backend != "fastvlp":
        return (f"cuda_graph: needs --matcher-backend fastvlp (the {matcher_backend!r} matcher solves on the host, "
                "which a graph cannot hold)")
    if not has_fixed_shapes:
        return "cuda_graph: this task has no fixed-shape batches to replay"
    return None


class GraphSteps:
    """Forward, backward and clipping of ``model`` on batches made fixed by ``fixed_shapes`` (None: the batch does
    not fit), captured on the first batch that fits. ``run(batch)`` returns ``(output, grad_norm)`` after a
    replay, or None where the caller must run the step eagerly; ``replays`` and ``fallbacks`` count both."""

    def __init__(self, model, fixed_shapes: Callable[[Any], Optional[Any]], clip_max_norm: float, amp: bool,
                 warmup_steps: int = 2) -> None:
        self.model, self.fixed_shapes, self.clip_max_norm, self.amp = model, fixed_shapes, clip_max_norm, amp
        self.warmup_steps = warmup_steps
        self.captured: Optional[CapturedTrainingStep] = None
        self.replays = 0
        self.fallbacks = 0

    def run(self, batch) -> Optional[Tuple[Any, torch.Tensor]]:
        fixed = self.fixed_shapes(batch)
        if fixed is not None and self.captured is None:
            self.captured = CapturedTrainingStep(self.model, None, fixed, amp=self.amp,
                                                 clip_max_norm=self.clip_max_norm, warmup_steps=self.warmup_steps)
        if fixed is None or not self.captured.accepts(fixed):
            self.fallbacks += 1
            return None
        output = self.captured.step(fixed)
        self.replays += 1
        return output, self.captured.grad_norm
