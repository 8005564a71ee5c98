"""``fastvlp bench kernels``: the solver and attention benchmarks in one command.

The attention benchmark needs a GPU; without one it is reported as skipped, and the solver benchmark runs on
the CPU. Peers that are not installed are reported as missing by each benchmark. A failed solver check
does not stop the attention benchmark: both run, and the command exits with the worse of their statuses.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run both benchmarks, the attention one even after a failed solver check; return the worse status."""
    import argparse

    parser = argparse.ArgumentParser(prog="fastvlp bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="passed to each benchmark (default: theirs)")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    # Any --repeats given is passed on, 0 included, so that each benchmark's own check reports it.
    common = (["--repeats", str(args.repeats)] if args.repeats is not None else []) + (
        ["--out-dir", args.out_dir] if args.out_dir else [])

    from fastvlp.bench import lsap

    status = lsap.main(["--device", "all", *common])
    if status:
        print("lsap: the solver check FAILED (rows marked 'wrong result'); the attention benchmark runs anyway")
    if not torch.cuda.is_available():
        print("attention: skipped (the fused-attention benchmark needs a CUDA GPU)")
        return status
    from fastvlp.bench import attention

    return max(status, attention.main(common))


if __name__ == "__main__":
    raise SystemExit(main())
