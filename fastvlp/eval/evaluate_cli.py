"""``fastvlp evaluate``: a fine-tuned checkpoint's metrics on a split, as a table and a JSON file."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from fastvlp.cli import positive_int, require_device

TASKS = ("vqa", "nlvr2", "caption", "retrieval", "detection")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvlp evaluate",
        description="Evaluate a fine-tuned checkpoint. Default splits: vqa and detection val, nlvr2 dev, "
                    "caption and retrieval the Karpathy test split.",
    )
    parser.add_argument("--task", required=True, choices=TASKS, help="must match the checkpoint's task.json")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoints/step-N of a fine-tuning run")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default=None)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write {task, split, num_examples, metrics, skipped, notes} here")
    parser.add_argument("--predictions", type=Path, default=None, help="write the predictions in the official format")
    add_generation_options(parser)
    return parser


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """``--num-beams`` and ``--max-length``, captioning's decoding (None: the task's default)."""
    parser.add_argument("--num-beams", type=positive_int, default=None,
                        help="caption: beam size (default 4; 1 decodes greedily)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="caption: most tokens generated (default 20, or the model's max_text_len when shorter)")


def check_generation_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Only captioning decodes: the decoding options with another task are a usage error."""
    for option, value in (("--num-beams", args.num_beams), ("--max-length", args.max_length)):
        if value is not None and args.task != "caption":
            parser.error(f"argument {option}: expected only with --task caption "
                         f"(the {args.task} task generates no text)")


def _cell(value) -> str:
    if value is None:  # e.g. the AP of a size class the split has no objects of
        return "undefined"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(result) -> str:
    rows = [(name, value) for name, value in result.metrics.items()]
    width = max([len(name) for name, _ in rows] + [6])
    lines = [f"{result.task} on {result.split}: {result.num_examples} examples", f"{'metric':<{width}}  value"]
    lines += [f"{name:<{width}}  {_cell(value)}" for name, value in rows]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_generation_options(parser, args)
    require_device(parser, args.device)  # before the checkpoint loads
    from fastvlp.inference import Predictor

    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, expected_task=args.task)
        result = predictor.evaluate(args.data, args.split, batch_size=args.batch_size, num_beams=args.num_beams,
                                    max_length=args.max_length)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"fastvlp evaluate: {error}", file=sys.stderr)
        return 1
    print(format_table(result))
    for note in result.notes:
        print(f"note: {note}")
    if result.skipped:
        print(f"skipped records: {json.dumps(result.skipped)}")
    from fastvlp.eval.result_files import write_json

    if args.out is not None:
        write_json(args.out, result.to_dict(), indent=1)
        print(f"metrics:     {args.out}")
    if args.predictions is not None:
        if result.predictions is None:
            print(f"fastvlp evaluate: {args.task} has no official prediction format; nothing written", file=sys.stderr)
        else:
            write_json(args.predictions, result.predictions)
            print(f"predictions: {args.predictions}")
    return 0
