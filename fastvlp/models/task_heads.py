"""Fine-tuning heads on the encoder's [CLS] vector: VQA answer scores, NLVR2's true/false over two
(image, text) pairs, and the image-text retrieval score.

The classifiers follow the answer head of UNITER and LXMERT: Linear -> GELU -> LayerNorm -> Linear, with
a hidden width of twice the model width.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _check_features(name: str, x, width: int, rank: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name}: expected {rank} dimensions [B, {width}], got shape {list(x.shape)}")
    if x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{name}: expected a last dimension of {width}, got shape {list(x.shape)}")


class ClassifierHead(nn.Module):
    """``Linear(input_dim, hidden_dim) -> GELU -> LayerNorm -> Linear(hidden_dim, num_outputs)``."""

    def __init__(self, input_dim: int, hidden_dim: int, num_outputs: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.input_dim = _check_positive_int("input_dim", input_dim)
        _check_positive_int("hidden_dim", hidden_dim)
        self.num_outputs = _check_positive_int("num_outputs", num_outputs)
        if (
            isinstance(layer_norm_eps, bool)
            or not isinstance(layer_norm_eps, (int, float))
            or not math.isfinite(layer_norm_eps)
            or layer_norm_eps <= 0
        ):
            raise ValueError(f"layer_norm_eps: expected a positive finite number, got {layer_norm_eps!r}")
        self.dense = nn.Linear(input_dim, hidden_dim)
        self.layer_norm = nn.LayerNorm(hidden_dim, eps=float(layer_norm_eps))
        self.output = nn.Linear(hidden_dim, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., input_dim]`` -> ``[..., num_outputs]``."""
        _check_features("x", x, self.input_dim)
        return self.output(self.layer_norm(F.gelu(self.dense(x))))


class VqaHead(nn.Module):
    """VQA answer logits ``[B, num_answers]`` from [CLS] ``[B, d_model]`` (trained with soft-score BCE,
    see :func:`fastvlp.models.task_losses.vqa_soft_bce`)."""

    def __init__(self, d_model: int, num_answers: int):
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.num_answers = _check_positive_int("num_answers", num_answers)
        self.classifier = ClassifierHead(d_model, 2 * d_model, num_answers)

    def forward(self, cls_hidden: Tensor) -> Tensor:
        """``[B, d_model]`` -> ``[B, num_answers]``."""
        _check_features("cls_hidden", cls_hidden, self.d_model, rank=2)
        return self.classifier(cls_hidden)

    @torch.no_grad()
    def init_bias_from_prior(self, prior: Sequence[float], floor: float = 1e-4) -> None:
        """Set the output bias to ``logit(prior)``, ``prior`` being each answer's mean soft score in the
        training set. The untrained head then predicts the answer marginals instead of 0.5 everywhere,
        whose loss, summed over thousands of answers, would otherwise swamp the first steps."""
        prior_tensor = torch.as_tensor(prior, dtype=torch.float64)
        if prior_tensor.shape != (self.num_answers,):
            raise ValueError(f"prior: expected {self.num_answers} values, got shape {list(prior_tensor.shape)}")
        if not bool(torch.isfinite(prior_tensor).all()) or bool((prior_tensor < 0).any() | (prior_tensor > 1).any()):
            raise ValueError("prior: expected values in [0, 1]")
        clamped = prior_tensor.clamp(floor, 1.0 - floor)
        bias = self.classifier.output.bias
        bias.copy_(torch.log(clamped / (1.0 - clamped)).to(bias.dtype))


class Nlvr2Head(nn.Module):
    """NLVR2: the statement is paired with each of the two images; the two [CLS] vectors are concatenated
    (left, right) and classified into two logits (index 1 = the statement is true)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.classifier = ClassifierHead(2 * d_model, 2 * d_model, 2)

    def forward(self, left_cls: Tensor, right_cls: Tensor) -> Tensor:
        """``left_cls``, ``right_cls`` ``[B, d_model]`` -> ``[B, 2]``."""
        _check_features("left_cls", left_cls, self.d_model, rank=2)
        _check_features("right_cls", right_cls, self.d_model, rank=2)
        if right_cls.shape[0] != left_cls.shape[0]:
            raise ValueError(f"right_cls: expected {left_cls.shape[0]} rows like left_cls, got {right_cls.shape[0]}")
        return self.classifier(torch.cat((left_cls, right_cls), dim=-1))


class RetrievalHead(nn.Module):
    """One image-text similarity score per pair ``[B]`` from [CLS] ``[B, d_model]`` (a single Linear; the
    retrieval loss reads its sigmoid, see :func:`fastvlp.models.task_losses.circle_loss`)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = _check_positive_int("d_model", d_model)
        self.score = nn.Linear(d_model, 1)

    def forward(self, cls_hidden: Tensor) -> Tensor:
        """``[B, d_model]`` -> ``[B]``."""
        _check_features("cls_hidden", cls_hidden, self.d_model, rank=2)
        return self.score(cls_hidden).squeeze(-1)
