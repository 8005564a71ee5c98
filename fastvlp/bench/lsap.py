"""Batched linear assignment against its peers, on the shapes of DETR-style set losses.

CPU contenders (float32, each call on a fresh batch from a pool):
scipy called per problem; lapx's ``lapjvr_batch`` with 1 and 2 threads; ``lap.lapjv``
(lapx's copy) with ``extend_cost``, looped; the square-only ``lapjv`` looped over
problems padded to square; fastvlp with 1 and 2 threads, and with every core where there are more.

CUDA contenders (when a GPU is present): fastvlp's CUDA solver (device time, results
left on the GPU) with ``check_finite=True``, the default and what the model runs (a host
sync checks the costs), and with ``check_finite=False`` (no sync) as a separately named
row; ``torch-linear-assignment``, ``torch-lap-cuda`` (padded to square), and DETR's path
(``.cpu()`` then scipy per problem); plus one matcher call and the six matcher calls of a
six-layer DETR step, fastvlp (both settings, the default one named plainly) against DETR's
host path. Every row records its ``check_finite``. DETR's path here returns the matches on
the device, as fastvlp's does: one small host-to-device copy per image and index tensor.

Every fastvlp solver's answer, on the CPU and on CUDA, is checked once per shape against
scipy's optimum (each problem of one batch: as many matches as the smaller side, distinct
columns, the same total cost), and so are the fastvlp matcher's matches against the cost it
matched on; a row that fails gets a ``wrong result`` status (CPU variants are then left out
of the speed-up summary) and the command exits with 1. A peer that is not installed, or
rejects a shape, is reported with the reason.

The defaults are 15 timed calls after 3 warm-up calls on the CPU, and 30 after 5 on CUDA
(where the warm-up also lasts at least ``MIN_CUDA_WARMUP_S`` seconds); ``--repeats`` and
``--warmup`` replace both as given.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastvlp.bench.common import (
    MIN_CUDA_WARMUP_S, device_name, result_row, time_cuda_calls, time_host_calls, unavailable_row, write_results,
)

# (batch, rows, cols): queries x targets, as the matcher sees them.
SHAPES: Tuple[Tuple[int, int, int], ...] = ((32, 100, 20), (64, 100, 50), (32, 100, 100), (32, 300, 100), (32, 900, 50))
# (repeats, warmup) where the command line gives none.
CPU_DEFAULTS = (15, 3)
CUDA_DEFAULTS = (30, 5)
WRONG_RESULT = "wrong result: not an optimal assignment"


def shape_label(shape: Tuple[int, int, int]) -> str:
    return f"{shape[0]}x{shape[1]}x{shape[2]}"


def make_pool(shape: Tuple[int, int, int], size: int, seed: int = 0) -> List[np.ndarray]:
    """``size`` distinct float32 batches, so that no call can reuse another's input."""
    generator = np.random.default_rng(seed)
    return [generator.random(shape, dtype=np.float32) for _ in range(size)]


def _solve_scipy_loop(batch: np.ndarray) -> None:
    from scipy.optimize import linear_sum_assignment

    for matrix in batch:
        linear_sum_assignment(matrix)


def _cpu_contenders(max_threads: int) -> Dict[str, Optional[Callable[[np.ndarray], object]] | str]:
    """name -> callable on a numpy batch, or the reason it is unavailable."""
    from fastvlp.ops.lsap import batched_linear_sum_assignment

    contenders: Dict[str, object] = {"scipy-loop": _solve_scipy_loop}
    try:
        import lap

        for threads in (1, 2):
            contenders[f"lapx-lapjvr_batch-{threads}t"] = (
                lambda batch, threads=threads: lap.lapjvr_batch(batch, extend_cost=True, return_cost=False, n_threads=threads)
            )
        contenders["lap-lapjv-extend-loop"] = lambda batch: [lap.lapjv(m, extend_cost=True, return_cost=False) for m in batch]
    except ImportError as error:
        for name in ("lapx-lapjvr_batch-1t", "lapx-lapjvr_batch-2t", "lap-lapjv-extend-loop"):
            contenders[name] = f"missing: {error}"
    try:
        from lapjv import lapjv as square_lapjv

        def padded_loop(batch: np.ndarray) -> None:
            side = max(batch.shape[1], batch.shape[2])
            for matrix in batch:
                # A constant pad keeps the optimum of the real rows and columns.
                square = np.zeros((side, side), dtype=matrix.dtype)
                square[: matrix.shape[0], : matrix.shape[1]] = matrix
                square_lapjv(square)

        contenders["lapjv-square-padded-loop"] = padded_loop
    except ImportError as error:
        contenders["lapjv-square-padded-loop"] = f"missing: {error}"
    for threads in sorted({1, 2, max_threads}):
        contenders[f"fastvlp-{threads}t"] = (
            lambda batch, threads=threads: batched_linear_sum_assignment(torch.from_numpy(batch), num_threads=threads)
        )
    return contenders


def assignment_is_optimal(batch: np.ndarray, assignment) -> bool:
    """Whether a ``[B, rows]`` row-to-column assignment (-1 = unmatched) solves every problem of
    ``batch``: as many matches as the smaller side, no column used twice, and scipy's optimal total cost.
    A benchmark of a wrong solver is worthless."""
    from scipy.optimize import linear_sum_assignment

    assignment = np.asarray(assignment.numpy() if isinstance(assignment, torch.Tensor) else assignment)
    if assignment.shape != batch.shape[:2]:
        return False
    for matrix, columns in zip(batch.astype(np.float64), assignment):
        rows = np.flatnonzero(columns >= 0)
        chosen = columns[rows]
        if len(rows) != min(matrix.shape) or len(np.unique(chosen)) != len(chosen) or chosen.max(initial=-1) >= matrix.shape[1]:
            return False
        expected_rows, expected_cols = linear_sum_assignment(matrix)
        if not np.isclose(matrix[rows, chosen].sum(), matrix[expected_rows, expected_cols].sum(), rtol=1e-6):
            return False
    return True


def check_solver(solve: Callable[[object], object], cost) -> Dict[str, object]:
    """``optimal``: whether ``solve(cost)`` (a numpy batch or a tensor on any device) returns an optimal
    assignment of every problem of ``cost``; with a ``wrong result`` status where it does not."""
    answer = solve(cost)
    host_cost = cost.cpu().numpy() if isinstance(cost, torch.Tensor) else cost
    optimal = assignment_is_optimal(host_cost, answer.cpu() if isinstance(answer, torch.Tensor) else answer)
    return {"optimal": True} if optimal else {"optimal": False, "status": WRONG_RESULT}


def _status_note(extra: Dict[str, object]) -> str:
    return f"  {extra['status']}" if "status" in extra else ""


def run_cpu(shapes: Sequence[Tuple[int, int, int]] = SHAPES, repeats: int = 15, warmup: int = 3,
            max_threads: Optional[int] = None, progress: bool = True) -> List[Dict[str, object]]:
    max_threads = max_threads or os.cpu_count() or 1
    rows: List[Dict[str, object]] = []
    for shape in shapes:
        pool = make_pool(shape, repeats + warmup)
        label = shape_label(shape)
        for name, contender in _cpu_contenders(max_threads).items():
            if isinstance(contender, str):
                rows.append(unavailable_row("lsap-cpu", name, label, contender))
                continue
            raw = time_host_calls(lambda index: contender(pool[index % len(pool)]), repeats, warmup)
            extra = {"device": "cpu", "dtype": "float32"}
            if name.startswith("fastvlp"):  # this variant's own answer (thread count included) is checked
                extra.update(check_solver(contender, pool[0]))
            rows.append(result_row("lsap-cpu", name, label, raw, **extra))
            if progress:
                print(f"  {label:>12} {name:<26} {rows[-1]['median_ms']:9.3f} ms" + _status_note(extra))
    return rows


def _cuda_pool(shape, size, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    return [torch.rand(shape, generator=generator, device=device) for _ in range(size)]


# Each solver row's check_finite: fastvlp's two settings, and None for peers that have no such switch.
GPU_CHECK_FINITE = {"fastvlp-cuda": True, "fastvlp-cuda-unchecked": False}


def _gpu_contenders() -> Dict[str, object]:
    """name -> callable on a cost tensor, or the reason it is unavailable. ``fastvlp-cuda`` is the
    library's default (``check_finite=True``), which the model runs; ``fastvlp-cuda-unchecked`` skips the
    check and its host sync."""
    from fastvlp.ops.lsap import batched_linear_sum_assignment

    contenders: Dict[str, object] = {
        "fastvlp-cuda": lambda cost: batched_linear_sum_assignment(cost, check_finite=True),
        "fastvlp-cuda-unchecked": lambda cost: batched_linear_sum_assignment(cost, check_finite=False),
        "detr-host-scipy-loop": lambda cost: _solve_scipy_loop(cost.cpu().numpy()),
    }
    try:
        from torch_linear_assignment import batch_linear_assignment

        contenders["torch-linear-assignment"] = batch_linear_assignment
    except ImportError as error:
        contenders["torch-linear-assignment"] = f"missing: {error}"
    try:
        from torch_lap_cuda import solve_lap

        def padded(cost: torch.Tensor):
            side = max(cost.shape[1], cost.shape[2])
            square = cost.new_zeros((cost.shape[0], side, side))
            square[:, : cost.shape[1], : cost.shape[2]] = cost
            return solve_lap(square)

        contenders["torch-lap-cuda-square-padded"] = padded
    except ImportError as error:
        contenders["torch-lap-cuda-square-padded"] = f"missing: {error}"
    return contenders


def run_cuda(shapes: Sequence[Tuple[int, int, int]] = SHAPES, repeats: int = 30, warmup: int = 5,
             progress: bool = True) -> List[Dict[str, object]]:
    device = torch.device("cuda")
    rows: List[Dict[str, object]] = []
    for shape in shapes:
        pool = _cuda_pool(shape, repeats + warmup, device)
        label = shape_label(shape)
        for name, contender in _gpu_contenders().items():
            if isinstance(contender, str):
                rows.append(unavailable_row("lsap-cuda", name, label, contender))
                continue
            try:
                raw = time_cuda_calls(lambda index: contender(pool[index % len(pool)]), repeats, warmup)
            except Exception as error:  # a peer that rejects the shape is reported, not dropped
                rows.append(unavailable_row("lsap-cuda", name, label, f"rejected: {error}"))
                continue
            checked = check_solver(contender, pool[0]) if name in GPU_CHECK_FINITE else {}  # fastvlp's rows
            rows.append(result_row("lsap-cuda", name, label, raw, device="cuda", dtype="float32",
                                   check_finite=GPU_CHECK_FINITE.get(name), **checked))
            if progress:
                print(f"  {label:>12} {name:<30} {rows[-1]['median_ms']:9.3f} ms" + _status_note(checked))
    rows.extend(run_matcher(repeats=repeats, warmup=warmup, progress=progress))
    return rows


def _detr_outputs(batch: int, queries: int, classes: int, max_targets: int, layers: int, device, seed: int):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    counts = torch.randint(0, max_targets + 1, (batch,), generator=generator).tolist()
    targets = [
        {"labels": torch.randint(0, classes, (count,), generator=generator).to(device),
         "boxes": torch.cat([torch.rand(count, 2, generator=generator) * 0.6 + 0.2,
                             torch.rand(count, 2, generator=generator) * 0.3 + 0.05], dim=1).to(device)}
        for count in counts
    ]
    layer_outputs = [
        {"pred_logits": torch.randn(batch, queries, classes + 1, device=device),
         "pred_boxes": torch.rand(batch, queries, 4, device=device) * 0.5 + 0.25}
        for _ in range(layers)
    ]
    return layer_outputs, targets


# (row contender, matcher backend, check_finite): the default-configured fastvlp matcher, which is what
# E2EVLP builds, is named plainly; scipy's path raises on NaN whatever check_finite says.
MATCHER_CONTENDERS = (
    ("matcher-fastvlp", "fastvlp", True),
    ("matcher-fastvlp-unchecked", "fastvlp", False),
    ("matcher-detr-host-scipy", "scipy", True),
)


def matches_are_optimal(matcher, outputs, targets) -> bool:
    """Whether ``matcher``'s matches of one layer's ``outputs`` to ``targets`` are, image by image, optimal
    assignments of the cost it matches on (:func:`assignment_is_optimal`)."""
    from fastvlp.ops.matching_cost import matching_cost, pad_targets

    labels, boxes, _ = pad_targets([target["labels"] for target in targets], [target["boxes"] for target in targets],
                                   outputs["pred_logits"].device)
    cost = matching_cost(outputs["pred_logits"], outputs["pred_boxes"], labels, boxes, matcher.cost_class,
                         matcher.cost_bbox, matcher.cost_giou).cpu().numpy()
    for image, (rows, cols) in enumerate(matcher(outputs, targets)):
        assignment = np.full((1, cost.shape[1]), -1, dtype=np.int64)
        assignment[0, rows.cpu().numpy()] = cols.cpu().numpy()
        if not assignment_is_optimal(cost[image:image + 1, :, :len(targets[image]["labels"])], assignment):
            return False
    return True


def check_matcher(matcher, layer_outputs, targets) -> Dict[str, object]:
    """``optimal``: whether ``matcher``'s matches are optimal for every layer of one pool entry; with a
    ``wrong result`` status where they are not."""
    optimal = all(matches_are_optimal(matcher, layer, targets) for layer in layer_outputs)
    return {"optimal": True} if optimal else {"optimal": False, "status": WRONG_RESULT}


def run_matcher(batch: int = 32, queries: int = 100, classes: int = 1601, max_targets: int = 50,
                repeats: int = 30, warmup: int = 5, progress: bool = True, device: str = "cuda",
                pool_size: Optional[int] = None) -> List[Dict[str, object]]:
    """One matcher call, and the six calls of a six-layer step (final + five auxiliary), for each entry
    of :data:`MATCHER_CONTENDERS`. Each timed call takes fresh outputs and targets from a pool of
    ``pool_size`` (default ``repeats + warmup``). Device time on CUDA, host time elsewhere. The fastvlp
    matchers' matches of the pool's first entry are checked (:func:`check_matcher`)."""
    from fastvlp.nn.matcher import HungarianMatcher

    device = torch.device(device)
    timer = time_cuda_calls if device.type == "cuda" else time_host_calls
    rows = []
    pools = [_detr_outputs(batch, queries, classes, max_targets, 6, device, seed)
             for seed in range(pool_size or repeats + warmup)]
    shape = f"B{batch}xQ{queries}xT<={max_targets}"
    for contender, backend, check_finite in MATCHER_CONTENDERS:
        matcher = HungarianMatcher(1, 5, 2, backend=backend, check_finite=check_finite)
        checked = check_matcher(matcher, *pools[0]) if backend == "fastvlp" else {}
        for layers, name in ((1, "matcher-call"), (6, "matcher-six-layer-step")):
            def call(index, layers=layers):
                outputs, targets = pools[index % len(pools)]
                for layer in outputs[:layers]:
                    matcher(layer, targets)

            raw = timer(call, repeats, warmup)
            rows.append(result_row(name, contender, shape, raw, device=device.type, layers=layers,
                                   backend=backend, check_finite=check_finite if backend == "fastvlp" else None,
                                   **checked))
            if progress:
                print(f"  {name:<24} {contender:<26} {rows[-1]['median_ms']:9.3f} ms" + _status_note(checked))
    return rows


def run_matcher_cuda(**kwargs) -> List[Dict[str, object]]:
    """:func:`run_matcher` on the GPU."""
    return run_matcher(device="cuda", **kwargs)


def has_wrong_result(rows: Sequence[Dict[str, object]]) -> bool:
    return any(str(row.get("status", "")).startswith("wrong result") for row in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fastvlp bench lsap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="cpu: CPU contenders only; cuda: GPU contenders only; all: both where a GPU exists")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed calls per row (default {CPU_DEFAULTS[0]} on the CPU, {CUDA_DEFAULTS[0]} on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed calls per row (default {CPU_DEFAULTS[1]} on the CPU, {CUDA_DEFAULTS[1]} on "
                             f"CUDA, where the warm-up also lasts at least {MIN_CUDA_WARMUP_S:g} s)")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0):
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    status = 0

    if args.device in ("cpu", "all"):
        repeats, warmup = _chosen(args, CPU_DEFAULTS)
        print(f"lsap on the CPU ({device_name('cpu')}), float32, medians of {repeats}:")
        rows = run_cpu(repeats=repeats, warmup=warmup)
        path = write_results("lsap", rows, device_name("cpu"), args.out_dir,
                             extra={"threads": os.cpu_count(), "repeats": repeats, "warmup": warmup})
        print(f"wrote {path} and {path.with_suffix('.md')}")
        print(speedup_summary(rows))
        if has_wrong_result(rows):
            print("FAILED: a fastvlp variant's assignment was not optimal (rows marked 'wrong result')")
            status = 1
    if args.device in ("cuda", "all"):
        if not torch.cuda.is_available():
            print("no CUDA GPU: skipped the CUDA contenders")
            return status
        repeats, warmup = _chosen(args, CUDA_DEFAULTS)
        print(f"lsap on {device_name('cuda')}, medians of {repeats}:")
        rows = run_cuda(repeats=repeats, warmup=warmup)
        path = write_results("lsap", rows, device_name("cuda"), args.out_dir,
                             extra={"repeats": repeats, "warmup": warmup, "min_warmup_s": MIN_CUDA_WARMUP_S},
                             table_columns=("name", "contender", "shape", "check_finite", "median_ms", "p10_ms",
                                            "p90_ms", "drift", "optimal"))
        print(f"wrote {path} and {path.with_suffix('.md')}")
        if has_wrong_result(rows):
            print("FAILED: a fastvlp CUDA solver or matcher answer was not optimal (rows marked 'wrong result')")
            status = 1
    return status


def _chosen(args, defaults: Tuple[int, int]) -> Tuple[int, int]:
    """(repeats, warmup): the command line's where given, else the device's defaults."""
    return (args.repeats if args.repeats is not None else defaults[0],
            args.warmup if args.warmup is not None else defaults[1])


def speedup_summary(rows: Sequence[Dict[str, object]]) -> str:
    """fastvlp's speed-ups over scipy and lapx, shape by shape, from one run's rows."""
    by_shape: Dict[str, Dict[str, float]] = {}
    for row in rows:
        if row["median_ms"] is not None and not row.get("status"):
            by_shape.setdefault(row["shape"], {})[row["contender"]] = row["median_ms"]
    lines = ["shape          vs scipy(1t)  vs lapx 1t  vs lapx 2t"]
    for shape, times in by_shape.items():
        one, two = times.get("fastvlp-1t"), times.get("fastvlp-2t")
        def ratio(peer, ours):
            return f"{times[peer] / ours:9.2f}x" if peer in times and ours else "        -"
        lines.append(f"{shape:<14} {ratio('scipy-loop', one)}  {ratio('lapx-lapjvr_batch-1t', one)}"
                     f"  {ratio('lapx-lapjvr_batch-2t', two)}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
