"""Argument checks shared by the public attention entry point and the reference: every error names the
argument (a ``[B, 1]`` key mask, for one, would broadcast and silently mask whole rows)."""
from __future__ import annotations

import math

import torch


def describe(value) -> str:
    """A value's dtype if it is a tensor, else its type's name, for error messages."""
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


def check_attention_arguments(q, k, v, key_padding_mask, causal, dropout_p, scale) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument unless ``q`` ``[B, Lq, H, D]`` and ``k``, ``v``
    ``[B, Lk, H, D]`` are floating-point tensors on one device (D > 0), ``key_padding_mask`` is None or bool
    ``[B, Lk]``, ``causal`` a bool, ``0 <= dropout_p < 1`` and ``scale`` None or a finite number."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, L, H, D], got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    batch, _, heads, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if (t.shape[0], t.shape[2], t.shape[3]) != (batch, heads, head_dim) or t.shape[1] != k.shape[1]:
            raise ValueError(
                f"{name}: expected shape [{batch}, {k.shape[1]}, {heads}, {head_dim}] (q's batch, heads and "
                f"head_dim; k's length), got {list(t.shape)}"
            )
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {t.device}")
    if head_dim == 0:
        raise ValueError("q: head_dim must be positive")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask: expected a bool tensor (True = ignore) or None, got {describe(key_padding_mask)}"
            )
        if key_padding_mask.shape != (batch, k.shape[1]):
            raise ValueError(
                f"key_padding_mask: expected shape [B, Lk] = [{batch}, {k.shape[1]}], "
                f"got {list(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: expected device {q.device} like q, got {key_padding_mask.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected bool, got {type(causal).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite number, got {scale}")
