"""Whether a kernel launch needs 64-bit element offsets.

The kernels address an element as ``base + batch * stride_b + head * stride_h + row * stride_row
+ d * stride_d``. The batch term is always computed in int64; the others are int32 products, exact
only below 2**31 (past it they wrap, and the load or store lands 2**32 elements before its
element). A sequence-first layout reaches that with a modest tensor: the q of a packed
``[L, B, 3E]`` projection has row stride ``3 * B * E``. Each kernel therefore has an ``INT64_OFFSETS`` variant,
in which the head and the row, key and head-dim index vectors are int64, and the launchers choose
it only when an offset inside one batch row, or the flattened ``batch * heads + head`` index, can
reach 2**31. Every other call compiles to the same 32-bit index arithmetic as without the flag.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import torch

INT32_LIMIT = 2**31

Layout = Tuple[Sequence[int], Sequence[int]]


def largest_offset(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Offset, in elements, of the element farthest from the first one (0 for an empty tensor)."""
    if len(shape) != len(strides):
        raise ValueError(f"strides: expected {len(shape)} strides for shape {list(shape)}, got {list(strides)}")
    if any(size == 0 for size in shape):
        return 0
    return sum((size - 1) * abs(stride) for size, stride in zip(shape, strides))


def needs_int64_offsets(layouts: Iterable[Layout] = (), indices: Iterable[int] = ()) -> bool:
    """True when some ``(shape, strides)`` in ``layouts`` has an element at offset 2**31 or more, or
    some value in ``indices`` (the largest value an int32 index takes) is 2**31 or more."""
    return (any(largest_offset(shape, strides) >= INT32_LIMIT for shape, strides in layouts)
            or any(index >= INT32_LIMIT for index in indices))


def batch_row_layouts(*tensors: Optional[torch.Tensor]) -> list:
    """``(shape, strides)`` of one batch row (dim 0 dropped: the kernels widen the batch term
    themselves) of every tensor given; None is skipped."""
    return [(t.shape[1:], t.stride()[1:]) for t in tensors if t is not None]


def attention_needs_int64(*tensors: Optional[torch.Tensor], batch: int, heads: int) -> bool:
    """The launchers' decision: ``tensors`` are the ``[B, L, H, D]`` operands (and the ``[B, Lk]`` key
    mask) one launch reads or writes; ``batch * heads - 1`` is its largest ``batch * heads + head``."""
    # Fast path on every launch: no element lies farther from a tensor's start than its storage reaches.
    if batch * heads - 1 < INT32_LIMIT and all(
        t is None or t.untyped_storage().nbytes() < INT32_LIMIT * t.element_size() for t in tensors
    ):
        return False
    return needs_int64_offsets(batch_row_layouts(*tensors), (batch * heads - 1,))

