"""Public entry point of fused attention: validation, backend choice, the op call."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import custom_op  # also registers torch.ops.fastvlp.attention_*
from .arguments import check_attention_arguments
from .dropout_rng import draw_dropout_seed

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_HEAD_DIM = 128
# The kernels put heads and batch rows on CUDA grid axes 1 and 2, each capped at 65535 blocks.
MAX_KERNEL_GRID_EXTENT = 65535


@dataclass(frozen=True)
class BackendChoice:
    """Which implementation a call runs (``"triton"`` or ``"reference"``), and for
    every backend not chosen, why not."""

    backend: str
    reasons: dict = field(default_factory=dict)


def _triton_available() -> Optional[str]:
    """None if Triton imports, else the reason it does not."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(error).__name__}: {error})"
    return None


def interpreter_enabled() -> bool:
    """Whether Triton kernels defined from now on run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _grid_limit_exceeded(q: torch.Tensor) -> Optional[str]:
    """Why the kernels' launch grid cannot hold this call, or None if it can."""
    if q.shape[0] > MAX_KERNEL_GRID_EXTENT or q.shape[2] > MAX_KERNEL_GRID_EXTENT:
        return (f"batch {q.shape[0]} or heads {q.shape[2]} exceeds the kernels' launch grid limit of "
                f"{MAX_KERNEL_GRID_EXTENT} (split the batch)")
    return None


# Whether the one-time warning about auto's grid-limit fallback on CUDA was given in this process.
_grid_fallback_warned = False


def _warn_grid_fallback(q: torch.Tensor, reason: Optional[str], device_type: str) -> None:
    """Warn once when ``auto`` runs a CUDA call on the reference only because of the grid limit: the
    reference materialises the ``[B, H, Lq, Lk]`` scores in float32, far slower and maybe out of memory."""
    global _grid_fallback_warned
    if _grid_fallback_warned or device_type != "cuda" or reason is None or reason != _grid_limit_exceeded(q):
        return
    if torch.compiler.is_compiling():  # warnings.warn breaks a full-graph trace
        return
    _grid_fallback_warned = True
    warnings.warn(
        f"fastvlp attention(backend='auto') runs this CUDA call on the reference implementation: {reason}. "
        "The reference materialises the score matrix (slow, memory-hungry); split the batch into chunks of at "
        f"most {MAX_KERNEL_GRID_EXTENT} rows to keep the Triton kernels. Warned once per process.",
        RuntimeWarning,
        stacklevel=4,
    )


def _triton_unsupported(q: torch.Tensor, device_type: Optional[str] = None) -> Optional[str]:
    """Why the Triton kernels cannot take this call, or None if they can. ``device_type`` stands
    for ``q.device.type`` (tests pass "cuda" to check the CUDA decisions without a GPU)."""
    device_type = device_type or q.device.type
    if q.dtype == torch.float64:
        return "float64 inputs are computed by the reference (the kernels take float16, bfloat16 and float32)"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported by the kernels (float16, bfloat16, float32)"
    if q.shape[-1] > MAX_KERNEL_HEAD_DIM:
        return f"head_dim {q.shape[-1]} exceeds the kernels' maximum of {MAX_KERNEL_HEAD_DIM}"
    grid = _grid_limit_exceeded(q)
    if grid:
        return grid
    missing = _triton_available()
    if missing:
        return missing
    if device_type == "cuda":
        return None
    if device_type != "cpu":
        return f"device type {device_type!r} has no Triton kernels here"
    if not interpreter_enabled():
        return (
            "CPU tensors run the kernels only in Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before fastvlp's kernels are imported"
        )
    from .kernel_config import kernels_interpreted

    if not kernels_interpreted():
        return (
            "TRITON_INTERPRET=1 was set after fastvlp's kernels were compiled for the GPU; set it before "
            "importing fastvlp.ops.fmha kernels (e.g. at process start)"
        )
    if q.dtype == torch.bfloat16:
        return "bfloat16 dot products are wrong in Triton's CPU interpreter; use float16/float32 or a GPU"
    return None


def select_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> BackendChoice:
    """Say which implementation :func:`attention` would run for these arguments.

    ``"auto"`` takes the Triton kernels for CUDA tensors they support and the
    reference otherwise (CPU tensors, float64, head_dim > 128, no Triton, or a batch or head
    count over the 65535 launch grid limit: :func:`attention` warns once per process when
    that last reason sends a CUDA call to the reference).
    ``"triton"`` forces the kernels (in Triton's interpreter for CPU tensors) and
    raises ``RuntimeError`` with the reason when they cannot run the call.
    ``"reference"`` forces the plain PyTorch implementation.
    """
    _validate(q, k, v, key_padding_mask, causal, dropout_p, None, backend, False)
    return _select(q, backend)


def _select(q: torch.Tensor, backend: str, *, warn: bool = False, device_type: Optional[str] = None) -> BackendChoice:
    """The choice for ``q``; ``warn``: give the one-time grid-limit warning (for calls that run it).
    ``device_type`` stands for ``q.device.type``, as in :func:`_triton_unsupported`."""
    device_type = device_type or q.device.type
    if backend == "reference":
        return BackendChoice("reference", {"triton": "backend='reference' was requested"})
    problem = _triton_unsupported(q, device_type)
    if backend == "triton":
        if problem:
            raise RuntimeError(f"backend='triton' cannot run this call: {problem}")
        return BackendChoice("triton", {"reference": "backend='triton' was requested"})
    if problem is None and device_type != "cuda":
        problem = "auto runs CPU tensors on the reference (pass backend='triton' for the interpreter)"
    if problem:
        if warn:
            _warn_grid_fallback(q, problem, device_type)
        return BackendChoice("reference", {"triton": problem})
    return BackendChoice(
        "triton", {"reference": "the Triton kernels support this call and never materialise the score matrix"}
    )


def _validate(q, k, v, key_padding_mask, causal, dropout_p, scale, backend, allow_tf32) -> None:
    check_attention_arguments(q, k, v, key_padding_mask, causal, dropout_p, scale)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32: expected bool, got {type(allow_tf32).__name__}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    backend: str = "auto",
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Softmax attention ``softmax(scale * q k^T) v`` on ``[B, L, H, D]`` tensors.

    Args:
        q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, H, D]``. Any strides (views of a packed
            QKV projection are read in place). float16, bfloat16, float32 or float64.
        key_padding_mask: bool ``[B, Lk]``, True = ignore that key (anywhere in the row). Ignored keys
            and values must still be finite, as with torch's ``scaled_dot_product_attention``: the
            kernels read whole blocks, and an inf or NaN there reaches the output.
        causal: query ``i`` sees keys ``j <= i + Lk - Lq`` (aligned bottom-right).
        dropout_p: probability of dropping an attention probability; applied whenever
            it is > 0 (pass 0.0 in evaluation). Reproducible under ``torch.manual_seed``.
        scale: score scale, default ``1 / sqrt(D)``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``; see :func:`select_backend`.
        allow_tf32: let float32 inputs use TF32 tensor cores in the kernels (faster,
            about 1e-3 relative error); otherwise float32 is computed to float32 accuracy.

    Returns:
        ``[B, Lq, H, D]`` in q's dtype. Queries with no visible key give zeros (and zero
        gradients). Differentiable with respect to q, k and v.

    The kernels use no atomics, so repeating a call in one process gives bitwise equal outputs and
    gradients. Across processes that holds under ``torch.use_deterministic_algorithms(True)``, where
    the kernels run one fixed tile per dtype and head dim instead of the autotuned one (which can
    differ between processes and changes the order of the float32 sums).
    """
    _validate(q, k, v, key_padding_mask, causal, dropout_p, scale, backend, allow_tf32)
    choice = _select(q, backend, warn=True)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    dropout_seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    arguments = (q, k, v, key_padding_mask, dropout_seed, causal, float(dropout_p), float(scale), choice.backend,
                 allow_tf32)
    if torch.compiler.is_compiling():
        return torch.ops.fastvlp.attention_forward(*arguments)[0]
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Nothing to differentiate (inference, decoding): the forward alone, without autograd.Function's
        # per-call cost, which is much of a small call's host time.
        return custom_op.forward_impl(*arguments)[0]
    return custom_op.EagerAttention.apply(*arguments)
