"""fastvlp.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights."""
import io
import math

import pytest
import torch
from torch import nn

from fastvlp.nn import multihead_attention as mha_module
from fastvlp.nn.multihead_attention import MultiheadAttention, MultiheadAttentionInputError
from fastvlp.ops.fmha import dispatch

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}
EMBED, HEADS = 16, 4


def make_pair(dtype=torch.float64, backend="reference", **kwargs):
    """fastvlp and torch modules holding the same random (non-zero-bias) weights."""
    ours = MultiheadAttention(EMBED, HEADS, dtype=dtype, backend=backend, **kwargs)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    theirs = nn.MultiheadAttention(EMBED, HEADS, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def inputs(batch, q_len, k_len, dtype, batch_first, kdim=EMBED, vdim=EMBED):
    def shaped(length, dim):
        shape = (batch, length, dim) if batch_first else (length, batch, dim)
        return torch.randn(shape, dtype=dtype)

    return shaped(q_len, EMBED), shaped(k_len, kdim), shaped(k_len, vdim)


def random_padding(batch, k_len):
    """Bool [B, S], True = ignore, with at least one visible key per batch entry."""
    mask = torch.rand(batch, k_len) < 0.4
    mask[torch.arange(batch), torch.randint(k_len, (batch,))] = False
    return mask


class CallCounter:
    """Wraps dispatch.attention to record the q/k/v it receives."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = dispatch.attention

        def wrapper(q, k, v, **kwargs):
            self.calls.append((q, k, v, kwargs))
            return real(q, k, v, **kwargs)

        monkeypatch.setattr(dispatch, "attention", wrapper)


def assert_pair_close(ours_out, theirs_out, dtype):
    assert (ours_out[1] is None) == (theirs_out[1] is None)
    torch.testing.assert_close(ours_out[0], theirs_out[0], **TOL[dtype])
    if ours_out[1] is not None:
        torch.testing.assert_close(ours_out[1], theirs_out[1], **TOL[dtype])


# ---------------------------------------------------------------------------------------- interface


CONFIGS = [
    {},
    {"bias": False},
    {"add_bias_kv": True, "add_zero_attn": True},
    {"kdim": 6, "vdim": 10},
    {"kdim": 6, "vdim": 10, "bias": False, "add_bias_kv": True, "batch_first": True},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_and_initialisation_match_torch(config):
    torch.manual_seed(7)
    ours = MultiheadAttention(EMBED, HEADS, **config)
    torch.manual_seed(7)
    theirs = nn.MultiheadAttention(EMBED, HEADS, **config)

    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name  # same initialisers in the same order
    for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                 "head_dim", "add_zero_attn"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                 "bias_v"):
        assert (getattr(ours, attr) is None) == (getattr(theirs, attr) is None), attr
    assert type(ours.out_proj) is type(theirs.out_proj)

    # Checkpoints load both ways with strict=True.
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)


def test_device_and_dtype_arguments():
    module = MultiheadAttention(EMBED, HEADS, kdim=5, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in module.parameters())
    query = torch.randn(3, 2, EMBED, dtype=torch.float64)
    key = torch.randn(4, 2, 5, dtype=torch.float64)
    out, _ = module(query, key, torch.randn(4, 2, EMBED, dtype=torch.float64), need_weights=False)
    assert out.dtype == torch.float64


def test_never_looks_up_torch_class(monkeypatch):
    class Forbidden:
        def __init__(self, *args, **kwargs):
            raise AssertionError("torch.nn.MultiheadAttention was looked up")

    monkeypatch.setattr(torch.nn, "MultiheadAttention", Forbidden)
    module = MultiheadAttention(EMBED, HEADS)
    x = torch.randn(5, 2, EMBED)
    module(x, x, x)
    module(x, x, x, need_weights=False)


def test_old_pickles_and_round_trip():
    module = MultiheadAttention(EMBED, HEADS, dtype=torch.float64)
    state = dict(module.__dict__)
    del state["_qkv_same_embed_dim"], state["backend"]  # what an old pickle lacks
    restored = MultiheadAttention.__new__(MultiheadAttention)
    restored.__setstate__(state)
    assert restored._qkv_same_embed_dim is True and restored.backend == "auto"

    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(4, 2, EMBED, dtype=torch.float64)
    torch.testing.assert_close(loaded(x, x, x)[0], module(x, x, x)[0])


# ---------------------------------------------------------------------------------------- parity

MASKS = ["none", "bool_padding", "float_padding", "bool_attn_mask", "float_attn_mask_3d", "causal_hint"]
WEIGHTS = [(False, True), (True, True), (True, False)]  # (need_weights, average_attn_weights)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("need_weights,average", WEIGHTS)
def test_forward_matches_torch(dtype, batch_first, mask, need_weights, average):
    batch, length = 3, 7
    ours, theirs = make_pair(dtype, batch_first=batch_first)
    x = inputs(batch, length, length, dtype, batch_first)[0]
    kwargs = dict(need_weights=need_weights, average_attn_weights=average)
    if mask == "bool_padding":
        kwargs["key_padding_mask"] = random_padding(batch, length)
    elif mask == "float_padding":
        kwargs["key_padding_mask"] = torch.randn(batch, length, dtype=dtype)
    elif mask == "bool_attn_mask":
        kwargs["attn_mask"] = torch.rand(length, length) < 0.3
        kwargs["attn_mask"].fill_diagonal_(False)
    elif mask == "float_attn_mask_3d":
        kwargs["attn_mask"] = torch.randn(batch * HEADS, length, length, dtype=dtype)
    elif mask == "causal_hint":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=dtype)
        kwargs["is_causal"] = True

    fast = ours.why_not_fast_path(x, x, x, kwargs.get("key_padding_mask"), need_weights,
                                  kwargs.get("attn_mask"), kwargs.get("is_causal", False)) is None
    assert fast == (not need_weights and mask in ("none", "bool_padding", "causal_hint"))

    result = ours(x, x, x, **kwargs)
    assert_pair_close(result, theirs(x, x, x, **kwargs), dtype)
    if not batch_first:
        assert result[0].is_contiguous()  # torch returns a contiguous (L, N, E) tensor


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_float32_fast_path_against_float64_torch(backend):
    ours, _ = make_pair(torch.float32, backend=backend, batch_first=True)
    reference = nn.MultiheadAttention(EMBED, HEADS, batch_first=True, dtype=torch.float64)
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    query, key, _ = inputs(2, 9, 13, torch.float32, True)
    padding = random_padding(2, 13)
    out, _ = ours(query, key, key, key_padding_mask=padding, need_weights=False)
    expected, _ = reference(query.double(), key.double(), key.double(), key_padding_mask=padding)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("same_key_value", [False, True])
def test_cross_attention_and_kdim_vdim_match_torch(need_weights, same_key_value):
    kdim = vdim = 6 if same_key_value else None
    kdim = kdim or 6
    vdim = vdim or 10
    ours, theirs = make_pair(kdim=kdim, vdim=vdim)
    query, key, value = inputs(2, 5, 8, torch.float64, False, kdim, vdim)
    if same_key_value:
        value = key
    padding = random_padding(2, 8)
    args = (query, key, value)
    kwargs = dict(key_padding_mask=padding, need_weights=need_weights)
    assert_pair_close(ours(*args, **kwargs), theirs(*args, **kwargs), torch.float64)


@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched_input_matches_torch(need_weights):
    ours, theirs = make_pair(batch_first=True)  # batch_first is ignored for 2-D inputs
    query = torch.randn(4, EMBED, dtype=torch.float64)
    memory = torch.randn(6, EMBED, dtype=torch.float64)
    padding = torch.tensor([False, True, False, False, True, False])
    kwargs = dict(key_padding_mask=padding, need_weights=need_weights, average_attn_weights=False)
    result = ours(query, memory, memory, **kwargs)
    assert result[0].shape == (4, EMBED)
    assert_pair_close(result, theirs(query, memory, memory, **kwargs), torch.float64)


@pytest.mark.parametrize("need_weights", [False, True])
def test_bias_kv_and_zero_attn_match_torch(need_weights):
    ours, theirs = make_pair(add_bias_kv=True, add_zero_attn=True)
    query, key, value = inputs(2, 5, 6, torch.float64, False)
    padding = random_padding(2, 6)
    kwargs = dict(key_padding_mask=padding, need_weights=need_weights)
    assert ours.why_not_fast_path(query, key, value, padding, need_weights) is not None
    assert_pair_close(ours(query, key, value, **kwargs), theirs(query, key, value, **kwargs), torch.float64)


@pytest.mark.parametrize("mode", ["self_padding", "cross_causal", "separate_weights"])
def test_gradients_match_torch(mode):
    kwargs = {"kdim": 6, "vdim": 10} if mode == "separate_weights" else {}
    ours, theirs = make_pair(batch_first=True, **kwargs)
    query, key, value = inputs(2, 6, 6, torch.float64, True, kwargs.get("kdim", EMBED), kwargs.get("vdim", EMBED))
    call = dict(need_weights=False)
    if mode == "self_padding":
        key = value = query
        call["key_padding_mask"] = random_padding(2, 6)
    elif mode == "cross_causal":
        value = key
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
        call["is_causal"] = True
    leaves = [t.detach().requires_grad_() for t in (query, key, value)]
    leaves_torch = [t.detach().requires_grad_() for t in (query, key, value)]
    if mode == "self_padding":
        leaves, leaves_torch = [leaves[0]] * 3, [leaves_torch[0]] * 3
    elif mode == "cross_causal":
        leaves[2], leaves_torch[2] = leaves[1], leaves_torch[1]
    assert ours.why_not_fast_path(*leaves, call.get("key_padding_mask"), False, call.get("attn_mask"),
                                  call.get("is_causal", False)) is None
    grad_out = torch.randn(2, 6, EMBED, dtype=torch.float64)
    (ours(*leaves, **call)[0] * grad_out).sum().backward()
    (theirs(*leaves_torch, **call)[0] * grad_out).sum().backward()
    for a, b in zip(leaves, leaves_torch):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64], msg=name)


# ---------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("kind,expected_linear_calls", [("self", 2), ("key_is_value", 3), ("distinct", 4)])
def test_fast_path_projection_is_packed(monkeypatch, kind, expected_linear_calls):
    ours, _ = make_pair(batch_first=False)
    query, key, value = inputs(2, 5, 7, torch.float64, False)
    if kind == "self":
        key = value = query
    elif kind == "key_is_value":
        value = key
    counter = CallCounter(monkeypatch)
    linear_calls = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: linear_calls.append(1) or real_linear(*a, **k))
    ours(query, key, value, need_weights=False)

    assert len(counter.calls) == 1 and len(linear_calls) == expected_linear_calls
    q, k, v, _ = counter.calls[0]
    key_length = 5 if kind == "self" else 7
    assert q.shape == (2, 5, HEADS, EMBED // HEADS) and k.shape == v.shape == (2, key_length, HEADS, EMBED // HEADS)
    pointers = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    # Self-attention: q, k and v are views of one [L, B, 3, H, D] projection; key is value: k and v share one.
    assert len(pointers) == {"self": 1, "key_is_value": 2, "distinct": 3}[kind]


def test_fallback_never_calls_the_op(monkeypatch):
    ours, _ = make_pair(add_zero_attn=True)
    counter = CallCounter(monkeypatch)
    x = torch.randn(4, 2, EMBED, dtype=torch.float64)
    ours(x, x, x, need_weights=False)
    ours2, _ = make_pair()
    ours2(x, x, x)  # need_weights defaults to True
    ours2(x, x, x, need_weights=False, key_padding_mask=torch.randn(2, 4, dtype=torch.float64))
    ours2(x, x, x, need_weights=False, attn_mask=torch.rand(4, 4) < 0.2)
    assert counter.calls == []


def test_backend_is_passed_to_the_op(monkeypatch):
    ours, _ = make_pair(batch_first=True)
    counter = CallCounter(monkeypatch)
    x = torch.randn(2, 3, EMBED, dtype=torch.float64)
    ours(x, x, x, need_weights=False)
    assert counter.calls[0][3]["backend"] == "reference"
    assert counter.calls[0][3]["causal"] is False and counter.calls[0][3]["dropout_p"] == 0.0


def test_is_causal_rules_follow_torch():
    ours, theirs = make_pair()
    x = torch.randn(5, 2, EMBED, dtype=torch.float64)
    for module in (ours, theirs):
        with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
            module(x, x, x, is_causal=True, need_weights=False)
    # Different query and key lengths: torch aligns that hint top-left, so the call falls back.
    memory = torch.randn(7, 2, EMBED, dtype=torch.float64)
    mask = torch.ones(5, 7, dtype=torch.bool).triu(1)
    assert "different query and key lengths" in ours.why_not_fast_path(x, memory, memory, None, False, mask, True)
    kwargs = dict(attn_mask=mask, is_causal=True, need_weights=False)
    assert_pair_close(ours(x, memory, memory, **kwargs), theirs(x, memory, memory, **kwargs), torch.float64)


def test_fully_masked_query_gives_zero_attention_on_fast_path():
    ours, theirs = make_pair(batch_first=True)
    x = torch.randn(3, 5, EMBED, dtype=torch.float64, requires_grad=True)
    padding = random_padding(3, 5)
    padding[1] = True  # every key of batch entry 1 is padding
    out, _ = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    # Zero attention output, so the result is the output projection's bias.
    torch.testing.assert_close(out[1], ours.out_proj.bias.expand(5, EMBED), atol=0, rtol=0)
    expected, _ = theirs(x, x, x, key_padding_mask=padding, need_weights=True)
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]], **TOL[torch.float64])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()

    # The weights path is torch's: NaN for such rows, like torch.
    weighted, weights = ours(x, x, x, key_padding_mask=padding)
    assert torch.isnan(weighted[1]).all() and torch.isnan(weights[1]).all()
    assert torch.isfinite(weighted[[0, 2]]).all()


@pytest.mark.parametrize("need_weights", [False, True])
def test_empty_key_sequence_matches_torch(need_weights):
    ours, theirs = make_pair()
    query = torch.randn(4, 2, EMBED, dtype=torch.float64)
    memory = torch.randn(0, 2, EMBED, dtype=torch.float64)
    assert_pair_close(ours(query, memory, memory, need_weights=need_weights),
                      theirs(query, memory, memory, need_weights=need_weights), torch.float64)


def test_dropout_only_in_training():
    ours, theirs = make_pair(dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, EMBED, dtype=torch.float64)
    ours.eval(), theirs.eval()
    for need_weights in (False, True):
        assert_pair_close(ours(x, x, x, need_weights=need_weights), theirs(x, x, x, need_weights=need_weights),
                          torch.float64)
    evaluated = ours(x, x, x, need_weights=False)[0]

    ours.train()
    torch.manual_seed(3)
    first = ours(x, x, x, need_weights=False)[0]
    second = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(3)
    replay = ours(x, x, x, need_weights=False)[0]
    assert not torch.allclose(first, evaluated) and not torch.allclose(first, second)
    torch.testing.assert_close(first, replay, atol=0, rtol=0)


def test_numpy_dropout_probability_trains_on_the_fast_path():
    import numpy as np

    module = MultiheadAttention(EMBED, 2, dropout=np.float32(0.25), batch_first=True, dtype=torch.float64).train()
    x = torch.randn(2, 5, EMBED, dtype=torch.float64)
    assert module.why_not_fast_path(x, x, x, need_weights=False) is None
    torch.manual_seed(0)
    dropped = module(x, x, x, need_weights=False)[0]
    assert not torch.allclose(dropped, module.eval()(x, x, x, need_weights=False)[0])


def test_drops_into_torch_encoder_layer_on_its_inference_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(EMBED, 2, 32, dropout=0.0, batch_first=True)
    reference = nn.TransformerEncoderLayer(EMBED, 2, 32, dropout=0.0, batch_first=True)
    reference.load_state_dict(layer.state_dict())
    layer.self_attn = MultiheadAttention(EMBED, 2, batch_first=True)
    layer.self_attn.load_state_dict(reference.self_attn.state_dict())
    x = torch.randn(3, 6, EMBED)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    layer.eval(), reference.eval()
    with torch.no_grad():  # torch's encoder layer asks the module for merge_masks here
        for mask in (None, padding):
            torch.testing.assert_close(layer(x, src_key_padding_mask=mask), reference(x, src_key_padding_mask=mask))
    merged, mask_type = layer.self_attn.merge_masks(None, padding, x)
    assert mask_type == 1 and merged is padding


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(embed_dim=10, num_heads=4), ValueError, "divisible by num_heads"),
        (dict(embed_dim=0, num_heads=4), ValueError, "greater than 0"),
        (dict(embed_dim=16.0, num_heads=4), TypeError, "embed_dim"),
        (dict(embed_dim=16, num_heads=4, dropout=1.5), ValueError, "dropout"),
        (dict(embed_dim=16, num_heads=4, kdim=-2), ValueError, "kdim"),
        (dict(embed_dim=16, num_heads=4, backend="cuda"), ValueError, "backend"),
    ],
)
def test_constructor_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiheadAttention(**kwargs)


def test_divisibility_error_is_also_torchs_type():
    with pytest.raises(AssertionError, match="embed_dim must be divisible by num_heads"):
        MultiheadAttention(10, 4)


def test_forward_validation_names_the_argument():
    module = MultiheadAttention(EMBED, HEADS, kdim=6)
    torch_module = nn.MultiheadAttention(EMBED, HEADS, kdim=6)
    x = torch.randn(5, 2, EMBED)
    key = torch.randn(7, 2, 6)
    value = torch.randn(7, 2, EMBED)
    cases = [
        (dict(query=torch.randn(5, 2, 8), key=key, value=value), "embedding dimension of 16 for `query`"),
        (dict(query=x, key=torch.randn(7, 2, EMBED), value=value), "embedding dimension of 6 for `key`"),
        (dict(query=x, key=key, value=torch.randn(6, 2, EMBED)), "same batch size"),
        (dict(query=x, key=key, value=value, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
         r"`key_padding_mask` shape to be \(2, 7\)"),
        (dict(query=x, key=key, value=value, key_padding_mask=torch.zeros(2, 7, dtype=torch.int64)),
         "only bool and floating types of key_padding_mask"),
        (dict(query=x, key=key, value=value, attn_mask=torch.zeros(5, 7, dtype=torch.int32)),
         "only bool and floating types of attn_mask"),
        (dict(query=torch.randn(1, 5, 2, EMBED), key=key, value=value), "received 4-D query"),
        (dict(query=x, key=key[0], value=value), "expected `key` and `value` to be 3-D"),
        (dict(query=x, key=key, value=value, attn_mask=torch.rand(5, 5) < 0.5), r"should be \(5, 7\)"),
        (dict(query=x, key=key, value=value, attn_mask=torch.randn(4, 5, 7)), r"should be \(8, 5, 7\)"),
        (dict(query=x, key=key, value=value, attn_mask=torch.rand(7, 7) < 0.5, is_causal=True,
              key_padding_mask=random_padding(2, 7)), r"should be \(5, 7\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(MultiheadAttentionInputError, match=match) as info:
            module(**kwargs, need_weights=False)
        assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)
        with pytest.raises((AssertionError, RuntimeError)):  # torch rejects the same call
            torch_module(**kwargs, need_weights=False)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        module(x.tolist(), key, value)
    nested = torch.nested.nested_tensor([torch.randn(3, EMBED), torch.randn(4, EMBED)], layout=torch.jagged)
    with pytest.raises(ValueError, match="nested tensors are not supported"):
        MultiheadAttention(EMBED, HEADS, batch_first=True)(nested, nested, nested)


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch_first", [False, True])
def test_triton_path_matches_torch_on_gpu(dtype, batch_first):
    torch.manual_seed(0)
    ours = MultiheadAttention(64, 2, batch_first=batch_first, device="cuda", dtype=dtype, backend="triton")
    reference = nn.MultiheadAttention(64, 2, batch_first=batch_first, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(64))
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    shape = (3, 37, 64) if batch_first else (37, 3, 64)
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    padding = random_padding(3, 37).cuda()
    out, _ = ours(x, x, x, key_padding_mask=padding, need_weights=False)
    expected, _ = reference(x64, x64, x64, key_padding_mask=padding, need_weights=False)
    # Errors measured in the interpreter (same sizes, seeds 0-2): fp32 7e-7 on the output and 1.7e-6 on
    # x.grad (magnitudes about 1.8 and 3.6); fp16 1.1e-3 and 2e-3. The tolerances keep a margin of 5 or more.
    if dtype == torch.float16:
        out_tol, grad_tol = dict(atol=5e-3, rtol=5e-3), dict(atol=1e-2, rtol=1e-2)
    else:
        out_tol, grad_tol = dict(atol=2e-5, rtol=2e-5), dict(atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(out.double(), expected, **out_tol)
    grad = torch.randn_like(expected)
    (out.double() * grad).sum().backward()
    (expected * grad).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **grad_tol)


@pytest.mark.parametrize("mask", ["padding_with_empty_row", "causal_hint"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_triton_path_in_interpreter_matches_float64_torch(batch_first, mask, fresh_seed):
    """The module's Triton path, run by Triton's interpreter on the CPU (on the GPU where there is
    one), against torch's module in float64: output, input and weight gradients."""
    from fastvlp.ops.fmha.kernel_config import kernels_interpreted

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not kernels_interpreted():
        pytest.skip("fastvlp's Triton kernels were imported before TRITON_INTERPRET=1 was set")
    torch.manual_seed(fresh_seed)
    embed, batch, length = 32, 3, 37
    ours = MultiheadAttention(embed, 2, batch_first=batch_first, device=device, backend="triton")
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(embed))
    reference = nn.MultiheadAttention(embed, 2, batch_first=batch_first, device=device, dtype=torch.float64)
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    batch_dim = 0 if batch_first else 1
    x = torch.randn((batch, length, embed) if batch_first else (length, batch, embed), device=device)
    grad_out = torch.randn(x.shape, dtype=torch.float64, device=device)
    call = dict(need_weights=False)
    if mask == "padding_with_empty_row":
        call["key_padding_mask"] = random_padding(batch, length).to(device)
        call["key_padding_mask"][1] = True
        # torch gives NaN for the fully masked entry, so it sees the others only; that entry's output
        # is ours' output bias, and its output gradient is zeroed so both sides get the same weight grads.
        kept = torch.tensor([0, 2], device=device)
        grad_out.index_fill_(batch_dim, torch.tensor([1], device=device), 0.0)
    else:
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, device=device)
        call["is_causal"] = True
        kept = torch.arange(batch, device=device)
    x = x.requires_grad_()
    assert ours.why_not_fast_path(x, x, x, call.get("key_padding_mask"), False, call.get("attn_mask"),
                                  call.get("is_causal", False)) is None
    out, _ = ours(x, x, x, **call)
    (out.double() * grad_out).sum().backward()

    x64 = x.detach().double().index_select(batch_dim, kept).requires_grad_()
    call64 = dict(call)
    if "key_padding_mask" in call:
        call64["key_padding_mask"] = call["key_padding_mask"][kept]
    else:
        call64["attn_mask"] = call["attn_mask"].double()
    expected, _ = reference(x64, x64, x64, **call64)
    (expected * grad_out.index_select(batch_dim, kept)).sum().backward()

    # Over 100 seeds the worst error was 8% of this tolerance on the output and x.grad, and 33% of it on
    # the weight gradients (sums over every position), which get 5e-5.
    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double().index_select(batch_dim, kept), expected, **tol)
    torch.testing.assert_close(x.grad.double().index_select(batch_dim, kept), x64.grad, **tol)
    if mask == "padding_with_empty_row":
        empty = out.select(batch_dim, 1)
        torch.testing.assert_close(empty, ours.out_proj.bias.expand_as(empty), atol=0, rtol=0)
        assert (x.grad.select(batch_dim, 1) == 0).all()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_func_grad_and_per_sample_grads_match_torch(backend, batch_first):
    """torch.func transforms run the module's torch path (the fused op has no functorch rules), so
    grad and vmap(grad) give torch's values; outside them the same call takes the fast path."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(53)
    ours, theirs = make_pair(torch.float64, backend=backend, batch_first=batch_first)
    query, key, value = inputs(3, 5, 7, torch.float64, batch_first)
    padding = random_padding(3, 7)
    params = {name: p.detach() for name, p in ours.named_parameters()}
    reasons = []

    def loss(module):
        def f(params, query, key, value, padding):
            if module is ours:
                reasons.append(ours.why_not_fast_path(query, key, value, padding, need_weights=False))
            out, _ = functional_call(module, params, (query, key, value),
                                     {"key_padding_mask": padding, "need_weights": False})
            return (out.sin() * out).sum()
        return f

    assert ours.why_not_fast_path(query, key, value, padding, need_weights=False) is None
    for argnums in (0, (0, 1, 2)):
        mine = grad(loss(ours), argnums=argnums)(params, query, key, value, padding)
        expected = grad(loss(theirs), argnums=argnums)(params, query, key, value, padding)
        torch.testing.assert_close(mine, expected, **TOL[torch.float64])
    assert reasons and all("torch.func transform" in reason for reason in reasons)

    # Per-sample gradients: vmap over the batch of a per-sample (unbatched) loss.
    batch_dim = 0 if batch_first else 1
    per_sample = dict(in_dims=(None, batch_dim, batch_dim, batch_dim, 0))
    mine = vmap(grad(loss(ours)), **per_sample)(params, query, key, value, padding)
    expected = vmap(grad(loss(theirs)), **per_sample)(params, query, key, value, padding)
    torch.testing.assert_close(mine, expected, **TOL[torch.float64])
    # ... and they add up to the gradient of the batch loss.
    total = grad(loss(theirs))(params, query, key, value, padding)
    for name in params:
        torch.testing.assert_close(mine[name].sum(0), total[name], **TOL[torch.float64])


def test_torchscript_is_not_supported_but_export_is():
    """Documented limits: torch.jit.script fails (torch's module scripts); torch.export traces it,
    keeping the fused op with strict=True."""
    torch.manual_seed(59)
    ours, theirs = make_pair(torch.float32, backend="auto", batch_first=True)
    torch.jit.script(theirs)
    with pytest.raises((ValueError, RuntimeError)):  # TorchScript's frontend errors
        torch.jit.script(ours)
    assert "torch.jit.script" in mha_module.__doc__
    query, key, value = inputs(2, 5, 6, torch.float32, True)
    padding = random_padding(2, 6)
    kwargs = {"key_padding_mask": padding, "need_weights": False}
    exported = torch.export.export(ours, (query, key, value), kwargs, strict=True)
    assert any("fastvlp.attention_forward" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(query, key, value, **kwargs)[0],
                               theirs(query, key, value, **kwargs)[0], **TOL[torch.float32])
