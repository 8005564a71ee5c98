"""One E2E-VLP pre-training step, fastvlp backends against torch/scipy, with the same weights and batches.

Each contender is timed twice over the same batches: plainly (the step time, images/s and peak memory) and
with synchronising hooks around the matcher and between the parts (the step's parts). Those extra host
syncs cost time on a GPU, so the parts' medians can add up to clearly more than the plain step: read them
as a breakdown, never as the step time. The parts: ``forward_with_matcher`` (the forward and its losses,
the matcher included), ``backward``, ``optimizer`` (gradient clipping and the step) and ``matcher`` (the
matcher alone, also counted in the forward; it runs as the model builds it, and each row records its
``check_finite``).
On CUDA, ``peak_memory_above_start_mb`` is the allocator's peak during the timed steps minus what was
allocated when the contender started (the weights and the batches), so it counts the contender's
activations, gradients and optimiser state. On the CPU, ``peak_rss_above_start_mb`` is the process's peak
resident memory during the timed steps minus its resident memory when the contender started, sampled every
2 ms by a background thread (psutil where installed, else ``/proc/self/statm``): it counts the same things
plus whatever the C allocator keeps mapped after a free, and a peak shorter than the interval can be missed.
Each row holds both fields, the other one None. ``--profile-steps N`` (CUDA) profiles N more steps of
each contender after its timed ones and adds ``kernel_profile`` (device time per step of the attention
kernels, the solver's and the rest, and the heaviest kernels) and
``speedup_bound_without_attention_and_matcher``: the step's median over what would be left with its
attention kernels and matcher free, the ceiling of any speed-up that changes only those two. After each contender its gradients and optimiser are freed
(on the CPU, glibc's free heap is also handed back to the system), so the next one starts from the same
memory. The batches are random pixels, tokens and boxes of the requested size: what a
step costs does not depend on what the pixels show. ``--torchvision-backbone`` adds a third row, torch/scipy
with the ResNet run as torchvision runs it (:func:`as_torchvision_backbone`), which measures what the
backbone's channels-last layout on CUDA and its dtype-keeping frozen batch norm save in the same run.

Each contender gets the batches in the form ``fastvlp pretrain`` builds for its matcher: for the batched
solver (fastvlp's rows) with the detection rows chosen and the targets padded to each batch's own largest
object count beforehand (:meth:`~fastvlp.models.E2EVLP.static_batch`), for scipy's with DETR's per-image
targets; the images, texts and objects are the same.

The GPU is spun up once before the first contender, and each contender warms up for at least ``--warmup``
whole optimiser steps and, on a GPU, ``MIN_CUDA_WARMUP_S`` seconds of them (``warmup_steps`` in the row).
From 6 repeats on, each row has a ``drift`` (the median of its first half of steps over its second) and
whether that is ``settled``. Each row records its first step's loss (the same weights and batch for every
contender) and, after the first contender, ``first_step_loss_diff_to_first_contender``.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import os
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, List, Optional, Sequence

import torch

from fastvlp.bench.captured_train_step import CUDA_GRAPH, static_batches, time_captured
from fastvlp.bench.common import (
    MIN_CUDA_WARMUP_S, device_error, device_name, min_warmup_seconds, result_row, spin_up, summarize,
    unavailable_row, unsettled_rows_note, warm_up, write_results,
)
from fastvlp.train.optim import build_optimizer

# Token ids 0..4 play [PAD], [UNK], [CLS], [SEP], [MASK]; the rest are words.
PAD, CLS, SEP, MASK = 0, 2, 3, 4
SPECIAL_IDS = (0, 1, 2, 3, 4)


def _token_batch(batch: int, max_length: int, vocab_size: int, generator: torch.Generator):
    lengths = torch.randint(max(4, max_length // 2), max_length + 1, (batch,), generator=generator)
    ids = torch.randint(len(SPECIAL_IDS), vocab_size, (batch, max_length), generator=generator)
    positions = torch.arange(max_length)
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    mask = positions[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, PAD), mask


def synthetic_batch(config, batch: int, height: int, width: int, generator: torch.Generator, device):
    """A pre-training batch of random content with padded images of at most ``height x width``
    (each image keeps 75 to 100% of each side, so the pixel mask is exercised)."""
    from fastvlp.models import make_pretraining_batch

    images = torch.randn(batch, 3, height, width, generator=generator)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.bool)
    for index in range(batch):
        valid_h = int(height * (0.75 + 0.25 * torch.rand((), generator=generator)))
        valid_w = int(width * (0.75 + 0.25 * torch.rand((), generator=generator)))
        pixel_mask[index, :valid_h, :valid_w] = False
    images = images.masked_fill(pixel_mask[:, None], 0.0)
    input_ids, text_mask = _token_batch(batch, config.max_text_len, config.vocab_size, generator)
    caption_ids, caption_mask = _token_batch(batch, config.max_text_len, config.vocab_size, generator)
    targets = []
    for _ in range(batch):
        count = int(torch.randint(1, 21, (), generator=generator))
        centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        attributes = torch.rand(count, config.num_attributes, generator=generator) < 2.0 / max(config.num_attributes, 1)
        targets.append({"labels": torch.randint(0, config.num_classes, (count,), generator=generator),
                        "boxes": torch.cat([centers, sizes], dim=1), "attributes": attributes})
    pretraining = make_pretraining_batch(
        images, pixel_mask, input_ids, text_mask, special_token_ids=SPECIAL_IDS, mask_token_id=MASK,
        vocab_size=config.vocab_size, caption_ids=caption_ids, caption_attention_mask=caption_mask,
        targets=targets, generator=generator,
    )
    return pretraining.to(device)


RSS_SAMPLE_INTERVAL_S = 0.002


def resident_memory_reader() -> Optional[Callable[[], int]]:
    """A function that returns the process's resident set size in bytes: psutil's where installed, else
    Linux's ``/proc/self/statm``; None where neither can be read."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        process = psutil.Process()

        def read() -> int:
            return process.memory_info().rss
    else:
        def read() -> int:
            with open("/proc/self/statm", "rb") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # field 2: resident pages
    try:
        read()
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (macOS, Windows), no sysconf
        return None
    return read


class PeakResidentMemory:
    """Within ``with``: samples the resident set size every ``interval_s`` in a background thread and keeps
    the largest value (``peak``, bytes), the values on entering and leaving included."""

    def __init__(self, read: Callable[[], int], interval_s: float = RSS_SAMPLE_INTERVAL_S):
        self.read, self.interval_s = read, interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> "PeakResidentMemory":
        self.peak = self.read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def _release_free_heap() -> None:
    """Hand glibc's free heap pages back to the system, so that memory a previous contender freed but the C
    allocator kept does not count in the next contender's starting resident size. No-op off glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)




@contextmanager
def _timed_matcher(model, device, spent: List[float]):
    """Adds the matcher's wall time (synchronised) of every call to ``spent``: its ``forward`` (DETR's
    per-image matches) or its ``assign`` (the dense assignment the criterion asks the batched solver for),
    counting a call made inside another once."""
    matcher = model.criterion.matcher
    starts: List[float] = []

    def before(*_):
        _synchronize(device)
        starts.append(time.perf_counter())

    def after(*_):
        _synchronize(device)
        elapsed = (time.perf_counter() - starts.pop()) * 1e3
        if not starts:
            spent.append(elapsed)

    handles = [matcher.register_forward_pre_hook(before), matcher.register_forward_hook(after)]
    real_assign = getattr(matcher, "assign", None)
    if callable(real_assign):
        def timed_assign(*args, **kwargs):
            before()
            try:
                return real_assign(*args, **kwargs)
            finally:
                after()

        matcher.assign = timed_assign
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if callable(real_assign):
            del matcher.assign


def _step(model, optimizer, batch, amp: bool, device, marks: Optional[Dict[str, float]] = None) -> torch.Tensor:
    """One optimiser step; returns its loss (detached, on the device)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        output = model(batch)
    if marks is not None:
        _synchronize(device)
        marks["forward"] = time.perf_counter()  # the matcher runs inside the model's forward
    optimizer.zero_grad(set_to_none=True)
    output.loss.backward()
    if marks is not None:
        _synchronize(device)
        marks["backward"] = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.config.clip_max_norm)
    optimizer.step()
    _synchronize(device)
    return output.loss.detach()


def time_contender(model, batches, repeats: int, warmup: int, amp: bool, device,
                   profile_steps: int = 0, min_warmup_s: float = 0.0) -> Dict[str, object]:
    """Time ``model``'s training step on ``batches`` after at least ``warmup`` whole optimiser steps and
    ``min_warmup_s`` seconds of them: raw step times (ms), the warm-up's step count and first loss, the peak
    memory above the start (MiB: the allocator's on CUDA, the process's resident memory on the CPU, None
    where unreadable), each part's median (ms) and the backends; with ``profile_steps`` on CUDA, also the
    device time of the kernels of that many more steps by kind (:mod:`fastvlp.bench.step_profile`). Leaves
    ``model`` without gradients and drops its optimiser."""
    if warmup < 1:
        raise ValueError(f"warmup: expected at least 1 step (fastvlp's kernels compile and autotune on their "
                         f"first call), got {warmup}")
    cuda = device.type == "cuda"
    start_allocated = torch.cuda.memory_allocated(device) if cuda else 0
    read_rss = None if cuda else resident_memory_reader()
    if read_rss is not None:
        gc.collect()
        _release_free_heap()
        start_rss = read_rss()
    optimizer = build_optimizer(model)  # the trainer's optimizer: decay groups, fused where supported
    try:
        model.train()
        losses: List[float] = []

        def warm_step(index: int) -> None:
            loss = _step(model, optimizer, batches[index % len(batches)], amp, device)
            if index == 0:  # the same weights and batch for every contender: their losses should agree
                losses.append(float(loss))

        warmup_steps = warm_up(warm_step, warmup, min_warmup_s)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        totals = []
        # The CPU's resident memory is sampled only around the plain steps, as CUDA's peak is taken over them.
        sampler = PeakResidentMemory(read_rss) if read_rss is not None else nullcontext()
        with sampler:
            for index in range(repeats):
                start = time.perf_counter()
                _step(model, optimizer, batches[index % len(batches)], amp, device)
                totals.append((time.perf_counter() - start) * 1e3)
        peak = (torch.cuda.max_memory_allocated(device) - start_allocated) / 2**20 if cuda else None
        peak_rss = (sampler.peak - start_rss) / 2**20 if read_rss is not None else None

        parts: Dict[str, List[float]] = {"forward_with_matcher": [], "backward": [], "optimizer": [], "matcher": []}
        for index in range(repeats):
            matcher_ms: List[float] = []
            marks: Dict[str, float] = {}
            with _timed_matcher(model, device, matcher_ms):
                _synchronize(device)
                start = time.perf_counter()
                _step(model, optimizer, batches[index % len(batches)], amp, device, marks)
                end = time.perf_counter()
            parts["forward_with_matcher"].append((marks["forward"] - start) * 1e3)
            parts["backward"].append((marks["backward"] - marks["forward"]) * 1e3)
            parts["optimizer"].append((end - marks["backward"]) * 1e3)
            parts["matcher"].append(sum(matcher_ms))
        kernels = None
        if profile_steps > 0 and cuda:  # after the timed steps, so the profiler's cost stays out of them
            from fastvlp.bench.step_profile import profile_steps as profile

            kernels = profile(lambda index: _step(model, optimizer, batches[index % len(batches)], amp, device),
                              profile_steps)
    finally:
        # Free this contender's gradients and optimiser state before the next contender is measured.
        model.zero_grad(set_to_none=True)
        del optimizer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {"raw_ms": totals, "warmup_steps": warmup_steps, "first_step_loss": losses[0],
            "peak_memory_above_start_mb": peak, "peak_rss_above_start_mb": peak_rss,
            "stages": {name: summarize(values)["median_ms"] for name, values in parts.items()},
            "stages_raw_ms": parts, "matcher_check_finite": model.criterion.matcher.check_finite,
            "backends": model.backend_report(), "kernel_profile": kernels}


def memory_column(device) -> str:
    """The row field that holds the peak memory on ``device``: the allocator's on CUDA, resident memory elsewhere."""
    return "peak_memory_above_start_mb" if torch.device(device).type == "cuda" else "peak_rss_above_start_mb"




def describe_row(row: Dict[str, object], device: torch.device) -> str:
    """One printed line: step time, images/s, peak memory, the parts, and whether the timings had settled."""
    memory = row[memory_column(device)]
    kind = "allocated" if device.type == "cuda" else "resident"
    return (f"  {row['contender']:<12} {row['median_ms']:9.1f} ms/step  {row['images_per_s']:7.1f} images/s  "
            + ("" if memory is None else f"{kind} peak +{memory:.1f} MiB  ")
            + "  ".join(f"{name} {value:.1f}" for name, value in row["stages"].items())
            + unsettled_rows_note([row]))


def _print_profile(row: Dict[str, object]) -> None:
    """Print a row's kernel profile and add its speed-up ceiling to it."""
    from fastvlp.bench.step_profile import attention_bound, format_profile

    print("\n".join(format_profile(row["contender"], row["kernel_profile"])))
    attention_ms = row["kernel_profile"]["device_ms_per_step"]["attention"]
    row["speedup_bound_without_attention_and_matcher"] = attention_bound(
        row["median_ms"], attention_ms, row["stages"]["matcher"])
    print(f"    with its attention kernels ({attention_ms:.1f} ms) and matcher ({row['stages']['matcher']:.1f} ms) "
          f"free, this step could be at most {row['speedup_bound_without_attention_and_matcher']:.2f}x faster")
    # Below 1, the device waits on the host for the rest of the step (launches, synchronisations, Python).
    row["device_busy_fraction"] = row["kernel_profile"]["device_ms_per_step_total"] / row["median_ms"]
    print(f"    the device ran kernels for {100 * row['device_busy_fraction']:.0f}% of the timed step")


TORCHVISION_BACKBONE = "torch-scipy-torchvision-backbone"


def as_trainer_builds(model, batches):
    """``batches`` as ``fastvlp pretrain`` hands them to ``model``: with the batched solver, targets padded
    beforehand to each batch's own largest count and no per-image dicts; DETR's per-image targets otherwise."""
    if model.criterion.matcher.backend != "fastvlp":
        return batches
    return [dataclasses.replace(model.static_batch(batch, None), targets=None) for batch in batches]


def as_torchvision_backbone(model):
    """``model`` (changed in place) with its ResNet run as torchvision's own modules run it: in the default
    NCHW layout on every device, and with torchvision's ``FrozenBatchNorm2d``, whose float32 scale turns
    half-precision activations into float32 under autocast. The row it gives measures what fastvlp's
    backbone layout and batch norm save in the step."""
    import torchvision

    from fastvlp.nn.frozen_batch_norm import FrozenBatchNorm2d

    model.backbone.layout = torch.contiguous_format
    for module in model.backbone.modules():
        if type(module) is FrozenBatchNorm2d:
            module.__class__ = torchvision.ops.FrozenBatchNorm2d  # same buffers: only forward differs
    return model


def run(preset: str = "tiny", batch_size: int = 8, image_size=(128, 128), repeats: int = 5, warmup: int = 2,
        device: str = "cpu", amp: bool = False, seed: int = 0, profile_steps: int = 0,
        torchvision_backbone: bool = False, cuda_graph: bool = False) -> List[Dict[str, object]]:
    """One row per contender, fastvlp's first, then torch/scipy, then with ``torchvision_backbone`` torch/scipy
    again with :func:`as_torchvision_backbone`, then with ``cuda_graph`` (CUDA only) fastvlp's step captured in
    a CUDA graph (:mod:`fastvlp.bench.captured_train_step`). Each records its first step's loss and, from the
    second contender on, how far that is from the first contender's (same weights, same batch)."""
    from fastvlp.models import E2EVLP, get_preset

    device = torch.device(device)
    torch.manual_seed(seed)
    config = get_preset(preset, attention_backend="fastvlp", matcher_backend="fastvlp")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph: a CUDA graph needs a CUDA device, got {device}")
    fast = E2EVLP(config).to(device)
    initial = copy.deepcopy(fast.state_dict())
    baseline = E2EVLP(config.replace(attention_backend="torch", matcher_backend="scipy")).to(device)
    baseline.load_state_dict(initial)
    contenders = [("fastvlp", fast), ("torch-scipy", baseline)]
    if torchvision_backbone:
        plain = E2EVLP(config.replace(attention_backend="torch", matcher_backend="scipy")).to(device)
        plain.load_state_dict(initial)
        contenders.append((TORCHVISION_BACKBONE, as_torchvision_backbone(plain)))
    if cuda_graph:
        graphed = E2EVLP(config).to(device)
        graphed.load_state_dict(initial)
        contenders.append((CUDA_GRAPH, graphed))
    generator = torch.Generator().manual_seed(seed)
    batches = [synthetic_batch(config, batch_size, *image_size, generator, device) for _ in range(2)]
    rows = []
    shape = f"{preset} B{batch_size} {image_size[0]}x{image_size[1]}"
    spin_up(device)  # before the first contender, which would otherwise be timed while the GPU's clocks rise
    for contender, model in contenders:
        if contender == CUDA_GRAPH:
            try:
                measured = time_captured(model, static_batches(model, batches), repeats, warmup, amp, device,
                                         min_warmup_seconds(device))
            except Exception as error:  # reported, never dropped; the eager rows stand
                traceback.print_exc()
                rows.append(unavailable_row("train-step", contender, shape, f"failed: {type(error).__name__}: {error}",
                                            device=device.type, amp=amp, batch_size=batch_size, stages={}))
                print(f"  {contender:<12} failed: {type(error).__name__}: {error}")
                continue
        else:
            measured = time_contender(model, as_trainer_builds(model, batches), repeats, warmup, amp, device,
                                      profile_steps, min_warmup_seconds(device))
        row = result_row("train-step", contender, shape, measured.pop("raw_ms"), device=device.type, amp=amp,
                         batch_size=batch_size, **measured)
        row["images_per_s"] = batch_size / (row["median_ms"] / 1e3)
        # Dropout (paper presets) and bf16 make the losses differ somewhat; a large difference is a bug.
        row["first_step_loss_diff_to_first_contender"] = (
            abs(row["first_step_loss"] - rows[0]["first_step_loss"]) if rows else None)
        rows.append(row)
        print(describe_row(row, device))
        if row["kernel_profile"] is not None:
            _print_profile(row)
    return rows


# The backbone downsamples 32 times, and training batch norm (``tiny``) needs more than one value per channel
# even at batch size 1: 64 leaves its last stage 2x2.
MIN_IMAGE_SIDE = 64


def parse_image_size(text: str):
    """``HxW`` -> (height, width); ValueError unless both are integers of at least :data:`MIN_IMAGE_SIDE`."""
    from fastvlp.cli import parse_height_width

    height, width = parse_height_width(text)
    if height < MIN_IMAGE_SIDE or width < MIN_IMAGE_SIDE:
        raise ValueError(text)
    return height, width




def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    from fastvlp.models.presets import PRESETS

    parser = argparse.ArgumentParser(prog="fastvlp bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", default="128x128", help="HxW of the padded batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (from 6 on, rows get a drift figure)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed optimiser steps per contender, at least 1 (on a GPU, for at least "
                             f"{MIN_CUDA_WARMUP_S:g} s as well)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for both contenders")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="on CUDA, profile this many more steps per contender: kernel time by kind")
    parser.add_argument("--torchvision-backbone", action="store_true",
                        help=f"add a {TORCHVISION_BACKBONE} row: torch/scipy with the ResNet in NCHW and "
                             "torchvision's FrozenBatchNorm2d (float32 outputs under autocast)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help=f"add a {CUDA_GRAPH} row: fastvlp's step captured once in a CUDA graph and replayed")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        parser.error("--cuda-graph needs a CUDA device")
    if args.profile_steps < 0:
        parser.error("--profile-steps must be >= 0")
    try:
        height, width = parse_image_size(args.image_size)
    except ValueError:
        parser.error(f"--image-size must look like 800x1333, sides of at least {MIN_IMAGE_SIDE}, "
                     f"got {args.image_size!r}")
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be >= 1")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1: fastvlp's kernels compile and autotune on their first call, "
                     "which the warm-up keeps out of the timing")
    problem = device_error(args.device)
    if problem:
        parser.error(problem)
    print(f"training step, {args.preset}, batch {args.batch_size}, {height}x{width}, on {device_name(args.device)}:")
    if args.repeats < 6:
        print(f"  ({args.repeats} repeats: too few for a drift figure, so unsettled rows cannot be told)")
    rows = run(args.preset, args.batch_size, (height, width), args.repeats, args.warmup, args.device, args.amp,
               profile_steps=args.profile_steps, torchvision_backbone=args.torchvision_backbone,
               cuda_graph=args.cuda_graph)
    speedup = rows[1]["median_ms"] / rows[0]["median_ms"]
    print(f"fastvlp step vs torch/scipy step: {speedup:.2f}x" + unsettled_rows_note(rows[:2])
          + f"; first-step losses differ by {rows[1]['first_step_loss_diff_to_first_contender']:.3g}")
    if args.torchvision_backbone:
        print(f"torch/scipy step with fastvlp's backbone vs torchvision's: "
              f"{rows[2]['median_ms'] / rows[1]['median_ms']:.2f}x" + unsettled_rows_note(rows[1:3]))
    if args.cuda_graph and rows[-1]["median_ms"] is not None:
        print(f"fastvlp step captured in a CUDA graph vs torch/scipy step: "
              f"{rows[1]['median_ms'] / rows[-1]['median_ms']:.2f}x"
              + unsettled_rows_note([rows[1], rows[-1]]))
    path = write_results("train_step", rows, device_name(args.device), args.out_dir,
                         extra={"preset": args.preset, "image_size": f"{height}x{width}", "amp": args.amp,
                                "repeats": args.repeats, "warmup": args.warmup,
                                "min_warmup_s": min_warmup_seconds(torch.device(args.device)),
                                "profile_steps": args.profile_steps,
                                "torchvision_backbone": args.torchvision_backbone, "cuda_graph": args.cuda_graph},
                         table_columns=("contender", "shape", "median_ms", "p10_ms", "p90_ms", "drift", "images_per_s",
                                        memory_column(args.device), "first_step_loss",
                                        "first_step_loss_diff_to_first_contender", "stages"))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
