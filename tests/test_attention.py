"""Fused attention (fastvlp.ops.fmha) against the float64 reference.

Without a GPU the Triton kernels run in Triton's interpreter, which must be
switched on before the kernels are defined, hence the environment line first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastvlp.ops.fmha.dispatch import BackendChoice, attention, select_backend  # noqa: E402
from fastvlp.ops.fmha.dropout_rng import draw_dropout_seed, dropout_keep_mask_torch, dropout_threshold  # noqa: E402
from fastvlp.ops.fmha.reference import attention_reference  # noqa: E402
from fastvlp.ops.fmha.reference_backward import attention_backward_reference  # noqa: E402
from fastvlp.ops.fmha.triton_rng import philox_4x32 as triton_philox_4x32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}


def _kernels_runnable():
    if DEVICE == "cuda":
        return True
    from fastvlp.ops.fmha.kernel_config import kernels_interpreted

    return kernels_interpreted()


pytestmark = pytest.mark.skipif(
    not _kernels_runnable(),
    reason="fastvlp's Triton kernels were imported before TRITON_INTERPRET=1 was set; run this file on its own",
)


def _inputs(batch, query_length, key_length, heads, head_dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(length):
        return torch.randn(batch, length, heads, head_dim, generator=generator).to(DEVICE, dtype)

    return draw(query_length), draw(key_length), draw(key_length)


def _padding(kind, batch, key_length, seed=1):
    """Bool [B, Lk] (True = ignore) of the named pattern."""
    if kind is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, key_length, dtype=torch.bool)
    if kind == "interleaved":
        # 2-D image padding flattened: the last columns of every row are padding.
        width = 9
        columns = torch.arange(key_length) % width
        for b in range(batch):
            mask[b] = columns >= width - 2 - b
    elif kind == "tail":
        for b in range(batch):
            mask[b, key_length - 5 - 11 * b:] = True
    elif kind == "random":
        mask = torch.rand(batch, key_length, generator=generator) < 0.4
    elif kind == "valid_window":
        # Valid keys only in a window that starts and ends past the kernels' 512-key mask scan block.
        for b in range(batch):
            mask[b, : 530 + 7 * b] = True
            mask[b, 1030 - 13 * b:] = True
    elif kind == "one_row_empty":
        mask = torch.rand(batch, key_length, generator=generator) < 0.3
        mask[-1] = True
    return mask.to(DEVICE)


def _relative_error(actual, expected):
    """Largest error relative to the largest expected value, taken per batch row, so that an error
    confined to one small-valued row is not hidden behind the others. A row's scale is floored at 10%
    of the largest row's: a row whose exact values are 0 gets rounding noise of the size of the other
    rows' rounding, which must not fail (that floor still judges it 10x more strictly than a global
    scale would)."""
    if expected.numel() == 0:
        return 0.0
    error = (actual.double() - expected).abs().flatten(1).amax(1)
    row_scale = expected.abs().flatten(1).amax(1)
    scale = torch.maximum(row_scale, 0.1 * row_scale.max()).clamp_min(1e-6)
    return (error / scale).max().item()


def _run(q, k, v, backend="triton", **kwargs):
    """Output and (dq, dk, dv) for a fixed random output gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend=backend, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def _run_reference(q, k, v, **kwargs):
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = attention_reference(q, k, v, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device, torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def _assert_matches(q, k, v, check_backward=True, **kwargs):
    tolerance = TOLERANCE[q.dtype]
    if check_backward:
        out, grads = _run(q, k, v, **kwargs)
        expected_out, expected_grads = _run_reference(q, k, v, **kwargs)
    else:
        out = attention(q, k, v, backend="triton", **kwargs)
        expected_out = attention_reference(q.double(), k.double(), v.double(), **kwargs)
    assert out.dtype == q.dtype and out.shape == expected_out.shape
    assert torch.isfinite(out).all()
    assert _relative_error(out, expected_out) < tolerance
    if check_backward:
        for name, grad, expected in zip("qkv", grads, expected_grads):
            assert torch.isfinite(grad).all(), name
            assert _relative_error(grad, expected) < tolerance, name
        return out, grads
    return out, None


CASES = {
    # name: (Lq, Lk, padding, causal)
    "odd_lengths": (37, 53, None, False),
    "interleaved_padding": (29, 45, "interleaved", False),
    "tail_padding": (21, 50, "tail", False),
    "empty_batch_row": (19, 34, "one_row_empty", False),
    "causal_short_queries": (37, 101, None, True),
    "causal_more_queries_than_keys": (40, 24, "random", True),
    "long_keys_valid_window": (13, 1100, "valid_window", False),
    # The dK/dV kernel sweeps several query blocks per key block without causal pruning.
    "cross_more_queries_than_keys": (70, 21, "random", False),
    # Lengths that are exact multiples of the interpreter's 32-wide blocks: no ragged last block.
    "causal_block_multiple": (64, 64, None, True),
    "causal_block_multiple_more_queries": (96, 32, "random", True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(case, dtype):
    query_length, key_length, padding, causal = CASES[case]
    q, k, v = _inputs(2, query_length, key_length, 2, 32, dtype)
    mask = _padding(padding, 2, key_length)
    out, grads = _assert_matches(q, k, v, key_padding_mask=mask, causal=causal)

    # Queries that see no key give exact zeros and zero gradients.
    visible = torch.ones(2, query_length, key_length, dtype=torch.bool, device=DEVICE)
    if mask is not None:
        visible &= ~mask[:, None, :]
    if causal:
        rows = torch.arange(query_length, device=DEVICE)[:, None]
        visible &= torch.arange(key_length, device=DEVICE)[None, :] <= rows + key_length - query_length
    empty_rows = ~visible.any(-1)  # [B, Lq]
    if case in ("empty_batch_row", "causal_more_queries_than_keys"):
        assert empty_rows.any()
    assert (out[empty_rows] == 0).all()
    assert (grads[0][empty_rows] == 0).all()
    if mask is not None:
        # Padded keys receive no gradient.
        assert (grads[1][mask] == 0).all() and (grads[2][mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [16, 48, 64, 128])
def test_head_dims_forward(head_dim, dtype):
    q, k, v = _inputs(1, 23, 41, 2, head_dim, dtype, seed=head_dim)
    _assert_matches(q, k, v, key_padding_mask=_padding("random", 1, 41), check_backward=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [16, 80])
def test_head_dims_backward(head_dim, dtype):
    q, k, v = _inputs(1, 19, 35, 2, head_dim, dtype, seed=head_dim)
    _assert_matches(q, k, v, key_padding_mask=_padding("random", 1, 35), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_scores_and_ties(dtype):
    # Scores of several hundred stress the running max; repeated keys create exact ties.
    q, k, v = _inputs(1, 20, 33, 1, 32, dtype, seed=3)
    q = q * 12.0
    k[:, 10:20] = k[:, 0:1]
    _assert_matches(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_masked_keys_with_large_scores_are_ignored(dtype, fresh_seed):
    # Masked keys whose raw scores dwarf the valid ones: a row max taken before masking, or a finite
    # mask bias, would underflow the valid keys' weights.
    q, k, v = _inputs(2, 29, 45, 2, 32, dtype, seed=fresh_seed)
    mask = _padding("random", 2, 45, seed=fresh_seed + 1)
    k[mask] = k[mask] * 200
    assert torch.isfinite(k).all()
    _assert_matches(q, k, v, key_padding_mask=mask)


def test_explicit_scale():
    q, k, v = _inputs(1, 18, 27, 2, 32, torch.float32, seed=4)
    _assert_matches(q, k, v, scale=0.37, causal=True)


def test_lse_matches_reference():
    q, k, v = _inputs(2, 30, 20, 2, 32, torch.float32, seed=6)
    mask = _padding("one_row_empty", 2, 20)
    out, lse = torch.ops.fastvlp.attention_forward(q, k, v, mask, None, True, 0.0, 32**-0.5, "triton", False)
    _, expected = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=True,
                                      return_lse=True)
    finite = torch.isfinite(expected)
    assert (~finite).any()
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("-inf")).all()
    torch.testing.assert_close(lse[finite].double(), expected[finite], rtol=1e-5, atol=1e-5)


def test_strided_views_of_packed_projections():
    """q, k, v as slices of packed [B, L, 3, H, D] / [B, L, 2, H, D] projections."""
    batch, query_length, key_length, heads, head_dim = 2, 26, 39, 2, 32
    generator = torch.Generator().manual_seed(8)
    packed_qkv = torch.randn(batch, query_length, 3, heads, head_dim, generator=generator).to(DEVICE)
    packed_kv = torch.randn(batch, key_length, 2, heads, head_dim, generator=generator).to(DEVICE)
    mask = _padding("interleaved", batch, query_length)
    q, k, v = packed_qkv.unbind(2)
    assert not q.is_contiguous()
    _assert_matches(q, k, v, key_padding_mask=mask)

    # Gradients flow back into the packed tensor, matching the contiguous computation.
    packed = packed_qkv.clone().requires_grad_()
    out = attention(*packed.unbind(2), key_padding_mask=mask, backend="triton")
    grad_out = torch.randn(out.shape, generator=generator).to(DEVICE)
    (grad_packed,) = torch.autograd.grad(out, packed, grad_out)
    qd, kd, vd = (t.double().requires_grad_() for t in packed_qkv.unbind(2))
    expected = torch.autograd.grad(attention_reference(qd, kd, vd, key_padding_mask=mask), (qd, kd, vd),
                                   grad_out.double())
    assert _relative_error(grad_packed, torch.stack(expected, 2)) < TOLERANCE[torch.float32]

    # Cross-attention with k, v from a packed KV projection and a transposed q.
    q_t = torch.randn(batch, heads, query_length, head_dim, generator=generator).to(DEVICE).transpose(1, 2)
    _assert_matches(q_t, *packed_kv.unbind(2), causal=True)


def test_backward_is_deterministic():
    q, k, v = _inputs(1, 33, 47, 2, 32, torch.float16, seed=9)
    mask = _padding("random", 1, 47)
    torch.manual_seed(0)
    _, first = _run(q, k, v, key_padding_mask=mask, dropout_p=0.2)
    torch.manual_seed(0)
    _, second = _run(q, k, v, key_padding_mask=mask, dropout_p=0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.fixture
def deterministic_algorithms():
    previous, previous_warn = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _with_tuned_tiles(block_m, block_n, run):
    """``run()`` while autotuning can only pick one (block_m, block_n) tile, as if another process
    had tuned to it."""
    import triton

    from fastvlp.ops.fmha import backward_kernels, forward_kernel
    from fastvlp.ops.fmha.launcher import only_tile

    warps = 4 if DEVICE == "cuda" else 1
    tile = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=1)
    with (only_tile(forward_kernel.attention_forward_kernel, tile),
          only_tile(backward_kernels.attention_backward_dkdv_kernel, tile),
          only_tile(backward_kernels.attention_backward_dq_kernel, tile)):
        return run()


def test_deterministic_mode_does_not_depend_on_the_tuned_tiles(deterministic_algorithms):
    """Two processes may tune to different tiles, which sum in a different order: in deterministic
    mode the kernels run one fixed tile, so outputs and gradients are bitwise equal anyway."""
    q, k, v = _inputs(1, 70, 70, 1, 32, torch.float32, seed=19)
    mask = _padding("random", 1, 70)

    def run():
        return _run(q, k, v, key_padding_mask=mask, causal=True)

    torch.use_deterministic_algorithms(False)
    tuned = [_with_tuned_tiles(32, 32, run), _with_tuned_tiles(64, 64, run)]
    # Without it the two tunings differ in the last bits (what this test guards against) ...
    assert not all(torch.equal(a, b) for a, b in zip((tuned[0][0], *tuned[0][1]), (tuned[1][0], *tuned[1][1])))
    torch.use_deterministic_algorithms(True, warn_only=True)
    fixed = [_with_tuned_tiles(32, 32, run), _with_tuned_tiles(64, 64, run)]
    # ... with it they agree bitwise, and still match the reference.
    for a, b in zip((fixed[0][0], *fixed[0][1]), (fixed[1][0], *fixed[1][1])):
        assert torch.equal(a, b)
    expected_out, expected_grads = _run_reference(q, k, v, key_padding_mask=mask, causal=True)
    for actual, expected in zip((fixed[0][0], *fixed[0][1]), (expected_out, *expected_grads)):
        assert _relative_error(actual, expected) < TOLERANCE[torch.float32]


def test_deterministic_tiles_are_fixed_per_dtype_and_head_dim(monkeypatch):
    from fastvlp.ops.fmha import kernel_config

    monkeypatch.setattr(kernel_config, "INTERPRETED", False)  # the GPU table
    for kernel, candidates in (("forward", kernel_config._FORWARD_CONFIGS),
                               ("backward", kernel_config._BACKWARD_CONFIGS)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d_block in (16, 32, 64, 128):
                config = kernel_config.deterministic_config(kernel, dtype, d_block)
                assert config is kernel_config.deterministic_config(kernel, dtype, d_block)
                # A tile autotuning may also choose (so it is known to compile), with dropout's
                # 4-key Philox groups and tensor-core dots (K >= 16) on both block sides.
                assert config in candidates
                assert config.kwargs["BLOCK_N"] % 4 == 0 and min(config.kwargs.values()) >= 32
    half = kernel_config.deterministic_config("backward", torch.float16, 128)
    assert half is kernel_config.deterministic_config("backward", torch.bfloat16, 128)
    assert half is not kernel_config.deterministic_config("backward", torch.float32, 128)
    with pytest.raises(ValueError, match="kernel"):
        kernel_config.deterministic_config("delta", torch.float16, 32)


def test_dropout_is_reproducible_and_seeded():
    q, k, v = _inputs(2, 25, 31, 2, 32, torch.float32, seed=10)
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outputs.append(attention(q, k, v, dropout_p=0.3, backend="triton"))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])
    no_dropout = attention(q, k, v, backend="triton")
    assert not torch.allclose(outputs[0], no_dropout)


def test_dropout_keep_mask_kernel_matches_torch_replica():
    from fastvlp.ops.fmha.triton_rng import dropout_keep_mask

    torch.manual_seed(11)
    seed = draw_dropout_seed(DEVICE)
    keep = dropout_keep_mask(seed, 2, 3, 37, 51, 0.25)
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 37, 51)
    assert torch.equal(keep, dropout_keep_mask_torch(seed, 2, 3, 37, 51, 0.25))
    assert abs(keep.double().mean().item() - 0.75) < 0.02
    # Different (batch, head) pairs and rows draw different masks.
    assert not torch.equal(keep[0, 0], keep[1, 2])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    # The extreme thresholds, 1 and 2**31 - 1 (the kernels compare draws with twice the threshold).
    for p in (1.5 / 2**31, 1 - 1e-10):
        assert dropout_threshold(p) in (1, 2**31 - 1)
        assert torch.equal(dropout_keep_mask(seed, 2, 3, 37, 51, p), dropout_keep_mask_torch(seed, 2, 3, 37, 51, p))
    with pytest.raises(ValueError, match="heads"):
        dropout_keep_mask(seed, 2, 0, 37, 51, 0.25)
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_keep_mask(seed, 2, 3, 37, 51, 1.0)
    with pytest.raises(ValueError, match="int64"):
        dropout_keep_mask(seed.int(), 2, 3, 37, 51, 0.25)


def _assert_matches_replaying_dropout(q, k, v, mask, causal, p, seed):
    """Run the kernels under ``torch.manual_seed(seed)`` and check the output and gradients against the
    float64 reference, whose dropout mask (if ``p``) is the kernels' own, replayed from the same seed.
    Returns the kernels' output and gradients and the reference's."""
    from fastvlp.ops.fmha.triton_rng import dropout_keep_mask

    torch.manual_seed(seed)
    out, grads = _run(q, k, v, key_padding_mask=mask, causal=causal, dropout_p=p)
    keep = None
    if p:
        torch.manual_seed(seed)  # attention draws its seed first: replay it
        batch, query_length, heads, _ = q.shape
        keep = dropout_keep_mask(draw_dropout_seed(DEVICE), batch, heads, query_length, k.shape[1], p)
    expected_out, expected_grads = _run_reference(q, k, v, key_padding_mask=mask, causal=causal, dropout_p=p,
                                                  dropout_keep=keep)
    assert _relative_error(out, expected_out) < TOLERANCE[q.dtype]
    for grad, expected in zip(grads, expected_grads):
        assert _relative_error(grad, expected) < TOLERANCE[q.dtype]
    return out, grads, expected_out, expected_grads


DROPOUT_CASES = {
    # name: (Lq, Lk, padding, causal, head_dim, dtype)
    "interleaved_padding": (27, 38, "interleaved", False, 32, torch.float32),
    "interleaved_padding_causal": (27, 38, "interleaved", True, 32, torch.float32),
    # The key-range scan starts past masked keys (lo > 0): the Philox counters must follow the key index.
    "long_keys_valid_window": (13, 1100, "valid_window", False, 32, torch.float32),
    "empty_batch_row": (19, 34, "one_row_empty", False, 32, torch.float32),
    "causal_more_queries_than_keys": (40, 24, "random", True, 32, torch.float32),
    "padded_head_dim_24": (20, 45, "random", True, 24, torch.float32),
    "fp16_causal": (27, 38, "interleaved", True, 32, torch.float16),
}


@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_dropout_forward_backward_match_reference_with_kernel_mask(case):
    query_length, key_length, padding, causal, head_dim, dtype = DROPOUT_CASES[case]
    # One head for the long case: it is the slowest in the interpreter, and the other cases cover heads.
    batch, heads, p = 2, 1 if key_length > 512 else 2, 0.3
    q, k, v = _inputs(batch, query_length, key_length, heads, head_dim, dtype, seed=12)
    mask = _padding(padding, batch, key_length)
    out, grads, expected_out, expected_grads = _assert_matches_replaying_dropout(q, k, v, mask, causal, p, seed=13)
    if dtype != torch.float32:  # the reference-backend check below is held to an fp32 tolerance
        return

    # The reference backend uses the same generator, so it draws the same mask.
    torch.manual_seed(13)
    reference_out, reference_grads = _run(q, k, v, backend="reference", key_padding_mask=mask, causal=causal,
                                          dropout_p=p)
    assert _relative_error(reference_out, expected_out) < 1e-6
    for grad, expected in zip(reference_grads, expected_grads):
        assert _relative_error(grad, expected) < 1e-6


def test_closed_form_backward_matches_autograd_float64():
    q, k, v = _inputs(2, 9, 13, 2, 8, torch.float64, seed=14)
    mask = _padding("one_row_empty", 2, 13)
    out, grads = _run_reference(q, k, v, key_padding_mask=mask, causal=True)
    _, lse = attention_reference(q, k, v, key_padding_mask=mask, causal=True, return_lse=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.float64)
    closed = attention_backward_reference(grad_out, q, k, v, out, lse, key_padding_mask=mask, causal=True,
                                          scale=8**-0.5)
    for a, b in zip(closed, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_float64_gradcheck_through_the_op():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 6, 2, 3, torch.float64, seed=15))
    mask = torch.tensor([[False, True, False, False, True, False]], device=DEVICE)
    assert select_backend(q, k, v).backend == "reference"
    torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, key_padding_mask=mask, causal=True), (q, k, v))


def test_double_backward_is_refused_not_silently_wrong():
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    out = attention(q, q, q, backend="reference")
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    # A gradient penalty over a weight that also reaches the output another way: once_differentiable
    # alone let autograd.grad drop the attention's second-order term here without an error.
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    weight = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    projected = (x @ weight).view(1, 5, 2, 4)
    out = attention(projected, projected, projected, backend="reference") + projected
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.square().sum(), weight, create_graph=True)
    # First-order gradients are unaffected.
    (grad_weight,) = torch.autograd.grad(out.square().sum(), weight)
    assert torch.isfinite(grad_weight).all() and grad_weight.abs().sum() > 0


def test_empty_inputs():
    q, k, v = _inputs(2, 5, 0, 2, 16, torch.float32)
    for backend in ("triton", "reference"):
        out, grads = _run(q, k, v, backend=backend)
        assert out.shape == (2, 5, 2, 16) and (out == 0).all()
        assert all((g == 0).all() for g in grads)
    q, k, v = _inputs(0, 5, 7, 2, 16, torch.float32)
    out, grads = _run(q, k, v, backend="triton")
    assert out.shape == (0, 5, 2, 16)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    q, k, v = _inputs(2, 0, 7, 2, 16, torch.float32)
    out, grads = _run(q, k, v, backend="triton")
    assert out.shape == (2, 0, 2, 16) and (grads[1] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_calls_without_gradients_skip_autograd_and_give_the_same_output(backend, monkeypatch):
    from fastvlp.ops.fmha import custom_op

    generator = torch.Generator().manual_seed(71)
    q, k, v = (torch.randn(2, 37, 2, 16, generator=generator).to(DEVICE) for _ in range(3))
    mask = torch.zeros(2, 37, dtype=torch.bool, device=DEVICE)
    mask[1, 20:] = True
    with torch.enable_grad():
        expected = attention(*(t.requires_grad_() for t in (q, k, v)), key_padding_mask=mask, backend=backend)
    q, k, v = (t.detach() for t in (q, k, v))
    applied = []
    real_apply = custom_op.EagerAttention.apply
    monkeypatch.setattr(custom_op.EagerAttention, "apply", lambda *args: applied.append(1) or real_apply(*args))
    with torch.no_grad():
        in_no_grad = attention(q, k, v, key_padding_mask=mask, backend=backend)
    plain = attention(q, k, v, key_padding_mask=mask, backend=backend)  # no input asks for a gradient
    assert applied == [] and not in_no_grad.requires_grad
    torch.testing.assert_close(in_no_grad, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(plain, expected.detach(), rtol=0, atol=0)
    attention(q.requires_grad_(), k, v, key_padding_mask=mask, backend=backend)  # a gradient asked for
    assert applied == [1]


def test_launches_switch_device_only_for_a_tensor_on_another_gpu(monkeypatch):
    from types import SimpleNamespace

    from fastvlp.ops.fmha.forward_kernel import device_context

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def on(index):
        return SimpleNamespace(is_cuda=True, get_device=lambda: index, device=torch.device("cuda", index))

    assert isinstance(device_context(on(0)), type(device_context(torch.zeros(1))))  # no switch
    switch = device_context(on(1))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 1


def test_select_backend_reasons():
    q, k, v = _inputs(1, 4, 4, 1, 16, torch.float32)
    forced = select_backend(q, k, v, backend="triton")
    assert isinstance(forced, BackendChoice) and forced.backend == "triton"
    assert "requested" in forced.reasons["reference"]
    chosen = select_backend(q, k, v, backend="reference")
    assert chosen.backend == "reference" and "requested" in chosen.reasons["triton"]
    automatic = select_backend(q, k, v)
    if DEVICE == "cpu":
        assert automatic.backend == "reference" and "CPU" in automatic.reasons["triton"]
    else:
        assert automatic.backend == "triton" and "reference" in automatic.reasons
    double = select_backend(*(t.double() for t in (q, k, v)))
    assert double.backend == "reference" and "float64" in double.reasons["triton"]
    wide = torch.randn(1, 4, 1, 256, device=DEVICE)
    assert "head_dim 256" in select_backend(wide, wide, wide).reasons["triton"]
    with pytest.raises(RuntimeError, match="head_dim 256"):
        select_backend(wide, wide, wide, backend="triton")
    # More batch rows than a CUDA grid axis holds: the reference takes the call (expand: no memory).
    many_rows = torch.randn(1, 2, 1, 16, device=DEVICE).expand(65536, -1, -1, -1)
    assert "launch grid" in select_backend(many_rows, many_rows, many_rows).reasons["triton"]
    with pytest.raises(RuntimeError, match="batch 65536"):
        select_backend(many_rows, many_rows, many_rows, backend="triton")
    if DEVICE == "cpu":
        half = q.to(torch.bfloat16)
        with pytest.raises(RuntimeError, match="interpreter"):
            attention(half, half, half, backend="triton")


def test_float64_auto_runs_the_reference_and_matches_sdpa(fresh_seed):
    q, k, v = _inputs(2, 7, 9, 2, 8, torch.float64, seed=fresh_seed)
    mask = _padding("random", 2, 9, seed=fresh_seed + 1)
    mask[:, -1] = False  # torch's SDPA gives NaN for rows that see no key
    assert select_backend(q, k, v).backend == "reference"
    # Independent check: torch's SDPA with the bottom-right causal mask written out.
    rows, cols = torch.arange(7, device=DEVICE)[:, None], torch.arange(9, device=DEVICE)[None, :]
    allowed = (cols <= rows + 9 - 7) & ~mask[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed).transpose(1, 2)
    out = attention(q, k, v, key_padding_mask=mask, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=[1.0]), "q: expected a torch.Tensor"),
        (dict(k=torch.randn(1, 4, 2)), "k: expected a 4-D"),
        (dict(v=torch.randn(1, 4, 2, 8)), r"v: expected shape \[1, 5, 2, 8\].*k's length"),
        (dict(k=torch.randn(1, 5, 2, 4)), "k: expected shape"),
        (dict(v=torch.randn(1, 5, 2, 8, dtype=torch.float64)), "v: expected dtype"),
        (dict(q=torch.ones(1, 3, 2, 8, dtype=torch.int64)), "q: expected a floating-point"),
        (dict(key_padding_mask=torch.zeros(1, 5)), "key_padding_mask: expected a bool tensor"),
        (dict(key_padding_mask=torch.zeros(1, 4, dtype=torch.bool)), r"key_padding_mask: expected shape"),
        (dict(causal=1), "causal: expected bool"),
        (dict(dropout_p=1.0), "dropout_p: expected 0 <= dropout_p < 1"),
        (dict(dropout_p="0.1"), "dropout_p: expected a float"),
        (dict(scale=float("nan")), "scale: expected a finite"),
        (dict(backend="cuda"), "backend: expected one of"),
        (dict(allow_tf32=None), "allow_tf32: expected bool"),
    ],
)
def test_invalid_arguments_name_the_argument(change, message):
    arguments = dict(q=torch.randn(1, 3, 2, 8), k=torch.randn(1, 5, 2, 8), v=torch.randn(1, 5, 2, 8))
    arguments.update(change)
    q, k, v = arguments.pop("q"), arguments.pop("k"), arguments.pop("v")
    with pytest.raises((TypeError, ValueError), match=message):
        attention(q, k, v, **arguments)


def _op_arguments(backend, dropout_p=0.0):
    q, k, v = (t.requires_grad_() for t in _inputs(2, 9, 13, 2, 16, torch.float32, seed=17))
    mask = _padding("random", 2, 13)
    seed = draw_dropout_seed(DEVICE) if dropout_p else None
    return (q, k, v, mask, seed, True, dropout_p, 0.25, backend, False)


@pytest.mark.parametrize("backend, dropout_p", [("reference", 0.0), ("reference", 0.2), ("triton", 0.2)])
def test_opcheck(backend, dropout_p):
    arguments = _op_arguments(backend, dropout_p)
    torch.library.opcheck(torch.ops.fastvlp.attention_forward.default, arguments)
    q, k, v = (t.detach() for t in arguments[:3])
    out, lse = torch.ops.fastvlp.attention_forward(q, k, v, *arguments[3:])
    backward_arguments = (torch.randn_like(out), q, k, v, out, lse, *arguments[3:])
    torch.library.opcheck(torch.ops.fastvlp.attention_backward.default, backward_arguments)


def test_backward_without_keys_gives_contiguous_gradients_like_its_fake():
    """No keys (Lk = 0): the gradients are zeros, contiguous as the fake kernel says, also for a q
    that is a transposed view (what a sequence-first layout hands over)."""
    q = torch.randn(5, 2, 2, 8, generator=torch.Generator().manual_seed(20)).to(DEVICE).transpose(0, 1)
    k = v = torch.randn(2, 0, 2, 8, device=DEVICE)
    assert not q.is_contiguous()
    for backend in ("reference", "triton"):
        out, lse = torch.ops.fastvlp.attention_forward(q, k, v, None, None, False, 0.0, 0.35, backend, False)
        arguments = (torch.randn_like(out), q, k, v, out, lse, None, None, False, 0.0, 0.35, backend, False)
        grads = torch.ops.fastvlp.attention_backward(*arguments)
        for grad, like in zip(grads, (q, k, v)):
            assert grad.shape == like.shape and grad.is_contiguous() and (grad == 0).all()
    torch.library.opcheck(torch.ops.fastvlp.attention_backward.default, arguments)


def _direct_op_call(dtype=torch.float32, dropout_p=0.0):
    q, k, v = _inputs(2, 19, 23, 2, 16, dtype, seed=21)
    seed = draw_dropout_seed(DEVICE) if dropout_p else None
    options = (False, dropout_p, 0.25, "triton", False)
    out, lse = torch.ops.fastvlp.attention_forward(q, k, v, None, seed, *options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(22)).to(DEVICE, dtype)
    return grad_out, q, k, v, out, lse, seed, options


def test_ops_called_directly_check_the_seed_grad_out_and_lse():
    grad_out, q, k, v, out, lse, _, options = _direct_op_call()
    with_dropout = (False, 0.2, *options[2:])
    bad_seeds = [(None, TypeError), (torch.zeros(2, dtype=torch.int64, device=DEVICE), ValueError),
                 (torch.zeros(3, dtype=torch.int32, device=DEVICE), ValueError)]
    if DEVICE == "cuda":  # a host seed would be read through a host pointer by the kernels
        bad_seeds.append((torch.zeros(3, dtype=torch.int64), ValueError))
    for seed, error in bad_seeds:
        with pytest.raises(error, match="dropout_seed"):
            torch.ops.fastvlp.attention_forward(q, k, v, None, seed, *with_dropout)
        with pytest.raises(error, match="dropout_seed"):
            torch.ops.fastvlp.attention_backward(grad_out, q, k, v, out, lse, None, seed, *with_dropout)
    backward = torch.ops.fastvlp.attention_backward
    with pytest.raises(TypeError, match="grad_out: expected dtype torch.float32"):
        backward(grad_out.half(), q, k, v, out, lse, None, None, *options)
    with pytest.raises(ValueError, match="grad_out: expected shape"):
        backward(grad_out[:, :-1], q, k, v, out, lse, None, None, *options)
    with pytest.raises(ValueError, match="lse: expected"):
        backward(grad_out, q, k, v, out, lse.transpose(1, 2), None, None, *options)
    with pytest.raises(ValueError, match="lse: expected"):
        backward(grad_out, q, k, v, out, lse.double(), None, None, *options)


def test_backward_op_reads_a_non_contiguous_lse_by_its_strides():
    grad_out, q, k, v, out, lse, seed, options = _direct_op_call()
    strided = lse.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, H, Lq] with Lq-major strides
    assert torch.equal(strided, lse) and not strided.is_contiguous()
    expected = torch.ops.fastvlp.attention_backward(grad_out, q, k, v, out, lse, None, seed, *options)
    actual = torch.ops.fastvlp.attention_backward(grad_out, q, k, v, out, strided, None, seed, *options)
    for a, b in zip(actual, expected):
        assert torch.equal(a, b)


@triton.jit
def _philox_known_answer_kernel(words_ptr, out_ptr, ROUNDS: tl.constexpr, WIDE_PRODUCTS: tl.constexpr):
    c0, c1 = tl.load(words_ptr).to(tl.uint32), tl.load(words_ptr + 1).to(tl.uint32)
    c2, c3 = tl.load(words_ptr + 2).to(tl.uint32), tl.load(words_ptr + 3).to(tl.uint32)
    k0, k1 = tl.load(words_ptr + 4).to(tl.uint32), tl.load(words_ptr + 5).to(tl.uint32)
    r0, r1, r2, r3 = triton_philox_4x32(c0, c1, c2, c3, k0, k1, ROUNDS, WIDE_PRODUCTS)
    tl.store(out_ptr, r0.to(tl.int64))
    tl.store(out_ptr + 1, r1.to(tl.int64))
    tl.store(out_ptr + 2, r2.to(tl.int64))
    tl.store(out_ptr + 3, r3.to(tl.int64))


# Random123's known-answer vectors for philox4x32-10: (c0, c1, c2, c3, k0, k1) -> outputs.
PHILOX_4X32_10_VECTORS = [
    ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("wide_products", [True, False])
@pytest.mark.parametrize("words, expected", PHILOX_4X32_10_VECTORS)
def test_philox_matches_random123_known_answers(words, expected, wide_products):
    """Both generators, run at the standard 10 rounds (the kernels use fewer; the round function is
    the same), give Random123's outputs: the two are otherwise only compared with each other. The
    kernels' two forms of a round's products (64-bit results, or umulhi and a low multiply) agree."""
    from fastvlp.ops.fmha.dropout_rng import philox_4x32

    replica = philox_4x32(*(torch.tensor(word, dtype=torch.int64) for word in words), rounds=10)
    assert tuple(int(word) for word in replica) == expected
    kernel_out = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    _philox_known_answer_kernel[(1,)](torch.tensor(words, dtype=torch.int64, device=DEVICE), kernel_out, ROUNDS=10,
                                      WIDE_PRODUCTS=wide_products)
    assert tuple(kernel_out.tolist()) == expected


def test_seed_words_are_taken_modulo_two_to_the_32_by_both_generators():
    """Seeds from draw_dropout_seed are 31-bit; the kernels load any int64 word as uint32 and the torch
    replica reduces it the same way, so the two generators agree for every int64 seed."""
    from fastvlp.ops.fmha.triton_rng import dropout_keep_mask

    wide = torch.tensor([2**32 + 12345, 2**40 + 2**33 + 777, -5], dtype=torch.int64, device=DEVICE)
    reduced = torch.tensor([12345, 777, 2**32 - 5], dtype=torch.int64, device=DEVICE)
    keep = dropout_keep_mask(wide, 2, 2, 9, 14, 0.4)
    assert torch.equal(keep, dropout_keep_mask_torch(wide, 2, 2, 9, 14, 0.4))
    assert torch.equal(keep, dropout_keep_mask_torch(reduced, 2, 2, 9, 14, 0.4))
    assert not torch.equal(keep, dropout_keep_mask_torch(torch.tensor([12345, 777, 5]), 2, 2, 9, 14, 0.4))
    # The triton and reference backends of the op drop the same probabilities for such a seed.
    q, k, v = _inputs(2, 9, 14, 2, 16, torch.float32, seed=23)
    outputs = [torch.ops.fastvlp.attention_forward(q, k, v, None, wide, False, 0.4, 0.25, backend, False)[0]
               for backend in ("triton", "reference")]
    assert _relative_error(outputs[0], outputs[1].double()) < TOLERANCE[torch.float32]


def _record_backward_launches(monkeypatch):
    from fastvlp.ops.fmha import backward_kernels

    launched = []

    class Recorder:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getattr__(self, attribute):
            return getattr(self.kernel, attribute)

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for name in ("delta", "dkdv", "dq"):
        attribute = f"attention_backward_{name}_kernel"
        monkeypatch.setattr(backward_kernels, attribute, Recorder(getattr(backward_kernels, attribute), name))
    return launched


@pytest.mark.parametrize("needed", ["q", "kv", "qkv", "v"])
def test_backward_launches_only_the_kernels_of_needed_gradients(monkeypatch, needed):
    """Cross-attention over a frozen memory needs dq only: the dK/dV kernel is skipped (and the
    reverse); the gradients computed are the same. With dQ, the backward is two launches."""
    launched = _record_backward_launches(monkeypatch)
    q, k, v = _inputs(2, 21, 30, 2, 16, torch.float32, seed=24)
    mask = _padding("random", 2, 30)
    leaves = dict(q=q.clone(), k=k.clone(), v=v.clone())
    for name in needed:
        leaves[name].requires_grad_()
    out = attention(leaves["q"], leaves["k"], leaves["v"], key_padding_mask=mask, backend="triton")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)  # as _run_reference
    grads = torch.autograd.grad(out, [leaves[name] for name in needed], grad_out)
    # The dQ kernel computes delta for the dK/dV launch after it; without dQ a delta kernel does.
    expected_launches = {"q": ["dq"], "kv": ["delta", "dkdv"], "v": ["delta", "dkdv"], "qkv": ["dq", "dkdv"]}
    assert launched == expected_launches[needed]
    _, expected = _run_reference(q, k, v, key_padding_mask=mask)
    expected = dict(zip("qkv", expected))
    for name, grad in zip(needed, grads):
        assert _relative_error(grad, expected[name]) < TOLERANCE[torch.float32], name


class _TinyAttention(torch.nn.Module):
    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x, key_padding_mask):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        out = attention(q, k, v, key_padding_mask=key_padding_mask, causal=True)
        return self.proj(out.reshape(batch, length, width))


def test_torch_compile_fullgraph():
    torch.manual_seed(18)
    module = _TinyAttention().to(DEVICE)
    x = torch.randn(2, 11, 16, device=DEVICE)
    mask = _padding("tail", 2, 11)
    mask[:, 0] = False
    expected = module(x, mask)
    expected.sum().backward()
    expected_grad = module.qkv.weight.grad.clone()
    module.zero_grad()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(x, mask)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(module.qkv.weight.grad, expected_grad)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU error path")
def test_triton_backend_on_cpu_without_interpreter_names_the_fix():
    code = (
        "import torch\n"
        "from fastvlp.ops.fmha.dispatch import attention\n"
        "x = torch.randn(1, 4, 1, 16)\n"
        "try:\n"
        "    attention(x, x, x, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert "TRITON_INTERPRET=1" in result.stdout, result.stderr


def test_varying_lengths_map_to_few_autotune_buckets():
    """Multi-scale training changes the image-token count every batch: the autotune key
    must see a small bounded set of buckets, not every length."""
    from fastvlp.ops.fmha.kernel_config import MAX_BUCKET, MIN_BUCKET, length_bucket

    lengths = range(1, 20001)
    buckets = {length_bucket(length) for length in lengths}
    assert len(buckets) <= 11
    assert all(MIN_BUCKET <= bucket <= MAX_BUCKET for bucket in buckets)
    assert all(length_bucket(length) >= min(length, MAX_BUCKET) for length in lengths)


def test_host_integer_helpers_match_triton():
    """The launchers' plain cdiv and next_power_of_2 (cheaper than Triton's constexpr-function
    wrappers on every launch) give Triton's values, at powers of two and either side of them."""
    import triton

    from fastvlp.ops.fmha.kernel_config import cdiv, next_power_of_2

    values = sorted({v for p in range(18) for v in (2**p - 1, 2**p, 2**p + 1)} | {1090, 1201, 4097})
    for value in values:
        if value >= 1:
            assert next_power_of_2(value) == triton.next_power_of_2(value), value
        for block in (16, 32, 64, 100, 128):
            assert cdiv(value, block) == triton.cdiv(value, block), (value, block)
    assert next_power_of_2(0) == 1


def test_repeat_launches_skip_the_autotuner_and_keep_its_choice(monkeypatch):
    """After the first launch of a key, the launchers go straight to the config the autotuner chose
    (its per-call key building is most of a small call's host time); a new key, or replaced
    configs, go through the autotuner again. Results are unchanged."""
    import triton
    from triton.runtime.autotuner import Autotuner

    from fastvlp.ops.fmha import forward_kernel, launcher

    tuner_runs = []
    original_run = Autotuner.run

    def counting_run(self, *args, **kwargs):
        tuner_runs.append(self)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counting_run)
    kernel = forward_kernel.attention_forward_kernel
    tile = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4 if DEVICE == "cuda" else 1, num_stages=1)
    monkeypatch.setattr(kernel, "configs", [tile])
    monkeypatch.setattr(kernel, "cache", {})
    q, k, v = _inputs(2, 21, 30, 2, 16, torch.float32, seed=31)
    mask = _padding("random", 2, 30)
    expected = _run_reference(q, k, v, key_padding_mask=mask)[0]

    def forward(*tensors, **options):
        return attention(*tensors, key_padding_mask=mask, backend="triton", **options)

    outputs = [forward(q, k, v) for _ in range(3)]
    assert tuner_runs.count(kernel) == 1
    state = launcher._TUNED_LAUNCHES[kernel]
    assert list(state.chosen.values()) == [tile.all_kwargs()]
    for out in outputs:
        assert _relative_error(out, expected) < TOLERANCE[torch.float32]
    forward(q, k, v, causal=True)  # another key: tuned (here: looked up) by the autotuner once
    forward(q, k, v, causal=True)
    assert tuner_runs.count(kernel) == 2 and len(state.chosen) == 2
    monkeypatch.setattr(kernel, "cache", {})  # as after another restriction of the tiles
    forward(q, k, v)
    assert tuner_runs.count(kernel) == 3
    assert launcher._TUNED_LAUNCHES[kernel] is not state


def test_concurrent_first_launches_keep_each_keys_own_config():
    """Two threads launching different keys for the first time at once: each key keeps the config the
    autotuner chose for it (the autotuner holds its latest choice in one shared attribute)."""
    import threading

    import triton
    from triton.runtime.autotuner import Autotuner

    from fastvlp.ops.fmha import launcher

    small = triton.Config({"BLOCK": 32}, num_warps=4, num_stages=1)
    big = triton.Config({"BLOCK": 128}, num_warps=8, num_stages=3)
    first_inside, second_done = threading.Event(), threading.Event()

    def body(x, length, BLOCK):  # the autotuner looks for a plain function under its fn
        pass

    class FakeKernel:  # stands in for the JIT function; records launches, pauses the first one
        fn = staticmethod(body)

        def __init__(self):
            self.launches = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)

        def run(self, *args, grid, warmup, **kwargs):
            self.launches.append((args[1], kwargs["BLOCK"]))
            if threading.current_thread().name == "first" and not second_done.is_set():
                first_inside.set()
                second_done.wait(0.5)  # the second thread's first launch would overtake here

    def short_keys_get_small_tiles(configs, named_args, **kwargs):
        return [small] if named_args["length"] <= 16 else [big]

    fake = FakeKernel()
    # A stand-in benchmarker: Triton before 3.7 times even a single remaining config, which needs a driver.
    tuner = Autotuner(fake, ["x", "length"], [small, big], ["length"], None, None,
                      prune_configs_by={"early_config_prune": short_keys_get_small_tiles},
                      do_bench=lambda kernel_call, quantiles: [1.0, 1.0, 1.0])

    def launch(length):
        launcher._launch_autotuned(tuner, (1,), (object(), length), {})

    first = threading.Thread(target=launch, args=(16,), name="first")
    first.start()
    assert first_inside.wait(5)
    second = threading.Thread(target=launch, args=(4096,), name="second")
    second.start()
    second.join(5)
    second_done.set()
    first.join(5)
    chosen = launcher._TUNED_LAUNCHES.pop(tuner).chosen
    assert {key[0]: kwargs["BLOCK"] for key, kwargs in chosen.items()} == {16: 32, 4096: 128}
    fake.launches.clear()
    launcher._TUNED_LAUNCHES[tuner] = launcher._TunedLaunches(tuner)
    launcher._TUNED_LAUNCHES[tuner].chosen.update(chosen)
    launch(16)
    launch(4096)
    launcher._TUNED_LAUNCHES.pop(tuner)
    assert fake.launches == [(16, 32), (4096, 128)]


@pytest.mark.parametrize("head_dim_block, dropout, causal, offered", [
    (32, False, False, {"128x64 w4 r168", "128x128 w8 r128"}),
    (32, None, False, set()),  # float32 (TF32 dots): its probabilities need the registers
    (16, False, False, {"128x64 w4 r168", "128x128 w8 r128"}),
    (32, True, False, {"128x64 w8 r128"}),  # dropout's random-number state needs other caps
    (32, False, True, set()),  # the causal kernel's second key loop: every cap spills
    (32, True, True, set()),
    (64, False, False, set()),
    (64, True, False, set()),
])
def test_register_capped_tiles_are_offered_only_where_they_fit(head_dim_block, dropout, causal, offered):
    from fastvlp.ops.fmha import kernel_config

    capped = [c for c in kernel_config._FORWARD_CONFIGS + kernel_config._BACKWARD_CONFIGS if c.maxnreg is not None]
    assert len(capped) == len(kernel_config._REGISTER_CAPS) and all(c.maxnreg % 8 == 0 for c in capped)
    dtype = torch.float32 if dropout is None else torch.float16
    named = {"q_ptr": torch.empty(1, dtype=dtype), "LQ_BUCKET": 1024, "LK_BUCKET": 1024}
    pruned = kernel_config.prune_by_length(kernel_config._FORWARD_CONFIGS, named, DOT_PRECISION="tf32",
                                           HEAD_DIM_BLOCK=head_dim_block, HAS_DROPOUT=bool(dropout), CAUSAL=causal)
    names = {f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} r{c.maxnreg}" for c in pruned if c.maxnreg}
    assert names == offered
    assert [c for c in pruned if c.maxnreg is None] == [c for c in kernel_config._FORWARD_CONFIGS if c.maxnreg is None]
    # Short sequences drop the wide capped tiles with the others of their size.
    short = kernel_config.prune_by_length(kernel_config._FORWARD_CONFIGS, dict(named, LQ_BUCKET=64),
                                          DOT_PRECISION="tf32", HEAD_DIM_BLOCK=head_dim_block, HAS_DROPOUT=dropout)
    assert all(c.kwargs["BLOCK_M"] <= 64 for c in short)


@pytest.mark.parametrize("head_dim_block, dropout, causal, dtype, offered", [
    (32, True, False, torch.float16, True),
    (32, True, True, torch.float16, False),  # causal masking: Triton 3.8 spills under the cap
    (32, True, False, torch.bfloat16, True),
    (32, False, False, torch.float16, False),  # without dropout it would change nothing
    (64, True, False, torch.float16, False),
    (32, True, False, torch.float32, False),
])
def test_register_capped_backward_tile_is_offered_only_where_it_fits(head_dim_block, dropout, causal, dtype, offered):
    from fastvlp.ops.fmha import kernel_config

    named = {"q_ptr": torch.empty(1, dtype=dtype), "LQ_BUCKET": 1024, "LK_BUCKET": 1024}
    pruned = kernel_config.prune_by_length(kernel_config._BACKWARD_CONFIGS, named, DOT_PRECISION="tf32",
                                           HEAD_DIM_BLOCK=head_dim_block, HAS_DROPOUT=dropout, CAUSAL=causal)
    capped = [c for c in pruned if c.maxnreg is not None]
    assert bool(capped) == offered
    if offered:
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.maxnreg) for c in capped] == [(64, 64, 4, 168)]


def test_short_query_tiles_are_offered_only_for_short_queries():
    """The forward's GPU candidates: for one query a beam (a decoding step) the 16- and 32-row tiles, no
    wider key block than the keys need; for the decoder's 40 or 100 queries those and the usual tiles;
    from a query bucket of 256 on, only the usual tiles."""
    from fastvlp.ops.fmha import kernel_config

    candidates = kernel_config._FORWARD_CONFIGS + kernel_config._SHORT_QUERY_FORWARD_CONFIGS
    short = kernel_config._SHORT_QUERY_FORWARD_CONFIGS

    def prune(query_bucket, key_bucket, dtype=torch.float16, precision="tf32"):
        named = {"q_ptr": torch.empty(1, dtype=dtype), "LQ_BUCKET": query_bucket, "LK_BUCKET": key_bucket}
        return kernel_config.prune_forward(candidates, named, DOT_PRECISION=precision, HEAD_DIM_BLOCK=32)

    assert prune(16, 2048) == short
    assert prune(32, 1024) == short
    assert prune(16, 16) == [c for c in short if c.kwargs["BLOCK_N"] <= 32]  # a short self-attention cache
    assert prune(16, 2048, torch.float32, "ieee") == sorted(
        short, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:2]
    for query_bucket in (64, 128):  # every tile no taller than the bucket (and the register caps' rule)
        assert prune(query_bucket, 2048) == [
            c for c in candidates
            if kernel_config.register_cap_fits(c, 32, False, False, True) and c.kwargs["BLOCK_M"] <= query_bucket
        ]
        assert any(kernel_config.is_short_query_tile(c) for c in prune(query_bucket, 2048))
        # float32 with exact dots keeps its two smallest usual tiles there, as before the short ones.
        exact = prune(query_bucket, 2048, torch.float32, "ieee")
        assert len(exact) == 2 and not any(kernel_config.is_short_query_tile(c) for c in exact)
    for query_bucket in (256, 2048):
        assert prune(query_bucket, 2048) and not any(kernel_config.is_short_query_tile(c) for c in prune(query_bucket, 2048))
    # The interpreter's one tile is kept whatever the lengths.
    interpreter = kernel_config._INTERPRETER_CONFIGS
    named = {"q_ptr": torch.empty(1, dtype=torch.float32), "LQ_BUCKET": 1024, "LK_BUCKET": 1024}
    assert kernel_config.prune_forward(interpreter, named, DOT_PRECISION="ieee", HEAD_DIM_BLOCK=32) == interpreter
    assert kernel_config.prune_for("forward") is kernel_config.prune_forward
    assert kernel_config.prune_for("backward") is kernel_config.prune_by_length
    with pytest.raises(ValueError, match="kernel"):
        kernel_config.prune_for("dq")


SHORT_QUERY_CASES = {
    # name: (Lq, Lk, padding, causal, dropout_p, dtype)
    "decoding_cross_attention": (1, 150, "one_row_empty", False, 0.0, torch.float16),
    "decoding_self_attention": (3, 21, None, True, 0.0, torch.float32),
    "short_queries_dropout": (5, 70, "random", False, 0.3, torch.float32),
}


@pytest.mark.parametrize("block_m, block_n", [(16, 32), (16, 64), (16, 128), (32, 64), (32, 128)])
@pytest.mark.parametrize("case", list(SHORT_QUERY_CASES))
def test_short_query_tiles_match_reference(case, block_m, block_n):
    """Each short-query tile of the forward against float64, the backward reading its log-sum-exp:
    key lengths that are no multiple of the key block, a batch row whose keys are all padding,
    bottom-right causal masks, and dropout replayed from the kernels' stream."""
    from fastvlp.ops.fmha import forward_kernel
    from fastvlp.ops.fmha.launcher import only_tile

    query_length, key_length, padding, causal, p, dtype = SHORT_QUERY_CASES[case]
    batch, heads = 2, 2
    q, k, v = _inputs(batch, query_length, key_length, heads, 32, dtype, seed=31)
    mask = _padding(padding, batch, key_length)
    tile = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4 if DEVICE == "cuda" else 1,
                         num_stages=1)
    with only_tile(forward_kernel.attention_forward_kernel, tile):
        out, grads, _, _ = _assert_matches_replaying_dropout(q, k, v, mask, causal, p, seed=17)
    if padding == "one_row_empty":  # no visible key: zeros, and zero gradients
        assert torch.all(out[-1] == 0) and all(torch.all(grad[-1] == 0) for grad in grads)


@pytest.mark.parametrize("dtype, precision, head_dim_block, kept", [
    (torch.float16, "tf32", 128, "all"),
    (torch.bfloat16, "tf32", 32, "all"),
    (torch.float32, "tf32", 64, "all"),
    (torch.float32, "tf32", 128, "two smallest"),  # the larger tiles exceed an H100's shared memory
    (torch.float32, "ieee", 32, "two smallest"),
])
def test_tile_pruning_by_dtype_and_head_dim(dtype, precision, head_dim_block, kept):
    """The GPU candidates each kernel keeps for long sequences (the interpreter has one tile)."""
    from fastvlp.ops.fmha import kernel_config

    for candidates in (kernel_config._FORWARD_CONFIGS, kernel_config._BACKWARD_CONFIGS):
        named = {"q_ptr": torch.empty(1, dtype=dtype), "LQ_BUCKET": 1024, "LK_BUCKET": 1024}
        pruned = kernel_config.prune_by_length(candidates, named, DOT_PRECISION=precision,
                                               HEAD_DIM_BLOCK=head_dim_block)
        # Register-capped tiles only where they are offered (head dim 32, no dropout here).
        candidates = [c for c in candidates
                      if kernel_config.register_cap_fits(c, head_dim_block, False, False, dtype != torch.float32)]
        areas = sorted(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in candidates)
        if kept == "all":
            assert pruned == candidates
        else:
            assert [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in pruned] == areas[:2]
    # Short sequences keep only tiles no longer than them (32 at least), whatever the dtype.
    short = kernel_config.prune_by_length(kernel_config._BACKWARD_CONFIGS,
                                          {"q_ptr": torch.empty(1, dtype=dtype), "LQ_BUCKET": 16, "LK_BUCKET": 64},
                                          DOT_PRECISION=precision, HEAD_DIM_BLOCK=head_dim_block)
    assert short and all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 64 for c in short)
