"""The VQA answer head of UNITER and LXMERT: Linear, GELU, LayerNorm, Linear, on the pooled [CLS]."""
from __future__ import annotations

from torch import nn

VQA_ANSWERS = 3129


class VQAHead(nn.Sequential):
    """``[B, hidden] -> [B, num_answers]`` through a ``2 * hidden`` wide layer."""

    def __init__(self, hidden: int, num_answers: int = VQA_ANSWERS, layer_norm_eps: float = 1e-12):
        if hidden < 1 or num_answers < 1:
            raise ValueError(f"hidden, num_answers: expected positive ints, got {hidden}, {num_answers}")
        super().__init__(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.LayerNorm(2 * hidden, eps=layer_norm_eps),
            nn.Linear(2 * hidden, num_answers),
        )
