"""Command line of the synthetic data:
python -m fastvlp.data.synth --out DIR [--num-images N] [--seed S] [--datasets a,b]."""

from __future__ import annotations

import argparse
import json

from fastvlp.data.synth.generate import DATASETS, write_synthetic_dataset


# Option types: argparse turns their errors into a usage message naming the option (exit status 2).
def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive int")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "a non-negative int")


def _dataset_list(text: str) -> tuple[str, ...]:
    datasets = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in datasets if name not in DATASETS]
    if unknown or not datasets:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(DATASETS)}, got {text!r}")
    if "vqa" in datasets and "coco" not in datasets:
        raise argparse.ArgumentTypeError("'vqa' asks about the coco images, so it needs 'coco' too")
    return datasets


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the synthetic-data options to `parser` (a new parser when None)."""
    parser = parser or argparse.ArgumentParser(prog="fastvlp data synth", description=__doc__)
    parser.add_argument("--out", required=True, help="output folder (the --data folder of training)")
    parser.add_argument(
        "--num-images", type=_positive_int, default=1000, help="images per data set (pairs for nlvr2)"
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument(
        "--datasets", type=_dataset_list, default=",".join(DATASETS), help=f"comma-separated subset of {DATASETS}"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Write the data set described by `args`, as parsed by `build_parser`; prints the counts as JSON."""
    summary = write_synthetic_dataset(args.out, num_images=args.num_images, seed=args.seed, datasets=args.datasets)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (sys.argv[1:] when None) and write the data set; returns the exit status."""
    return run(build_parser().parse_args(argv))
