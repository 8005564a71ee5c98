"""The ``fastvlp`` command line: ``fastvlp bench ...``, ``fastvlp data ...``, ``fastvlp pretrain``, ``fastvlp demo``."""
from __future__ import annotations

import sys
from typing import Callable, Dict, Optional, Sequence

USAGE = """usage: fastvlp <command> [<args>]

commands:
  bench lsap        batched linear assignment against scipy, lapx, lap, lapjv (and the GPU peers)
  bench attention   fused attention against nn.MultiheadAttention, SDPA, FlexAttention, xformers (GPU)
  bench kernels     the solver and attention benchmarks together
  bench train       one pre-training step, fastvlp backends against torch/scipy
  bench e2e         time per query, E2E-VLP against the two-stage region-feature pipeline
  data synth        write the embedded synthetic data set in the published formats
  pretrain          pre-train E2E-VLP on coco + vg (single process or under torchrun)
  demo              synthesise data and pre-train the tiny preset for a few hundred steps

`fastvlp <command> <subcommand> --help` describes each one.
"""


def _bench_lsap(argv):
    from fastvlp.bench.lsap import main

    return main(argv)


def _bench_attention(argv):
    from fastvlp.bench.attention import main

    return main(argv)


def _bench_kernels(argv):
    from fastvlp.bench.kernels import main

    return main(argv)


def _bench_train(argv):
    from fastvlp.bench.train_step import main

    return main(argv)


def _bench_e2e(argv):
    from fastvlp.bench.e2e import main

    return main(argv)


def _pretrain(argv):
    from fastvlp.train.pretrain_cli import main

    return main(argv)


def _demo(argv):
    from fastvlp.train.demo import main

    return main(argv)


def _data_synth(argv):
    from fastvlp.data.synth.cli import main

    return main(argv)


COMMANDS: Dict[str, Dict[str, Callable[[Sequence[str]], int]]] = {
    "bench": {"lsap": _bench_lsap, "attention": _bench_attention, "kernels": _bench_kernels, "train": _bench_train, "e2e": _bench_e2e},
    "data": {"synth": _data_synth},
}
# Commands without subcommands.
SINGLE_COMMANDS: Dict[str, Callable[[Sequence[str]], int]] = {"pretrain": _pretrain, "demo": _demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in SINGLE_COMMANDS:
        return int(SINGLE_COMMANDS[argv[0]](argv[1:]) or 0)
    group = COMMANDS.get(argv[0])
    if group is None:
        print(f"fastvlp: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if len(argv) < 2 or argv[1] not in group:
        choices = ", ".join(group)
        print(f"fastvlp {argv[0]}: expected one of: {choices}", file=sys.stderr)
        return 2
    return int(group[argv[1]](argv[2:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
