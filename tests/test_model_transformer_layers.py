"""DETR-style encoder/decoder layers: float64 reference, masks, causality, backends, state_dict keys."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastvlp.nn.multihead_attention import MultiheadAttention
from fastvlp.nn.transformer_layers import (
    TORCH_ATTENTION_PATH,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
    build_attention,
    causal_attention_mask,
    describe_attention_path,
)

D_MODEL, HEADS, FFN = 16, 4, 24
IN_PROCESS_BACKENDS = ["fastvlp", "torch"]


def reference_attention(attention, query, key, value, key_padding_mask=None, causal=False):
    """Multi-head attention from its parameters in float64, sequence-first in and out."""
    weight, bias = attention.in_proj_weight.double(), attention.in_proj_bias.double()
    w_q, w_k, w_v = weight.chunk(3)
    b_q, b_k, b_v = bias.chunk(3)
    heads = attention.num_heads

    def split(x, w, b):  # [L, B, d] -> [B, H, L, D]
        projected = x.double() @ w.T + b
        return projected.unflatten(-1, (heads, -1)).permute(1, 2, 0, 3)

    q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    blocked = torch.zeros(scores.shape, dtype=torch.bool)
    if key_padding_mask is not None:
        blocked |= key_padding_mask[:, None, None, :]
    if causal:
        blocked |= causal_attention_mask(query.shape[0])
    scores = scores.masked_fill(blocked, float("-inf"))
    mixed = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).flatten(2)  # [L, B, d]
    return mixed @ attention.out_proj.weight.double().T + attention.out_proj.bias.double()


def reference_layer_norm(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)


def reference_ffn(layer, x):
    hidden = F.relu(x @ layer.linear1.weight.double().T + layer.linear1.bias.double())
    return hidden @ layer.linear2.weight.double().T + layer.linear2.bias.double()


def reference_encoder_layer(layer, src, mask, pos):
    src, pos = src.double(), pos.double()
    x = reference_layer_norm(src + reference_attention(layer.self_attn, src + pos, src + pos, src, mask), layer.norm1)
    return reference_layer_norm(x + reference_ffn(layer, x), layer.norm2)


def reference_decoder_layer(layer, tgt, memory, tgt_mask, memory_mask, pos, query_pos, causal):
    tgt, memory, pos = tgt.double(), memory.double(), pos.double()
    query_pos = torch.zeros_like(tgt) if query_pos is None else query_pos.double()
    x = tgt + reference_attention(layer.self_attn, tgt + query_pos, tgt + query_pos, tgt, tgt_mask, causal)
    x = reference_layer_norm(x, layer.norm1)
    x = reference_layer_norm(x + reference_attention(layer.multihead_attn, x + query_pos, memory + pos, memory, memory_mask), layer.norm2)
    return reference_layer_norm(x + reference_ffn(layer, x), layer.norm3)


def padding_mask(lengths, total):
    return torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]


def encoder_inputs(generator, length=11, lengths=(11, 6, 8)):
    batch = len(lengths)
    src = torch.randn(length, batch, D_MODEL, generator=generator)
    pos = torch.randn(length, batch, D_MODEL, generator=generator)
    return src, padding_mask(lengths, length), pos


def make_layer(kind, backend, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cls = TransformerEncoderLayer if kind == "encoder" else TransformerDecoderLayer
    layer = cls(D_MODEL, HEADS, FFN, dropout=0.1, attention_backend=backend).to(dtype).eval()
    # Non-zero biases, so that a wrong bias slice would show.
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("backend", IN_PROCESS_BACKENDS)
def test_encoder_layer_matches_reference(backend):
    generator = torch.Generator().manual_seed(1)
    layer = make_layer("encoder", backend)
    src, mask, pos = (t.double() if t.is_floating_point() else t for t in encoder_inputs(generator))
    out = layer(src, src_key_padding_mask=mask, pos=pos)
    torch.testing.assert_close(out, reference_encoder_layer(layer, src, mask, pos), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", IN_PROCESS_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_decoder_layer_matches_reference(backend, causal):
    generator = torch.Generator().manual_seed(2)
    layer = make_layer("decoder", backend)
    memory, memory_mask, pos = (t.double() if t.is_floating_point() else t for t in encoder_inputs(generator))
    tgt = torch.randn(7, 3, D_MODEL, generator=generator, dtype=torch.float64)
    query_pos = None if causal else torch.randn(7, 3, D_MODEL, generator=generator, dtype=torch.float64)
    tgt_mask = padding_mask((7, 4, 5), 7) if causal else None
    out = layer(
        tgt, memory, tgt_key_padding_mask=tgt_mask, memory_key_padding_mask=memory_mask, pos=pos, query_pos=query_pos, causal=causal
    )
    expected = reference_decoder_layer(layer, tgt, memory, tgt_mask, memory_mask, pos, query_pos, causal)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", IN_PROCESS_BACKENDS)
def test_padding_never_leaks(backend):
    generator = torch.Generator().manual_seed(3)
    encoder, decoder = make_layer("encoder", backend, dtype=torch.float32), make_layer("decoder", backend, dtype=torch.float32)
    src, mask, pos = encoder_inputs(generator)
    tgt = torch.randn(6, 3, D_MODEL, generator=generator)
    tgt_mask = padding_mask((6, 2, 4), 6)

    def run(src, tgt):
        memory = encoder(src, src_key_padding_mask=mask, pos=pos)
        out = decoder(tgt, memory, tgt_key_padding_mask=tgt_mask, memory_key_padding_mask=mask, pos=pos, causal=True)
        return memory, out

    memory, out = run(src, tgt)
    changed_src = torch.where(mask.T[..., None], torch.randn(src.shape, generator=generator) * 50, src)
    changed_tgt = torch.where(tgt_mask.T[..., None], torch.randn(tgt.shape, generator=generator) * 50, tgt)
    memory2, out2 = run(changed_src, changed_tgt)
    valid, valid_tgt = ~mask.T, ~tgt_mask.T
    torch.testing.assert_close(memory2[valid], memory[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2[valid_tgt], out[valid_tgt], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(memory2[~valid], memory[~valid])  # the padded rows did change


@pytest.mark.parametrize("backend", IN_PROCESS_BACKENDS)
def test_causal_self_attention_ignores_later_tokens(backend):
    generator = torch.Generator().manual_seed(4)
    decoder = make_layer("decoder", backend, dtype=torch.float32)
    memory, memory_mask, pos = encoder_inputs(generator)
    tgt = torch.randn(8, 3, D_MODEL, generator=generator)
    out = decoder(tgt, memory, memory_key_padding_mask=memory_mask, pos=pos, causal=True)
    changed = tgt.clone()
    changed[5] += torch.randn(3, D_MODEL, generator=generator)
    out2 = decoder(changed, memory, memory_key_padding_mask=memory_mask, pos=pos, causal=True)
    torch.testing.assert_close(out2[:5], out[:5], rtol=1e-6, atol=1e-6)
    assert (out2[5:] - out[5:]).abs().amax() > 1e-3
    not_causal = decoder(changed, memory, memory_key_padding_mask=memory_mask, pos=pos, causal=False)
    assert (not_causal[:5] - out[:5]).abs().amax() > 1e-3


def test_backends_share_state_dict_and_agree_with_gradients():
    generator = torch.Generator().manual_seed(5)
    layers = {backend: make_layer("decoder", backend, seed=backend == "torch", dtype=torch.float32).train() for backend in IN_PROCESS_BACKENDS}
    keys = {backend: list(layer.state_dict()) for backend, layer in layers.items()}
    assert keys["fastvlp"] == keys["torch"]
    assert "self_attn.in_proj_weight" in keys["torch"] and "multihead_attn.out_proj.bias" in keys["torch"]
    layers["fastvlp"].load_state_dict(layers["torch"].state_dict())
    for layer in layers.values():  # dropout off, training mode otherwise
        for module in layer.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        layer.self_attn.dropout = layer.multihead_attn.dropout = 0.0
    memory, memory_mask, pos = encoder_inputs(generator)
    tgt = torch.randn(5, 3, D_MODEL, generator=generator)
    results = {}
    for backend, layer in layers.items():
        out = layer(tgt, memory, tgt_key_padding_mask=padding_mask((5, 3, 4), 5), memory_key_padding_mask=memory_mask, pos=pos, causal=True)
        out.square().sum().backward()
        results[backend] = (out, {name: p.grad for name, p in layer.named_parameters()})
    torch.testing.assert_close(results["fastvlp"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["fastvlp"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_attention_path_is_reported():
    generator = torch.Generator().manual_seed(6)
    src, mask, pos = encoder_inputs(generator)
    for backend, expected in (("torch", TORCH_ATTENTION_PATH), ("fastvlp", "reference")):
        layer = make_layer("encoder", backend, dtype=torch.float32)
        layer.record_attention_path = True
        layer(src, src_key_padding_mask=mask, pos=pos)
        assert layer.attention_paths == {"encoder_self_attention": expected}
    attention = build_attention(D_MODEL, HEADS, 0.0, "fastvlp")
    assert isinstance(attention, MultiheadAttention) and attention.backend == "auto"
    assert build_attention(D_MODEL, HEADS, 0.0, "triton").backend == "triton"
    double = src.double()  # parameters are float32: fastvlp's module falls back to torch's math
    assert describe_attention_path(attention, double, double, double).startswith("torch fallback:")
    with pytest.raises(TypeError, match="attention"):
        describe_attention_path(torch.nn.Linear(2, 2), src, src, src)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_heads: 3 does not divide d_model=16"):
        TransformerEncoderLayer(16, 3)
    with pytest.raises(ValueError, match="attention_backend"):
        TransformerDecoderLayer(16, 4, attention_backend="flash")
    with pytest.raises(ValueError, match="dropout"):
        TransformerEncoderLayer(16, 4, dropout=1.0)
    layer = TransformerDecoderLayer(16, 4)
    with pytest.raises(TypeError, match="causal"):
        layer(torch.randn(2, 1, 16), torch.randn(3, 1, 16), causal=1)


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from fastvlp.nn.transformer_layers import TransformerDecoderLayer, TransformerEncoderLayer

    torch.set_num_threads(1)  # tiny shapes: avoid OpenMP oversubscription on a shared machine
    layers = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        encoder = TransformerEncoderLayer(32, 2, 48, 0.0, attention_backend=backend)
        decoder = TransformerDecoderLayer(32, 2, 48, 0.0, attention_backend=backend)
        encoder.record_attention_path = decoder.record_attention_path = True
        layers[backend] = (encoder, decoder)
    generator = torch.Generator().manual_seed(1)
    src, pos = torch.randn(13, 2, 32, generator=generator), torch.randn(13, 2, 32, generator=generator)
    tgt = torch.randn(7, 2, 32, generator=generator)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, 9:] = True
    tgt_mask = torch.zeros(2, 7, dtype=torch.bool)
    tgt_mask[0, 5:] = True
    results = {}
    for backend, (encoder, decoder) in layers.items():
        s, t = src.clone().requires_grad_(), tgt.clone().requires_grad_()
        memory = encoder(s, src_key_padding_mask=mask, pos=pos)
        out = decoder(t, memory, tgt_key_padding_mask=tgt_mask, memory_key_padding_mask=mask, pos=pos, causal=True)
        out.square().sum().backward()
        results[backend] = (out.detach(), s.grad, t.grad, encoder.self_attn.in_proj_weight.grad)
    for reference, triton in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(triton, reference, rtol=1e-4, atol=1e-4)
    paths = {**layers["triton"][0].attention_paths, **layers["triton"][1].attention_paths}
    assert set(paths.values()) == {"triton"}, paths
    print("OK", sorted(paths))
    """
)


def test_triton_backend_in_interpreter_matches_torch():
    """The kernels through Triton's CPU interpreter, in a fresh process (TRITON_INTERPRET must be set
    before the kernels are defined): an encoder and a causal decoder layer, forward and backward."""
    pytest.importorskip("triton")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
