"""``torch.library`` registration of fused attention, so autograd and
``torch.compile(fullgraph=True)`` see one opaque operator per direction, and
:class:`EagerAttention`, the same two functions as a plain ``autograd.Function``
for eager calls (it skips the dispatcher's Python round trips; on an H200 a small
forward+backward took 3% to 45% less time this way).

``fastvlp::attention_forward`` returns ``(out, lse)``; ``fastvlp::attention_backward``
returns ``(dq, dk, dv)``. Both take a ``backend`` string ("triton" or "reference"),
chosen beforehand by :func:`fastvlp.ops.fmha.dispatch.select_backend`. Dropout is
described by a seed tensor (see ``dropout_rng.py``), never by a stored mask.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dropout_rng import dropout_keep_mask_torch
from .reference import attention_reference
from .reference_backward import attention_backward_reference


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_outputs(q: torch.Tensor, v: torch.Tensor):
    batch, query_length, heads, _ = q.shape
    out = q.new_empty(batch, query_length, heads, v.shape[-1])
    lse = torch.empty(batch, heads, query_length, dtype=_lse_dtype(q.dtype), device=q.device)
    return out, lse


def _reference_keep(seed, q, k, dropout_p):
    if dropout_p <= 0.0:
        return None
    batch, query_length, heads, _ = q.shape
    return dropout_keep_mask_torch(seed, batch, heads, query_length, k.shape[1], dropout_p)


def _check_seed(dropout_seed, q, dropout_p) -> None:
    """The kernels read the seed's three words through a pointer on q's device."""
    if dropout_p <= 0.0:
        return
    if not isinstance(dropout_seed, torch.Tensor):
        raise TypeError(f"dropout_seed: expected a tensor from draw_dropout_seed when dropout_p > 0, "
                        f"got {type(dropout_seed).__name__}")
    if dropout_seed.dtype != torch.int64 or dropout_seed.shape != (3,):
        raise ValueError(f"dropout_seed: expected an int64 tensor of shape [3] (draw_dropout_seed), got "
                         f"{dropout_seed.dtype} {list(dropout_seed.shape)}")
    if dropout_seed.device != q.device:
        raise ValueError(f"dropout_seed: expected device {q.device} like q, got {dropout_seed.device}")


def _check_backward_tensors(grad_out, q, v, out, lse) -> None:
    """What the backward kernels assume of the tensors autograd passes; a direct op call may differ."""
    batch, query_length, heads, _ = q.shape
    expected = (batch, query_length, heads, v.shape[-1])
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != expected:
            raise ValueError(f"{name}: expected shape {list(expected)} (q's [B, Lq, H] and v's D), got {list(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {t.device}")
    if lse.shape != (batch, heads, query_length) or lse.dtype != _lse_dtype(q.dtype) or lse.device != q.device:
        raise ValueError(f"lse: expected {_lse_dtype(q.dtype)} [{batch}, {heads}, {query_length}] on {q.device} "
                         f"(attention_forward's second output), got {lse.dtype} {list(lse.shape)} on {lse.device}")


def forward_impl(q, k, v, key_padding_mask, dropout_seed, causal, dropout_p, scale, backend, allow_tf32):
    """``(out, lse)`` of one attention call on the chosen backend."""
    out, lse = _empty_outputs(q, v)
    if out.numel() == 0 or k.shape[1] == 0:
        # No keys at all: every row is fully masked.
        return out.zero_(), lse.fill_(float("-inf"))
    if backend == "triton":
        from .forward_kernel import attention_forward_triton

        return attention_forward_triton(
            q, k, v, key_padding_mask, dropout_seed, causal, dropout_p, scale, allow_tf32, out, lse
        )
    keep = _reference_keep(dropout_seed, q, k, dropout_p)
    ref_out, ref_lse = attention_reference(
        q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p,
        scale=scale, dropout_keep=keep, return_lse=True,
    )
    out.copy_(ref_out)
    lse.copy_(ref_lse)
    return out, lse


def _zeros(t: torch.Tensor) -> torch.Tensor:
    # Contiguous like every other gradient (and the fake kernel), whatever t's strides are.
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device)


def backward_impl(grad_out, q, k, v, out, lse, key_padding_mask, dropout_seed, causal, dropout_p, scale, backend,
                  allow_tf32, need_dq=True, need_dkdv=True):
    """``(dq, dk, dv)``, contiguous, of one attention call on the chosen backend. The Triton backend
    skips the kernel of a gradient not asked for (``need_dq``, ``need_dkdv``) and returns None there."""
    if q.numel() == 0 or k.numel() == 0:
        return _zeros(q), _zeros(k), _zeros(v)
    if backend == "triton":
        from .backward_kernels import attention_backward_triton

        return attention_backward_triton(
            grad_out, q, k, v, out, lse, key_padding_mask, dropout_seed, causal, dropout_p, scale, allow_tf32,
            need_dq=need_dq, need_dkdv=need_dkdv,
        )
    keep = _reference_keep(dropout_seed, q, k, dropout_p)
    grads = attention_backward_reference(
        grad_out, q, k, v, out, lse, key_padding_mask=key_padding_mask, causal=causal,
        dropout_p=dropout_p, dropout_keep=keep, scale=scale,
    )
    return tuple(g.contiguous() for g in grads)


@torch.library.custom_op("fastvlp::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    dropout_seed: Optional[torch.Tensor],
    causal: bool,
    dropout_p: float,
    scale: float,
    backend: str,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_seed(dropout_seed, q, dropout_p)
    return forward_impl(q, k, v, key_padding_mask, dropout_seed, causal, dropout_p, scale, backend, allow_tf32)


@attention_forward.register_fake
def _(q, k, v, key_padding_mask, dropout_seed, causal, dropout_p, scale, backend, allow_tf32):
    return _empty_outputs(q, v)


@torch.library.custom_op("fastvlp::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    dropout_seed: Optional[torch.Tensor],
    causal: bool,
    dropout_p: float,
    scale: float,
    backend: str,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_seed(dropout_seed, q, dropout_p)
    _check_backward_tensors(grad_out, q, v, out, lse)
    return backward_impl(grad_out, q, k, v, out, lse, key_padding_mask, dropout_seed, causal, dropout_p, scale,
                         backend, allow_tf32)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, dropout_seed, causal, dropout_p, scale, backend, allow_tf32):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    ), torch.empty_like(v, memory_format=torch.contiguous_format)


def _save_for_backward(ctx, inputs, out, lse) -> None:
    """What both autograd paths keep: the tensors the backward reads, and the call's options."""
    q, k, v, key_padding_mask, dropout_seed, causal, dropout_p, scale, backend, allow_tf32 = inputs
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, dropout_seed)
    ctx.options = (causal, dropout_p, scale, backend, allow_tf32)


def _saved_arguments(ctx, grad_out):
    """The backward's arguments, in ``attention_backward``'s order."""
    return (grad_out, *ctx.saved_tensors, *ctx.options)


def _setup_context(ctx, inputs, output):
    out, lse = output
    _save_for_backward(ctx, inputs, out, lse)
    ctx.mark_non_differentiable(lse)


def refuse_double_backward() -> None:
    """Raise when the backward is asked to build a graph (``create_graph=True``): its gradients are not
    differentiable, and ``once_differentiable`` alone lets ``torch.autograd.grad(..., inputs=...)``
    drop the second-order term silently when another path reaches the same input."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastvlp attention has no double backward, so its gradient cannot be taken with create_graph=True; "
            "for higher-order gradients use fastvlp.ops.attention_reference or torch's scaled_dot_product_attention"
        )


def _backward(ctx, grad_out, grad_lse):
    refuse_double_backward()
    grad_q, grad_k, grad_v = torch.ops.fastvlp.attention_backward(*_saved_arguments(ctx, grad_out))
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


class EagerAttention(torch.autograd.Function):
    """The registered op's forward and backward without the dispatcher, for eager mode
    (``torch.compile`` traces the registered op instead). Returns only ``out``."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = forward_impl(*inputs)
        _save_for_backward(ctx, inputs, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward()
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad_q, grad_k, grad_v = backward_impl(*_saved_arguments(ctx, grad_out), need_dq=need_q,
                                               need_dkdv=need_k or need_v)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None, None
