"""Plain PyTorch attention: the oracle every fused kernel is tested against.

It materialises the full score matrix, so it is only meant for CPU runs, tests
and shapes small enough for an ``Lq x Lk`` matrix per head.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .arguments import check_attention_arguments, describe


def causal_keep_mask(query_length: int, key_length: int, device=None) -> torch.Tensor:
    """Bool ``[Lq, Lk]``, True where query ``i`` may see key ``j``.

    Aligned bottom-right: query ``i`` sees keys ``j <= i + (Lk - Lq)``, so the last
    query sees every key (incremental decoding). With ``Lq > Lk`` the first
    ``Lq - Lk`` queries see nothing and their output is zero.
    """
    rows = torch.arange(query_length, device=device).unsqueeze(1)
    cols = torch.arange(key_length, device=device).unsqueeze(0)
    return cols <= rows + (key_length - query_length)


def _check_inputs(q, k, v, key_padding_mask, causal, dropout_p, scale, dropout_keep, compute_dtype) -> None:
    check_attention_arguments(q, k, v, key_padding_mask, causal, dropout_p, scale)
    if dropout_keep is not None:
        if not isinstance(dropout_keep, torch.Tensor) or dropout_keep.dtype != torch.bool:
            raise TypeError(f"dropout_keep: expected a bool tensor or None, got {describe(dropout_keep)}")
        expected = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        if dropout_keep.shape != expected:
            raise ValueError(
                f"dropout_keep: expected shape [B, H, Lq, Lk] = {list(expected)}, got {list(dropout_keep.shape)}"
            )
        if dropout_keep.device != q.device:
            raise ValueError(f"dropout_keep: expected device {q.device} like q, got {dropout_keep.device}")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
        raise TypeError(f"compute_dtype: expected a floating-point torch.dtype or None, got {compute_dtype!r}")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    dropout_keep: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
):
    """Softmax attention on ``[B, L, H, D]`` tensors.

    ``key_padding_mask`` is bool ``[B, Lk]`` with True meaning "ignore". A query
    whose keys are all masked gets a zero output (and zero gradients), not NaN.
    Dropout, when ``dropout_p > 0``, drops attention probabilities and rescales
    by ``1 / (1 - p)``; ``dropout_keep`` (bool ``[B, H, Lq, Lk]``) fixes which
    are kept, so that a kernel's own mask can be replayed exactly.

    Half-precision inputs are computed in float32 unless ``compute_dtype`` says
    otherwise; the result has the input's dtype. With ``return_lse`` the
    natural-log log-sum-exp of the scaled, masked scores ``[B, H, Lq]`` is also
    returned (``-inf`` for fully masked rows).

    Raises ``TypeError``/``ValueError`` naming the argument for inputs outside these
    shapes and dtypes, ``causal`` that is not a bool, or ``dropout_p`` outside ``[0, 1)``.
    """
    _check_inputs(q, k, v, key_padding_mask, causal, dropout_p, scale, dropout_keep, compute_dtype)
    batch, query_length, heads, head_dim = q.shape
    key_length = k.shape[1]
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    qh = q.to(compute_dtype).permute(0, 2, 1, 3)
    kh = k.to(compute_dtype).permute(0, 2, 1, 3)
    vh = v.to(compute_dtype).permute(0, 2, 1, 3)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]

    keep = torch.ones(batch, 1, query_length, key_length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    if causal:
        keep = keep & causal_keep_mask(query_length, key_length, q.device)
    scores = scores.masked_fill(~keep, float("-inf"))

    if key_length:
        row_max = scores.amax(dim=-1, keepdim=True)
    else:  # no keys at all: every row is fully masked (amax has nothing to reduce)
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    row_has_key = torch.isfinite(row_max)
    row_max = torch.where(row_has_key, row_max, torch.zeros_like(row_max))
    # where() instead of relying on exp(-inf) so that empty rows give exact zeros
    # and no NaN reaches the gradient.
    exp_scores = torch.where(keep, torch.exp(scores - row_max), torch.zeros_like(scores))
    row_sum = exp_scores.sum(dim=-1, keepdim=True)
    probs = exp_scores / torch.where(row_has_key, row_sum, torch.ones_like(row_sum))

    if dropout_p > 0.0:
        if dropout_keep is None:
            dropout_keep = torch.rand_like(probs) >= dropout_p
        probs = probs * dropout_keep.to(probs.dtype) / (1.0 - dropout_p)

    out = torch.matmul(probs, vh).permute(0, 2, 1, 3).to(q.dtype)
    if return_lse:
        lse = torch.where(row_has_key, row_max + torch.log(row_sum), torch.full_like(row_sum, float("-inf")))
        return out, lse.squeeze(-1)
    return out
