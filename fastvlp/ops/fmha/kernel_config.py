"""Launch configuration shared by the attention kernels: length buckets for the
autotune key, the candidate block shapes, the fixed tiles of deterministic mode,
and interpreter detection.

Sequence lengths are runtime (``do_not_specialize``) arguments and the autotune
key sees only their bucket, so a stream of varying lengths compiles and tunes a
small bounded set of variants rather than one per length.
"""
from __future__ import annotations

import os

import triton

# Read when the kernels are defined: triton.jit picks the interpreter at decoration time.
INTERPRETED = (
    bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs")
    else os.environ.get("TRITON_INTERPRET", "0") == "1"
)
if INTERPRETED:
    from .interpreter_compat import squeeze_loop_bounds

    squeeze_loop_bounds()

MIN_BUCKET = 16
MAX_BUCKET = 16384


# Plain integer versions of triton.cdiv and triton.next_power_of_2: Triton (3.5 on) wraps those as
# constexpr functions whose host-side call costs a few microseconds each, and every launch needs several.
def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling of ``numerator / denominator`` for positive integers."""
    return -(-numerator // denominator)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def length_bucket(length: int) -> int:
    """Next power of two of ``length``, clipped to [16, 16384]: the autotune key."""
    return min(max(next_power_of_2(int(length)), MIN_BUCKET), MAX_BUCKET)


def head_dim_block(head_dim: int) -> int:
    """Head dims are padded (with masked loads) to a power of two of at least 16, the
    smallest tile a tensor-core dot accepts."""
    return max(16, next_power_of_2(head_dim))


def dot_precision(dtype, allow_tf32: bool) -> str:
    """``ieee`` keeps float32 dots float32-accurate; ``tf32`` trades that for tensor
    cores (and is Triton's default, which half-precision operands ignore)."""
    import torch

    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def kernels_interpreted() -> bool:
    """Whether the kernels were defined under ``TRITON_INTERPRET=1`` (they run on CPU)."""
    from .forward_kernel import attention_forward_kernel

    return type(attention_forward_kernel.fn).__name__ == "InterpretedFunction"


def _config(block_m, block_n, warps, stages, max_registers=None):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                         maxnreg=max_registers)


# Interpreter: one small config (no tuning), so that tests with odd lengths cross
# several blocks and stay fast.
_INTERPRETER_CONFIGS = [_config(32, 32, 1, 1)]

# H100 candidates. Head dim 32 is bound by the exponentials, so wide query tiles
# (fewer rescales per key) and 4 warps; long key loops want 3 pipeline stages.
_FORWARD_CONFIGS = [
    _config(128, 64, 4, 3),
    _config(128, 32, 4, 3),
    _config(64, 64, 4, 3),
    _config(64, 32, 4, 2),
    _config(128, 64, 8, 3),
    _config(128, 128, 8, 2),
    # Register-capped tiles (see _REGISTER_CAPS): each lets one more program share a multiprocessor.
    _config(128, 64, 4, 3, max_registers=168),
    _config(128, 128, 8, 2, max_registers=128),
    _config(128, 64, 8, 3, max_registers=128),
]

# Tiles of few query rows for the forward. Up to SHORT_QUERY_BUCKET queries they replace the tiles above:
# a decoding step has one query a beam, and a 64-row tile over it computes 63 rows of padding and walks
# the keys in as many sequential blocks as a full tile does. Up to MIXED_QUERY_BUCKET they join them: the
# decoder's 40 caption or 100 detection queries make one or two 64- or 128-row tiles per batch row and
# head, too few programs to keep every multiprocessor busy over a 1090-key loop, and smaller tiles need
# fewer registers, so more of them share a multiprocessor. Rows of 16 are the smallest a tensor-core dot
# takes; wide key blocks shorten the key loop.
SHORT_QUERY_BUCKET = 32
MIXED_QUERY_BUCKET = 128
_SHORT_QUERY_FORWARD_CONFIGS = [
    _config(16, 32, 2, 2),
    _config(16, 64, 4, 3),
    _config(16, 128, 4, 3),
    _config(32, 64, 4, 3),
    _config(32, 128, 4, 3),
]

# Where each register-capped tile is offered: half precision, head dim 32 or less, no causal masking (its
# second key loop; Triton 3.8 spills up to 232 bytes in the causal backward), and only with dropout or only
# without it. A multiprocessor has 65536 registers.
# Forward, without dropout: 128x64 w4 needs 174 registers a thread uncapped (2 programs of 4 warps; 168: 3)
# and 128x128 w8 needs 176 (1 program of 8 warps; 128: 2). Forward with dropout (its random-number state):
# 128x64 w8 needs 161 (1 program; 128: 2). Backward with dropout: the 64x64 w4 tile needs 221 (dQ) and 177
# (dK/dV) registers (2 programs; 168: 3). Without dropout the last two need at most their caps, which would
# change nothing. Compiled for sm_90 by Triton 3.6 (the GPU machine's) each keeps every value in registers
# where it is offered (Triton 3.8 spills 16 to 80 bytes in some of them); elsewhere they spill, up to
# hundreds of bytes (`scripts/compile_kernels.py` reports registers and spills).
_REGISTER_CAPS = {
    # (BLOCK_M, BLOCK_N, warps, stages, registers): for dropout calls
    (128, 64, 4, 3, 168): False,
    (128, 128, 8, 2, 128): False,
    (128, 64, 8, 3, 128): True,
    (64, 64, 4, 2, 168): True,  # backward
}

# Backward kernels: BLOCK_M is the tile along queries, BLOCK_N along keys in both
# the dK/dV kernel (outer loop over keys) and the dQ kernel (outer loop over queries).
_BACKWARD_CONFIGS = [
    _config(64, 64, 4, 2),
    _config(32, 64, 4, 2),
    _config(64, 128, 8, 2),
    _config(128, 64, 8, 2),
    _config(32, 32, 4, 1),
    _config(64, 64, 4, 2, max_registers=168),  # register-capped: see _REGISTER_CAPS
]


# Under torch.use_deterministic_algorithms(True) the launchers skip autotuning and use one of these
# tiles. The tile shape sets the order of the fp32 sums (online softmax over key blocks, dQ over key
# blocks, dK/dV over query blocks), so two processes that tuned to different tiles would disagree in
# the last bits. Each is one of the candidates above; compiled for sm_90 (causal, key mask, dropout)
# none needed more than 136 KiB of shared memory (an H100 has 227 KiB, an A100 163 KiB), and for half
# precision at head dim 128 the backward tile was the candidate that spilled the fewest registers (that
# was measured before the dQ kernel also computed delta, an extra [BLOCK_M, D] tile live only at its
# start; `scripts/compile_kernels.py` found the shared memory still at most 136 KiB after it).
# tests/test_attention_gpu.py compiles and runs every fixed tile.
_DETERMINISTIC_CONFIGS = {
    # (kernel, half precision, head_dim_block > 64): tile
    ("forward", True, False): _config(128, 64, 4, 3),
    ("forward", True, True): _config(128, 64, 8, 3),
    ("forward", False, False): _config(64, 64, 4, 3),
    ("forward", False, True): _config(64, 32, 4, 2),
    ("backward", True, False): _config(64, 64, 4, 2),
    ("backward", True, True): _config(64, 64, 4, 2),
    ("backward", False, False): _config(32, 64, 4, 2),
    ("backward", False, True): _config(32, 32, 4, 1),
}
_INTERPRETER_DETERMINISTIC_CONFIG = _config(32, 32, 1, 1)


def forward_configs():
    return _INTERPRETER_CONFIGS if INTERPRETED else _FORWARD_CONFIGS + _SHORT_QUERY_FORWARD_CONFIGS


def backward_configs():
    return _INTERPRETER_CONFIGS if INTERPRETED else _BACKWARD_CONFIGS


def register_cap_fits(config, head_dim_block: int, has_dropout: bool, causal: bool, half_precision: bool) -> bool:
    """Whether a tile is offered for this call: every uncapped tile; a register-capped one where
    ``_REGISTER_CAPS`` says it compiles without spilling and the cap adds a program a multiprocessor
    (half precision only: float32's probabilities, kept in float32 for TF32 dots, spill under the caps)."""
    if config.maxnreg is None:
        return True
    key = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages, config.maxnreg)
    return half_precision and head_dim_block <= 32 and not causal and _REGISTER_CAPS[key] == bool(has_dropout)


def _launch_argument(named_args, kwargs, name, default=None):
    """A launch argument as the autotuner's pruning hook receives it: by name, or among the keywords."""
    return named_args[name] if name in named_args else kwargs.get(name, default)


def prune_by_length(configs, named_args, **kwargs):
    """Drop tiles much larger than the sequences (short decoder calls are launch
    bound, and a 128-row tile over 40 queries is mostly padding), and the register-capped tiles
    where :func:`register_cap_fits` says they are not offered. float32 with
    ``ieee`` dots runs on CUDA cores, where big tiles only spill and compile slowly,
    so it keeps the two smallest tiles. So does float32 with TF32 dots at a padded head
    dim of 128 or more: compiled for sm_90, its larger tiles need 228 to 336 KB of shared
    memory, more than an H100 has (``scripts/compile_kernels.py``), and would only fail
    to load while autotuning."""

    def argument(name, default=None):
        return _launch_argument(named_args, kwargs, name, default)

    head_dim, dropout, causal = argument("HEAD_DIM_BLOCK"), argument("HAS_DROPOUT", False), argument("CAUSAL", False)
    half = argument("q_ptr").element_size() == 2
    configs = [c for c in configs if register_cap_fits(c, head_dim, dropout, causal, half)] or configs
    query_bucket, key_bucket = argument("LQ_BUCKET"), argument("LK_BUCKET")
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= max(query_bucket, 32) and c.kwargs["BLOCK_N"] <= max(key_bucket, 32)
    ]
    by_area = sorted(kept or configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    if _keeps_two_smallest(argument):
        return by_area[:2]
    return kept or by_area[:1]


def _keeps_two_smallest(argument) -> bool:
    """float32 with ``ieee`` dots, or with TF32 dots at a padded head dim of 128 or more (see
    :func:`prune_by_length`); ``argument(name)`` reads a launch argument."""
    return argument("DOT_PRECISION") == "ieee" or (
        argument("HEAD_DIM_BLOCK") >= 128 and argument("q_ptr").element_size() == 4)


def is_short_query_tile(config) -> bool:
    """Whether a forward tile is one of ``_SHORT_QUERY_FORWARD_CONFIGS`` (fewer than 64 query rows)."""
    return config.kwargs["BLOCK_M"] < 64


def prune_forward(configs, named_args, **kwargs):
    """The forward's pruning: only the short-query tiles where the query bucket is at most
    ``SHORT_QUERY_BUCKET``, both kinds up to ``MIXED_QUERY_BUCKET``, only the others above; then
    :func:`prune_by_length`. float32 calls that keep only their two smallest tiles keep the usual
    ones above ``SHORT_QUERY_BUCKET`` (the short tiles, smaller still, would crowd them out). The
    interpreter's single tile is kept whatever the length."""

    def argument(name):
        return _launch_argument(named_args, kwargs, name)

    query_bucket = argument("LQ_BUCKET")
    mixed = query_bucket <= MIXED_QUERY_BUCKET and not _keeps_two_smallest(argument)
    short_offered, usual_offered = query_bucket <= SHORT_QUERY_BUCKET or mixed, query_bucket > SHORT_QUERY_BUCKET
    chosen = [c for c in configs if (short_offered if is_short_query_tile(c) else usual_offered)]
    return prune_by_length(chosen or configs, named_args, **kwargs)


def prune_for(kernel: str):
    """The pruning function of ``kernel``: "forward", or "backward" for both backward kernels."""
    if kernel not in ("forward", "backward"):
        raise ValueError(f"kernel: expected 'forward' or 'backward', got {kernel!r}")
    return prune_forward if kernel == "forward" else prune_by_length


def deterministic_config(kernel: str, dtype, head_dim_block: int) -> triton.Config:
    """The fixed tile of ``kernel`` ("forward", or "backward" for both backward kernels) for one
    dtype and padded head dim, used instead of autotuning in deterministic mode."""
    import torch

    if kernel not in ("forward", "backward"):
        raise ValueError(f"kernel: expected 'forward' or 'backward', got {kernel!r}")
    if INTERPRETED:
        return _INTERPRETER_DETERMINISTIC_CONFIG
    return _DETERMINISTIC_CONFIGS[(kernel, dtype != torch.float32, head_dim_block > 64)]
