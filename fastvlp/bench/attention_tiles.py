"""Every candidate tile of each fused-attention kernel, timed one at a time on E2E-VLP's shapes (GPU).

``fastvlp bench attention`` times the kernels with the tiles autotuning picks. This benchmark shows the whole
field behind that choice: for each scenario of ``fastvlp bench attention`` (default E, X, D, C-cross, S and
C-self) at dropout 0 and 0.1, each of the three kernels runs with every candidate tile of its list in
``fastvlp.ops.fmha.kernel_config`` (autotuning restricted to that one tile) and as the library runs it
(autotuned). Each row records the time between CUDA events around one call, each call synchronised (so a
launch the GPU waits for counts), after a warm-up of at least ``--warmup`` calls and
``common.MIN_CUDA_WARMUP_S`` seconds. Each (scenario, dropout, kernel) group times its tiles and the autotuned
run in an order rotated by one per group (``timing_position``), so that none is always first; the rows keep
the tile list's order, the autotuned row last. The kernels:

* ``forward``: the forward kernel;
* ``backward-dq``: the dQ kernel, which also computes and stores ``delta = rowsum(O * dO)``;
* ``backward-dkdv``: the small delta kernel, then the dK/dV kernel (in a full backward the dQ kernel
  supplies delta instead; the delta kernel's launch is the same for every tile).

Rows say whether the autotuner's length pruning (``prune_forward`` or ``prune_by_length``) keeps the tile for
that shape (``kept_by_pruning``), so a best tile that autotuning never sees stands out; the autotuned row
names the tile it chose. Every row's result is checked against a float32 reference with the same dropout mask
(the kernels' Philox stream replayed in torch): the output for the forward, dQ and dK/dV for the backward
kernels; a row over the dtype's tolerance keeps its time but gets a ``wrong result`` status. A tile that does
not compile or launch (shared memory, registers) gets a row with the reason. The summary gives, per scenario,
dropout and kernel, the autotuned tile's time over the best tile's, and names any tile of the group whose
timings had not settled (``drift``, ``settled`` in the results).

``run`` also takes ``device="cpu"`` with ``TRITON_INTERPRET=1`` (host timings, small scenarios, the
interpreter's tile list or the ``tiles`` given) so that its bookkeeping can be tested without a GPU.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .attention import TOLERANCE, UNSETTLED_FOOTNOTE, reject_unknown, rotated, scenarios, unsettled_note
from .common import (
    device_name, error_reason, result_row, time_cuda_calls, time_host_calls, unavailable_row, unsettled, write_results,
)

KERNELS = ("forward", "backward-dq", "backward-dkdv")
DEFAULT_SCENARIOS = ("E", "X", "D", "C-cross", "S", "C-self")


def tile_name(config) -> str:
    """``"128x64 w4 s3"``: BLOCK_M x BLOCK_N, warps and pipeline stages of a ``triton.Config``, and
    ``" r168"`` after them for a tile capped at 168 registers a thread."""
    cap = f" r{config.maxnreg}" if getattr(config, "maxnreg", None) is not None else ""
    return f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}{cap}"


def _autotuned_kernels() -> Dict[str, object]:
    from fastvlp.ops.fmha import backward_kernels, forward_kernel

    return {"forward": forward_kernel.attention_forward_kernel,
            "backward-dq": backward_kernels.attention_backward_dq_kernel,
            "backward-dkdv": backward_kernels.attention_backward_dkdv_kernel}


def _reference(q, k, v, grad_out, mask, causal, dropout_p, seed):
    """Float32 output and (dq, dk, dv) of the call, with the kernels' own dropout mask."""
    from fastvlp.ops.fmha.dropout_rng import dropout_keep_mask_torch
    from fastvlp.ops.fmha.reference import attention_reference

    batch, query_length, heads, _ = q.shape
    keep = (dropout_keep_mask_torch(seed, batch, heads, query_length, k.shape[1], dropout_p)
            if dropout_p > 0 else None)
    inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        out = attention_reference(*inputs, key_padding_mask=mask, causal=causal, dropout_p=dropout_p,
                                  dropout_keep=keep)
        grads = torch.autograd.grad(out, inputs, grad_out.float())
    return out.detach(), [g.detach() for g in grads]


def _difference(found: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> tuple:
    """(max abs difference, scale of the expected values), as ``fastvlp bench attention`` measures them."""
    difference = max(float((a.float() - b).abs().max()) for a, b in zip(found, expected))
    return difference, max(1.0, max(float(b.abs().max()) for b in expected))


def _kernel_calls(q, k, v, grad_out, mask, causal, dropout_p, seed) -> Dict[str, Callable[[], tuple]]:
    """Each kernel's launch on fixed inputs, returning the tensors it computes. The backward launches
    read the forward's output and log-sum-exp, computed once here with the autotuned forward."""
    from fastvlp.ops.fmha.backward_kernels import attention_backward_triton
    from fastvlp.ops.fmha.forward_kernel import attention_forward_triton

    scale = 1.0 / math.sqrt(q.shape[-1])
    batch, query_length, heads, _ = q.shape
    out = torch.empty(batch, query_length, heads, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, query_length, device=q.device, dtype=torch.float32)

    def forward():
        attention_forward_triton(q, k, v, mask, seed, causal, dropout_p, scale, False, out, lse)
        return (out,)

    forward()
    saved_out, saved_lse = out.clone(), lse.clone()

    def backward(need_dq: bool):
        def call():
            grads = attention_backward_triton(grad_out, q, k, v, saved_out, saved_lse, mask, seed, causal,
                                              dropout_p, scale, False, need_dq=need_dq, need_dkdv=not need_dq)
            return tuple(g for g in grads if g is not None)
        return call

    return {"forward": forward, "backward-dq": backward(True), "backward-dkdv": backward(False)}


def _candidate_tiles(kernel: str, tiles) -> list:
    from fastvlp.ops.fmha.kernel_config import backward_configs, forward_configs

    if tiles is not None:
        return list(tiles)
    return list(forward_configs() if kernel == "forward" else backward_configs())


def _kept_by_pruning(kernel, candidates, q, k, causal, mask, dropout_p) -> set:
    """Names of the tiles ``kernel``'s pruning keeps for this call (float16/bfloat16: ``tf32`` dots)."""
    from fastvlp.ops.fmha.kernel_config import dot_precision, head_dim_block, length_bucket, prune_for

    named = dict(q_ptr=q, LQ_BUCKET=length_bucket(q.shape[1]), LK_BUCKET=length_bucket(k.shape[1]),
                 HEAD_DIM_BLOCK=head_dim_block(q.shape[-1]), DOT_PRECISION=dot_precision(q.dtype, False),
                 CAUSAL=causal, HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0)
    prune = prune_for("forward" if kernel == "forward" else "backward")
    return {tile_name(config) for config in prune(candidates, named)}


def run(names: Sequence[str] = DEFAULT_SCENARIOS, dropouts: Sequence[float] = (0.0, 0.1), repeats: int = 20,
        warmup: int = 5, dtype: torch.dtype = torch.float16, kernels: Sequence[str] = KERNELS,
        device: str = "cuda", scenario_list: Optional[Sequence[Dict[str, object]]] = None, tiles=None,
        progress: bool = True,
        after_scenario: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> List[Dict[str, object]]:
    """Time every candidate tile of each kernel in ``kernels`` on each scenario; returns result rows.
    ``tiles`` replaces every kernel's candidate list (tests); ``scenario_list`` replaces
    :func:`fastvlp.bench.attention.scenarios`."""
    from fastvlp.ops.fmha.dropout_rng import draw_dropout_seed
    from fastvlp.ops.fmha.launcher import only_tile

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats/warmup: expected >= 1 and >= 0, got {repeats} and {warmup}")
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise ValueError(f"kernels: unknown {sorted(unknown)}; expected names from {list(KERNELS)}")
    if any(not 0.0 <= p < 1.0 for p in dropouts):
        raise ValueError(f"dropouts: expected probabilities in [0, 1), got {list(dropouts)}")
    cuda = torch.device(device).type == "cuda"
    timer = time_cuda_calls if cuda else time_host_calls
    autotuned = _autotuned_kernels()
    rows: List[Dict[str, object]] = []
    groups = 0  # (scenario, dropout, kernel) groups timed so far
    for scenario in (scenario_list if scenario_list is not None else scenarios()):
        if names and scenario["name"] not in names:
            continue
        mask = None if scenario["mask"] is None else scenario["mask"].to(device)
        causal = scenario["causal"]
        generator = torch.Generator(device=device).manual_seed(0)

        def draw(length):
            return torch.randn(scenario["batch"], length, scenario["heads"], scenario["head_dim"], device=device,
                               dtype=dtype, generator=generator)

        q, k, v = draw(scenario["query_length"]), draw(scenario["key_length"]), draw(scenario["key_length"])
        grad_out = torch.randn(q.shape, device=device, dtype=dtype, generator=generator)
        shape = (f"B{scenario['batch']} H{scenario['heads']} D{scenario['head_dim']} "
                 f"{scenario['query_length']}x{scenario['key_length']}")
        for dropout_p in dropouts:
            torch.manual_seed(0)
            seed = draw_dropout_seed(device) if dropout_p > 0 else None
            expected_out, expected_grads = _reference(q, k, v, grad_out, mask, causal, dropout_p, seed)
            expected = {"forward": [expected_out], "backward-dq": expected_grads[:1],
                        "backward-dkdv": expected_grads[1:]}
            calls = _kernel_calls(q, k, v, grad_out, mask, causal, dropout_p, seed)
            for kernel in kernels:
                candidates = _candidate_tiles(kernel, tiles)
                kept = _kept_by_pruning(kernel, candidates, q, k, causal, mask, dropout_p)
                runs = [(tile_name(config), config) for config in candidates] + [("autotuned", None)]
                timed = {}
                # A rotated order per group, so that no tile (nor the autotuned run) is always timed first.
                for position, index in enumerate(rotated(range(len(runs)), groups)):
                    tile, config = runs[index]
                    label = dict(kernel=kernel, tile=tile, dropout_p=dropout_p, dtype=str(dtype).replace("torch.", ""),
                                 timing_position=position)
                    if config is not None:
                        label["kept_by_pruning"] = tile in kept
                    timed[index] = _time_one(scenario["name"], shape, label, calls[kernel], expected[kernel], timer,
                                             repeats, warmup, dtype, autotuned[kernel], config, only_tile)
                    if progress:
                        _print_row(scenario["name"], timed[index])
                rows += [timed[index] for index in range(len(runs))]
                groups += 1
        if after_scenario is not None:
            after_scenario(rows)
    return rows


def _print_row(name: str, row: Dict[str, object]) -> None:
    time_text = f"{row['median_ms']:8.3f} ms" if row.get("median_ms") is not None else "   -    "
    print(f"  {name:<8} p={row['dropout_p']:<4} {row['kernel']:<14} {row['tile']:<26} {time_text}"
          + (f"  {row['status'][:80]}" if row.get("status") else "")
          + (f"  unsettled (drift {row['drift']:.2f})" if unsettled(row) else ""), flush=True)


def _time_one(name, shape, label, call, expected, timer, repeats, warmup, dtype, kernel, config, only_tile):
    """One row: the kernel restricted to ``config`` (None: autotuned as the library runs it)."""
    import contextlib

    restriction = contextlib.nullcontext() if config is None else only_tile(kernel, config)
    try:
        with restriction:
            found = call()
            if config is None:  # the tile autotuning chose for this call
                label["tile"] = f"autotuned: {tile_name(kernel.best_config)}"
            difference, scale = _difference(found, expected)
            timings = timer(lambda _: call(), repeats=repeats, warmup=warmup)
    except Exception as error:  # a tile that does not compile or launch is reported, not dropped
        return unavailable_row(name, "fastvlp", shape, error_reason(error), **label)
    row = result_row(name, "fastvlp", shape, timings, max_abs_diff_vs_reference=difference, **label)
    tolerance = TOLERANCE.get(dtype, 1e-3) * scale
    if not difference <= tolerance:  # also catches NaN
        row["status"] = f"wrong result: max_abs_diff_vs_reference {difference:.3g} > {tolerance:.3g}"
    return row


def tile_summary(rows: Sequence[Dict[str, object]]) -> str:
    """Per scenario, dropout and kernel: the best tile's time and the autotuned one's, and their ratio
    (above 1: autotuning left time on the table). Rows with a status or no time are left out; a ratio
    whose group holds a tile whose timings had not settled names it at the line's end."""
    groups: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for row in rows:
        if row.get("median_ms") is None or row.get("status"):
            continue
        groups.setdefault((row["name"], row["dropout_p"], row["kernel"]), {})[row["tile"]] = row
    lines = ["scenario  p     kernel          best tile (ms)                  autotuned tile (ms)              "
             "autotuned/best"]
    for (name, dropout_p, kernel), group in groups.items():
        swept = {tile: row["median_ms"] for tile, row in group.items() if not tile.startswith("autotuned")}
        chosen = [tile for tile in group if tile.startswith("autotuned")]
        if not swept or not chosen:
            continue
        best = min(swept, key=swept.get)
        tuned = group[chosen[0]]["median_ms"]
        lines.append(f"{name:<9} {dropout_p:<5} {kernel:<15} {best:<16} {swept[best]:9.3f}   "
                     f"{chosen[0][len('autotuned: '):]:<16} {tuned:9.3f}     {tuned / swept[best]:6.2f}"
                     + unsettled_note(group.values(), name_key="tile"))
    if any("  unsettled: " in line for line in lines):
        lines.append(UNSETTLED_FOOTNOTE)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastvlp.bench.attention_tiles",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="*", default=list(DEFAULT_SCENARIOS),
                        help="subset of E X S C-self C-cross standard")
    parser.add_argument("--kernels", nargs="*", default=list(KERNELS), help=f"subset of {' '.join(KERNELS)}")
    parser.add_argument("--dropouts", nargs="*", type=float, default=[0.0, 0.1])
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats must be >= 1 and --warmup >= 1 (each tile compiles in its first call)")
    reject_unknown(parser, "--kernels", args.kernels, KERNELS)
    reject_unknown(parser, "--scenarios", args.scenarios, [scenario["name"] for scenario in scenarios()])
    if any(not 0.0 <= p < 1.0 for p in args.dropouts):
        parser.error(f"--dropouts: expected probabilities in [0, 1), got {args.dropouts}")
    if not torch.cuda.is_available():
        parser.error("the attention tile sweep needs a CUDA GPU")
    device = device_name("cuda")
    print(f"attention tiles on {device}, {args.dtype}, medians of {args.repeats}:")
    columns = ("name", "kernel", "dropout_p", "tile", "kept_by_pruning", "shape", "median_ms",
               "max_abs_diff_vs_reference", "drift", "settled")

    def write(rows, complete=False):
        return write_results("attention_tiles", rows, device, args.out_dir, table_columns=columns,
                             complete=complete, extra={"repeats": args.repeats, "warmup": args.warmup})

    rows = run(args.scenarios, args.dropouts, args.repeats, args.warmup, getattr(torch, args.dtype), args.kernels,
               after_scenario=write)
    path = write(rows, complete=True)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    print(tile_summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
