"""Each attention peer's mask in its own best form, for the attention benchmarks.

The rule both attention benchmarks follow: every peer gets its mask prepared once, outside the timed
calls, in the form it consumes without further work, and each preparation is timed as its own row. In a
model the mask is built once per batch and reused by every layer, so that is where its cost belongs.
fastvlp reads the bool key padding ``[B, Lk]`` the model already holds, so it has nothing to prepare.
SDPA gets an additive mask in the inputs' dtype whose rows are 16-element aligned: given a bool mask it
would convert it on every call, and given an unaligned one its memory-efficient kernel would copy it into
an aligned buffer on every call.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


def _check_scenario(scenario: Dict[str, object]) -> None:
    if not isinstance(scenario, dict):
        raise TypeError(f"scenario: expected a dict from attention.scenarios(), got {type(scenario).__name__}")
    missing = {"batch", "query_length", "key_length", "mask", "causal"} - set(scenario)
    if missing:
        raise ValueError(f"scenario: missing keys {sorted(missing)}")


def keep_mask(scenario: Dict[str, object], device) -> Optional[torch.Tensor]:
    """Bool ``[B, 1, Lq, Lk]`` (True = attend) combining the key padding and the bottom-right causal
    mask, or None when the scenario masks nothing."""
    _check_scenario(scenario)
    mask, causal = scenario["mask"], scenario["causal"]
    query_length, key_length = scenario["query_length"], scenario["key_length"]
    if mask is None and not causal:
        return None
    keep = torch.ones(scenario["batch"], 1, query_length, key_length, dtype=torch.bool, device=device)
    if mask is not None:
        keep &= ~mask.to(device)[:, None, None, :]
    if causal:
        rows = torch.arange(query_length, device=device)[:, None]
        keep &= torch.arange(key_length, device=device)[None, :] <= rows + key_length - query_length
    return keep


def sdpa_bool_mask(scenario: Dict[str, object], device) -> Tuple[Optional[torch.Tensor], bool]:
    """``(attn_mask, is_causal)`` as a model would hand SDPA its bool mask: ``[B, 1, 1, Lk]`` for key
    padding alone (broadcast over queries), ``[B, 1, Lq, Lk]`` with causality, or ``is_causal=True``
    alone for a square causal scenario without padding."""
    _check_scenario(scenario)
    only_causal = scenario["causal"] and scenario["mask"] is None and \
        scenario["query_length"] == scenario["key_length"]
    if only_causal:
        return None, True
    keep = keep_mask(scenario, device)
    if keep is not None and not scenario["causal"]:
        keep = keep[:, :, :1, :]
    return keep, False


def sdpa_mask(scenario: Dict[str, object], device, dtype: torch.dtype) -> Tuple[Optional[torch.Tensor], bool]:
    """``(attn_mask, is_causal)`` in SDPA's best form: the bool mask of :func:`sdpa_bool_mask` as an
    additive mask in ``dtype`` (0 to attend, -inf to ignore, as SDPA's own conversion gives), a view of
    storage whose last dim is padded to a multiple of 16 so that every kernel reads it in place."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    keep, is_causal = sdpa_bool_mask(scenario, device)
    if keep is None:
        return None, is_causal
    key_length = keep.shape[-1]
    padded = (key_length + 15) // 16 * 16
    storage = torch.zeros(*keep.shape[:-1], padded, device=device, dtype=dtype)
    additive = storage[..., :key_length]
    additive.masked_fill_(~keep, float("-inf"))
    return additive, False


def flex_mask_mod(scenario: Dict[str, object]):
    """FlexAttention's ``mask_mod`` for the scenario's padding and bottom-right causality."""
    _check_scenario(scenario)
    mask, causal = scenario["mask"], scenario["causal"]
    offset = scenario["key_length"] - scenario["query_length"]

    def mask_mod(b, h, q_index, kv_index):
        keep = kv_index >= 0
        if mask is not None:
            keep = keep & ~mask[b, kv_index]
        if causal:
            keep = keep & (kv_index <= q_index + offset)
        return keep

    return mask_mod


def flex_block_mask(scenario: Dict[str, object], device):
    """FlexAttention's ``BlockMask`` for the scenario (one per batch row, shared by the heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(flex_mask_mod(scenario), scenario["batch"], None, scenario["query_length"],
                             scenario["key_length"], device=device)


def xformers_bias(scenario: Dict[str, object], heads: int, device, dtype: torch.dtype):
    """xformers' ``attn_bias``: None, its bottom-right causal mask object, or a dense additive
    ``[B, H, Lq, Lk]`` bias (the only form it takes for arbitrary padding) whose last dim is allocated to
    a multiple of 8, as its kernels require."""
    keep = keep_mask(scenario, device)
    if keep is None:
        return None
    if scenario["mask"] is None and scenario["causal"]:
        import xformers.ops as xops

        return xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
    key_length = scenario["key_length"]
    padded = (key_length + 7) // 8 * 8
    storage = torch.zeros(scenario["batch"], heads, scenario["query_length"], padded, device=device, dtype=dtype)
    bias = storage[..., :key_length]
    bias.masked_fill_(~keep.expand(-1, heads, -1, -1), float("-inf"))
    return bias
