"""BERT-style text embeddings: token + segment + learned position, summed, layer-normalised, dropout."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class TextEmbeddings(nn.Module):
    """Embeds ``input_ids`` ``[B, T]`` (``T <= max_len``) into ``[B, T, d_model]``.

    The encoder's text and the decoder's caption tokens both go through this module, so the caption
    decoder reuses the word and position embeddings (and the output heads tie to ``word_embeddings``).
    Text tokens carry their position here; the attention layers add no position to them.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        max_len: int = 40,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("max_len", max_len), ("type_vocab_size", type_vocab_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not 0 <= pad_token_id < vocab_size:
            raise ValueError(f"pad_token_id: expected 0 <= pad_token_id < vocab_size={vocab_size}, got {pad_token_id}")
        self.word_embeddings = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_len, d_model)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, d_model)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.max_len = max_len
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # BERT's initialisation: N(0, 0.02), the padding row zero.
        for embedding in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(embedding.weight, std=0.02)
        with torch.no_grad():
            self.word_embeddings.weight[self.word_embeddings.padding_idx].zero_()

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None, position_offset: int = 0,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """``position_offset`` shifts the positions (``position_offset .. position_offset + T - 1``).
        ``position_ids`` (int64 ``[T]``, on the ids' device) gives them instead, unchecked: they are read on
        the device, never on the host, so that a CUDA graph can replay the call with new positions (the
        caller keeps them below ``max_len``)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an integer tensor [B, T], got {getattr(input_ids, 'shape', type(input_ids))}")
        length = input_ids.shape[1]
        if position_ids is not None:
            if not isinstance(position_ids, Tensor) or position_ids.shape != (length,) or position_ids.dtype != torch.int64:
                raise ValueError(f"position_ids: expected an int64 tensor [{length}], got {getattr(position_ids, 'shape', position_ids)}")
        elif position_offset < 0 or position_offset + length > self.max_len:
            raise ValueError(
                f"input_ids: {length} tokens from position {position_offset} exceed max_len={self.max_len} learned positions"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif not isinstance(token_type_ids, Tensor) or token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids: expected shape {list(input_ids.shape)}, got {getattr(token_type_ids, 'shape', None)}")
        positions = (position_ids if position_ids is not None
                     else torch.arange(position_offset, position_offset + length, device=input_ids.device))
        embeddings = (
            self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.layer_norm(embeddings))
