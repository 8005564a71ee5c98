"""The ``fastvlp`` command line: ``bench``, ``data``, ``pretrain``, ``finetune``, ``evaluate``, ``predict``, ``demo``."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, NoReturn, Optional, Sequence, Tuple

USAGE = """usage: fastvlp <command> [<args>]

commands:
  bench lsap        batched linear assignment against scipy, lapx, lap, lapjv (and the GPU peers)
  bench attention   fused attention against nn.MultiheadAttention, SDPA, FlexAttention, xformers (GPU)
  bench kernels     the solver and attention benchmarks together
  bench train       one pre-training step, fastvlp backends against torch/scipy
  bench e2e         time per query, E2E-VLP against the two-stage region-feature pipeline
  bench generation  caption generation (beam 4, with and without the cache) and VQA inference
  data synth        write the embedded synthetic data set in the published formats
  pretrain          pre-train E2E-VLP on coco + vg (single process or under torchrun)
  finetune          fine-tune on vqa, nlvr2, caption, retrieval or detection
  evaluate          a fine-tuned checkpoint's metrics on a split
  predict           one prediction from a fine-tuned checkpoint, as JSON
  demo              synthesise data, pre-train tiny, fine-tune and evaluate VQA and captioning

`fastvlp <command> <subcommand> --help` describes each one.
"""


# Each command's module is imported only when it runs, so `fastvlp --help` stays fast.
COMMANDS: Dict[str, Dict[str, str]] = {
    "bench": {
        "lsap": "fastvlp.bench.lsap",
        "attention": "fastvlp.bench.attention",
        "kernels": "fastvlp.bench.kernels",
        "train": "fastvlp.bench.train_step",
        "e2e": "fastvlp.bench.e2e",
        "generation": "fastvlp.bench.generation",
    },
    "data": {"synth": "fastvlp.data.synth.cli"},
}
# Commands without subcommands.
SINGLE_COMMANDS: Dict[str, str] = {
    "pretrain": "fastvlp.train.pretrain_cli",
    "finetune": "fastvlp.train.finetune_cli",
    "evaluate": "fastvlp.eval.evaluate_cli",
    "predict": "fastvlp.predict_cli",
    "demo": "fastvlp.train.demo",
}


def positive_int(text: str) -> int:
    """argparse ``type`` of a count: a bad value is a usage error naming the option."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def parse_height_width(text: str) -> Tuple[int, int]:
    """``"HxW"`` -> ``(H, W)``; ValueError unless it is two integers joined by ``x`` (their values are the
    caller's to check)."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"expected HxW, e.g. 800x1333, got {text!r}")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"expected HxW, e.g. 800x1333, got {text!r}") from None


def usage_error(parser: argparse.ArgumentParser, error: Exception, aliases: Optional[Dict[str, str]] = None) -> NoReturn:
    """Exit as argparse does for a bad option (status 2, the usage and the message on stderr) with
    ``error``'s message, whose leading field name (``max_steps: ...``, the style of the options'
    validation) is written as its option (``argument --max-steps: ...``). ``aliases`` name the options
    spelt otherwise than their field (``{"config_overrides": "--set"}``)."""
    message = str(error)
    name, sep, rest = message.partition(": ")
    if sep and name.isidentifier():
        option = (aliases or {}).get(name, "--" + name.replace("_", "-"))
        message = f"argument {option}: {rest}"
    parser.error(message)


def require_device(parser: argparse.ArgumentParser, device: Optional[str]) -> None:
    """A ``--device`` this machine lacks, or a malformed one, is a usage error (checked before anything loads)."""
    from fastvlp.train.loop import checked_device

    try:
        checked_device(device)
    except ValueError as error:
        usage_error(parser, error)


def _run(module_name: str, argv: Sequence[str]) -> int:
    return int(importlib.import_module(module_name).main(list(argv)) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in SINGLE_COMMANDS:
        return _run(SINGLE_COMMANDS[argv[0]], argv[1:])
    group = COMMANDS.get(argv[0])
    if group is None:
        print(f"fastvlp: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if len(argv) < 2 or argv[1] not in group:
        choices = ", ".join(group)
        print(f"fastvlp {argv[0]}: expected one of: {choices}", file=sys.stderr)
        return 2
    return _run(group[argv[1]], argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
