"""``fastvlp predict``: one prediction from a fine-tuned checkpoint, printed as JSON."""
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
        prog="fastvlp predict",
        description="vqa: top-k answers with scores (--text is the question); nlvr2: true or false with a "
                    "probability (--image, --image2, --text); caption: the caption; retrieval: the image-text "
                    "score; detection: boxes (x1, y1, x2, y2 in the image's pixels), labels and scores "
                    "(--text: the paired caption, optional).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--task", required=True, choices=TASKS, help="must match the checkpoint's task.json")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--image2", type=Path, default=None, help="nlvr2: the right image")
    parser.add_argument("--text", default=None)
    parser.add_argument("--top-k", type=positive_int, default=5)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_device(parser, args.device)  # before the checkpoint loads
    from fastvlp.inference import Predictor

    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, expected_task=args.task)
        output = predictor.predict(args.image, image2=args.image2, text=args.text, top_k=args.top_k)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"fastvlp predict: {error}", file=sys.stderr)
        return 1
    print(json.dumps(output, indent=1))
    return 0
