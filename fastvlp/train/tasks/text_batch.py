"""Tokenising a batch's texts for the encoder."""
from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor

from fastvlp.data.tokenizer import WordPieceTokenizer


def encode_texts(tokenizer: WordPieceTokenizer, texts: Sequence[str]) -> Tuple[Tensor, Tensor]:
    """``input_ids`` ``[B, T]`` and ``text_attention_mask`` ``[B, T]`` (True = real token) of ``texts``."""
    encoded = tokenizer.encode_batch(list(texts))
    return encoded.input_ids, encoded.attention_mask
