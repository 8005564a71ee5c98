"""``fastvlp predict``: one prediction from a fine-tuned checkpoint, printed as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from fastvlp.cli import positive_int, require_device
from fastvlp.eval.evaluate_cli import add_generation_options, check_generation_options

TASKS = ("vqa", "nlvr2", "caption", "retrieval", "detection")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvlp predict",
        description="vqa: top-k answers with scores (--text is the question); nlvr2: true or false with a "
                    "probability (--image, --image2, --text); caption: the caption (no --text; --num-beams and "
                    "--max-length set the decoding); retrieval: the image-text score; detection: boxes (x1, y1, "
                    "x2, y2 in the image's pixels), labels and scores of the --top-k best (--text: the paired caption, "
                    "optional, refused by a checkpoint fine-tuned with --no-text).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--task", required=True, choices=TASKS, help="must match the checkpoint's task.json")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--image2", type=Path, default=None, help="nlvr2 only, and needed there: the right image")
    parser.add_argument("--text", default=None, help="the question, statement or caption (not taken by --task caption)")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="vqa: the answers, detection: the boxes, highest-scoring first (default 5); "
                             "not taken by the other tasks")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    add_generation_options(parser)
    return parser


def check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Inputs the task would not use are usage errors, not silently dropped; so is nlvr2 without --image2."""
    if args.task == "nlvr2" and args.image2 is None:
        parser.error("argument --image2: expected the right image, which --task nlvr2 needs")
    if args.task != "nlvr2" and args.image2 is not None:
        parser.error(f"argument --image2: expected only with --task nlvr2 (the {args.task} task takes one image)")
    if args.task == "caption" and args.text is not None:
        parser.error("argument --text: expected none with --task caption, which takes no text")
    if args.top_k is not None and args.task not in ("vqa", "detection"):
        parser.error(f"argument --top-k: expected only with --task vqa or detection (the {args.task} task "
                     f"ranks no outputs)")
    check_generation_options(parser, args)


def check_image_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A missing image is a usage error naming its option, found before the checkpoint loads."""
    for option in ("image", "image2"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            parser.error(f"argument --{option}: no such file: {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_inputs(parser, args)
    require_device(parser, args.device)  # before the checkpoint loads
    check_image_files(parser, args)
    from fastvlp.inference import Predictor

    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, expected_task=args.task)
        output = predictor.predict(args.image, image2=args.image2, text=args.text, top_k=args.top_k,
                                   num_beams=args.num_beams, max_length=args.max_length)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"fastvlp predict: {error}", file=sys.stderr)
        return 1
    print(json.dumps(output, indent=1))
    return 0
