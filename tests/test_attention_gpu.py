"""Fused attention on a CUDA device: bfloat16, model-sized shapes, the short-query tiles, TF32, the bound on
compiles when sequence lengths vary, element offsets past 2**31 (up to about 20 GB of GPU
memory, skipped when that is not free), half-precision dropout backward, float32 at head dim
128, and deterministic mode's fixed tiles. Skipped without a GPU."""
import pytest
import torch

from fastvlp.ops.fmha.dispatch import attention, select_backend
from fastvlp.ops.fmha.reference import attention_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _image_padding(batch, height, width, text_tokens=0, seed=0):
    """DETR-style key padding: per image a valid (h, w) box inside (height, width),
    flattened row by row (so the padding interleaves), after ``text_tokens`` valid tokens."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(batch):
        valid_h = int(torch.randint(height // 2, height + 1, (1,), generator=generator))
        valid_w = int(torch.randint(width // 2, width + 1, (1,), generator=generator))
        image = torch.ones(height, width, dtype=torch.bool)
        image[:valid_h, :valid_w] = False
        masks.append(torch.cat([torch.zeros(text_tokens, dtype=torch.bool), image.flatten()]))
    return torch.stack(masks).cuda()


def _check(q, k, v, tolerance, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, **kwargs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    reference_kwargs = {key: value for key, value in kwargs.items() if key not in ("allow_tf32", "backend")}
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = attention_reference(q64, k64, v64, **reference_kwargs)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    for actual, wanted in zip((out, *grads), (expected, *expected_grads)):
        assert torch.isfinite(actual).all()
        error = (actual.double() - wanted).abs().max() / wanted.abs().max().clamp_min(1e-6)
        assert error < tolerance


def _randn(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def test_auto_picks_triton_on_cuda():
    x = _randn(1, 8, 2, 32, dtype=torch.float16)
    assert select_backend(x, x, x).backend == "triton"


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3),
                                              (torch.float32, 2e-5)])
def test_encoder_self_attention_with_image_padding(dtype, tolerance):
    mask = _image_padding(4, 12, 17, text_tokens=9)
    length = mask.shape[1]
    q, k, v = (_randn(4, length, 8, 32, dtype=dtype) for _ in range(3))
    _check(q, k, v, tolerance, key_padding_mask=mask)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_decoder_shapes(dtype, tolerance):
    memory_mask = _image_padding(3, 10, 21, seed=1)
    memory_length = memory_mask.shape[1]
    queries = _randn(3, 100, 8, 32, dtype=dtype)
    memory_k, memory_v = _randn(3, memory_length, 8, 32, dtype=dtype), _randn(3, memory_length, 8, 32, dtype=dtype)
    _check(queries, memory_k, memory_v, tolerance, key_padding_mask=memory_mask)  # cross-attention
    _check(queries, queries, queries, tolerance)  # 100 x 100 self-attention
    text_mask = torch.zeros(3, 40, dtype=torch.bool, device="cuda")
    text_mask[0, 31:] = True
    text = _randn(3, 40, 8, 32, dtype=dtype)
    _check(text, text, text, tolerance, key_padding_mask=text_mask, causal=True)


@pytest.mark.parametrize("head_dim", [16, 64, 96, 128])
def test_head_dims_bfloat16(head_dim):
    q, k, v = (_randn(2, 130, 4, head_dim, dtype=torch.bfloat16) for _ in range(3))
    _check(q, k, v, 2e-2, causal=True, key_padding_mask=_image_padding(2, 10, 13))


def test_float32_tf32_opt_in():
    q, k, v = (_randn(2, 200, 4, 64, dtype=torch.float32) for _ in range(3))
    _check(q, k, v, 2e-5)
    _check(q, k, v, 5e-3, allow_tf32=True)


def test_dropout_matches_reference_with_kernel_mask_on_gpu():
    from fastvlp.ops.fmha.dropout_rng import draw_dropout_seed, dropout_keep_mask_torch
    from fastvlp.ops.fmha.triton_rng import dropout_keep_mask

    q, k, v = (_randn(2, 150, 4, 32, dtype=torch.float16) for _ in range(3))
    mask = _image_padding(2, 10, 15)
    torch.manual_seed(3)
    out = attention(q, k, v, key_padding_mask=mask, dropout_p=0.1)
    torch.manual_seed(3)
    seed = draw_dropout_seed("cuda")
    keep = dropout_keep_mask(seed, 2, 4, 150, 150, 0.1)
    assert torch.equal(keep, dropout_keep_mask_torch(seed, 2, 4, 150, 150, 0.1))
    expected = attention_reference(q.double(), k.double(), v.double(), key_padding_mask=mask, dropout_p=0.1,
                                   dropout_keep=keep)
    assert (out.double() - expected).abs().max() / expected.abs().max() < 3e-3


# bfloat16 keeps 8 significant bits to float16's 11, so its bound is about 8x float16's: one draw on an H200
# reached 2.2e-2 (the gradients of a single query over a long memory are sums of many rounded terms).
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_short_query_tiles_on_gpu(dtype, tolerance):
    """Each short-query forward tile, with its own warps and stages, on a cached decoding step's shapes:
    one query a beam over an image memory with padding, and a few causal queries over a text cache."""
    from fastvlp.ops.fmha import forward_kernel, kernel_config
    from fastvlp.ops.fmha.launcher import only_tile

    memory_mask = _image_padding(8, 30, 35, seed=3)
    step = _randn(8, 1, 8, 32, dtype=dtype)
    memory_k, memory_v = (_randn(8, memory_mask.shape[1], 8, 32, dtype=dtype) for _ in range(2))
    text = _randn(8, 21, 8, 32, dtype=dtype)
    for tile in kernel_config._SHORT_QUERY_FORWARD_CONFIGS:
        with only_tile(forward_kernel.attention_forward_kernel, tile):
            _check(step, memory_k, memory_v, tolerance, key_padding_mask=memory_mask)
            _check(text[:, -3:], text, text, tolerance, causal=True)


def test_varying_lengths_compile_a_bounded_set_of_kernels():
    import triton

    if not hasattr(triton, "knobs") or not hasattr(triton.knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no compile hook to count with")
    from fastvlp.ops.fmha.forward_kernel import attention_forward_kernel

    compiled = []
    previous = triton.knobs.runtime.jit_post_compile_hook

    def count(*args, **kwargs):
        compiled.append(kwargs.get("key"))
        return False

    def run(length):
        q, k, v = (_randn(2, length, 4, 32, dtype=torch.float16) for _ in range(3))
        mask = torch.zeros(2, length, dtype=torch.bool, device="cuda")
        mask[1, length - 7:] = True
        attention(q, k, v, key_padding_mask=mask)

    run(1037)  # tunes and compiles the bucket's kernels once
    tuned_before = len(attention_forward_kernel.cache)
    triton.knobs.runtime.jit_post_compile_hook = count
    try:
        for length in range(1025, 1700, 37):  # all in the 2048 bucket
            run(length)
    finally:
        triton.knobs.runtime.jit_post_compile_hook = previous
    torch.cuda.synchronize()
    assert compiled == []
    assert len(attention_forward_kernel.cache) == tuned_before


# --- Large offsets: element offsets of 2**31 and more need the kernels' int64 variant. ---

def _require_free_memory(gibibytes):
    free, _ = torch.cuda.mem_get_info()
    if free < gibibytes * 2**30:
        pytest.skip(f"needs {gibibytes} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


@pytest.fixture
def release_memory():
    """Return the cached blocks of a large test, so tests running beside it in other processes see them free."""
    yield
    torch.cuda.empty_cache()


def _relative(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-6)).item()


def test_rows_past_two_to_the_31_elements_are_read_from_the_right_address(release_memory):
    """q, k, v [1, 3, 1, 16] float16 with row stride 2**30 + 64 in one 8.6 GB buffer: row 2 sits
    2**31 + 128 elements past row 0. An int32 row offset wraps to a decoy 2**32 elements earlier."""
    from fastvlp.ops.fmha.offset_width import attention_needs_int64

    _require_free_memory(10)
    row_stride, view_offset = 2**30 + 64, 2**31
    storage = torch.zeros(view_offset + 2 * row_stride + 48, dtype=torch.float16, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    views = []
    for index in range(3):
        start = view_offset + 16 * index
        view = storage.as_strided((1, 3, 1, 16), (3 * row_stride, row_stride, 16, 1), storage_offset=start)
        view.copy_(torch.randn(1, 3, 1, 16, device="cuda", generator=generator))
        wrapped = start + 2 * row_stride - 2**32
        storage[wrapped: wrapped + 16] = 3 * torch.randn(16, device="cuda", generator=generator)
        views.append(view)
    views = [view.detach().requires_grad_() for view in views]  # detach keeps the strides
    assert attention_needs_int64(*views, batch=1, heads=1)
    out = attention(*views)
    grad_out = torch.randn(out.shape, device="cuda", generator=generator).half()
    grads = torch.autograd.grad(out, views, grad_out)
    q, k, v = (t.detach().double().requires_grad_() for t in views)
    expected = attention_reference(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    for actual, wanted in zip((out, *grads), (expected, *expected_grads)):
        assert _relative(actual, wanted) < 3e-3


def test_sequence_first_packed_projection_past_int32_offsets(release_memory):
    """The smallest failing shape of MultiheadAttention(batch_first=False) from the kernels' review:
    q, k, v are [B, L, H, D] views of one packed [L, B, 3E] projection (row stride 3 * B * E =
    393216), and (L - 1) * 393216 passes 2**31 - 1 for L = 5463. The first and last batch rows must
    equal the same rows computed from contiguous copies (small strides). About 13 GB."""
    from fastvlp.ops.fmha.offset_width import attention_needs_int64

    _require_free_memory(16)
    length, batch, heads, head_dim = 5463, 128, 8, 128
    embed = heads * head_dim
    generator = torch.Generator(device="cuda").manual_seed(3)
    packed = torch.randn(length, batch, 3 * embed, device="cuda", dtype=torch.float16, generator=generator)
    q, k, v = (t.transpose(0, 1).detach().requires_grad_()
               for t in packed.view(length, batch, 3, heads, head_dim).unbind(2))
    assert q.stride(1) == 3 * batch * embed and (length - 1) * q.stride(1) >= 2**31
    assert attention_needs_int64(q, k, v, batch=batch, heads=heads)
    out = attention(q, k, v)
    grad_out = torch.randn(out.shape, device="cuda", dtype=torch.float16, generator=generator)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    rows = [0, batch - 1]
    small = [t[rows].detach().contiguous().requires_grad_() for t in (q, k, v)]
    small_out = attention(*small)
    small_grads = torch.autograd.grad(small_out, small, grad_out[rows])
    for actual, wanted in zip((out, *grads), (small_out, *small_grads)):
        assert torch.isfinite(actual[rows]).all()
        assert _relative(actual[rows], wanted) < 2e-3


def test_query_rows_past_int32_offsets_are_stored_in_place(release_memory):
    """A contiguous q of [1, 2**21 + 1, 8, 128] float16: the last query row starts 2**31 elements
    in, so the output and dq stores (and the q loads of both backward kernels) need int64 offsets.
    Checks the first and last 64 rows of out and dq, and dk, dv summed over all queries. About 20 GB."""
    _require_free_memory(24)
    length, keys, heads, head_dim = 2**21 + 1, 64, 8, 128
    generator = torch.Generator(device="cuda").manual_seed(4)

    def draw(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.float16, generator=generator)

    q, k, v = draw(1, length, heads, head_dim), draw(1, keys, heads, head_dim), draw(1, keys, heads, head_dim)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v)
    grad_out = draw(*out.shape)
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), grad_out)
    k64, v64 = (t.detach().double() for t in (k, v))
    for rows in (slice(0, 64), slice(length - 64, length)):
        q64 = q.detach()[:, rows].double().requires_grad_()
        expected = attention_reference(q64, k64, v64)
        (expected_grad_q,) = torch.autograd.grad(expected, q64, grad_out[:, rows].double())
        assert _relative(out[:, rows], expected) < 3e-3
        assert _relative(grad_q[:, rows], expected_grad_q) < 3e-3
    # dk, dv: every query contributes, so sum float32 reference gradients chunk by chunk.
    k32, v32 = (t.detach().float().requires_grad_() for t in (k, v))
    expected_grad_k, expected_grad_v = torch.zeros_like(k32), torch.zeros_like(v32)
    for start in range(0, length, 2**17):
        chunk = slice(start, min(start + 2**17, length))
        partial = attention_reference(q.detach()[:, chunk].float(), k32, v32)
        grads = torch.autograd.grad(partial, (k32, v32), grad_out[:, chunk].float())
        expected_grad_k += grads[0]
        expected_grad_v += grads[1]
    assert _relative(grad_k, expected_grad_k) < 5e-3
    assert _relative(grad_v, expected_grad_v) < 5e-3


def _keep_rows(seed, rows, key_length, dropout_p):
    """The keep decisions of the given query rows of (batch 0, head 0), from the Philox counter layout."""
    from fastvlp.ops.fmha.dropout_rng import dropout_threshold, philox_4x32

    seed = seed.to(torch.int64) & 0xFFFFFFFF
    groups = (key_length + 3) // 4
    c0 = torch.arange(groups, device=seed.device).view(1, groups)
    c1 = rows.to(torch.int64).view(-1, 1)
    c0, c1 = torch.broadcast_tensors(c0, c1)
    outputs = philox_4x32(c0, c1, torch.zeros_like(c0), seed[2].expand_as(c0), seed[0], seed[1])
    bits = torch.stack(outputs, dim=-1).reshape(len(rows), groups * 4)[:, :key_length]
    return (bits >> 1) >= dropout_threshold(dropout_p)


def test_keep_mask_kernel_past_int32_offsets(release_memory):
    """dropout_keep_mask with (Lq - 1) * Lk past 2**31: the last rows land where they belong. 4.3 GB."""
    from fastvlp.ops.fmha.dropout_rng import draw_dropout_seed, dropout_keep_mask_torch
    from fastvlp.ops.fmha.triton_rng import dropout_keep_mask

    _require_free_memory(8)
    torch.manual_seed(6)
    seed = draw_dropout_seed("cuda")
    # The row helper agrees with the replica on a small mask.
    small = dropout_keep_mask_torch(seed, 1, 1, 7, 10, 0.3)[0, 0]
    assert torch.equal(_keep_rows(seed, torch.arange(7, device="cuda"), 10, 0.3), small)
    query_length, key_length = 46342, 46341
    assert (query_length - 1) * key_length >= 2**31
    keep = dropout_keep_mask(seed, 1, 1, query_length, key_length, 0.3)
    rows = torch.tensor([0, 1, query_length - 2, query_length - 1], device="cuda")
    assert torch.equal(keep[0, 0, rows], _keep_rows(seed, rows, key_length, 0.3))


# --- Coverage the CPU suite cannot give: half-precision dropout backward, float32 at head dim 128. ---

@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
def test_dropout_backward_half_precision_matches_reference(dtype, tolerance):
    """Causal with Lq > Lk, random padding and one batch row without any key, dropout 0.2."""
    from fastvlp.ops.fmha.dropout_rng import draw_dropout_seed, dropout_keep_mask_torch

    batch, query_length, key_length, heads, head_dim, p = 2, 150, 97, 4, 64, 0.2
    generator = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch, length, heads, head_dim, device="cuda", generator=generator).to(dtype)
               for length in (query_length, key_length, key_length))
    mask = torch.rand(batch, key_length, device="cuda", generator=generator) < 0.3
    mask[1] = True
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.manual_seed(5)
    out = attention(q, k, v, key_padding_mask=mask, causal=True, dropout_p=p)
    grad_out = torch.randn(out.shape, device="cuda", generator=generator).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.manual_seed(5)  # attention draws its seed first: replay it
    keep = dropout_keep_mask_torch(draw_dropout_seed("cuda"), batch, heads, query_length, key_length, p)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = attention_reference(q64, k64, v64, key_padding_mask=mask, causal=True, dropout_p=p, dropout_keep=keep)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    for actual, wanted in zip((out, *grads), (expected, *expected_grads)):
        assert torch.isfinite(actual).all()
        assert _relative(actual, wanted) < tolerance
    assert (out[1] == 0).all() and (grads[0][1] == 0).all() and (grads[1][1] == 0).all()


@pytest.mark.parametrize("allow_tf32, tolerance", [(True, 5e-3), (False, 5e-5)], ids=["tf32", "ieee"])
def test_float32_head_dim_128_long_causal(allow_tf32, tolerance):
    """Several autotune candidates do not fit shared memory for float32 at head dim 128; the
    autotuner must skip them and the result stay right."""
    generator = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 2048, 4, 128, device="cuda", generator=generator).requires_grad_() for _ in range(3))
    out = attention(q, k, v, causal=True, allow_tf32=allow_tf32)
    grad_out = torch.randn(out.shape, device="cuda", generator=generator)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = attention_reference(q64, k64, v64, causal=True)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    for actual, wanted in zip((out, *grads), (expected, *expected_grads)):
        assert torch.isfinite(actual).all()
        assert _relative(actual, wanted) < tolerance


# --- Deterministic mode: one fixed tile per dtype and head dim, whatever autotuning picks. ---

@pytest.mark.parametrize("dtype, head_dim, tolerance", [
    (torch.float16, 128, 3e-3), (torch.bfloat16, 64, 2e-2), (torch.float32, 128, 5e-5), (torch.float32, 32, 5e-5),
], ids=["fp16-d128", "bf16-d64", "fp32-d128", "fp32-d32"])
def test_deterministic_mode_fixed_tiles_on_gpu(monkeypatch, dtype, head_dim, tolerance):
    """Each fixed tile compiles and fits this GPU, gives the reference's values, and does not change
    when the autotuner is limited to other tiles (as another process may have tuned)."""
    import triton

    from fastvlp.ops.fmha import backward_kernels, forward_kernel

    generator = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(2, length, 4, head_dim, device="cuda", generator=generator).to(dtype)
               for length in (190, 230, 230))
    mask = _image_padding(2, 10, 23, seed=2)
    grad_out = torch.randn(2, 190, 4, head_dim, device="cuda", generator=generator).to(dtype)

    def run(block_m, block_n):
        tiles = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)]
        with monkeypatch.context() as patch:
            for kernel in (forward_kernel.attention_forward_kernel, backward_kernels.attention_backward_dkdv_kernel,
                           backward_kernels.attention_backward_dq_kernel):
                patch.setattr(kernel, "configs", tiles)
                patch.setattr(kernel, "cache", {})
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                out = attention(*leaves, key_padding_mask=mask, causal=True)
                return (out, *torch.autograd.grad(out, leaves, grad_out))
            finally:
                torch.use_deterministic_algorithms(previous)

    first, second = run(32, 32), run(64, 64)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = attention_reference(q64, k64, v64, key_padding_mask=mask, causal=True)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    for actual, wanted in zip(first, (expected, *expected_grads)):
        assert _relative(actual, wanted) < tolerance
