"""``fastvlp bench kernels``: the solver and attention benchmarks in one command.

The attention benchmark needs a GPU; without one it is reported as skipped, and the solver benchmark runs on
the CPU. Peers that are not installed are reported as missing by each benchmark.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastvlp bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="passed to each benchmark (default: theirs)")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    common = (["--repeats", str(args.repeats)] if args.repeats else []) + (
        ["--out-dir", args.out_dir] if args.out_dir else [])

    from fastvlp.bench import lsap

    status = lsap.main(["--device", "all", *common])
    if not torch.cuda.is_available():
        print("attention: skipped (the fused-attention benchmark needs a CUDA GPU)")
        return status
    from fastvlp.bench import attention

    return status or attention.main(common)


if __name__ == "__main__":
    raise SystemExit(main())
