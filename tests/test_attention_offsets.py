"""64-bit element offsets in the fused attention kernels: the host-side decision at the 2**31
boundary (for the layouts that reach it), the int64 kernel variant against the int32 one, and
rows 2**31 elements apart read from the right address in Triton's CPU interpreter.

The GPU versions of the large cases are in test_attention_gpu.py.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastvlp.ops.fmha import offset_width  # noqa: E402
from fastvlp.ops.fmha.dispatch import attention  # noqa: E402
from fastvlp.ops.fmha.dropout_rng import draw_dropout_seed  # noqa: E402
from fastvlp.ops.fmha.offset_width import (  # noqa: E402
    INT32_LIMIT, attention_needs_int64, largest_offset, needs_int64_offsets,
)
from fastvlp.ops.fmha.reference import attention_reference  # noqa: E402


def _interpreted():
    from fastvlp.ops.fmha.kernel_config import kernels_interpreted

    return kernels_interpreted()


needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not _interpreted(),
    reason="runs the kernels in Triton's CPU interpreter (the CUDA versions are in test_attention_gpu.py)",
)


def _sequence_first_qkv(length, batch, embed, heads):
    """q, k, v as MultiheadAttention(batch_first=False) hands them to the kernels: [B, L, H, D] views of
    one packed [L, B, 3E] projection. On the meta device: shapes and strides only, no memory."""
    packed = torch.empty(length, batch, 3 * embed, device="meta", dtype=torch.float16)
    return tuple(t.transpose(0, 1) for t in packed.view(length, batch, 3, heads, embed // heads).unbind(2))


def test_largest_offset_at_the_int32_boundary():
    assert largest_offset((2**31,), (1,)) == INT32_LIMIT - 1
    assert not needs_int64_offsets([((2**31,), (1,))])
    assert needs_int64_offsets([((2**31 + 1,), (1,))])
    # A tensor [L, H, D] (one batch row) whose last element sits exactly at 2**31 - 1, then one past it.
    assert not needs_int64_offsets([((2**21, 8, 128), (1024, 128, 1))])
    assert needs_int64_offsets([((2**21 + 1, 8, 128), (1024, 128, 1))])
    # Any one operand decides; empty tensors have no offsets.
    assert needs_int64_offsets([((4, 2), (2, 1)), ((3,), (2**30,))])
    assert largest_offset((0, 5), (2**40, 1)) == 0
    assert not needs_int64_offsets([((0, 5), (2**40, 1))])
    # Indices: the largest value an int32 index takes.
    assert not needs_int64_offsets(indices=[INT32_LIMIT - 1])
    assert needs_int64_offsets(indices=[INT32_LIMIT])
    with pytest.raises(ValueError, match="strides"):
        largest_offset((2, 3), (3,))


@pytest.mark.parametrize(
    "embed, batch, first_failing_length",
    # From the review of the kernels: (L - 1) * 3 * B * E reaches 2**31 at these L.
    [(1024, 128, 5463), (768, 256, 3642), (4096, 64, 2732), (256, 64, 43692)],
)
def test_sequence_first_packed_projection_turns_int64_on_at_its_boundary(embed, batch, first_failing_length):
    heads = 8
    for length, expected in ((first_failing_length - 1, False), (first_failing_length, True)):
        q, k, v = _sequence_first_qkv(length, batch, embed, heads)
        assert q.stride(1) == 3 * batch * embed
        out = torch.empty(batch, length, heads, embed // heads, device="meta")
        assert attention_needs_int64(q, k, v, out, None, batch=batch, heads=heads) is expected, length


def test_other_layouts_and_the_batch_head_index():
    # Cross-attention keys from a sequence-first [S, B, E] memory projection (E = 256, B = 64).
    for length, expected in ((131072, False), (131073, True)):
        memory = torch.empty(length, 64, 256, device="meta").view(length, 64, 8, 32).transpose(0, 1)
        assert attention_needs_int64(memory, batch=64, heads=8) is expected
    # A [B, H, L, D] tensor passed as .transpose(1, 2): the head stride is L * D.
    for length, expected in ((2**20, False), (2**20 + 1, True)):
        q = torch.empty(1, 16, length, 128, device="meta").transpose(1, 2)
        assert attention_needs_int64(q, batch=1, heads=16) is expected
    # The batch stride is not counted (the kernels always widen the batch term) ...
    many = torch.empty(4096, 1024, 8, 64, device="meta")
    assert many.numel() >= INT32_LIMIT and not attention_needs_int64(many, batch=4096, heads=8)
    # ... but the flattened batch * heads + head index is.
    assert not attention_needs_int64(batch=65535, heads=32768)
    assert attention_needs_int64(batch=65535, heads=32769)
    # A key mask read through a large key stride, and None operands skipped.
    mask = torch.empty(2**16 + 1, 2**15, dtype=torch.bool, device="meta").t()
    assert attention_needs_int64(None, mask, batch=2**15, heads=1)
    assert not attention_needs_int64(None, mask[:, : 2**16], batch=2**15, heads=1)


def _decision_spy(monkeypatch, value=None):
    """Record the launchers' decisions; force them to ``value`` unless it is None."""
    calls = []
    decide_for_real = offset_width.attention_needs_int64

    def decide(*args, **kwargs):
        calls.append(decide_for_real(*args, **kwargs) if value is None else value)
        return calls[-1]

    monkeypatch.setattr(offset_width, "attention_needs_int64", decide)
    return calls


def _forward_backward(q, k, v, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))  # detach keeps the strides (clone would not)
    torch.manual_seed(3)
    out = attention(q, k, v, backend="triton", **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@needs_interpreter
def test_int64_variant_is_bitwise_equal_to_the_int32_one(monkeypatch):
    """Every kernel branch (key mask, causal, dropout, padded head dim) with the INT64_OFFSETS variant
    forced on: only the index arithmetic changes, so the results are bitwise those of the int32 variant."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 20, 2, 24, generator=generator)
    k, v = (torch.randn(2, 45, 2, 24, generator=generator) for _ in range(2))
    mask = torch.rand(2, 45, generator=generator) < 0.3
    mask[1, :34] = True  # a masked prefix: the key range starts at the second block
    kwargs = dict(key_padding_mask=mask, causal=True, dropout_p=0.2)
    narrow = _forward_backward(q, k, v, **kwargs)
    decisions = _decision_spy(monkeypatch, True)
    wide = _forward_backward(q, k, v, **kwargs)
    assert decisions == [True, True]  # the forward and the backward launcher
    for a, b in zip(narrow, wide):
        assert torch.equal(a, b)
    expected = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=True)
    assert not torch.allclose(narrow[0].double(), expected, atol=1e-3)  # dropout did apply


@needs_interpreter
def test_keep_mask_kernel_int64_variant_matches_the_replica(monkeypatch):
    from fastvlp.ops.fmha import triton_rng
    from fastvlp.ops.fmha.dropout_rng import dropout_keep_mask_torch

    seed = draw_dropout_seed("cpu")
    monkeypatch.setattr(triton_rng, "needs_int64_offsets", lambda *args, **kwargs: True)
    keep = triton_rng.dropout_keep_mask(seed, 2, 2, 19, 23, 0.3)
    assert torch.equal(keep, dropout_keep_mask_torch(seed, 2, 2, 19, 23, 0.3))


ROW_STRIDE = 2**30 + 64  # row 2 of a view with this row stride sits 2**31 + 128 elements past row 0
VIEW_OFFSET = 2**31  # so that where an int32 offset of row 2 wraps to is still inside the storage


def _views_with_huge_row_stride():
    """q, k, v [1, 3, 1, 16] float16 interleaved in one 8 GiB storage with row stride 2**30 + 64, and
    copies of them whose row 2 holds the decoy values stored where an int32 row offset wraps to.
    torch.empty reserves the 8 GiB without touching it; a few pages are written."""
    try:
        storage = torch.empty(VIEW_OFFSET + 2 * ROW_STRIDE + 48, dtype=torch.float16)
    except RuntimeError as error:  # no address space for the reservation
        pytest.skip(f"cannot reserve an 8 GiB virtual buffer: {error}")
    generator = torch.Generator().manual_seed(1)
    views, decoyed = [], []
    for index in range(3):
        start = VIEW_OFFSET + 16 * index
        view = storage.as_strided((1, 3, 1, 16), (3 * ROW_STRIDE, ROW_STRIDE, 16, 1), storage_offset=start)
        view.copy_(torch.randn(1, 3, 1, 16, generator=generator))
        wrapped = start + 2 * ROW_STRIDE - 2**32
        storage[wrapped: wrapped + 16] = 3 * torch.randn(16, generator=generator)
        copy = view.clone()
        copy[0, 2, 0] = storage[wrapped: wrapped + 16]
        views.append(view)
        decoyed.append(copy)
    return views, decoyed


@needs_interpreter
def test_rows_past_two_to_the_31_elements_are_read_from_the_right_address(monkeypatch):
    views, decoyed = _views_with_huge_row_stride()
    assert attention_needs_int64(*views, batch=1, heads=1)
    decisions = _decision_spy(monkeypatch)
    out, *grads = _forward_backward(*views)
    assert decisions == [True, True]  # the forward and backward launchers chose the int64 variant
    q, k, v = (t.detach().double().requires_grad_() for t in views)
    expected = attention_reference(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.dtype)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    for actual, wanted in zip((out, *grads), (expected, *expected_grads)):
        torch.testing.assert_close(actual.double(), wanted, rtol=5e-3, atol=5e-3)

    # The int32 variant on the same views reads the decoys 2**32 elements before row 2: what every
    # launch did before the int64 variant existed.
    _decision_spy(monkeypatch, False)
    wrapped = attention(*views, backend="triton").double()
    decoy_expected = attention_reference(*(t.double() for t in decoyed))
    torch.testing.assert_close(wrapped, decoy_expected, rtol=5e-3, atol=5e-3)
    assert (wrapped - expected).abs().max() > 0.1
