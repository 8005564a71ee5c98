"""Fused attention on a CUDA device: bfloat16, model-sized shapes, TF32, and the
bound on compiles when sequence lengths vary. Skipped without a GPU."""
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
