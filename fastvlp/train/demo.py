"""``fastvlp demo``: synthesise a small coco + vg set and pre-train the tiny preset on it, on the CPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

DEMO_IMAGES = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlp demo", description="Pre-train the tiny preset on synthetic data.")
    parser.add_argument("--out", type=Path, default=Path("fastvlp-demo"), help="run folder (data goes in OUT/data)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true", help="continue a demo run in --out")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        print("fastvlp demo: --steps: expected a positive int", file=sys.stderr)
        return 2
    from fastvlp.data.synth import write_synthetic_dataset
    from fastvlp.train.loss_plot import plot_losses
    from fastvlp.train.pretrain import PretrainOptions, RunExistsError, run_pretraining
    from fastvlp.train.pretrain_cli import configure_console_logging

    configure_console_logging()
    out = Path(args.out)
    data = out / "data"
    if not (data / "coco").is_dir() or not (data / "vg").is_dir():
        print(f"writing {DEMO_IMAGES} synthetic coco + vg images to {data}")
        write_synthetic_dataset(data, DEMO_IMAGES, datasets=("coco", "vg"))
    run = out / "run"
    options = PretrainOptions(
        preset="tiny", data=data, out=run, max_steps=args.steps, batch_size=args.batch_size, device=args.device,
        save_every=max(1, args.steps // 3), keep_last=2, resume=args.resume,
    )
    try:
        result = run_pretraining(options)
    except RunExistsError as error:
        print(f"fastvlp demo: {error}", file=sys.stderr)
        return 1
    plot = out / "loss.png"
    reason = plot_losses(result.metrics_path, plot)
    print(f"metrics:     {result.metrics_path}")
    print(f"checkpoints: {run / 'checkpoints'} (newest: {result.checkpoint})")
    print(f"log:         {run / 'train.log'}")
    print(f"loss plot:   {plot}" if reason is None else reason)
    return 0
