"""Caption decoding over key/value caches of a fixed size, and its step replayed from a CUDA graph.

:class:`~fastvlp.models.caption_cache.IncrementalCaptionDecoder` grows each layer's self-attention cache by
one position a step, so every step has new shapes and its kernels are launched one by one from the host. On
a GPU, decoding a batch of captions is then bound by the host's time per launch, not by the kernels.

:class:`StaticCaptionDecoder` allocates each cache at its final length up front and keeps the step's position
in a device tensor: step ``t`` writes its keys and values at position ``t`` and attends to positions
``0 .. t``, the later ones masked as padding. Every step has the same shapes and reads nothing back to the
host, so :class:`CapturedCaptionDecoder` records one step in a CUDA graph and replays it for every token.
Masked positions add nothing to the softmax, so the logits are those of the growing cache up to the order of
floating-point sums (the tests hold the two together).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from fastvlp.models.caption_cache import IncrementalCaptionDecoder
from fastvlp.models.outputs import EncoderOutput


class StaticCaptionDecoder(IncrementalCaptionDecoder):
    """:class:`IncrementalCaptionDecoder` with caches of ``max_length`` positions, allocated up front.

    At most ``max_length`` steps (positions ``0 .. max_length - 1``, within the text embeddings' learned
    positions). :attr:`position` is the next step's position as a device tensor; :attr:`length` mirrors it
    on the host for the eager steps (a graph replay does not run Python: its owner keeps the mirror).
    """

    def __init__(self, model: nn.Module, encoded: EncoderOutput, max_length: int):
        super().__init__(model, encoded)
        positions = model.text_embeddings.max_len
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= positions:
            raise ValueError(f"max_length: expected an int in [1, {positions}] (the learned positions), got {max_length!r}")
        self.max_length = max_length
        memory = encoded.memory
        attention = self.layers[0].self_attn
        shape = (self.batch_size, max_length, self.num_heads, attention.embed_dim // self.num_heads)
        self.keys: List[Tensor] = [memory.new_zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.values: List[Tensor] = [memory.new_zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.position = torch.zeros(1, dtype=torch.int64, device=memory.device)
        self._slots = torch.arange(max_length, device=memory.device)

    def step(self, token_ids: Tensor) -> Tensor:
        if self.length >= self.max_length:
            raise ValueError(f"token_ids: the caches hold {self.max_length} positions, all of them used")
        return super().step(token_ids)

    def _embed(self, token_ids: Tensor) -> Tensor:
        return self.model.text_embeddings(token_ids, position_ids=self.position)

    def _self_attention(self, index: int, attention: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = self.keys[index], self.values[index]
        keys.index_copy_(1, self.position, k.to(keys.dtype))
        values.index_copy_(1, self.position, v.to(values.dtype))
        later = (self._slots > self.position).expand(self.batch_size, -1)  # True = not written yet
        return self._attend(attention, q, keys, values, later)

    def _advance(self) -> None:
        self.position.add_(1)
        self.length += 1

    def reorder(self, rows: Tensor) -> None:
        if not isinstance(rows, Tensor) or rows.dtype != torch.int64 or rows.shape != (self.batch_size,):
            raise ValueError(f"rows: expected an int64 tensor [{self.batch_size}], got {getattr(rows, 'shape', rows)}")
        rows = rows.to(self.position.device)
        for cache in (*self.keys, *self.values):
            cache.copy_(cache.index_select(0, rows))

    def rewind(self) -> None:
        """Back to position 0 (the caches' contents are masked until written again)."""
        self.position.zero_()
        self.length = 0


class CapturedCaptionDecoder:
    """A :class:`StaticCaptionDecoder`'s step recorded once in a CUDA graph and replayed for every token.

    ``step(token_ids)`` copies the ids into the graph's input, replays, and returns a copy of the logits;
    ``reorder(rows)`` runs eagerly. The constructor warms the step up on a side stream (so that Triton's
    autotuning and cuBLAS's set-up happen outside the capture), then rewinds the decoder and captures.
    """

    def __init__(self, decoder: StaticCaptionDecoder, warmup_steps: int = 2):
        if not isinstance(decoder, StaticCaptionDecoder):
            raise TypeError(f"decoder: expected a StaticCaptionDecoder, got {type(decoder).__name__}")
        device = decoder.position.device
        if device.type != "cuda":
            raise ValueError(f"decoder: a CUDA graph needs a decoder on a CUDA device, got {device}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 1 <= warmup_steps <= decoder.max_length:
            raise ValueError(f"warmup_steps: expected an int in [1, {decoder.max_length}], got {warmup_steps!r}")
        self.decoder = decoder
        self.token_ids = torch.zeros(decoder.batch_size, dtype=torch.int64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                decoder.step(self.token_ids)
        torch.cuda.current_stream(device).wait_stream(side)
        decoder.rewind()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step(self.token_ids)
        decoder.length = 0  # the capture ran the step's Python once; its kernels have not run

    @property
    def length(self) -> int:
        return self.decoder.length

    def step(self, token_ids: Tensor) -> Tensor:
        """As :meth:`StaticCaptionDecoder.step`, from the graph."""
        decoder = self.decoder
        if not isinstance(token_ids, Tensor) or token_ids.shape != self.token_ids.shape:
            raise ValueError(f"token_ids: expected an integer tensor [{decoder.batch_size}], got {getattr(token_ids, 'shape', token_ids)}")
        if decoder.length >= decoder.max_length:
            raise ValueError(f"token_ids: the caches hold {decoder.max_length} positions, all of them used")
        self.token_ids.copy_(token_ids)
        self.graph.replay()
        decoder.length += 1
        return self.logits.clone()

    def reorder(self, rows: Tensor) -> None:
        self.decoder.reorder(rows)
