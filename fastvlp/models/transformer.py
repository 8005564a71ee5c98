"""Encoder and decoder stacks of E2E-VLP (DETR's layout: sequence-first ``[L, B, d]``, post-norm layers)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from fastvlp.nn.transformer_layers import TransformerDecoderLayer, TransformerEncoderLayer


def _xavier_init(module: nn.Module) -> None:
    # DETR initialises every matrix of its Transformer this way.
    for parameter in module.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)


def _collect_paths(layers) -> Dict[str, str]:
    paths: Dict[str, str] = {}
    for layer in layers:
        paths.update(layer.attention_paths)
    return paths


class TransformerEncoder(nn.Module):
    """``num_layers`` post-norm encoder layers (no final norm: each layer already ends with one)."""

    def __init__(self, num_layers: int, d_model: int, num_heads: int, ffn_dim: int, dropout: float, activation: str, attention_backend: str):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(d_model, num_heads, ffn_dim, dropout, activation, attention_backend) for _ in range(num_layers)
        )
        self.layers[0].record_attention_path = True
        _xavier_init(self)

    def forward(self, src: Tensor, padding_mask: Optional[Tensor] = None, pos: Optional[Tensor] = None) -> Tensor:
        """``src`` ``[L, B, d]``, ``padding_mask`` bool ``[B, L]`` (True = padding), ``pos`` ``[L, B, d]`` -> ``[L, B, d]``."""
        # Under autocast the image tokens arrive in half precision and the text in float32: give the
        # attention inputs one dtype, the parameters', so fastvlp's attention keeps its fused path.
        output = src.to(self.layers[0].norm1.weight.dtype)
        for layer in self.layers:
            output = layer(output, src_key_padding_mask=padding_mask, pos=pos)
        return output

    def attention_paths(self) -> Dict[str, str]:
        return _collect_paths(self.layers)


class TransformerDecoder(nn.Module):
    """``num_layers`` post-norm decoder layers and a final LayerNorm, applied to every layer's output
    that is returned (all of them with ``return_intermediate``, for the auxiliary losses)."""

    def __init__(self, num_layers: int, d_model: int, num_heads: int, ffn_dim: int, dropout: float, activation: str, attention_backend: str):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerDecoderLayer(d_model, num_heads, ffn_dim, dropout, activation, attention_backend) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.layers[0].record_attention_path = True
        _xavier_init(self)

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
        return_intermediate: bool = False,
    ) -> Tensor:
        """``tgt`` ``[T, B, d]``, ``memory`` ``[S, B, d]`` -> ``[num_layers, T, B, d]`` with
        ``return_intermediate``, else ``[1, T, B, d]`` (the last layer), normalised."""
        dtype = self.norm.weight.dtype
        output, memory = tgt.to(dtype), memory.to(dtype)
        intermediate = []
        for index, layer in enumerate(self.layers):
            output = layer(
                output,
                memory,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                pos=pos,
                query_pos=query_pos,
                causal=causal,
            )
            if return_intermediate or index == len(self.layers) - 1:
                intermediate.append(self.norm(output))
        return torch.stack(intermediate)

    def attention_paths(self) -> Dict[str, str]:
        return _collect_paths(self.layers)
