"""Input checks of the plain attention oracle and of the dropout keep-mask replica, and the
oracle's values on small cases (the fused kernels are compared against it in test_attention.py)."""
import math

import pytest
import torch

from fastvlp.ops.fmha.dropout_rng import draw_dropout_seed, dropout_keep_mask_torch
from fastvlp.ops.fmha.reference import attention_reference


def random_qkv(batch=2, query_length=5, key_length=7, heads=3, head_dim=4, seed=None):
    generator = torch.Generator().manual_seed(torch.seed() % 2**31 if seed is None else seed)
    return tuple(torch.randn(batch, length, heads, head_dim, generator=generator, dtype=torch.float64)
                 for length in (query_length, key_length, key_length))


def plain_attention(q, k, v, keep):
    """Softmax over the kept keys, one (batch, head) at a time, in float64; rows without keys give 0."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            for i in range(q.shape[1]):
                kept = keep[b, h, i].nonzero().flatten()
                if len(kept) == 0:
                    continue
                scores = k[b, kept, h] @ q[b, i, h] / math.sqrt(q.shape[3])
                out[b, i, h] = torch.softmax(scores, 0) @ v[b, kept, h]
    return out


def test_values_with_padding_causal_and_dropout_keep(fresh_seed):
    q, k, v = random_qkv(query_length=5, key_length=7, seed=fresh_seed)
    generator = torch.Generator().manual_seed(fresh_seed + 1)
    mask = torch.rand(2, 7, generator=generator) < 0.4
    mask[1] = True  # a fully masked image
    drop_keep = torch.rand(2, 3, 5, 7, generator=generator) >= 0.3
    out = attention_reference(q, k, v, key_padding_mask=mask, causal=True, dropout_p=0.3, dropout_keep=drop_keep)
    causal = torch.arange(7)[None, :] <= torch.arange(5)[:, None] + 2
    keep = ~mask[:, None, None, :] & causal
    # Dropout scales the kept probabilities: plain attention on the dropped weights.
    expected = torch.zeros_like(out)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                if keep[b, 0, i].any():
                    scores = (k[b, :, h] @ q[b, i, h] / 2).masked_fill(~keep[b, 0, i], float("-inf"))
                    weights = torch.softmax(scores, 0) * drop_keep[b, h, i] / 0.7
                    expected[b, i, h] = weights @ v[b, :, h]
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    plain = plain_attention(q, k, v, keep.expand(2, 3, 5, 7))
    torch.testing.assert_close(attention_reference(q, k, v, key_padding_mask=mask, causal=True), plain)


def test_no_keys_and_no_queries():
    q, k, v = random_qkv(query_length=4, key_length=0)
    out, lse = attention_reference(q, k, v, return_lse=True)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
    assert lse.shape == (2, 3, 4) and bool((lse == float("-inf")).all())
    q, k, v = random_qkv(query_length=0, key_length=6)
    assert attention_reference(q, k, v).shape == (2, 0, 3, 4)


def _bad_reference_calls():
    q, k, v = random_qkv(batch=2, query_length=5, key_length=7, heads=3, head_dim=4, seed=0)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    keep = torch.ones(2, 3, 5, 7, dtype=torch.bool)
    return [
        ((q[0], k, v), {}, ValueError, r"q: expected a 4-D tensor"),
        ((q, k.numpy(), v), {}, TypeError, r"k: expected a torch.Tensor"),
        ((q, k, v.long()), {}, TypeError, r"v: expected a floating-point tensor"),
        ((q, k[:1], v[:1]), {}, ValueError, r"k: expected shape \[2, 7, 3, 4\].*got \[1, 7, 3, 4\]"),
        ((q, k[:, :, :2], v), {}, ValueError, r"k: expected shape \[2, 7, 3, 4\]"),
        ((q, k, v[..., :3]), {}, ValueError, r"v: expected shape \[2, 7, 3, 4\]"),
        ((q, k, v[:, :6]), {}, ValueError, r"v: expected shape \[2, 7, 3, 4\].*k's length"),
        ((q[..., :0], k[..., :0], v[..., :0]), {}, ValueError, r"q: head_dim must be positive"),
        # The reported case: a [B, 1] mask used to broadcast and mask whole rows.
        ((q, k, v), dict(key_padding_mask=mask[:, :1]), ValueError,
         r"key_padding_mask: expected shape \[B, Lk\] = \[2, 7\]"),
        ((q, k, v), dict(key_padding_mask=mask[0]), ValueError, r"key_padding_mask: expected shape"),
        ((q, k, v), dict(key_padding_mask=mask.to(torch.uint8)), TypeError,
         r"key_padding_mask: expected a bool tensor.*uint8"),
        ((q, k, v), dict(key_padding_mask=[[False] * 7] * 2), TypeError,
         r"key_padding_mask: expected a bool tensor.*list"),
        ((q, k, v), dict(causal=1), TypeError, r"causal: expected bool"),
        ((q, k, v), dict(causal=torch.tensor(True)), TypeError, r"causal: expected bool"),
        ((q, k, v), dict(dropout_p=1.0), ValueError, r"dropout_p: expected 0 <= dropout_p < 1"),
        ((q, k, v), dict(dropout_p=-0.1), ValueError, r"dropout_p: expected 0 <= dropout_p < 1"),
        ((q, k, v), dict(dropout_p=float("nan")), ValueError, r"dropout_p: expected 0 <= dropout_p < 1"),
        ((q, k, v), dict(dropout_p="0.1"), TypeError, r"dropout_p: expected a float"),
        ((q, k, v), dict(scale=float("inf")), ValueError, r"scale: expected a finite number"),
        ((q, k, v), dict(scale=torch.tensor(0.5)), TypeError, r"scale: expected a float or None"),
        ((q, k, v), dict(dropout_p=0.2, dropout_keep=keep[:, :1]), ValueError,
         r"dropout_keep: expected shape \[B, H, Lq, Lk\] = \[2, 3, 5, 7\]"),
        ((q, k, v), dict(dropout_p=0.2, dropout_keep=keep.float()), TypeError, r"dropout_keep: expected a bool tensor"),
        ((q, k, v), dict(compute_dtype=torch.int32), TypeError, r"compute_dtype: expected a floating-point"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_reference_calls())))
def test_reference_rejects_bad_inputs(case):
    args, kwargs, error, message = _bad_reference_calls()[case]
    with pytest.raises(error, match=message):
        attention_reference(*args, **kwargs)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(batch=0), ValueError, r"batch: expected a positive int, got 0"),
        (dict(heads=-2), ValueError, r"heads: expected a positive int, got -2"),
        (dict(query_length=-1), ValueError, r"query_length: expected a non-negative int, got -1"),
        (dict(key_length=-3), ValueError, r"key_length: expected a non-negative int, got -3"),
        (dict(batch=2.0), TypeError, r"batch: expected an int, got float"),
        (dict(key_length=True), TypeError, r"key_length: expected an int, got bool"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p: expected 0 <= dropout_p < 1"),
        (dict(dropout_p=None), TypeError, r"dropout_p: expected a float"),
        (dict(seed=torch.zeros(2, dtype=torch.int64)), ValueError, r"seed: expected an integer tensor of shape \[3\]"),
        (dict(seed=torch.zeros(3)), ValueError, r"seed: expected an integer tensor of shape \[3\]"),
        (dict(seed=[1, 2, 3]), TypeError, r"seed: expected a tensor from draw_dropout_seed"),
    ],
)
def test_keep_mask_rejects_bad_arguments(arguments, error, message):
    call = dict(seed=draw_dropout_seed("cpu"), batch=2, heads=3, query_length=5, key_length=7, dropout_p=0.25)
    call.update(arguments)
    with pytest.raises(error, match=message):
        dropout_keep_mask_torch(**call)


def test_keep_mask_shapes_and_rate():
    seed = draw_dropout_seed("cpu")
    keep = dropout_keep_mask_torch(seed, 2, 3, 33, 45, 0.25)
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 33, 45)
    # 8910 draws: the kept fraction is 0.75 within about 5 standard deviations.
    assert abs(keep.double().mean().item() - 0.75) < 0.025
    assert torch.equal(keep, dropout_keep_mask_torch(seed, 2, 3, 33, 45, 0.25))
    assert torch.equal(keep[:, :, :20, :45], dropout_keep_mask_torch(seed, 2, 3, 20, 45, 0.25))
    assert dropout_keep_mask_torch(seed, 2, 3, 0, 45, 0.25).shape == (2, 3, 0, 45)
    assert dropout_keep_mask_torch(seed, 2, 3, 4, 0, 0.25).shape == (2, 3, 4, 0)
    assert bool(dropout_keep_mask_torch(seed, 1, 1, 6, 9, 0.0).all())
