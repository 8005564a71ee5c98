"""Incremental caption decoding with per-layer key/value caches.

:meth:`E2EVLP.caption_logits` re-runs the whole caption prefix at every step, so generating T tokens
costs O(T^2) token passes. :class:`IncrementalCaptionDecoder` runs one new token per step instead:

* each decoder layer's causal self-attention keeps the keys and values of the tokens already seen, and
  the new token's query attends to all of them (the bottom-right causal alignment: the last query sees
  every key, so no mask is needed);
* the cross-attention keys and values over the encoder memory are projected once, up front.

It reads the parameters of the model's own decoder layers (post-norm: self-attention, cross-attention,
feed-forward, each with a residual and LayerNorm), so its step logits equal the last position of
``caption_logits`` on the same prefix; the tests hold the two together. Dropout is not applied: this is
an inference path.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastvlp.models.outputs import EncoderOutput
from fastvlp.ops.fmha import dispatch


def _split_in_projection(attention: nn.Module) -> Tuple[Tuple[Tensor, ...], Tuple[Optional[Tensor], ...]]:
    # Both attention backends keep q, k and v projections packed in `in_proj_weight` / `in_proj_bias`.
    weights = attention.in_proj_weight.chunk(3)
    bias = attention.in_proj_bias
    biases = (None, None, None) if bias is None else bias.chunk(3)
    return weights, biases


class IncrementalCaptionDecoder:
    """Feeds caption tokens to ``model``'s decoder one position at a time.

    ``encoded``: the image-only encoder output (``model.encode_image_only``), one row per sequence being
    decoded (repeat it per beam beforehand). :meth:`step` takes the next input token of every row and
    returns the logits of the token after it; :meth:`reorder` permutes the rows' self-attention caches
    (beam search). Rows may only be reordered among rows that share the same memory, since the
    cross-attention cache is not reordered.
    """

    def __init__(self, model: nn.Module, encoded: EncoderOutput):
        if not isinstance(encoded, EncoderOutput):
            raise TypeError(f"encoded: expected an EncoderOutput, got {type(encoded).__name__}")
        for name in ("decoder", "text_embeddings", "caption_head"):
            if not hasattr(model, name):
                raise TypeError(f"model: expected an E2EVLP model (missing {name!r})")
        self.model = model
        self.layers = list(model.decoder.layers)
        self.dtype = model.decoder.norm.weight.dtype
        self.num_heads = self.layers[0].self_attn.num_heads
        self.memory_padding_mask = encoded.padding_mask
        memory = encoded.memory.to(self.dtype)
        memory_keys = memory + encoded.pos.to(self.dtype)
        self.cross_cache: List[Tuple[Tensor, Tensor]] = []
        for layer in self.layers:
            (_, w_k, w_v), (_, b_k, b_v) = _split_in_projection(layer.multihead_attn)
            self.cross_cache.append((self._heads(F.linear(memory_keys, w_k, b_k)), self._heads(F.linear(memory, w_v, b_v))))
        self.self_cache: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(self.layers)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.memory_padding_mask.shape[0]

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # [B, L, d] -> [B, L, H, D]

    def _attend(self, attention: nn.Module, q: Tensor, k: Tensor, v: Tensor, key_padding_mask=None) -> Tensor:
        if hasattr(attention, "backend"):
            out = dispatch.attention(q, k, v, key_padding_mask=key_padding_mask, backend=attention.backend)
        else:
            # The torch backend's model decodes through torch's own attention, so that benchmarks compare
            # the two backends on the cached path too. Memory rows always keep at least one image token.
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask).transpose(1, 2)
        return F.linear(out.flatten(2), attention.out_proj.weight, attention.out_proj.bias)

    def step(self, token_ids: Tensor) -> Tensor:
        """``token_ids`` int ``[B]`` at position ``self.length`` -> logits ``[B, vocab_size]`` of the next token."""
        if not isinstance(token_ids, Tensor) or token_ids.dim() != 1 or token_ids.shape[0] != self.batch_size:
            raise ValueError(f"token_ids: expected an integer tensor [{self.batch_size}], got {getattr(token_ids, 'shape', token_ids)}")
        x = self._embed(token_ids[:, None]).to(self.dtype)  # [B, 1, d]
        for index, layer in enumerate(self.layers):
            (w_q, w_k, w_v), (b_q, b_k, b_v) = _split_in_projection(layer.self_attn)
            q, k, v = (self._heads(F.linear(x, w, b)) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
            x = layer.norm1(x + self._self_attention(index, layer.self_attn, q, k, v))

            (w_q, _, _), (b_q, _, _) = _split_in_projection(layer.multihead_attn)
            memory_k, memory_v = self.cross_cache[index]
            q = self._heads(F.linear(x, w_q, b_q))
            x = layer.norm2(x + self._attend(layer.multihead_attn, q, memory_k, memory_v, self.memory_padding_mask))

            x = layer.norm3(x + layer.linear2(layer.activation(layer.linear1(x))))
        self._advance()
        return self.model.caption_head(self.model.decoder.norm(x))[:, 0]

    def _embed(self, token_ids: Tensor) -> Tensor:
        """``[B, 1]`` ids at position ``self.length`` -> their text embeddings ``[B, 1, d]``."""
        return self.model.text_embeddings(token_ids, position_offset=self.length)

    def _self_attention(self, index: int, attention: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The new token's query over layer ``index``'s cached keys and values and its own."""
        if self.self_cache[index] is not None:
            past_k, past_v = self.self_cache[index]
            k, v = torch.cat((past_k, k), 1), torch.cat((past_v, v), 1)
        self.self_cache[index] = (k, v)
        return self._attend(attention, q, k, v)

    def _advance(self) -> None:
        self.length += 1

    def reorder(self, rows: Tensor) -> None:
        """Row ``i`` continues from the cached prefix of row ``rows[i]`` (int64 ``[B]``)."""
        if not isinstance(rows, Tensor) or rows.dtype != torch.int64 or rows.shape != (self.batch_size,):
            raise ValueError(f"rows: expected an int64 tensor [{self.batch_size}], got {getattr(rows, 'shape', rows)}")
        self.self_cache = [
            None if cache is None else (cache[0].index_select(0, rows), cache[1].index_select(0, rows))
            for cache in self.self_cache
        ]
