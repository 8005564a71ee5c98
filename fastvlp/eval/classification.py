"""Plain accuracy for classification tasks (NLVR2 true/false, ITM matched/mismatched)."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


def classification_accuracy(predictions: Union[Tensor, Sequence], labels: Union[Tensor, Sequence]) -> float:
    """Fraction of ``predictions`` equal to ``labels``. Predictions may be class indices ``[N]`` (or
    booleans) or logits ``[N, C]`` (argmax taken)."""
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels)
    if predictions.dim() == 2:
        if not predictions.is_floating_point():
            raise ValueError("predictions: a 2-D input must be float logits [N, C]")
        predictions = predictions.argmax(1)
    if predictions.dim() != 1 or labels.shape != predictions.shape:
        raise ValueError(f"predictions, labels: expected [N] (or [N, C] logits) and [N], got {list(predictions.shape)}, {list(labels.shape)}")
    if predictions.numel() == 0:
        raise ValueError("predictions: expected at least one prediction")
    if predictions.is_floating_point() or labels.is_floating_point():
        raise TypeError("predictions, labels: expected integer or bool class labels")
    return (predictions.long() == labels.long()).double().mean().item()
