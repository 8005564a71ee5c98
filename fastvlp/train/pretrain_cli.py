"""``fastvlp pretrain``: argument parsing over :func:`fastvlp.train.pretrain.run_pretraining`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from fastvlp.cli import parse_height_width, usage_error
from fastvlp.data.transforms import SCALE_PRESETS
from fastvlp.models.presets import list_presets
from fastvlp.nn.matcher import MATCHER_BACKENDS
from fastvlp.nn.transformer_layers import ATTENTION_BACKENDS


# Options whose names differ from the option fields they set.
OPTION_ALIASES = {"config_overrides": "--set"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvlp pretrain",
        description="Pre-train E2E-VLP on coco + vg under --data (MLM, ITM, detection, captioning).",
    )
    parser.add_argument("--preset", required=True, choices=list_presets())
    parser.add_argument("--data", required=True, type=Path, help="folder holding coco/ and/or vg/")
    parser.add_argument("--out", required=True, type=Path, help="run folder: metrics.jsonl, checkpoints/, train.log")
    parser.add_argument("--max-steps", type=int, default=1000, help="optimiser updates of the whole schedule")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument("--batch-size", type=int, default=8, help="per process and per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser update")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of --max-steps, at most 1000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (the newest)")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=None,
                        help="triton on the CPU runs in Triton's interpreter: set TRITON_INTERPRET=1 before starting")
    parser.add_argument("--matcher-backend", choices=MATCHER_BACKENDS, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--exclude-images", type=Path, default=None,
                        help="file of images to leave out, one a line: a file name, or a bare number, which is a COCO "
                             "image id (its Visual Genome copy goes too; a Visual Genome image is left out by its file "
                             "name); the log and run.json count the entries that matched no image")
    parser.add_argument("--backbone-weights", type=Path, default=None,
                        help="local torchvision ResNet state dict (.pth or .safetensors); when --resume continues "
                             "a checkpoint, the weights come from it and this file is not read (the log says so)")
    parser.add_argument("--vocab", type=Path, default=None,
                        help="BERT vocab.txt (default: trained on the captions); when --resume continues a "
                             "checkpoint, only the run's own vocabulary is accepted")
    parser.add_argument("--scale", choices=sorted(SCALE_PRESETS), default=None,
                        help="image scale augmentation: paper (short side 480..800, long side <= 1333) or tiny "
                             "(96..128, <= 160); default: tiny for the tiny preset, paper for the others. "
                             "Checkpoints record it, and fine-tuning from them keeps it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the preset's E2EVLPConfig (repeatable), e.g. --set d_model=64")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each step's forward and backward from one CUDA graph (CUDA, one process, "
                             "--grad-accum 1, the fastvlp matcher): batches are padded to fixed shapes (images to "
                             "the scale's largest side squared, texts to max_text_len, targets to --max-targets); "
                             "one that does not fit runs eagerly and is counted")
    parser.add_argument("--pad-to", default=None, metavar="HxW",
                        help="with --cuda-graph, the image canvas every batch is padded to (default: the scale's "
                             "largest side, squared); a batch with a larger image runs eagerly")
    parser.add_argument("--max-targets", type=int, default=None,
                        help="with --cuda-graph, objects an image's detection target is padded to (default: the "
                             "preset's num_queries)")
    return parser


def configure_console_logging() -> None:
    root = logging.getLogger("fastvlp")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def parse_overrides(items: Sequence[str]) -> dict:
    """``["d_model=64", "aux_loss=false"]`` -> ``{"d_model": 64, "aux_loss": False}`` (values read as JSON,
    else kept as strings)."""
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set: expected FIELD=VALUE, got {item!r}")
        try:
            overrides[name] = json.loads(text)
        except json.JSONDecodeError:
            overrides[name] = text
    return overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as error:
        parser.error(str(error))
    pad_to = None
    if args.pad_to is not None:
        try:
            pad_to = parse_height_width(args.pad_to)
        except ValueError as error:
            parser.error(f"argument --pad-to: {error}")
    from fastvlp.train.distributed import launched_by_torchrun, shutdown_distributed
    from fastvlp.train.pretrain import NonFiniteLossError, PretrainOptions, RunExistsError, run_pretraining

    if not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0:
        configure_console_logging()
    options = PretrainOptions(
        preset=args.preset, data=args.data, out=args.out, max_steps=args.max_steps, stop_after=args.stop_after,
        batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed, resume=args.resume,
        save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
        warmup_steps=args.warmup_steps, attention_backend=args.attention_backend,
        matcher_backend=args.matcher_backend, device=args.device, num_workers=args.num_workers,
        exclude_images=args.exclude_images, backbone_weights=args.backbone_weights, vocab=args.vocab,
        scale=args.scale, progress=not args.no_progress, config_overrides=overrides, cuda_graph=args.cuda_graph,
        max_targets=args.max_targets, pad_to=pad_to,
    )
    try:  # a bad option is a usage error before any work, not a failure of the run
        options.validate()
    except (ValueError, TypeError, FileNotFoundError) as error:
        usage_error(parser, error, OPTION_ALIASES)
    try:
        result = run_pretraining(options)
    except (RunExistsError, NonFiniteLossError, ValueError, FileNotFoundError) as error:
        print(f"fastvlp pretrain: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    print(f"step {result.step}: checkpoint {result.checkpoint}, metrics {result.metrics_path}")
    return 0
