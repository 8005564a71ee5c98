"""Counter-based dropout randomness shared by the kernels and the reference path.

Dropout never stores its mask. Each attention probability ``(b, h, i, j)`` gets a
keep decision from Philox-4x32 (Salmon et al., SC 2011) keyed by a per-call seed,
so the backward pass, the reference path and :func:`dropout_keep_mask` can all
regenerate exactly the forward's mask. This module is the PyTorch half (seed
drawing and an integer-exact replica of the kernels' generator); the Triton half
lives in ``triton_rng.py``.

Counter layout, identical in both halves, for key ``(seed[0], seed[1])``:
``c0 = j // 4, c1 = i, c2 = b * H + h, c3 = seed[2]``; the four Philox outputs
serve the four keys ``4 * (j // 4) + r``. A probability is kept when the top
31 bits of its output are ``>= dropout_threshold(p)``. Both halves take each seed word modulo
2**32 (the kernels load the words as uint32), so any int64 seed gives the same mask in both.
"""
from __future__ import annotations

import torch

# Seven rounds: the smallest Philox-4x32 variant reported to pass BigCrush; the
# kernels spend one Philox call per four probabilities, so rounds are a direct cost.
PHILOX_ROUNDS = 7
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
_LOW32 = 0xFFFFFFFF
_LOW16 = 0xFFFF


def draw_dropout_seed(device) -> torch.Tensor:
    """Three 31-bit words (int64 ``[3]``) drawn from torch's generator on ``device``.

    Drawn on the device itself, so seeding with ``torch.manual_seed`` makes a call
    reproducible and no host synchronisation is needed to pass the seed to a kernel.
    """
    return torch.randint(0, 2**31 - 1, (3,), dtype=torch.int64, device=device)


def dropout_threshold(dropout_p: float) -> int:
    """Integer threshold on 31 random bits: keep iff ``bits >= threshold``."""
    return min(int(dropout_p * 2**31), 2**31 - 1)


def _mul_hi_lo(a: torch.Tensor, b: int):
    """High and low 32 bits of ``a * b`` for 32-bit ``a`` and ``b``, in int64 without overflow."""
    a_lo, a_hi = a & _LOW16, a >> 16
    b_lo, b_hi = b & _LOW16, b >> 16
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    middle = (ll >> 16) + (lh & _LOW16) + (hl & _LOW16)
    high = hh + (lh >> 16) + (hl >> 16) + (middle >> 16)
    low = ((middle & _LOW16) << 16) | (ll & _LOW16)
    return high & _LOW32, low


def philox_4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox-4x32 on int64 tensors holding unsigned 32-bit values (broadcasting)."""
    for _ in range(rounds):
        high_a, low_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        high_b, low_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0 = (k0 + PHILOX_KEY_A) & _LOW32
        k1 = (k1 + PHILOX_KEY_B) & _LOW32
    return c0, c1, c2, c3


def check_keep_mask_arguments(seed, batch, heads, query_length, key_length, dropout_p) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument of a keep-mask request that is not
    a ``[3]`` integer seed, positive ``batch`` and ``heads``, non-negative lengths and
    ``0 <= dropout_p < 1``."""
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"seed: expected a tensor from draw_dropout_seed, got {type(seed).__name__}")
    if seed.shape != (3,) or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
        raise ValueError(f"seed: expected an integer tensor of shape [3], got {seed.dtype} {list(seed.shape)}")
    for name, value, least in (("batch", batch, 1), ("heads", heads, 1),
                               ("query_length", query_length, 0), ("key_length", key_length, 0)):
        # bool is an int, and a float would make arange and view disagree on the mask's size.
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name}: expected {'a positive' if least else 'a non-negative'} int, got {value}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")


def dropout_keep_mask_torch(
    seed: torch.Tensor, batch: int, heads: int, query_length: int, key_length: int, dropout_p: float
) -> torch.Tensor:
    """Bool ``[B, H, Lq, Lk]`` keep-mask, bit-identical to the kernels' dropout.

    ``batch`` and ``heads`` must be positive, the lengths non-negative and
    ``0 <= dropout_p < 1`` (see :func:`check_keep_mask_arguments`).
    """
    check_keep_mask_arguments(seed, batch, heads, query_length, key_length, dropout_p)
    device = seed.device
    seed = seed.to(torch.int64) & _LOW32  # the kernels' uint32 load: words modulo 2**32
    groups = (key_length + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=device).view(1, 1, 1, groups)
    c1 = torch.arange(query_length, dtype=torch.int64, device=device).view(1, 1, query_length, 1)
    c2 = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    c3 = seed[2].view(1, 1, 1, 1)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    outputs = philox_4x32(c0, c1, c2, c3, seed[0], seed[1])
    bits = torch.stack(outputs, dim=-1).reshape(batch, heads, query_length, groups * 4)
    return (bits[..., :key_length] >> 1) >= dropout_threshold(dropout_p)
