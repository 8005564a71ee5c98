"""Triton half of the dropout generator (see ``dropout_rng.py`` for the layout),
and a small kernel that materialises the keep-mask for tests and inspection."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout_rng import PHILOX_ROUNDS, check_keep_mask_arguments, dropout_threshold
from .kernel_config import INTERPRETED
from .offset_width import needs_int64_offsets

_ROUNDS = tl.constexpr(PHILOX_ROUNDS)


@triton.jit
def philox_4x32(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr, WIDE_PRODUCTS: tl.constexpr = True):
    """Philox-4x32 on uint32 blocks (Salmon et al. 2011): counter (c0..c3), key (k0, k1).

    ``WIDE_PRODUCTS`` takes each round's two products as full 64-bit results, one wide multiply-add
    apiece on NVIDIA GPUs, instead of ``umulhi`` and a separate low multiply: the same bits, with
    fewer instructions and, in some kernels, more registers (see ``dropout_keep_tile``)."""
    for _ in tl.static_range(ROUNDS):
        if WIDE_PRODUCTS:
            product_a = c0.to(tl.uint64) * 0xD2511F53
            product_b = c2.to(tl.uint64) * 0xCD9E8D57
            high_a = (product_a >> 32).to(tl.uint32)
            high_b = (product_b >> 32).to(tl.uint32)
            low_a = product_a.to(tl.uint32)
            low_b = product_b.to(tl.uint32)
        else:
            high_a = tl.umulhi(c0, 0xD2511F53)
            high_b = tl.umulhi(c2, 0xCD9E8D57)
            low_a = c0 * 0xD2511F53
            low_b = c2 * 0xCD9E8D57
        c0 = high_b ^ c1 ^ k0
        c2 = high_a ^ c3 ^ k1
        c1 = low_b
        c3 = low_a
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def load_dropout_seed(seed_ptr):
    """Key words and stream word of a seed written by ``draw_dropout_seed``, each modulo 2**32."""
    k0 = tl.load(seed_ptr).to(tl.uint32)
    k1 = tl.load(seed_ptr + 1).to(tl.uint32)
    stream = tl.load(seed_ptr + 2).to(tl.uint32)
    return k0, k1, stream


@triton.jit
def dropout_keep_tile(k0, k1, stream, batch_head, rows, col_start, threshold,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WIDE_PRODUCTS: tl.constexpr = True):
    """Bool ``[BLOCK_M, BLOCK_N]`` keep decisions for query ``rows`` and keys
    ``col_start + arange(BLOCK_N)``; ``col_start`` must be a multiple of 4. One Philox
    call covers four neighbouring keys.

    ``WIDE_PRODUCTS`` (see ``philox_4x32``) does not change the decisions. Compiled for sm_90 in half
    precision at head dim 32 it took a fifth of the instructions out of the forward's key loop with
    dropout and a sixth out of dQ's, for up to 8 more registers a thread; in dK/dV's loop it saved 3%
    for 47 more, so that kernel passes False."""
    groups = col_start // 4 + tl.arange(0, BLOCK_N // 4)
    # Counters enter as a row, a column and two scalars; broadcasting makes the
    # first round cheaper than starting from four full tiles.
    c0 = groups[None, :].to(tl.uint32)
    c1 = rows[:, None].to(tl.uint32)
    c2 = batch_head.to(tl.uint32)
    c3 = stream
    r0, r1, r2, r3 = philox_4x32(c0, c1, c2, c3, k0, k1, _ROUNDS, WIDE_PRODUCTS)
    shape: tl.constexpr = (BLOCK_M, BLOCK_N // 4)
    r0 = tl.broadcast_to(r0, shape)
    r1 = tl.broadcast_to(r1, shape)
    r2 = tl.broadcast_to(r2, shape)
    r3 = tl.broadcast_to(r3, shape)
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    # (bits >> 1) >= threshold, compared unsigned without the shift: threshold < 2**31, so 2 * threshold
    # fits in 32 bits, and the shift of every draw is one instruction a probability.
    return bits >= threshold.to(tl.uint32) * 2


# threshold stays a runtime value: Triton would make a 1 a compile-time constant, which has no .to().
@triton.jit(do_not_specialize=["query_length", "key_length", "threshold"])
def dropout_keep_kernel(seed_ptr, keep_ptr, query_length, key_length, threshold,
                        INT64_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # B * H on axis 0, which CUDA does not cap at 65535 as it does axes 1 and 2.
    batch_head = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    start_n = tl.program_id(2) * BLOCK_N
    k0, k1, stream = load_dropout_seed(seed_ptr)
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    keep = dropout_keep_tile(k0, k1, stream, batch_head, rows, start_n, threshold, BLOCK_M, BLOCK_N)
    offsets = (batch_head.to(tl.int64) * query_length * key_length
               + (rows.to(tl.int64) if INT64_OFFSETS else rows)[:, None] * key_length + cols[None, :])
    in_bounds = (rows[:, None] < query_length) & (cols[None, :] < key_length)
    tl.store(keep_ptr + offsets, keep.to(tl.int8), mask=in_bounds)


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, query_length: int, key_length: int,
                      dropout_p: float) -> torch.Tensor:
    """Bool ``[B, H, Lq, Lk]``: the keep-mask the kernels apply for ``seed`` (from
    ``draw_dropout_seed``), generated by the kernels' own Triton code.

    Replaying it through ``attention_reference(..., dropout_keep=mask)`` reproduces a
    dropout call exactly. Runs on the seed's device (CUDA, or CPU in the interpreter).
    """
    check_keep_mask_arguments(seed, batch, heads, query_length, key_length, dropout_p)
    if seed.dtype != torch.int64:
        raise ValueError(f"seed: expected an int64 tensor from draw_dropout_seed, got {seed.dtype}")
    if seed.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("dropout_keep_mask on CPU needs TRITON_INTERPRET=1 set before fastvlp's kernels are imported")
    keep = torch.empty(batch, heads, query_length, key_length, dtype=torch.int8, device=seed.device)
    if keep.numel() == 0:
        return keep.bool()
    block_m, block_n = (16, 16) if INTERPRETED else (64, 64)
    grid = (batch * heads, triton.cdiv(query_length, block_m), triton.cdiv(key_length, block_n))
    # One [Lq, Lk] matrix's offsets are int32 unless they can reach 2**31.
    int64_offsets = needs_int64_offsets([((query_length, key_length), (key_length, 1))])
    dropout_keep_kernel[grid](seed, keep, query_length, key_length, dropout_threshold(dropout_p),
                              INT64_OFFSETS=int64_offsets, BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool()
