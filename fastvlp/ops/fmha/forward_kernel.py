"""Triton forward of fused attention (online softmax, FlashAttention-2 style).

One program owns ``BLOCK_M`` queries of one (batch, head) and streams key/value
blocks through an fp32 online softmax in base 2 (``log2(e)`` is folded into the
scale, so each probability costs one ``exp2``). Key padding and sequence ends
enter as a per-key-block bias vector (0 or -inf) rather than per-element selects,
and keys outside the batch row's first..last valid key are never visited (each
program finds them by scanning its row of the mask, so no host-side launch is
spent on it). Causal calls split the key range into blocks every query of the
tile sees (no causal test) and the diagonal blocks (with it). It saves the natural-log log-sum-exp
for the backward, ``-inf`` for rows without any visible key (output 0). Element offsets are
int32 unless the launch needs int64 (``offset_width.py``). Under
``torch.use_deterministic_algorithms(True)`` it runs one fixed tile per dtype and head dim rather
than the autotuned one (``kernel_config.py``), since the tile sets the order of the fp32 sums.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dropout_rng import dropout_threshold
from . import offset_width
from .launcher import kernel_launcher
from .kernel_config import (
    cdiv, dot_precision, forward_configs, head_dim_block, length_bucket, prune_forward,
)
from .triton_rng import dropout_keep_tile, load_dropout_seed

LOG2E = 1.4426950408889634


@triton.jit
def key_bias(mask_row_ptr, stride_mask_k, offs_n, key_length, HAS_MASK: tl.constexpr):
    """0 for keys that exist and are not padding, -inf otherwise (a ``[BLOCK_N]`` vector). ``offs_n``
    is int64 in the kernels' INT64_OFFSETS variant (see ``offset_width.py``), like every index
    vector that enters an address."""
    valid = offs_n < key_length
    if HAS_MASK:
        padded = tl.load(mask_row_ptr + offs_n * stride_mask_k, mask=valid, other=1)
        valid = valid & (padded == 0)
    return tl.where(valid, 0.0, float("-inf"))


@triton.jit
def key_block_range(mask_row_ptr, stride_mask_k, key_length, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                    INT64_OFFSETS: tl.constexpr, SCAN_BLOCK: tl.constexpr = 512):
    """[lo, hi) of keys worth visiting: lo is block-aligned (dropout counters need
    multiples of 4); padded keys before the first or after the last valid key are skipped.
    Each program scans its batch row's mask (a few hundred bytes, from L2), which
    costs less than the host-side launches that computing the range beforehand needs.
    A row without any valid key gives (0, 0)."""
    if HAS_MASK:
        first = key_length
        last = 0
        offs = tl.arange(0, SCAN_BLOCK)
        for start in range(0, key_length, SCAN_BLOCK):
            index = start + offs
            # index stays int32 (first and last are loop-carried); only its address term is widened.
            padded = tl.load(mask_row_ptr + (index.to(tl.int64) if INT64_OFFSETS else index) * stride_mask_k,
                             mask=index < key_length, other=1)
            valid = padded == 0
            first = tl.minimum(first, tl.min(tl.where(valid, index, key_length), 0))
            last = tl.maximum(last, tl.max(tl.where(valid, index + 1, 0), 0))
        lo = tl.minimum(first, last)
        hi = last
    else:
        lo = 0
        hi = key_length
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _forward_blocks(acc, m_i, l_i, q, k_ptrs_base, v_ptrs_base, stride_kn, stride_vn,
                    mask_row_ptr, stride_mask_k, offs_m, offs_d, start, stop, key_length, causal_offset,
                    qk_scale, seed_k0, seed_k1, seed_stream, batch_head, threshold,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    arange_n = tl.arange(0, BLOCK_N).to(tl.int64) if INT64_OFFSETS else tl.arange(0, BLOCK_N)
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + arange_n
        in_bounds = offs_n < key_length
        if HEAD_DIM == HEAD_DIM_BLOCK:
            k_t = tl.load(k_ptrs_base + offs_n[None, :] * stride_kn, mask=in_bounds[None, :], other=0.0)
        else:
            k_t = tl.load(k_ptrs_base + offs_n[None, :] * stride_kn,
                          mask=in_bounds[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        bias = key_bias(mask_row_ptr, stride_mask_k, offs_n, key_length, HAS_MASK)
        scores = scores * qk_scale + bias[None, :]
        if APPLY_CAUSAL:
            visible = offs_n[None, :] <= offs_m[:, None] + causal_offset
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with no visible key so far keeps m = -inf; shift by 0 instead so
        # exp2 gives exact zeros instead of NaN from (-inf) - (-inf).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        probs = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep_tile(seed_k0, seed_k1, seed_stream, batch_head, offs_m, start_n,
                                     threshold, BLOCK_M, BLOCK_N)
            probs = tl.where(keep, probs, 0.0)
        if HEAD_DIM == HEAD_DIM_BLOCK:
            v = tl.load(v_ptrs_base + offs_n[:, None] * stride_vn, mask=in_bounds[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs_base + offs_n[:, None] * stride_vn,
                        mask=in_bounds[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        acc = tl.dot(probs.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(
    configs=forward_configs(),
    key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM_BLOCK", "CAUSAL", "HAS_MASK", "HAS_DROPOUT", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_forward},
)
# Lengths (and the mask's row stride, which is Lk) stay runtime values so that new
# lengths reuse compiled kernels; tensor strides keep Triton's divisibility
# specialisation, which vectorised loads need (they scale with H * D, not length).
@triton.jit(do_not_specialize=["query_length", "key_length", "LQ_BUCKET", "LK_BUCKET", "threshold",
                               "stride_mask_b"])
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, mask_ptr, seed_ptr,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_mask_b, stride_mask_k,
    heads, query_length, key_length, LQ_BUCKET, LK_BUCKET,
    qk_scale, threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    # Heads and batch rows on grid axes 1 and 2: CUDA caps each at 65535, which B * H on one axis can pass.
    # In the INT64_OFFSETS variant every index that enters an address is int64 (offset_width.py).
    head = tl.program_id(1).to(tl.int64) if INT64_OFFSETS else tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = (batch.to(tl.int64) if INT64_OFFSETS else batch) * heads + head

    offs_m = start_m + (tl.arange(0, BLOCK_M).to(tl.int64) if INT64_OFFSETS else tl.arange(0, BLOCK_M))
    offs_d = tl.arange(0, HEAD_DIM_BLOCK).to(tl.int64) if INT64_OFFSETS else tl.arange(0, HEAD_DIM_BLOCK)
    row_ok = offs_m < query_length
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head * stride_vh
    mask_row_ptr = mask_ptr + batch.to(tl.int64) * stride_mask_b

    q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if HEAD_DIM == HEAD_DIM_BLOCK:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_ptrs_base = k_base + offs_d[:, None] * stride_kd
    v_ptrs_base = v_base + offs_d[None, :] * stride_vd

    seed_k0, seed_k1, seed_stream = 0, 0, 0
    if HAS_DROPOUT:
        seed_k0, seed_k1, seed_stream = load_dropout_seed(seed_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_BLOCK], dtype=tl.float32)

    lo, hi = key_block_range(mask_row_ptr, stride_mask_k, key_length, HAS_MASK, BLOCK_N, INT64_OFFSETS)
    causal_offset = key_length - query_length
    if CAUSAL:
        # Keys below the first row's limit are visible to every row of the tile.
        full_stop = (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N
        full_stop = tl.maximum(tl.minimum(full_stop, hi), lo)
        diagonal_stop = tl.minimum(hi, start_m + BLOCK_M + causal_offset)
        acc, m_i, l_i = _forward_blocks(
            acc, m_i, l_i, q, k_ptrs_base, v_ptrs_base, stride_kn, stride_vn, mask_row_ptr, stride_mask_k,
            offs_m, offs_d, lo, full_stop, key_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, False, HAS_MASK, HAS_DROPOUT, DOT_PRECISION,
            INT64_OFFSETS)
        acc, m_i, l_i = _forward_blocks(
            acc, m_i, l_i, q, k_ptrs_base, v_ptrs_base, stride_kn, stride_vn, mask_row_ptr, stride_mask_k,
            offs_m, offs_d, full_stop, diagonal_stop, key_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, True, HAS_MASK, HAS_DROPOUT, DOT_PRECISION,
            INT64_OFFSETS)
    else:
        acc, m_i, l_i = _forward_blocks(
            acc, m_i, l_i, q, k_ptrs_base, v_ptrs_base, stride_kn, stride_vn, mask_row_ptr, stride_mask_k,
            offs_m, offs_d, lo, hi, key_length, causal_offset, qk_scale,
            seed_k0, seed_k1, seed_stream, batch_head, threshold,
            HEAD_DIM, HEAD_DIM_BLOCK, BLOCK_M, BLOCK_N, False, HAS_MASK, HAS_DROPOUT, DOT_PRECISION,
            INT64_OFFSETS)

    has_key = l_i > 0.0
    inv_l = tl.where(has_key, 1.0 / tl.where(has_key, l_i, 1.0), 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l * dropout_scale
    out = acc * inv_l[:, None]
    # Saved in natural log (times ln 2), like the reference's lse.
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + batch_head.to(tl.int64) * query_length + offs_m, lse, mask=row_ok)

    out_ptrs = (out_ptr + batch.to(tl.int64) * stride_ob + head * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    if HEAD_DIM == HEAD_DIM_BLOCK:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def mask_arguments(key_padding_mask, q):
    """(mask, stride_b, stride_k) kernel arguments; placeholders when absent."""
    if key_padding_mask is None:
        return q, 0, 0
    mask_bytes = key_padding_mask.view(torch.uint8)
    return mask_bytes, mask_bytes.stride(0), mask_bytes.stride(1)


_NO_SWITCH = contextlib.nullcontext()


def device_context(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current device); no switch when it is the
    current one already, the usual case (switching there and back is host time on every call)."""
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(t.device)


def attention_forward_triton(q, k, v, key_padding_mask, dropout_seed, causal, dropout_p, scale, allow_tf32,
                             out, lse):
    """Run the forward kernel into ``out`` ([B, Lq, H, D]) and ``lse`` ([B, H, Lq] fp32)."""
    batch, query_length, heads, head_dim = q.shape
    key_length = k.shape[1]
    has_dropout = dropout_p > 0.0
    mask, stride_mask_b, stride_mask_k = mask_arguments(key_padding_mask, q)
    seed = dropout_seed if has_dropout else q

    d_block = head_dim_block(head_dim)
    launch = kernel_launcher(attention_forward_kernel, "forward", q.dtype, d_block)

    def grid(meta):
        return (cdiv(query_length, meta["BLOCK_M"]), heads, batch)

    with device_context(q):
        launch(
            grid, q, k, v, out, lse, mask, seed,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            stride_mask_b, stride_mask_k,
            heads, query_length, key_length, length_bucket(query_length), length_bucket(key_length),
            scale * LOG2E, dropout_threshold(dropout_p) if has_dropout else 0,
            1.0 / (1.0 - dropout_p),
            HEAD_DIM=head_dim, HEAD_DIM_BLOCK=d_block, CAUSAL=causal,
            HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=has_dropout,
            DOT_PRECISION=dot_precision(q.dtype, allow_tf32),
            INT64_OFFSETS=offset_width.attention_needs_int64(q, k, v, out, key_padding_mask, batch=batch,
                                                             heads=heads),
        )
    return out, lse
