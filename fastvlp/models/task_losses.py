"""Fine-tuning losses: VQA's soft-score binary cross-entropy, label-smoothed caption cross-entropy, the
circle loss for retrieval, and hard-negative mining over a batch's pair scores.

Losses are computed in float32 (float64 inputs stay float64) and return a scalar that stays attached to
the graph even when there is nothing to average over, so an empty batch still back-propagates zeros.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_float_tensor(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _check_number(name: str, value, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        interval = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return float(value)


def vqa_soft_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits against VQA soft scores.

    ``logits`` ``[B, A]`` (finite) and ``targets`` ``[B, A]`` in [0, 1] (0, .3, .6, .9, 1 for 0..4+
    annotators). The element-wise loss is averaged over all ``B * A`` elements and multiplied by ``A``:
    a sum over the answers averaged over the questions, the usual VQA convention. ``B = 0`` gives 0.
    """
    _check_float_tensor("logits", logits)
    _check_float_tensor("targets", targets)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits: expected a [B, A] tensor with A >= 1, got shape {list(logits.shape)}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets: expected the shape of logits {list(logits.shape)}, got {list(targets.shape)}")
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise ValueError("logits: expected finite values")
    if targets.numel() and not bool(((targets >= 0) & (targets <= 1)).all()):
        raise ValueError("targets: expected soft scores in [0, 1]")
    dtype = _compute_dtype(logits)
    total = F.binary_cross_entropy_with_logits(logits.to(dtype), targets.to(dtype), reduction="sum")
    # sum / (B * A) * A = sum / B; max(B, 1) keeps B = 0 at an attached zero.
    return total / max(logits.shape[0], 1)


def label_smoothed_token_loss(
    logits: Tensor, labels: Tensor, smoothing: float = 0.1, ignore_index: int = -100
) -> Tensor:
    """Label-smoothed cross-entropy averaged over the labels that are not ``ignore_index``.

    ``logits`` ``[..., V]``, ``labels`` integer ``[...]`` (each in ``[0, V)`` or ``ignore_index``). Per
    label: ``(1 - smoothing) * -log p[label] + smoothing * mean_v(-log p[v])``, the definition of
    ``F.cross_entropy(..., label_smoothing=smoothing)``. Returns 0 (attached to the graph) when every
    label is ignored or there are none.
    """
    _check_float_tensor("logits", logits)
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels: expected a tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected a [..., V] tensor with V >= 1, got shape {list(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels: expected shape {list(logits.shape[:-1])} (logits without V), got {list(labels.shape)}")
    smoothing = _check_number("smoothing", smoothing, 0.0, 1.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    vocab_size = logits.shape[-1]
    labels = labels.long()
    valid = labels != ignore_index
    if bool((valid & ((labels < 0) | (labels >= vocab_size))).any()):
        raise ValueError(f"labels: expected ids in [0, {vocab_size}) or ignore_index={ignore_index}")

    log_probs = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
    target_nll = -log_probs.gather(-1, labels.clamp(0, vocab_size - 1).unsqueeze(-1)).squeeze(-1)
    uniform_nll = -log_probs.mean(dim=-1)
    per_label = (1.0 - smoothing) * target_nll + smoothing * uniform_nll
    # where, not a multiply: an ignored position's loss may be inf, and inf * 0 is nan.
    total = torch.where(valid, per_label, per_label.new_zeros(())).sum()
    return total / valid.sum().clamp(min=1)


def circle_loss(positive: Tensor, negative: Tensor, margin: float = 0.25, gamma: float = 32.0) -> Tensor:
    """Circle loss (Sun et al., CVPR 2020) with one positive and ``K`` negatives per row.

    ``positive`` ``[B]`` and ``negative`` ``[B, K]`` are similarity scores in [0, 1] (e.g. the sigmoid of
    :class:`fastvlp.models.task_heads.RetrievalHead` scores). With ``alpha_p = relu(1 + m - s_p)``,
    ``alpha_n = relu(s_n + m)`` (both detached, as in the paper), ``delta_p = 1 - m`` and ``delta_n = m``,
    a row's loss is ``softplus(logsumexp_j(gamma * alpha_n_j * (s_n_j - delta_n)) - gamma * alpha_p *
    (s_p - delta_p))``; the result is the mean over rows (0 for ``B = 0``).
    """
    _check_float_tensor("positive", positive)
    _check_float_tensor("negative", negative)
    if positive.dim() != 1:
        raise ValueError(f"positive: expected a [B] tensor, got shape {list(positive.shape)}")
    if negative.dim() != 2 or negative.shape[0] != positive.shape[0] or negative.shape[1] < 1:
        raise ValueError(
            f"negative: expected a [{positive.shape[0]}, K] tensor with K >= 1, got shape {list(negative.shape)}"
        )
    margin = _check_number("margin", margin, 0.0, 1.0)
    gamma = _check_number("gamma", gamma, 0.0, math.inf, low_open=True, high_open=True)
    for name, scores in (("positive", positive), ("negative", negative)):
        if scores.numel() and not bool(((scores >= 0) & (scores <= 1)).all()):
            raise ValueError(f"{name}: expected similarity scores in [0, 1]")

    dtype = torch.promote_types(_compute_dtype(positive), _compute_dtype(negative))
    s_p, s_n = positive.to(dtype), negative.to(dtype)
    alpha_p = (1.0 + margin - s_p).clamp(min=0).detach()
    alpha_n = (s_n + margin).clamp(min=0).detach()
    positive_term = -gamma * alpha_p * (s_p - (1.0 - margin))
    negative_term = torch.logsumexp(gamma * alpha_n * (s_n - margin), dim=1)
    # softplus(x) = logaddexp(x, 0): exact and overflow-free for any x.
    per_row = torch.logaddexp(negative_term + positive_term, s_p.new_zeros(()))
    return per_row.sum() / max(positive.shape[0], 1)


def hard_negative_indices(scores: Tensor, num_negatives: int) -> Tensor:
    """The ``num_negatives`` hardest negatives of each row of a batch's pair scores.

    ``scores`` ``[B, B]``: ``scores[i, j]`` scores text ``i`` against image ``j`` (or the reverse); the
    diagonal holds the positives. Returns int64 ``[B, num_negatives]``: for each row ``i``, the columns
    ``j != i`` with the highest scores, best first, ties broken by the lower column index.
    ``num_negatives`` must be in ``1 .. B - 1``.
    """
    _check_float_tensor("scores", scores)
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a square [B, B] tensor, got shape {list(scores.shape)}")
    batch = scores.shape[0]
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or not 1 <= num_negatives <= batch - 1:
        raise ValueError(f"num_negatives: expected an int in [1, B - 1 = {batch - 1}], got {num_negatives!r}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores: expected no NaN")
    # A stable descending sort keeps equal scores in column order; the diagonal is then dropped from each
    # row (rather than masked with -inf, which would tie with genuine -inf scores).
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    off_diagonal = order != torch.arange(batch, device=scores.device)[:, None]
    return order[off_diagonal].view(batch, batch - 1)[:, :num_negatives]
