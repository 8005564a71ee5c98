"""DETR-style post-norm Transformer encoder and decoder layers over a choice of attention backends.

Tensors are sequence-first (``[L, B, d]``), as DETR lays them out. Position encodings are added to the
queries and keys of every attention (``q = k = x + pos``, ``v = x``), never to the values.

Attention backends (``attention_backend``):

* ``"torch"``: ``torch.nn.MultiheadAttention``, called as DETR calls it (sequence-first, boolean
  ``key_padding_mask``) with ``need_weights=False``.
* ``"fastvlp"``: :class:`fastvlp.nn.multihead_attention.MultiheadAttention` with ``backend="auto"``
  (Triton kernels on CUDA, the plain reference on the CPU).
* ``"triton"``: the same module with ``backend="triton"`` (the kernels forced; on the CPU they need
  ``TRITON_INTERPRET=1`` set before fastvlp is imported).

Both modules have the same parameters (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
``out_proj.bias``), so a layer's ``state_dict`` is identical under every backend and checkpoints move
between them.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastvlp.nn.multihead_attention import MultiheadAttention
from fastvlp.ops.fmha import dispatch

ATTENTION_BACKENDS = ("fastvlp", "triton", "torch")
TORCH_ATTENTION_PATH = "torch.nn.MultiheadAttention"
_FMHA_BACKEND = {"fastvlp": "auto", "triton": "triton"}
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def check_attention_backend(attention_backend: str) -> str:
    if attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend: expected one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
    return attention_backend


def build_attention(embed_dim: int, num_heads: int, dropout: float, attention_backend: str) -> nn.Module:
    """A sequence-first multi-head attention module for ``attention_backend`` (see the module docstring)."""
    check_attention_backend(attention_backend)
    if attention_backend == "torch":
        return nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout)
    return MultiheadAttention(embed_dim, num_heads, dropout=dropout, backend=_FMHA_BACKEND[attention_backend])


def describe_attention_path(
    attention: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
) -> str:
    """Which implementation ``attention(query, key, value, ...)`` runs with ``need_weights=False``.

    ``"torch.nn.MultiheadAttention"`` for torch's module; for fastvlp's, the fused op's backend
    (``"triton"`` or ``"reference"``), or ``"torch fallback: <reason>"`` when the module leaves
    its fast path. Inputs are sequence-first ``[L, B, d]``.
    """
    if not isinstance(attention, MultiheadAttention):
        if isinstance(attention, nn.MultiheadAttention):
            return TORCH_ATTENTION_PATH
        raise TypeError(f"attention: expected a MultiheadAttention module, got {type(attention).__name__}")
    reason = attention.why_not_fast_path(
        query, key, value, key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask, is_causal=is_causal
    )
    if reason is not None:
        return f"torch fallback: {reason}"
    heads, head_dim = attention.num_heads, attention.head_dim
    # [L, B, d] -> [B, L, H, D] views: only their dtype, device and shape matter for the choice.
    q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(0, 1) for t in (query, key, value))
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        q = k = v = q.new_empty((1, 1, heads, head_dim), dtype=dtype)
    return dispatch.select_backend(q, k, v, backend=attention.backend).backend


def causal_attention_mask(length: int, device=None) -> Tensor:
    """Bool ``[length, length]``, True where a query may not attend (keys after it): torch's convention."""
    return torch.ones((length, length), dtype=torch.bool, device=device).triu(1)


def _with_position(x: Tensor, position: Optional[Tensor]) -> Tensor:
    return x if position is None else x + position


def _check_layer_arguments(d_model, num_heads, ffn_dim, dropout, activation):
    for name, value in (("d_model", d_model), ("num_heads", num_heads), ("ffn_dim", ffn_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if d_model % num_heads:
        raise ValueError(f"num_heads: {num_heads} does not divide d_model={d_model}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(_ACTIVATIONS)}, got {activation!r}")


class _AttentionPathRecorder(nn.Module):
    """Shared by both layers: optionally notes which implementation each attention ran.

    Recording asks the attention module which path it takes (a few argument checks per call), so
    only the layers whose ``record_attention_path`` is True record; a stack sets it on its first
    layer, whose calls look like every other layer's.
    """

    record_attention_path: bool = False

    def _note(self, role: str, attention: nn.Module, *args, **kwargs) -> None:
        if self.record_attention_path:
            self.attention_paths[role] = describe_attention_path(attention, *args, **kwargs)


class TransformerEncoderLayer(_AttentionPathRecorder):
    """Post-norm encoder layer: self-attention, then a feed-forward network (ReLU or GELU, ``activation``), each followed by
    dropout, a residual connection and LayerNorm (DETR's ``forward_post``)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        attention_backend: str = "fastvlp",
    ):
        super().__init__()
        _check_layer_arguments(d_model, num_heads, ffn_dim, dropout, activation)
        self.self_attn = build_attention(d_model, num_heads, dropout, attention_backend)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.attention_backend = attention_backend
        self.attention_paths: Dict[str, str] = {}

    def forward(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None) -> Tensor:
        """``src`` ``[L, B, d]``; ``src_key_padding_mask`` bool ``[B, L]`` (True = padding); ``pos`` ``[L, B, d]``."""
        q = k = _with_position(src, pos)
        self._note("encoder_self_attention", self.self_attn, q, k, src, key_padding_mask=src_key_padding_mask)
        attended = self.self_attn(q, k, src, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        transformed = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(transformed))


class TransformerDecoderLayer(_AttentionPathRecorder):
    """Post-norm decoder layer: self-attention (optionally causal, with key padding), cross-attention
    to the memory (``pos`` added to the memory keys, ``query_pos`` to the queries), then a feed-forward
    network (ReLU or GELU, ``activation``); each followed by dropout, a residual connection and LayerNorm."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        activation: str = "relu",
        attention_backend: str = "fastvlp",
    ):
        super().__init__()
        _check_layer_arguments(d_model, num_heads, ffn_dim, dropout, activation)
        self.self_attn = build_attention(d_model, num_heads, dropout, attention_backend)
        self.multihead_attn = build_attention(d_model, num_heads, dropout, attention_backend)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.attention_backend = attention_backend
        self.attention_paths: Dict[str, str] = {}

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        tgt_key_padding_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        causal: bool = False,
    ) -> Tensor:
        """``tgt`` ``[T, B, d]``, ``memory`` ``[S, B, d]``; padding masks bool ``[B, T]`` / ``[B, S]``
        (True = padding); ``pos`` ``[S, B, d]`` for the memory, ``query_pos`` ``[T, B, d]``.
        ``causal``: target position ``i`` attends only to target positions ``<= i``."""
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected bool, got {type(causal).__name__}")
        causal_mask = causal_attention_mask(tgt.shape[0], tgt.device) if causal else None

        q = k = _with_position(tgt, query_pos)
        self._note(
            "decoder_causal_self_attention" if causal else "decoder_self_attention", self.self_attn, q, k, tgt,
            key_padding_mask=tgt_key_padding_mask, attn_mask=causal_mask, is_causal=causal,
        )
        attended = self.self_attn(
            q, k, tgt, key_padding_mask=tgt_key_padding_mask, need_weights=False, attn_mask=causal_mask, is_causal=causal
        )[0]
        tgt = self.norm1(tgt + self.dropout1(attended))

        query, key = _with_position(tgt, query_pos), _with_position(memory, pos)
        self._note("decoder_cross_attention", self.multihead_attn, query, key, memory, key_padding_mask=memory_key_padding_mask)
        attended = self.multihead_attn(query, key, memory, key_padding_mask=memory_key_padding_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))

        transformed = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(transformed))
