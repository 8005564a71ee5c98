"""The fused attention's forward kernel and its peers' on one E2E-VLP shape, for a hardware-counter profiler.

``fastvlp bench attention`` says how long each contender takes; this says why, by giving Nsight Compute a
few settled calls of each to read counters over (occupancy, issue slots, warp stall reasons, memory
throughput). Every contender of ``fastvlp bench attention`` that is named runs the forward of the
scenario (E by default: the encoder's self-attention over 1090 tokens with image padding) in the same way
it is timed there, at dropout 0: first ``--warmup`` calls (autotuning, compilation), outside the
profiled range, then ``--calls`` calls inside it, each in an NVTX range named after the contender. The
profiled range is opened with ``torch.cuda.profiler.start()``, so run it under
``ncu --profile-from-start off``; ``bench/gpu.sh``'s ``profile-attention`` step does::

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --section SchedulerStats \\
        python -m fastvlp.bench.attention_kernel_profile

Without a profiler attached the calls simply run. It needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

import torch

from .attention import CONTENDERS, Setup, _scenario_inputs, scenarios

DEFAULT_CONTENDERS = ("fastvlp", "flex-compiled", "sdpa-cudnn")


def check_request(scenario: str, contenders: Sequence[str]) -> dict:
    """The scenario named ``scenario``; ``ValueError`` naming the argument for an unknown scenario or
    contender, or for module rows (which time projections too, not one kernel)."""
    known = {entry["name"]: entry for entry in scenarios()}
    if scenario not in known:
        raise ValueError(f"scenario: expected one of {sorted(known)}, got {scenario!r}")
    kernels = [name for name in CONTENDERS if "(module" not in name]
    unknown = [name for name in contenders if name not in kernels]
    if unknown or not contenders:
        raise ValueError(f"contenders: expected names from {kernels}, got {list(contenders)}")
    return known[scenario]


def profile_calls(scenario: dict, contenders: Sequence[str], calls: int, warmup: int,
                  dtype: torch.dtype = torch.float16) -> List[str]:
    """Run each contender's forward ``warmup`` times, then ``calls`` times inside the profiled range.
    Returns one line per contender: what ran, or why it could not."""
    if calls < 1 or warmup < 1:
        raise ValueError(f"calls/warmup: expected >= 1, got {calls} and {warmup}")
    inputs = _scenario_inputs(scenario, "cuda", dtype)
    q, k, v = inputs.q, inputs.k, inputs.v
    lines = []
    for name in contenders:
        try:
            prepared = CONTENDERS[name](scenario, 0.0, Setup("cuda", dtype))
            with prepared.hold(), torch.no_grad():
                for _ in range(warmup):
                    prepared.call(q, k, v)
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                try:
                    for _ in range(calls):
                        with torch.cuda.nvtx.range(name):
                            prepared.call(q, k, v)
                    torch.cuda.synchronize()
                finally:
                    torch.cuda.profiler.stop()
        except Exception as error:  # a peer missing on this machine (xformers, a cuDNN without the kernel)
            lines.append(f"{name}: not profiled ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
            continue
        lines.append(f"{name}: {calls} forward call(s) of {scenario['name']} {inputs.shape} profiled "
                     f"after {warmup} warm-up call(s)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="E", help="a scenario of `fastvlp bench attention` (default E)")
    parser.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                        help="comma-separated contenders of `fastvlp bench attention` (module rows excluded)")
    parser.add_argument("--calls", type=int, default=2, help="profiled forward calls of each contender")
    parser.add_argument("--warmup", type=int, default=10, help="calls before the profiled range")
    args = parser.parse_args(argv)
    contenders = [name for name in args.contenders.split(",") if name]
    try:
        scenario = check_request(args.scenario, contenders)
        if args.calls < 1 or args.warmup < 1:
            raise ValueError(f"--calls/--warmup: expected >= 1, got {args.calls} and {args.warmup}")
    except ValueError as error:
        parser.error(str(error))
    if not torch.cuda.is_available():
        print("attention_kernel_profile: needs a CUDA GPU (none found)", file=sys.stderr)
        return 2
    for line in profile_calls(scenario, contenders, args.calls, args.warmup):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
