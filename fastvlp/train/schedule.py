"""The learning-rate schedule: linear warm-up from 0, then linear decay to 0 at the last step."""
from __future__ import annotations

import torch


class WarmupLinearDecay:
    """Multiplier of the base learning rate after ``step`` completed updates: ``(step + 1) / warmup_steps``
    during warm-up, then falling linearly to 0 at ``max_steps``. A class (not a lambda) so that the
    schedule is a plain function of the step, which is all a checkpoint needs to record."""

    def __init__(self, warmup_steps: int, max_steps: int) -> None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps: expected a positive int, got {max_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= max_steps:
            raise ValueError(f"warmup_steps: expected an int in 0..max_steps={max_steps}, got {warmup_steps!r}")
        self.warmup_steps, self.max_steps = warmup_steps, max_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        remaining = self.max_steps - step
        return max(0.0, remaining / max(1, self.max_steps - self.warmup_steps))


def default_warmup_steps(max_steps: int) -> int:
    """10% of the run, at most 1000 steps."""
    return min(1000, max(1, max_steps // 10)) if max_steps > 1 else 0


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(warmup_steps, max_steps))
