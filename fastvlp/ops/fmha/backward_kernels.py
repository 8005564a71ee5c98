"""Triton backward of fused attention, without atomics: a launch with a given tile config gives
bitwise the same gradients every time. Autotuning may pick different tiles in another process,
and the tile sets the order of the fp32 sums; under ``torch.use_deterministic_algorithms(True)``
the launcher uses one fixed tile per dtype and head dim instead (``kernel_config.py``).

Two launches when dQ is needed (the math is spelled out in ``reference_backward.py``):
1. dQ: one program per query block computes ``delta = rowsum(O * dO)`` (fp32) for its rows,
   stores it for the next launch, and loops over the key blocks it sees;
2. dK and dV: one program per key block loops over the query blocks that see it, reading
   delta (a block without any valid key stores zeros and skips the loop).
Without dQ, a small kernel computes delta instead. Each launch costs tens of microseconds of
host time, which is most of a small call's time, so delta rides in the dQ kernel.
Probabilities are recomputed from the saved log-sum-exp, and dropout's keep-mask
is regenerated from the forward's seed rather than stored. Rows whose lse is
``-inf`` (no visible key) are treated as ``+inf`` so every probability is 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout_rng import dropout_threshold
from .forward_kernel import LOG2E, device_context, key_bias, key_block_range, mask_arguments
from . import offset_width
from .launcher import kernel_launcher
from .kernel_config import (
    backward_configs, cdiv, dot_precision, head_dim_block, length_bucket, prune_by_length,
)
from .triton_rng import dropout_keep_tile, load_dropout_seed

_BACKWARD_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM_BLOCK", "CAUSAL", "HAS_MASK", "HAS_DROPOUT", "DOT_PRECISION"]
_RUNTIME_INTS = ["query_length", "key_length", "LQ_BUCKET", "LK_BUCKET", "threshold", "stride_mask_b"]


@triton.jit
def _load_rows(base, offs_rows, stride_row, offs_d, row_ok, HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr):
    """A ``[rows, HEAD_DIM_BLOCK]`` tile, zeros outside the rows and the head dim. ``offs_rows`` is
    int64 in the INT64_OFFSETS variant (``offset_width.py``), like every index that enters an address."""
    ptrs = base + offs_rows[:, None] * stride_row + offs_d[None, :]
    if HEAD_DIM == HEAD_DIM_BLOCK:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _load_rows_transposed(base, offs_rows, stride_row, offs_d, row_ok,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr):
    """The same tile read as ``[HEAD_DIM_BLOCK, rows]`` through its strides (no data movement)."""
    ptrs = base + offs_rows[None, :] * stride_row + offs_d[:, None]
    if HEAD_DIM == HEAD_DIM_BLOCK:
        return tl.load(ptrs, mask=row_ok[None, :], other=0.0)
    return tl.load(ptrs, mask=row_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _lse_log2(lse_ptr, offs_m, query_length):
    """Saved lse in base 2; rows without keys (-inf) and rows past the end become +inf so
    that exp2(score - lse) is exactly 0 for them."""
    lse = tl.load(lse_ptr + offs_m, mask=offs_m < query_length, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit(do_not_specialize=["query_length"])
def attention_backward_delta_kernel(
    out_ptr, grad_out_ptr, delta_ptr,
    stride_ob, stride_om, stride_oh,
    stride_gb, stride_gm, stride_gh,
    heads, query_length,
    HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr, INT64_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    # Heads and batch rows on grid axes 1 and 2: CUDA caps each at 65535, which B * H on one axis can pass.
    head = tl.program_id(1).to(tl.int64) if INT64_OFFSETS else tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = (batch.to(tl.int64) if INT64_OFFSETS else batch) * heads + head
    offs_m = start_m + (tl.arange(0, BLOCK_M).to(tl.int64) if INT64_OFFSETS else tl.arange(0, BLOCK_M))
    offs_d = tl.arange(0, HEAD_DIM_BLOCK)
    row_ok = offs_m < query_length
    out = _load_rows(out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh, offs_m, stride_om, offs_d,
                     row_ok, HEAD_DIM, HEAD_DIM_BLOCK)
    grad_out = _load_rows(grad_out_ptr + batch.to(tl.int64) * stride_gb + head * stride_gh, offs_m, stride_gm,
                          offs_d, row_ok, HEAD_DIM, HEAD_DIM_BLOCK)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), axis=1)
    tl.store(delta_ptr + batch_head.to(tl.int64) * query_length + offs_m, delta, mask=row_ok)


@triton.jit
def _key_block_grads(grad_k, grad_v, k, v, bias, q_base, grad_out_base, stride_qm, stride_gm,
                     lse_row_ptr, delta_row_ptr, start_n, offs_n, offs_d, start, stop, query_length, causal_offset,
                     qk_scale, seed_k0, seed_k1, seed_stream, batch_head, threshold, dropout_scale,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [start, stop); tiles are
    key-major ([BLOCK_N, BLOCK_M]) so both products land on the key rows."""
    arange_m = tl.arange(0, BLOCK_M).to(tl.int64) if INT64_OFFSETS else tl.arange(0, BLOCK_M)
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + arange_m
        row_ok = offs_m < query_length
        q_t = _load_rows_transposed(q_base, offs_m, stride_qm, offs_d, row_ok, HEAD_DIM, HEAD_DIM_BLOCK)
        grad_out = _load_rows(grad_out_base, offs_m, stride_gm, offs_d, row_ok, HEAD_DIM, HEAD_DIM_BLOCK)
        lse = _lse_log2(lse_row_ptr, offs_m, query_length)
        scores_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)
        probs_t = tl.math.exp2(scores_t * qk_scale + bias[:, None] - lse[None, :])
        if APPLY_CAUSAL:
            probs_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, probs_t, 0.0)
        grad_probs_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = tl.trans(dropout_keep_tile(seed_k0, seed_k1, seed_stream, batch_head, offs_m,
                                                start_n, threshold, BLOCK_M, BLOCK_N, WIDE_PRODUCTS=False))
            dropped_t = tl.where(keep_t, probs_t * dropout_scale, 0.0)
            grad_probs_t = tl.where(keep_t, grad_probs_t * dropout_scale, 0.0)
        else:
            dropped_t = probs_t
        grad_v = tl.dot(dropped_t.to(grad_out.dtype), grad_out, grad_v, input_precision=DOT_PRECISION)
        delta = tl.load(delta_row_ptr + offs_m, mask=row_ok, other=0.0)
        grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
        grad_k = tl.dot(grad_scores_t.to(q_t.dtype), tl.trans(q_t), grad_k, input_precision=DOT_PRECISION)
    return grad_k, grad_v


@triton.autotune(configs=backward_configs(), key=_BACKWARD_KEY,
                 prune_configs_by={"early_config_prune": prune_by_length})
@triton.jit(do_not_specialize=_RUNTIME_INTS)
def attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr, mask_ptr, seed_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_gb, stride_gm, stride_gh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_mask_b, stride_mask_k,
    heads, query_length, key_length, LQ_BUCKET, LK_BUCKET,
    qk_scale, sm_scale, threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    # Heads and batch rows on grid axes 1 and 2: CUDA caps each at 65535, which B * H on one axis can pass.
    head = tl.program_id(1).to(tl.int64) if INT64_OFFSETS else tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = (batch.to(tl.int64) if INT64_OFFSETS else batch) * heads + head
    offs_n = start_n + (tl.arange(0, BLOCK_N).to(tl.int64) if INT64_OFFSETS else tl.arange(0, BLOCK_N))
    offs_d = tl.arange(0, HEAD_DIM_BLOCK)
    key_ok = offs_n < key_length

    k = _load_rows(k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh, offs_n, stride_kn, offs_d, key_ok,
                   HEAD_DIM, HEAD_DIM_BLOCK)
    v = _load_rows(v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh, offs_n, stride_vn, offs_d, key_ok,
                   HEAD_DIM, HEAD_DIM_BLOCK)
    bias = key_bias(mask_ptr + batch.to(tl.int64) * stride_mask_b, stride_mask_k, offs_n, key_length, HAS_MASK)
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh
    grad_out_base = grad_out_ptr + batch.to(tl.int64) * stride_gb + head * stride_gh
    lse_row_ptr = lse_ptr + batch_head.to(tl.int64) * query_length
    delta_row_ptr = delta_ptr + batch_head.to(tl.int64) * query_length

    seed_k0, seed_k1, seed_stream = 0, 0, 0
    if HAS_DROPOUT:
        seed_k0, seed_k1, seed_stream = load_dropout_seed(seed_ptr)

    grad_k = tl.zeros([BLOCK_N, HEAD_DIM_BLOCK], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, HEAD_DIM_BLOCK], dtype=tl.float32)

    # Key blocks without a valid key get zero gradients, no loop.
    query_stop = tl.where(tl.max(bias, 0) == 0.0, query_length, 0)
    causal_offset = key_length - query_length
    if CAUSAL:
        # Query i sees key j iff j <= i + causal_offset: rows before first_row see
        # nothing in this block, rows from full_row on see all of it.
        first_row = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        full_row = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        diagonal_stop = tl.minimum(full_row, query_stop)
        grad_k, grad_v = _key_block_grads(
            grad_k, grad_v, k, v, bias, q_base, grad_out_base, stride_qm, stride_gm, lse_row_ptr, delta_row_ptr,
            start_n, offs_n, offs_d, first_row, diagonal_stop, query_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, True, HAS_DROPOUT, DOT_PRECISION, INT64_OFFSETS)
        grad_k, grad_v = _key_block_grads(
            grad_k, grad_v, k, v, bias, q_base, grad_out_base, stride_qm, stride_gm, lse_row_ptr, delta_row_ptr,
            start_n, offs_n, offs_d, tl.maximum(full_row, first_row), query_stop, query_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, False, HAS_DROPOUT, DOT_PRECISION, INT64_OFFSETS)
    else:
        grad_k, grad_v = _key_block_grads(
            grad_k, grad_v, k, v, bias, q_base, grad_out_base, stride_qm, stride_gm, lse_row_ptr, delta_row_ptr,
            start_n, offs_n, offs_d, 0, query_stop, query_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, False, HAS_DROPOUT, DOT_PRECISION, INT64_OFFSETS)

    grad_k = grad_k * sm_scale
    store_mask = key_ok[:, None]
    if HEAD_DIM != HEAD_DIM_BLOCK:
        store_mask = store_mask & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = (grad_k_ptr + batch.to(tl.int64) * stride_dkb + head * stride_dkh
               + offs_n[:, None] * stride_dkn + offs_d[None, :])
    dv_ptrs = (grad_v_ptr + batch.to(tl.int64) * stride_dvb + head * stride_dvh
               + offs_n[:, None] * stride_dvn + offs_d[None, :])
    tl.store(dk_ptrs, grad_k.to(grad_k_ptr.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, grad_v.to(grad_v_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _query_block_grads(grad_q, q, grad_out, lse, delta, k_base, v_base, stride_kn, stride_vn,
                       mask_row_ptr, stride_mask_k, offs_m, offs_d, start, stop, key_length, causal_offset,
                       qk_scale, seed_k0, seed_k1, seed_stream, batch_head, threshold, dropout_scale,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, stop)."""
    arange_n = tl.arange(0, BLOCK_N).to(tl.int64) if INT64_OFFSETS else tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + arange_n
        key_ok = offs_n < key_length
        k_t = _load_rows_transposed(k_base, offs_n, stride_kn, offs_d, key_ok, HEAD_DIM, HEAD_DIM_BLOCK)
        v_t = _load_rows_transposed(v_base, offs_n, stride_vn, offs_d, key_ok, HEAD_DIM, HEAD_DIM_BLOCK)
        bias = key_bias(mask_row_ptr, stride_mask_k, offs_n, key_length, HAS_MASK)
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        probs = tl.math.exp2(scores * qk_scale + bias[None, :] - lse[:, None])
        if APPLY_CAUSAL:
            probs = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_offset, probs, 0.0)
        grad_probs = tl.dot(grad_out, v_t, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed_k0, seed_k1, seed_stream, batch_head, offs_m, start_n,
                                     threshold, BLOCK_M, BLOCK_N)
            # dS = P * (keep * scale * dP - delta), the scaling and subtraction in one multiply-add.
            grad_scores = probs * tl.where(keep, grad_probs * dropout_scale - delta[:, None], -delta[:, None])
        else:
            grad_scores = probs * (grad_probs - delta[:, None])
        grad_q = tl.dot(grad_scores.to(k_t.dtype), tl.trans(k_t), grad_q, input_precision=DOT_PRECISION)
    return grad_q


@triton.autotune(configs=backward_configs(), key=_BACKWARD_KEY,
                 prune_configs_by={"early_config_prune": prune_by_length})
@triton.jit(do_not_specialize=_RUNTIME_INTS)
def attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_q_ptr, mask_ptr, seed_ptr,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_gb, stride_gm, stride_gh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_mask_b, stride_mask_k,
    heads, query_length, key_length, LQ_BUCKET, LK_BUCKET,
    qk_scale, sm_scale, threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    # Heads and batch rows on grid axes 1 and 2: CUDA caps each at 65535, which B * H on one axis can pass.
    head = tl.program_id(1).to(tl.int64) if INT64_OFFSETS else tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = (batch.to(tl.int64) if INT64_OFFSETS else batch) * heads + head
    offs_m = start_m + (tl.arange(0, BLOCK_M).to(tl.int64) if INT64_OFFSETS else tl.arange(0, BLOCK_M))
    offs_d = tl.arange(0, HEAD_DIM_BLOCK)
    row_ok = offs_m < query_length

    q = _load_rows(q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh, offs_m, stride_qm, offs_d, row_ok,
                   HEAD_DIM, HEAD_DIM_BLOCK)
    grad_out = _load_rows(grad_out_ptr + batch.to(tl.int64) * stride_gb + head * stride_gh, offs_m, stride_gm,
                          offs_d, row_ok, HEAD_DIM, HEAD_DIM_BLOCK)
    lse = _lse_log2(lse_ptr + batch_head.to(tl.int64) * query_length, offs_m, query_length)
    # delta = rowsum(O * dO) of this block's rows, kept for the dK/dV launch that follows.
    out = _load_rows(out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh, offs_m, stride_om, offs_d,
                     row_ok, HEAD_DIM, HEAD_DIM_BLOCK)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), axis=1)
    tl.store(delta_ptr + batch_head.to(tl.int64) * query_length + offs_m, delta, mask=row_ok)
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh
    mask_row_ptr = mask_ptr + batch.to(tl.int64) * stride_mask_b

    seed_k0, seed_k1, seed_stream = 0, 0, 0
    if HAS_DROPOUT:
        seed_k0, seed_k1, seed_stream = load_dropout_seed(seed_ptr)

    grad_q = tl.zeros([BLOCK_M, HEAD_DIM_BLOCK], dtype=tl.float32)
    lo, hi = key_block_range(mask_row_ptr, stride_mask_k, key_length, HAS_MASK, BLOCK_N, INT64_OFFSETS)
    causal_offset = key_length - query_length
    if CAUSAL:
        full_stop = (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N
        full_stop = tl.maximum(tl.minimum(full_stop, hi), lo)
        diagonal_stop = tl.minimum(hi, start_m + BLOCK_M + causal_offset)
        grad_q = _query_block_grads(
            grad_q, q, grad_out, lse, delta, k_base, v_base, stride_kn, stride_vn, mask_row_ptr, stride_mask_k,
            offs_m, offs_d, lo, full_stop, key_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, False, HAS_MASK, HAS_DROPOUT, DOT_PRECISION,
            INT64_OFFSETS)
        grad_q = _query_block_grads(
            grad_q, q, grad_out, lse, delta, k_base, v_base, stride_kn, stride_vn, mask_row_ptr, stride_mask_k,
            offs_m, offs_d, full_stop, diagonal_stop, key_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, True, HAS_MASK, HAS_DROPOUT, DOT_PRECISION,
            INT64_OFFSETS)
    else:
        grad_q = _query_block_grads(
            grad_q, q, grad_out, lse, delta, k_base, v_base, stride_kn, stride_vn, mask_row_ptr, stride_mask_k,
            offs_m, offs_d, lo, hi, key_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, False, HAS_MASK, HAS_DROPOUT, DOT_PRECISION,
            INT64_OFFSETS)

    grad_q = grad_q * sm_scale
    store_mask = row_ok[:, None]
    if HEAD_DIM != HEAD_DIM_BLOCK:
        store_mask = store_mask & (offs_d[None, :] < HEAD_DIM)
    dq_ptrs = (grad_q_ptr + batch.to(tl.int64) * stride_dqb + head * stride_dqh
               + offs_m[:, None] * stride_dqm + offs_d[None, :])
    tl.store(dq_ptrs, grad_q.to(grad_q_ptr.dtype.element_ty), mask=store_mask)


def _strides_without_last(t: torch.Tensor):
    return t.stride()[:3]  # one call: each stride(i) is a separate host round trip


def attention_backward_triton(grad_out, q, k, v, out, lse, key_padding_mask, dropout_seed, causal, dropout_p,
                              scale, allow_tf32, need_dq=True, need_dkdv=True):
    """``(dq, dk, dv)``, contiguous, in the inputs' dtype; ``dq`` is None unless ``need_dq``, and
    ``dk``, ``dv`` are None unless ``need_dkdv`` (their kernel is then not launched)."""
    batch, query_length, heads, head_dim = q.shape
    key_length = k.shape[1]
    # The kernels index the head dim with unit stride; copy the rare inputs that lack it.
    q, k, v, out, grad_out = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, out, grad_out))
    lse = lse.contiguous()  # read as [B, H, Lq] with rows of length Lq
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device) if need_dq else None
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device) if need_dkdv else None
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device) if need_dkdv else None
    delta = torch.empty(batch, heads, query_length, dtype=torch.float32, device=q.device)
    has_dropout = dropout_p > 0.0
    mask, stride_mask_b, stride_mask_k = mask_arguments(key_padding_mask, q)
    seed = dropout_seed if has_dropout else q
    d_block = head_dim_block(head_dim)
    int64_offsets = offset_width.attention_needs_int64(q, k, v, out, grad_out, grad_q, grad_k, grad_v,
                                                       key_padding_mask, batch=batch, heads=heads)
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_BLOCK=d_block, CAUSAL=causal, HAS_MASK=key_padding_mask is not None,
                  HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(q.dtype, allow_tf32),
                  INT64_OFFSETS=int64_offsets)
    scalars = (heads, query_length, key_length, length_bucket(query_length), length_bucket(key_length),
               scale * LOG2E, scale, dropout_threshold(dropout_p) if has_dropout else 0, 1.0 / (1.0 - dropout_p))
    launch_dkdv = kernel_launcher(attention_backward_dkdv_kernel, "backward", q.dtype, d_block)
    launch_dq = kernel_launcher(attention_backward_dq_kernel, "backward", q.dtype, d_block)

    with device_context(q):
        if need_dq:  # computes and stores delta on the way
            launch_dq(
                lambda meta: (cdiv(query_length, meta["BLOCK_M"]), heads, batch),
                q, k, v, out, grad_out, lse, delta, grad_q, mask, seed,
                *_strides_without_last(q), *_strides_without_last(k), *_strides_without_last(v),
                *_strides_without_last(out), *_strides_without_last(grad_out), *_strides_without_last(grad_q),
                stride_mask_b, stride_mask_k, *scalars, **common,
            )
        elif need_dkdv:
            delta_block = 16 if d_block >= 128 else 64
            attention_backward_delta_kernel[(cdiv(query_length, delta_block), heads, batch)](
                out, grad_out, delta, *_strides_without_last(out), *_strides_without_last(grad_out),
                heads, query_length, HEAD_DIM=head_dim, HEAD_DIM_BLOCK=d_block, INT64_OFFSETS=int64_offsets,
                BLOCK_M=delta_block,
            )
        if need_dkdv:
            launch_dkdv(
                lambda meta: (cdiv(key_length, meta["BLOCK_N"]), heads, batch),
                q, k, v, grad_out, lse, delta, grad_k, grad_v, mask, seed,
                *_strides_without_last(q), *_strides_without_last(k), *_strides_without_last(v),
                *_strides_without_last(grad_out), *_strides_without_last(grad_k), *_strides_without_last(grad_v),
                stride_mask_b, stride_mask_k, *scalars, **common,
            )
    return grad_q, grad_k, grad_v
