"""Compile every attention kernel variant and candidate tile for a CUDA target, without a GPU.

Triton compiles to a cubin with its own ptxas, so a machine with no GPU can still find the kernels that no
longer lower (a Triton upgrade, a kernel edit checked only in the interpreter) and the tiles whose shared
memory exceeds the target's. A stand-in driver names the target; the real launch functions
(``attention_forward_triton``, ``attention_backward_triton``) run on CPU tensors, and each launch they make
is replaced by Triton's ``warmup`` (compile, never run) of every tile the autotuner could pick for it (its
candidates after the kernel's own pruning; ``--all-tiles`` skips the pruning) and of the fixed tile of
deterministic mode. float32 is compiled with exact (``ieee``) and with TF32 dot products.

    python scripts/compile_kernels.py [--arch 90] [--dtypes float16,bfloat16,float32] [--head-dims 32,64,80,128]
        [--quick] [--all-tiles] [--jobs N]

Prints one line per compiled kernel (name, variant, tile, shared memory) and exits 1 when any compile fails
or any tile needs more shared memory than ``--max-shared-kb`` (227 KB, an H100's or H200's opt-in limit).
Each line also gives what the cubin says about speed, read with the ``cuobjdump`` that Triton ships:
registers a thread, the programs a multiprocessor can hold at that count (65536 registers), bytes spilled to
local memory, which tensor-core instructions the matrix products became (``HGMMA``, Hopper's warpgroup
instructions, or the older ``HMMA``), and how many instructions the main loop holds (one key or query
block's work: a static count for comparing edits, not a timing). Spills are reported, not failed: a tile
that spills is slower, and autotuning does not pick it where another is faster.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET (the kernels must be defined for a GPU)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402


class TargetOnlyDriver:
    """What compiling (never launching) asks of Triton's active driver: the target, a device and a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


REGISTERS_PER_MULTIPROCESSOR = 65536


def cuobjdump_path() -> Optional[str]:
    """The ``cuobjdump`` that Triton ships with its NVIDIA backend (or one on PATH), None without either."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else shutil.which("cuobjdump")


def cubin_resources(cubin: bytes, num_warps: int, tool: str) -> Dict[str, object]:
    """Registers a thread, spilled bytes (stack and local memory), programs a multiprocessor holds by
    registers, and the tensor-core instruction kind of a compiled kernel, read with ``cuobjdump`` (``tool``)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return parse_resources(usage, sass, num_warps)


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*);")
_BACKWARD_TARGET = re.compile(r"\bBRA\b[^;]*?\b(0x[0-9a-f]+)")


def main_loop_instructions(sass: str) -> Optional[int]:
    """Instructions in the kernel's main loop: of the address ranges that a branch jumps back over, the
    one holding the most matrix-product instructions (the longer on a tie). None without a loop. What one
    iteration over a key block costs, as the compiler emitted it: a static count, not a timing."""
    lines = [(int(address, 16), text, op) for address, text, op in _INSTRUCTION.findall(sass)]
    best = None
    for address, text, op in lines:
        target = _BACKWARD_TARGET.search(text) if op == "BRA" else None
        if target is None or int(target.group(1), 16) >= address:
            continue
        body = [body_op for at, _, body_op in lines if int(target.group(1), 16) <= at <= address]
        rank = (sum(body_op in ("HGMMA", "HMMA") for body_op in body), len(body))
        best = max(best, rank) if best is not None else rank
    return None if best is None else best[1]


def parse_resources(usage: str, sass: str, num_warps: int) -> Dict[str, object]:
    """:func:`cubin_resources` from ``cuobjdump -res-usage`` and ``cuobjdump -sass`` output."""
    counts = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    if "REG" not in counts:
        raise ValueError(f"usage: no register count in cuobjdump output {usage[:200]!r}")
    registers = counts["REG"]
    # Registers are allocated to warps in blocks of 256 (8 a thread).
    per_program = -(-registers // 8) * 8 * 32 * num_warps
    instructions = set(re.findall(r"\b(HGMMA|HMMA)\.", sass))
    return {
        "registers": registers,
        "spill_bytes": counts.get("STACK", 0) + counts.get("LOCAL", 0),
        "programs_per_sm": REGISTERS_PER_MULTIPROCESSOR // per_program,
        "tensor_cores": "+".join(sorted(instructions)) or "none",
        "main_loop_instructions": main_loop_instructions(sass),
    }


class Report:
    def __init__(self, max_shared_bytes: int):
        self.max_shared_bytes = max_shared_bytes
        self.compiled, self.failures, self.oversized, self.spilling = 0, [], [], []
        self.seen = set()
        self.tool = cuobjdump_path()  # None: registers and spills are not read

    def compile(self, jit_function, grid, args, kwargs, label: str) -> None:
        name = f"{jit_function.fn.__name__} {label}"
        if name in self.seen:  # the same kernel and variant from another launch function
            return
        self.seen.add(name)
        start = time.perf_counter()
        try:
            compiled = jit_function.warmup(*args, grid=grid, **kwargs)
        except Exception as error:  # report every failure, not only the first
            self.failures.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            print(f"FAILED  {name}: {type(error).__name__}", flush=True)
            return
        shared = int(getattr(compiled.metadata, "shared", 0))
        self.compiled += 1
        flag = ""
        if shared > self.max_shared_bytes:
            self.oversized.append(f"{name}: {shared / 1024:.0f} KB shared memory")
            flag = "  (over the limit)"
        detail = ""
        if self.tool is not None:
            found = cubin_resources(compiled.asm["cubin"], kwargs.get("num_warps", 4), self.tool)
            detail = (f", {found['registers']} registers (at most {found['programs_per_sm']} programs/SM), "
                      f"{found['spill_bytes']} B spilled, {found['tensor_cores']}, "
                      f"main loop {found['main_loop_instructions']} instructions")
            if found["spill_bytes"]:
                self.spilling.append(name)
        print(f"ok      {name}: {shared / 1024:.1f} KB shared{detail}, {time.perf_counter() - start:.1f} s{flag}", flush=True)


def _tile_label(config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    cap = f" maxnreg={config.maxnreg}" if config.maxnreg is not None else ""
    return f"[{tiles} warps={config.num_warps} stages={config.num_stages}{cap}]"


def compiling_launcher(report: Report, variant: str, quick: bool, all_tiles: bool):
    """A stand-in for ``launcher.kernel_launcher``: each launch compiles the tiles the autotuner could pick
    (after the kernel's own pruning, unless ``all_tiles``) and deterministic mode's, instead of running."""
    from fastvlp.ops.fmha import kernel_config

    def kernel_launcher(autotuned_kernel, kernel, dtype, head_dim_block):
        fixed = kernel_config.deterministic_config(kernel, dtype, head_dim_block)

        def launch(grid, *args, **kwargs):
            configs = list(autotuned_kernel.configs)
            prune = getattr(autotuned_kernel, "early_config_prune", None)
            if prune is not None and not all_tiles:
                named = dict(zip(autotuned_kernel.arg_names, args))
                configs = prune(configs, named, **kwargs)
            if quick:
                configs = [fixed]
            elif all(_tile_label(fixed) != _tile_label(config) for config in configs):
                configs.append(fixed)
            for config in configs:
                tiles = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                if config.maxnreg is not None:
                    tiles["maxnreg"] = config.maxnreg
                report.compile(autotuned_kernel.fn, (1, 1, 1), args, {**kwargs, **tiles},
                               f"{variant} {_tile_label(config)}")

        return launch

    return kernel_launcher


class CompilingKernel:
    """A stand-in for a plain ``@triton.jit`` kernel launched as ``kernel[grid](...)``: compiles instead."""

    def __init__(self, report: Report, jit_function, variant: str):
        self.report, self.jit_function, self.variant = report, jit_function, variant

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.report.compile(self.jit_function, (1, 1, 1), args, kwargs, self.variant)


# Lengths past every tile (so the pruning keeps them all) and multiples of none; a short query length
# for the forward's short-query tiles.
BATCH, HEADS, QUERY_LENGTH, KEY_LENGTH = 2, 2, 136, 200
SHORT_QUERY_LENGTH = 3


def compile_variant(report: Report, dtype, tf32: bool, head_dim: int, masked: bool, causal: bool, dropout: bool,
                    quick: bool, all_tiles: bool) -> None:
    """Run the forward and both kinds of backward for one variant, compiling each launch's tiles."""
    from fastvlp.ops.fmha import backward_kernels, forward_kernel

    variant = (f"{str(dtype).replace('torch.', '')}{' tf32' if tf32 else ''} d{head_dim}"
               f"{' mask' if masked else ''}{' causal' if causal else ''}{' dropout' if dropout else ''}")
    q = torch.randn(BATCH, QUERY_LENGTH, HEADS, head_dim).to(dtype)
    k = torch.randn(BATCH, KEY_LENGTH, HEADS, head_dim).to(dtype)
    v = torch.randn_like(k)
    mask = torch.rand(BATCH, KEY_LENGTH) < 0.3 if masked else None
    seed = torch.tensor([1, 2], dtype=torch.int64)
    out, lse = torch.empty_like(q), torch.empty(BATCH, HEADS, QUERY_LENGTH)
    forward_kernel.kernel_launcher = backward_kernels.kernel_launcher = compiling_launcher(report, variant, quick, all_tiles)
    dropout_p, scale = (0.1 if dropout else 0.0), head_dim ** -0.5
    forward_kernel.attention_forward_triton(q, k, v, mask, seed, causal, dropout_p, scale, tf32, out, lse)
    # A decoding step's few queries: the forward's short-query tiles.
    short_q = q[:, :SHORT_QUERY_LENGTH].contiguous()
    forward_kernel.attention_forward_triton(short_q, k, v, mask, seed, causal, dropout_p, scale, tf32,
                                            torch.empty_like(short_q), torch.empty(BATCH, HEADS, SHORT_QUERY_LENGTH))
    grad_out = torch.randn_like(q)
    backward_kernels.attention_backward_triton(grad_out, q, k, v, out, lse, mask, seed, causal, dropout_p, scale, tf32)
    # Without dQ, the backward computes its row sums in a kernel of their own.
    delta_kernel = backward_kernels.attention_backward_delta_kernel
    backward_kernels.attention_backward_delta_kernel = CompilingKernel(report, delta_kernel, variant)
    try:
        backward_kernels.attention_backward_triton(grad_out, q, k, v, out, lse, mask, seed, causal, dropout_p, scale,
                                                   tf32, need_dq=False)
    finally:
        backward_kernels.attention_backward_delta_kernel = delta_kernel


def _compile_in_worker(task):
    """One variant in a forked worker (which inherits the stand-in driver): its counts and problem lines."""
    max_shared_bytes, variant, quick, all_tiles = task
    report = Report(max_shared_bytes)
    compile_variant(report, *variant, quick=quick, all_tiles=all_tiles)
    return report.compiled, report.failures, report.oversized, report.spilling


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (90: H100/H200)")
    parser.add_argument("--dtypes", default="float16,bfloat16,float32")
    parser.add_argument("--head-dims", default="32,64,80,128", help="80 checks a padded head dim")
    parser.add_argument("--max-shared-kb", type=float, default=227.0)
    parser.add_argument("--quick", action="store_true",
                        help="one tile per kernel (deterministic mode's) and fewer variants: a smoke test")
    parser.add_argument("--all-tiles", action="store_true",
                        help="every candidate tile, also those the kernel's pruning would never pick")
    parser.add_argument("--jobs", type=int, default=1, help="compile variants in this many processes")
    args = parser.parse_args(argv)
    try:
        dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
        head_dims = [int(d) for d in args.head_dims.split(",")]
    except (AttributeError, ValueError) as error:
        parser.error(f"--dtypes/--head-dims: {error}")
    if any(not isinstance(d, torch.dtype) for d in dtypes) or any(d < 1 for d in head_dims):
        parser.error("--dtypes: expected torch dtype names; --head-dims: positive integers")
    if args.jobs < 1:
        parser.error(f"--jobs: expected at least 1, got {args.jobs}")

    driver.set_active(TargetOnlyDriver(args.arch))
    from fastvlp.ops.fmha import triton_rng
    from fastvlp.ops.fmha.kernel_config import kernels_interpreted

    if kernels_interpreted():
        sys.exit("compile_kernels.py: the kernels were defined for the interpreter")
    report = Report(int(args.max_shared_kb * 1024))
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)

    # (mask, causal, dropout): the kernels' constexpr switches. --quick keeps the two extremes.
    switches = list(itertools.product((False, True), repeat=3))
    if args.quick:
        switches = [(False, False, False), (True, True, True)]
    precisions = [(dtype, tf32) for dtype in dtypes for tf32 in ((False, True) if dtype == torch.float32 else (False,))]
    variants = [(dtype, tf32, head_dim, *switch)
                for (dtype, tf32), head_dim, switch in itertools.product(precisions, head_dims, switches)]
    if args.jobs == 1:
        for variant in variants:
            compile_variant(report, *variant, quick=args.quick, all_tiles=args.all_tiles)
    else:
        import multiprocessing

        tasks = [(report.max_shared_bytes, variant, args.quick, args.all_tiles) for variant in variants]
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for compiled, failures, oversized, spilling in pool.imap_unordered(_compile_in_worker, tasks):
                report.compiled += compiled
                report.spilling += spilling
                report.failures += failures
                report.oversized += oversized
    # dropout_keep_mask (the dropout replay for tests) refuses CPU tensors outside the interpreter, so its
    # kernel is compiled with the arguments that function passes on a GPU.
    keep = torch.empty(2, 2, 40, 72, dtype=torch.int8)
    report.compile(triton_rng.dropout_keep_kernel, (1, 1, 1), (torch.tensor([1, 2]), keep, 40, 72,
                   triton_rng.dropout_threshold(0.1)), dict(INT64_OFFSETS=False, BLOCK_M=64, BLOCK_N=64), "keep mask")

    print(f"{report.compiled} kernels compiled for sm_{args.arch} with Triton {triton.__version__}; "
          f"{len(report.failures)} failed; {len(report.oversized)} over {args.max_shared_kb:g} KB of shared memory"
          + (f"; {len(report.spilling)} spill registers to local memory" if report.tool else
             "; registers not read (no cuobjdump)"))
    for line in report.failures + report.oversized:
        print("  " + line)
    for name in report.spilling:
        print("  spills: " + name)
    return 1 if report.failures or report.oversized else 0


if __name__ == "__main__":
    sys.exit(main())
