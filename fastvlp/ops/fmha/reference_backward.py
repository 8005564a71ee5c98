"""Closed-form attention gradients in plain PyTorch, from the saved log-sum-exp.

This is the backward of the reference path and the formula the Triton backward
implements block by block, so it doubles as a readable statement of that math:

    P  = exp(scale * Q K^T - lse)          (0 where masked; lse = -inf rows give 0)
    dV = (P * Z)^T dO                      Z = dropout keep / (1 - p), or 1
    dP = (dO V^T) * Z
    dS = P * (dP - delta),  delta = rowsum(dO * O)
    dQ = scale * dS K,      dK = scale * dS^T Q
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import causal_keep_mask


def attention_backward_reference(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    dropout_keep: Optional[torch.Tensor] = None,
    scale: float,
):
    """Gradients ``(dq, dk, dv)`` of attention on ``[B, L, H, D]`` tensors.

    ``lse`` is ``[B, H, Lq]`` (natural log, ``-inf`` for rows without keys) as
    returned by ``attention_reference(..., return_lse=True)``; ``dropout_keep`` is
    the bool ``[B, H, Lq, Lk]`` keep-mask the forward used when ``dropout_p > 0``.
    """
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    query_length, key_length = q.shape[1], k.shape[1]

    def heads_first(t):
        return t.to(compute_dtype).permute(0, 2, 1, 3)

    qh, kh, vh, oh, doh = map(heads_first, (q, k, v, out, grad_out))
    keep = torch.ones(q.shape[0], 1, query_length, key_length, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask.to(torch.bool)[:, None, None, :]
    if causal:
        keep = keep & causal_keep_mask(query_length, key_length, q.device)

    lse = lse.to(compute_dtype).unsqueeze(-1)
    row_has_key = torch.isfinite(lse)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    shifted = scores - torch.where(row_has_key, lse, torch.zeros_like(lse))
    probs = torch.where(keep & row_has_key, torch.exp(shifted), torch.zeros_like(scores))

    if dropout_p > 0.0:
        if dropout_keep is None:
            raise ValueError("dropout_keep: required when dropout_p > 0")
        zeta = dropout_keep.to(compute_dtype) / (1.0 - dropout_p)
    else:
        zeta = torch.ones((), dtype=compute_dtype, device=q.device)

    grad_v = torch.matmul((probs * zeta).transpose(-1, -2), doh)
    grad_probs = torch.matmul(doh, vh.transpose(-1, -2)) * zeta
    delta = (doh * oh).sum(dim=-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta)
    grad_q = torch.matmul(grad_scores, kh) * scale
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), qh) * scale

    def back(t, like):
        return t.permute(0, 2, 1, 3).to(like.dtype)

    return back(grad_q, q), back(grad_k, k), back(grad_v, v)
