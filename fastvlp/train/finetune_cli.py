"""``fastvlp finetune``: argument parsing over :func:`fastvlp.train.finetune.run_finetuning`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from fastvlp.cli import positive_int, usage_error
from fastvlp.data.transforms import SCALE_PRESETS
from fastvlp.models.presets import list_presets
from fastvlp.nn.matcher import MATCHER_BACKENDS
from fastvlp.nn.transformer_layers import ATTENTION_BACKENDS
from fastvlp.train.pretrain_cli import OPTION_ALIASES, configure_console_logging, parse_overrides

TASKS = ("vqa", "nlvr2", "caption", "retrieval", "detection")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastvlp finetune",
        description="Fine-tune E2E-VLP on a downstream task: vqa (vqa/ + coco/ images), nlvr2 (nlvr2/), caption "
                    "(coco/ captions, Karpathy split when dataset_coco.json is in coco/, coco/karpathy/ or coco/annotations/), retrieval "
                    "(flickr30k/), detection (coco/ instances, with the image's caption as text).",
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", type=Path,
                       help="checkpoint directory to start from (checkpoints/step-N); a resumed run no longer reads it")
    start.add_argument("--preset", choices=list_presets(), help="start from this preset's random weights")
    parser.add_argument("--data", required=True, type=Path, help="data folder (the layout of the README)")
    parser.add_argument("--out", required=True, type=Path, help="run folder: metrics.jsonl, checkpoints/, train.log")
    parser.add_argument("--max-steps", type=int, default=None, help="optimiser updates (default: the task's)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument("--batch-size", type=int, default=16, help="per process and per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser update")
    parser.add_argument("--lr", type=float, default=None,
                        help="Transformer learning rate (default: the paper's for the task, times the model's "
                             "pre-training rate over the paper's 1e-4; the backbone keeps the ratio to it of "
                             "the model's pre-training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--save-every", type=int, default=1000)
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (the newest)")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=None)
    parser.add_argument("--matcher-backend", choices=MATCHER_BACKENDS, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--vocab", type=Path, default=None,
                        help="BERT vocab.txt, with --preset only (default: trained); --init brings its tokenizer")
    # The task options default to None (not given): another task refuses them rather than ignoring them.
    parser.add_argument("--num-answers", type=positive_int, default=None,
                        help="vqa only: size of the answer vocabulary (default 3129)")
    parser.add_argument("--no-text", action="store_true",
                        help="detection only: encode the image alone, without its caption")
    parser.add_argument("--num-negatives", type=positive_int, default=None,
                        help="retrieval only: hard negatives per positive (default 3)")
    parser.add_argument("--scale", choices=sorted(SCALE_PRESETS), default=None,
                        help="image scale augmentation, paper or tiny (default: the --init checkpoint's, else "
                             "tiny for the tiny preset and paper for the others); task.json records it for "
                             "evaluation and prediction")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the model's E2EVLPConfig (repeatable), e.g. --set dropout=0.0")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as error:
        parser.error(str(error))
    from fastvlp.train.distributed import launched_by_torchrun, shutdown_distributed
    from fastvlp.train.finetune import FinetuneOptions, run_finetuning
    from fastvlp.train.loop import NonFiniteLossError, RunExistsError

    if not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0:
        configure_console_logging()
    # Only the options given: each task fills in its own defaults, and FinetuneOptions refuses another task's.
    given = (("num_answers", args.num_answers), ("num_negatives", args.num_negatives))
    task_options = {key: value for key, value in given if value is not None}
    if args.no_text:
        task_options["with_text"] = False
    options = FinetuneOptions(
        task=args.task, data=args.data, out=args.out, init=args.init, preset=args.preset, max_steps=args.max_steps,
        stop_after=args.stop_after, batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
        resume=args.resume, save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
        lr=args.lr, attention_backend=args.attention_backend, matcher_backend=args.matcher_backend,
        device=args.device, num_workers=args.num_workers, vocab=args.vocab, scale=args.scale, task_options=task_options,
        config_overrides=overrides, progress=not args.no_progress,
    )
    try:  # a bad option is a usage error before any work, not a failure of the run
        options.validate()
    except (ValueError, TypeError, FileNotFoundError) as error:
        usage_error(parser, error, {**OPTION_ALIASES, "with_text": "--no-text"})
    try:
        result = run_finetuning(options)
    except (RunExistsError, NonFiniteLossError, ValueError, FileNotFoundError) as error:
        print(f"fastvlp finetune: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    print(f"step {result.step}: checkpoint {result.checkpoint}, metrics {result.metrics_path}")
    return 0
