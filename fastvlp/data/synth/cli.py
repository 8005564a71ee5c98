"""Command line of the synthetic data:
python -m fastvlp.data.synth --out DIR [--num-images N] [--seed S] [--datasets a,b]."""

from __future__ import annotations

import argparse
import json

from fastvlp.data.synth.generate import DATASETS, write_synthetic_dataset


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the synthetic-data options to `parser` (a new parser when None)."""
    parser = parser or argparse.ArgumentParser(prog="fastvlp data synth", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (the --data folder of training)")
    parser.add_argument("--num-images", type=int, default=1000, help="images per data set (pairs for nlvr2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {DATASETS}")
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the data set described by parsed `args`; prints the counts as JSON."""
    datasets = tuple(name.strip() for name in args.datasets.split(",") if name.strip())
    summary = write_synthetic_dataset(args.out, num_images=args.num_images, seed=args.seed, datasets=datasets)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (sys.argv[1:] when None) and write the data set; returns the exit status."""
    return run(build_parser().parse_args(argv))
