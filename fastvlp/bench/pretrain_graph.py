"""``fastvlp pretrain`` itself, eagerly and with ``--cuda-graph``, on the same synthetic data, seed and batches:
the step times the training loop logs (data loading, the step, the loss reads and the optimiser: what a run
costs), and what each run learnt.

A step's time is the loop's ``step_time_s``. The first step of each run is left out of the timed rows (model
set-up, kernel compilation, the graph's capture); ``long_steps`` counts the later steps that took more than
three times the median, which in an eager run are the first steps at each new canvas shape (kernels tuned for
new sequence lengths) and in either run the first step of each epoch (data-loading workers starting).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastvlp.bench.common import device_error, device_name, result_row, write_results

MODES = ("eager", "cuda-graph")
LONG_STEP_FACTOR = 3.0


def run_mode(data: Path, out: Path, mode: str, preset: str, steps: int, batch_size: int, num_workers: int,
             device: str, seed: int = 0, pad_to: Optional[Tuple[int, int]] = None) -> Dict[str, object]:
    """One pre-training run of ``steps`` steps in ``mode``; its row (step times in ms after the first step)."""
    from fastvlp.train.metrics_log import read_metrics
    from fastvlp.train.pretrain import PretrainOptions, run_pretraining

    options = PretrainOptions(preset=preset, data=data, out=out, max_steps=steps, batch_size=batch_size, seed=seed,
                              num_workers=num_workers, device=device, progress=False, save_every=steps,
                              cuda_graph=mode == "cuda-graph", pad_to=pad_to)
    options.validate()
    result = run_pretraining(options)
    records = read_metrics(result.metrics_path)
    times = [record["step_time_s"] * 1e3 for record in records[1:]]
    median = statistics.median(times) if times else None
    last = records[-1]
    row = result_row("pretrain-step", mode, f"{preset} B{batch_size}", times, device=torch.device(device).type,
                     steps=len(records), first_step_ms=records[0]["step_time_s"] * 1e3,
                     mean_ms=statistics.fmean(times) if times else None,
                     long_steps=sum(time > LONG_STEP_FACTOR * median for time in times) if times else 0,
                     first_loss=records[0]["loss"], last_loss=last["loss"],
                     last_losses={key: last.get(key) for key in ("loss_mlm", "loss_itm", "loss_det", "loss_cap")},
                     cuda_graph_fallbacks=last.get("cuda_graph_fallbacks"), backends=result.backends)
    return row


def run(preset: str = "tiny", num_images: int = 64, steps: int = 10, batch_size: int = 8, num_workers: int = 0,
        device: str = "cpu", modes: Sequence[str] = MODES, pad_to: Optional[Tuple[int, int]] = None,
        workdir: Optional[Path] = None) -> List[Dict[str, object]]:
    """One row per mode, on ``num_images`` synthetic images (seed 0) written once for all modes."""
    from fastvlp.data.synth import write_synthetic_dataset

    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"modes: expected some of {list(MODES)}, got {unknown}")
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        data = Path(folder) / "data"
        write_synthetic_dataset(data, num_images, seed=0, datasets=("coco", "vg"))
        rows = []
        for mode in modes:
            rows.append(run_mode(data, Path(folder) / mode, mode, preset, steps, batch_size, num_workers, device,
                                 pad_to=pad_to))
            row = rows[-1]
            print(f"  {mode:<11} median {row['median_ms']:8.1f} ms/step, mean {row['mean_ms']:8.1f}, first step "
                  f"{row['first_step_ms']:8.1f} ms, {row['long_steps']} long steps; loss {row['first_loss']:.3f} -> "
                  f"{row['last_loss']:.3f}" + ("" if row["cuda_graph_fallbacks"] is None
                                               else f"; {row['cuda_graph_fallbacks']} steps ran eagerly"))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    from fastvlp.cli import parse_height_width
    from fastvlp.models.presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m fastvlp.bench.pretrain_graph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--num-images", type=int, default=64, help="synthetic images for each of coco and vg")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help="default: both on CUDA, eager alone elsewhere")
    parser.add_argument("--pad-to", default=None, metavar="HxW", help="the graph mode's canvas (pretrain's --pad-to)")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    problem = device_error(args.device)
    if problem:
        parser.error(problem)
    modes = args.modes or (MODES if torch.device(args.device).type == "cuda" else ("eager",))
    if "cuda-graph" in modes and torch.device(args.device).type != "cuda":
        parser.error("--modes cuda-graph needs a CUDA device")
    if args.num_images < 1 or args.steps < 2 or args.batch_size < 1 or args.num_workers < 0:
        parser.error("--num-images and --batch-size must be >= 1, --steps >= 2, --num-workers >= 0")
    try:
        pad_to = None if args.pad_to is None else parse_height_width(args.pad_to)
    except ValueError as error:
        parser.error(f"--pad-to: {error}")
    print(f"fastvlp pretrain, {args.preset}, batch {args.batch_size}, {args.steps} steps on {args.num_images} "
          f"synthetic images, on {device_name(args.device)}:")
    rows = run(args.preset, args.num_images, args.steps, args.batch_size, args.num_workers, args.device, modes, pad_to)
    if len(rows) == 2:
        print(f"--cuda-graph against eager: median {rows[0]['median_ms'] / rows[1]['median_ms']:.2f}x, "
              f"mean {rows[0]['mean_ms'] / rows[1]['mean_ms']:.2f}x")
    path = write_results("pretrain_graph", rows, device_name(args.device), args.out_dir,
                         extra={"preset": args.preset, "num_images": args.num_images, "steps": args.steps,
                                "batch_size": args.batch_size, "num_workers": args.num_workers, "pad_to": args.pad_to},
                         table_columns=("contender", "shape", "median_ms", "mean_ms", "p10_ms", "p90_ms", "first_step_ms",
                                        "long_steps", "first_loss", "last_loss", "cuda_graph_fallbacks"))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
