"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` on fastvlp's fused attention.

Constructor, parameters (names, shapes, registration order, initialisation), ``state_dict`` keys and
``forward`` signature are those of ``torch.nn.MultiheadAttention``, so checkpoints load both ways with
``strict=True`` and existing call sites keep working. What changes is the computation behind calls
that do not ask for attention weights.

Which call takes which path:

* **Fast path**: ``need_weights=False``, ``attn_mask`` absent (or present with ``is_causal=True`` and
  as many queries as keys: ``attn_mask`` is then taken to be the causal mask, as torch's ``is_causal``
  hint says), ``key_padding_mask`` absent or bool, no ``bias_k``/``bias_v``, no ``add_zero_attn``,
  ``dropout < 1``, dense inputs whose dtype and device match the parameters. The in-projection is a single
  GEMM when ``query is key is value`` (two when only ``key is value`` or only ``query is key``), q/k/v are strided views of its
  output, and :func:`fastvlp.ops.fmha.dispatch.attention` does the attention without materialising
  the ``L x S`` matrix. Dropout runs inside the op, so its random draws differ from torch's.
* **Fallback**: every other call, notably the default ``need_weights=True``, float (additive) masks,
  any ``attn_mask`` that is not the causal hint, ``add_bias_kv`` and ``add_zero_attn``. It calls
  ``torch.nn.functional.multi_head_attention_forward`` exactly as ``torch.nn.MultiheadAttention``
  does, so outputs, weights and errors are torch's. Calls made under a ``torch.func`` transform
  (``grad``, ``vmap``, ``jvp``, ...) also take it: the fused op has no functorch rules.

Callers that do not use the weights should pass ``need_weights=False`` to get the fast path (DETR's
layers call with the default ``need_weights=True`` and take ``[0]``, which stays on the fallback).

Compilers: ``torch.compile`` and ``torch.export`` trace the module (with ``strict=True`` export puts the
fused op ``fastvlp::attention_forward`` in the graph; the default non-strict export traces torch's path).
``torch.jit.script`` does not compile it (unlike ``torch.nn.MultiheadAttention``): TorchScript cannot
read this module's annotations or its dispatch code, so a model that is scripted as a whole, as DETR's
tests do, must keep ``torch.nn.MultiheadAttention``.

Queries whose keys are all masked: on the fast path their attention output is zero, so the module
returns ``out_proj.bias`` for them (zero gradients, no NaN). The fallback returns what torch returns:
NaN on the weights path, and with ``need_weights=False`` whatever torch's ``scaled_dot_product_attention``
gives for such rows.
:meth:`MultiheadAttention.why_not_fast_path` tells which path a call would take.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.overrides import has_torch_function

from fastvlp.ops.fmha import dispatch

try:  # the Linear subclass torch uses, so that quantisation tooling treats out_proj the same way
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear as _OutProjection
except ImportError:  # pragma: no cover - very old or stripped torch builds
    _OutProjection = nn.Linear

__all__ = ["MultiheadAttention", "MultiheadAttentionInputError"]


class MultiheadAttentionInputError(ValueError, AssertionError, RuntimeError):
    """Invalid arguments to :class:`MultiheadAttention` or its ``forward``.

    A ``ValueError`` like every fastvlp argument error, and also an ``AssertionError`` and a
    ``RuntimeError``, the types ``torch.nn.MultiheadAttention`` raises for the same mistakes, so
    that code written against torch still catches it.
    """


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise MultiheadAttentionInputError(
            f"only bool and floating types of {name} are supported, got {mask.dtype}"
        )


class MultiheadAttention(nn.Module):
    """Multi-head attention with the interface of ``torch.nn.MultiheadAttention``.

    Args are torch's (``embed_dim``, ``num_heads``, ``dropout``, ``bias``, ``add_bias_kv``,
    ``add_zero_attn``, ``kdim``, ``vdim``, ``batch_first``, ``device``, ``dtype``) plus the
    keyword-only ``backend`` handed to :func:`fastvlp.ops.fmha.dispatch.attention` on the fast path:
    ``"auto"`` (Triton on CUDA, the plain reference on CPU), ``"triton"`` or ``"reference"``.
    See the module docstring for which calls take the fast path.
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                "embed_dim and num_heads must be greater than 0,"
                f" got embed_dim={embed_dim} and num_heads={num_heads} instead"
            )
        if embed_dim % num_heads != 0:
            raise MultiheadAttentionInputError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and num_heads={num_heads}"
            )
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if not isinstance(dropout, numbers.Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")

        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.backend = backend

        # Registration order follows torch's so that state_dict keys come out in the same order.
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)

        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = _OutProjection(embed_dim, embed_dim, bias=bias, **factory_kwargs)

        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn

        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Same initialisers in the same order as torch, so equal seeds give equal weights.
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # As torch does: pickles from torch 1.1 predate separate q/k/v weights (always packed then).
        state.setdefault("_qkv_same_embed_dim", True)
        # Pickles of torch's class loaded as this one carry no backend.
        state.setdefault("backend", "auto")
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}, backend={self.backend!r}"
        )

    # ------------------------------------------------------------------ validation

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, need_weights, is_causal) -> bool:
        """Validate the arguments (in torch's words where torch checks the same); return whether batched."""
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        _check_mask_dtype(key_padding_mask, "key_padding_mask")
        _check_mask_dtype(attn_mask, "attn_mask")
        if query.is_nested or key.is_nested or value.is_nested:
            raise MultiheadAttentionInputError(
                "nested tensors are not supported by fastvlp's MultiheadAttention: pad `query`, `key` and "
                "`value` and pass `key_padding_mask` instead"
            )

        if query.dim() == 3:
            kind, expected_dims, kpm_dims = "batched (3-D)", 3, 2
        elif query.dim() == 2:
            kind, expected_dims, kpm_dims = "unbatched (2-D)", 2, 1
        else:
            raise MultiheadAttentionInputError(
                f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
            )
        if key.dim() != expected_dims or value.dim() != expected_dims:
            raise MultiheadAttentionInputError(
                f"For {kind} `query`, expected `key` and `value` to be {expected_dims}-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != kpm_dims:
            raise MultiheadAttentionInputError(
                f"For {kind} `query`, expected `key_padding_mask` to be `None` or {kpm_dims}-D"
                f" but found {key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise MultiheadAttentionInputError(
                f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                f" but found {attn_mask.dim()}-D tensor instead"
            )
        if expected_dims == 2 and attn_mask is not None and attn_mask.dim() == 3:
            expected_shape = (self.num_heads, query.shape[0], key.shape[0])
            if attn_mask.shape != expected_shape:
                raise MultiheadAttentionInputError(
                    f"Expected `attn_mask` shape to be {expected_shape} but got {attn_mask.shape}"
                )
        if is_causal and attn_mask is None:
            raise MultiheadAttentionInputError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                "method `generate_square_subsequent_mask` to create this mask."
            )

        # Feature sizes and the batch/sequence agreement torch leaves to a failing matmul or view.
        batch_dim = (0 if self.batch_first else 1) if expected_dims == 3 else None
        seq_dim = (1 if self.batch_first else 0) if expected_dims == 3 else 0
        for name, tensor, size in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if tensor.shape[-1] != size:
                raise MultiheadAttentionInputError(
                    f"was expecting embedding dimension of {size} for `{name}`, but got {tensor.shape[-1]}"
                )
        if key.shape[seq_dim] != value.shape[seq_dim] or (
            batch_dim is not None and not query.shape[batch_dim] == key.shape[batch_dim] == value.shape[batch_dim]
        ):
            raise MultiheadAttentionInputError(
                "`query`, `key` and `value` must have the same batch size and `key` and `value` the same "
                f"sequence length, got shapes {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
            )
        if key_padding_mask is not None:
            expected = (key.shape[seq_dim],) if batch_dim is None else (key.shape[batch_dim], key.shape[seq_dim])
            if tuple(key_padding_mask.shape) != expected:
                raise MultiheadAttentionInputError(
                    f"Expected `key_padding_mask` shape to be {expected} (batch, source length), "
                    f"but got {tuple(key_padding_mask.shape)}"
                )
        # torch reads attn_mask (and checks its shape) unless the is_causal hint alone can stand for it.
        if attn_mask is not None and not (is_causal and key_padding_mask is None and not need_weights):
            batch = 1 if batch_dim is None else query.shape[batch_dim]
            expected = (
                (query.shape[seq_dim], key.shape[seq_dim])
                if attn_mask.dim() == 2
                else (batch * self.num_heads, query.shape[seq_dim], key.shape[seq_dim])
            )
            if tuple(attn_mask.shape) != expected:
                raise MultiheadAttentionInputError(
                    f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should be {expected}."
                )
        return expected_dims == 3

    # ------------------------------------------------------------------ path selection

    # torch's nn.TransformerEncoderLayer calls this on its inference fast path (which then runs torch's
    # own fused kernel on this module's weights); the mask logic is torch's, so it is torch's method.
    merge_masks = nn.MultiheadAttention.merge_masks

    def why_not_fast_path(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ) -> Optional[str]:
        """``None`` if ``forward`` with these arguments takes the fused fast path, else the reason it does not.

        Raises what ``forward`` raises for invalid arguments.
        """
        self._check_inputs(query, key, value, key_padding_mask, attn_mask, need_weights, is_causal)
        return self._fast_path_blocker(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)

    def _fast_path_blocker(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        tensors = (query, key, value)
        params = [p for p in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight,
                              self.in_proj_bias, self.out_proj.weight, self.out_proj.bias) if p is not None]
        if need_weights:
            return "need_weights=True: attention weights need the materialised path"
        if has_torch_function(tensors + tuple(params)):
            return "a tensor argument overrides __torch_function__"
        if torch._C._are_functorch_transforms_active():
            # The fused op's autograd.Function has no functorch rules; torch's path has them all.
            return "a torch.func transform (grad, vmap, jvp, ...) is active"
        if self.bias_k is not None or self.bias_v is not None:
            return "add_bias_kv is enabled"
        if self.add_zero_attn:
            return "add_zero_attn is enabled"
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            return "key_padding_mask is a float (additive) mask"
        if attn_mask is not None and not is_causal:
            return "attn_mask is given without the is_causal hint"
        seq_dim = 1 if (self.batch_first and query.dim() == 3) else 0
        if is_causal and query.shape[seq_dim] != key.shape[seq_dim]:
            return "is_causal with different query and key lengths (torch aligns that mask top-left)"
        if self.training and self.dropout >= 1.0:
            return "dropout=1 in training (the fused op takes dropout_p < 1)"
        dtype, device = params[0].dtype, params[0].device
        if any(t.dtype != dtype or t.device != device for t in tensors + tuple(params)):
            return "inputs and parameters differ in dtype or device"
        if key_padding_mask is not None and key_padding_mask.device != device:
            return "key_padding_mask is on another device"
        return None

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Same arguments, shapes and return values as ``torch.nn.MultiheadAttention.forward``.

        Returns ``(attn_output, attn_weights)``; ``attn_weights`` is ``None`` when ``need_weights`` is
        False, else averaged over heads (``average_attn_weights=True``) or per head. ``is_causal`` is a
        hint that ``attn_mask`` is the causal mask and, as in torch, requires ``attn_mask``.
        """
        is_batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask, need_weights, is_causal)
        if self._fast_path_blocker(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) is None:
            return self._fast_forward(query, key, value, key_padding_mask, is_causal, is_batched), None
        return self._torch_forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, is_batched
        )

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor):
        """q, k, v as ``[..., L, H, D]`` views of as few projection GEMM outputs as the inputs allow."""
        heads, head_dim, embed = self.num_heads, self.head_dim, self.embed_dim
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight
            if query is key and key is value:
                packed = F.linear(query, weight, bias).unflatten(-1, (3, heads, head_dim))
                return packed.unbind(-3)
            if query is key:  # DETR's self-attention: q = k = x + pos, v = x
                packed = F.linear(query, weight[: 2 * embed], None if bias is None else bias[: 2 * embed])
                q, k = packed.unflatten(-1, (2, heads, head_dim)).unbind(-3)
                v = F.linear(value, weight[2 * embed :], None if bias is None else bias[2 * embed :])
                return q, k, v.unflatten(-1, (heads, head_dim))
            q = F.linear(query, weight[:embed], None if bias is None else bias[:embed])
            q = q.unflatten(-1, (heads, head_dim))
            if key is value:
                packed = F.linear(key, weight[embed:], None if bias is None else bias[embed:])
                k, v = packed.unflatten(-1, (2, heads, head_dim)).unbind(-3)
                return q, k, v
            w_k, w_v = weight[embed : 2 * embed], weight[2 * embed :]
        else:
            q = F.linear(query, self.q_proj_weight, None if bias is None else bias[:embed])
            q = q.unflatten(-1, (heads, head_dim))
            w_k, w_v = self.k_proj_weight, self.v_proj_weight
        b_k = None if bias is None else bias[embed : 2 * embed]
        b_v = None if bias is None else bias[2 * embed :]
        k = F.linear(key, w_k, b_k).unflatten(-1, (heads, head_dim))
        v = F.linear(value, w_v, b_v).unflatten(-1, (heads, head_dim))
        return q, k, v

    def _fast_forward(self, query, key, value, key_padding_mask, is_causal, is_batched) -> Tensor:
        # Project in the caller's layout (no input copies), then view as [B, L, H, D].
        q, k, v = self._in_projection(query, key, value)
        if not is_batched:
            q, k, v = (t.unsqueeze(0) for t in (q, k, v))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))

        out = dispatch.attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=bool(is_causal),
            dropout_p=float(self.dropout) if self.training else 0.0,  # the op takes a Python float
            backend=self.backend,
        )
        out = out.flatten(2)  # [B, Lq, E]
        if not is_batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)  # the projection below writes a contiguous [Lq, B, E], as torch returns
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    def _torch_forward(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, is_batched
    ):
        """torch's own math: multi_head_attention_forward on sequence-first tensors."""
        transpose = self.batch_first and is_batched
        if transpose:
            # Keep the identities between query, key and value: torch packs the projection on them.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))

        separate = not self._qkv_same_embed_dim
        attn_output, attn_weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if transpose:
            attn_output = attn_output.transpose(1, 0)
        return attn_output, attn_weights
