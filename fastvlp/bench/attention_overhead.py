"""Host cost of one fused attention call on small shapes, where it, not the kernels, sets the time.

For the decoder-sized scenarios of ``fastvlp bench attention`` (S, C-self, C-cross, X, D) it measures three
figures per call, each over ``--repeats`` calls after one warm-up (at least ``--warmup`` calls and
``common.MIN_CUDA_WARMUP_S`` seconds, after a once-per-process GPU spin-up):

* ``host_us``: host time to issue the call, a host clock around it, the GPU synchronised before each call
  so that launch queues start empty.
* ``device_us`` (``median_ms`` and ``raw_ms`` in ms): device time of the call's work, between CUDA events.
  A ``torch.cuda._sleep`` enqueued before the start event keeps the GPU busy for longer than the host
  takes to issue the call (at least ``MIN_SLEEP_US``, or ``SLEEP_OVER_HOST`` times the row's median issue
  time; cycles per microsecond measured once per process), so the GPU reaches the start event only once
  the whole call is queued and the interval holds no host time. Where the GPU had already passed the
  start event when the host finished issuing (the sleep too short, or a synchronisation inside the call),
  the call is measured again with twice the sleep, up to ``MAX_SLEEP_DOUBLINGS`` times; a row with calls
  that still included host time gets a status saying how many.
* ``latency_us``: CUDA events around the call started on an idle GPU, each call synchronised: host issue
  and device time together, as a caller that waits for every call sees them.

Contenders: the public ``attention`` (eager path), the registered ``torch.ops.fastvlp.attention_forward``
op with autograd (the path ``torch.compile`` traces), the bare kernel launchers (forward, then backward
with saved outputs), and SDPA's default dispatch, given the same prebuilt additive mask as in ``fastvlp
bench attention`` (``fastvlp.bench.attention_masks``). The backward launchers are also timed from a second
Python thread (autograd runs a CUDA backward on its own device thread), next to that thread's bare round
trip, to show whether issuing them off the main thread costs more. Each scenario times the contenders in
a rotated order (``timing_position``), so that none is always first; rows keep one order. ``settled`` is
False where the host or the device timings drifted (``host_drift``, ``drift``).

The results are written after each scenario. A ``torch.profiler`` table of one scenario's fastvlp
forward+backward, by self CPU time, follows; it is printed and saved beside the results as
``attention_overhead_profile.txt``.
"""
from __future__ import annotations

import functools
import math
import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .attention import SCENARIO_NAMES, reject_unknown, rotated, scenarios
from .attention_masks import sdpa_mask
from .common import (
    MIN_CUDA_WARMUP_S, device_name, result_row, spin_up, summarize, time_cuda_calls, unsettled, warm_up,
    write_results,
)

DEFAULT_SCENARIOS = ("S", "C-self", "C-cross", "X", "D")
# The sleep before the start event: never under MIN_SLEEP_US, and SLEEP_OVER_HOST times the median issue
# time on the host, so that it outlasts a slow issue too; a rarer, slower one is caught and measured again.
MIN_SLEEP_US = 1000.0
SLEEP_OVER_HOST = 4.0
MAX_SLEEP_DOUBLINGS = 3
_CALIBRATION_CYCLES = 2_000_000


def host_times_us(call: Callable[[], object], repeats: int) -> List[float]:
    """Microseconds the host spends issuing ``call``, synchronised before each so queues start empty."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return times


@functools.lru_cache(maxsize=None)
def sleep_cycles_per_us() -> float:
    """GPU clock cycles that ``torch.cuda._sleep`` spins per microsecond, measured once, after the GPU's
    spin-up, at the clocks the timed calls run at."""
    spin_up()
    torch.cuda._sleep(_CALIBRATION_CYCLES)  # its first launch pays for loading the kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(_CALIBRATION_CYCLES)
    end.record()
    end.synchronize()
    return _CALIBRATION_CYCLES / (start.elapsed_time(end) * 1e3)


def queued_device_time_ms(call: Callable[[], object], sleep_cycles: int) -> Tuple[float, bool]:
    """``(ms between CUDA events around call, whether the whole call was queued before the GPU reached the
    start event)``: a sleep enqueued first holds the GPU back while the host issues the call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    start.record()
    call()
    end.record()
    reached_start = start.query()  # True: the GPU waited on the host inside the interval
    end.synchronize()
    return start.elapsed_time(end), not reached_start


def device_times_us(call: Callable[[], object], repeats: int, sleep_cycles: int) -> Tuple[List[float], int, int]:
    """``(device microseconds per call, calls that still included host time, the last sleep in cycles)``.
    A call whose start the GPU reached before the host had issued it is measured again with twice the
    sleep, which later calls keep, up to ``MAX_SLEEP_DOUBLINGS`` doublings."""
    longest = sleep_cycles * 2 ** MAX_SLEEP_DOUBLINGS
    times, uncovered = [], 0
    for _ in range(repeats):
        elapsed_ms, covered = queued_device_time_ms(call, sleep_cycles)
        while not covered and sleep_cycles < longest:
            sleep_cycles *= 2
            elapsed_ms, covered = queued_device_time_ms(call, sleep_cycles)
        uncovered += not covered
        times.append(elapsed_ms * 1e3)
    return times, uncovered, sleep_cycles


class WorkerThread:
    """One persistent thread that runs the callables handed to :meth:`run`, one at a time."""

    def __init__(self) -> None:
        self._tasks: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._serve, daemon=True, name="attention-overhead-worker").start()

    def _serve(self) -> None:
        while True:
            function, done, failure = self._tasks.get()
            try:
                function()
            except BaseException as error:  # handed back to the caller
                failure.append(error)
            done.set()

    def run(self, function: Callable[[], object]) -> None:
        """Run ``function`` on the worker thread and wait for it; its exception is raised here."""
        done, failure = threading.Event(), []
        self._tasks.put((function, done, failure))
        done.wait()
        if failure:
            raise failure[0]


def sdpa_default(scenario, device, dtype) -> Callable:
    """SDPA's default dispatch on ``[B, L, H, D]`` tensors, with the mask ``fastvlp bench attention``
    gives its SDPA rows: built here, once, outside the timed calls."""
    attn_mask, is_causal = sdpa_mask(scenario, device, dtype)

    def sdpa(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(
            a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), attn_mask=attn_mask,
            is_causal=is_causal).transpose(1, 2)

    sdpa.attn_mask = attn_mask
    return sdpa


def _contenders(scenario, q, k, v, grad_out, worker: WorkerThread) -> Dict[str, Dict[str, Callable[[], object]]]:
    from fastvlp.ops.fmha.backward_kernels import attention_backward_triton
    from fastvlp.ops.fmha.dispatch import attention
    from fastvlp.ops.fmha.forward_kernel import attention_forward_triton

    mask, causal = scenario["mask"], scenario["causal"]
    scale = 1.0 / math.sqrt(q.shape[-1])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd_bwd(function):
        def call():
            function(*leaves).backward(grad_out)
            for t in leaves:
                t.grad = None
        return call

    def public(a, b, c):
        return attention(a, b, c, key_padding_mask=mask, causal=causal, backend="triton")

    def registered_op(a, b, c):
        return torch.ops.fastvlp.attention_forward(a, b, c, mask, None, causal, 0.0, scale, "triton", False)[0]

    out = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device, dtype=torch.float32)

    def launch_forward():
        return attention_forward_triton(q, k, v, mask, None, causal, 0.0, scale, False, out, lse)

    def launch_backward():
        return attention_backward_triton(grad_out, q, k, v, out, lse, mask, None, causal, 0.0, scale, False)

    sdpa = sdpa_default(scenario, q.device, q.dtype)
    launch_forward()  # the backward launcher reads the forward's outputs
    return {
        "fastvlp": {"fwd": lambda: public(q, k, v), "fwd+bwd": fwd_bwd(public)},
        "fastvlp-registered-op": {"fwd": lambda: registered_op(q, k, v), "fwd+bwd": fwd_bwd(registered_op)},
        "fastvlp-kernel-launchers": {"fwd": launch_forward, "bwd": launch_backward},
        "fastvlp-kernel-launchers-worker-thread": {"bwd": lambda: worker.run(launch_backward)},
        "worker-thread-round-trip": {"no-op": lambda: worker.run(lambda: None)},
        "sdpa-default": {"fwd": lambda: sdpa(q, k, v), "fwd+bwd": fwd_bwd(sdpa)},
    }


def measure(call: Callable[[], object], repeats: int, warmup: int) -> Dict[str, object]:
    """The row fields of one call: warm-up, then host, device and latency figures (see the module's doc)."""
    warm_up(lambda _: call(), warmup, MIN_CUDA_WARMUP_S, torch.cuda.synchronize)
    host = host_times_us(call, repeats)
    sleep_us = max(MIN_SLEEP_US, SLEEP_OVER_HOST * statistics.median(host))
    device, uncovered, cycles = device_times_us(call, repeats, int(sleep_us * sleep_cycles_per_us()))
    latency_ms = time_cuda_calls(lambda _: call(), repeats, warmup=0, min_warmup_s=0.0)  # warmed up above
    fields = dict(raw_ms=[t / 1e3 for t in device], device_us=statistics.median(device),
                  sleep_before_start_us=cycles / sleep_cycles_per_us(), host_us=statistics.median(host),
                  host_raw_us=host, host_drift=summarize(host).get("drift"),
                  latency_us=statistics.median(latency_ms) * 1e3, latency_raw_ms=latency_ms)
    if uncovered:
        fields["status"] = (f"device_us includes host time in {uncovered} of {repeats} calls: the GPU reached the "
                            f"start event before the host had issued the call (a synchronisation inside it?)")
    return fields


def overhead_row(name: str, contender: str, shape: str, mode: str, position: int,
                 fields: Dict[str, object]) -> Dict[str, object]:
    """A result row from :func:`measure`'s fields: ``settled`` only if both device and host timings were."""
    raw_ms = fields.pop("raw_ms")
    row = result_row(name, contender, shape, raw_ms, mode=mode, timing_position=position, **fields)
    if "settled" in row:
        row["settled"] = row["settled"] and not unsettled({"drift": row["host_drift"]})
    return row


def _scenario_tensors(scenario, dtype: torch.dtype):
    if scenario["mask"] is not None:
        scenario["mask"] = scenario["mask"].cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)

    def draw(length):
        return torch.randn(scenario["batch"], length, scenario["heads"], scenario["head_dim"], device="cuda",
                           dtype=dtype, generator=generator)

    q, k, v = draw(scenario["query_length"]), draw(scenario["key_length"]), draw(scenario["key_length"])
    return q, k, v, torch.randn(q.shape, device="cuda", dtype=dtype, generator=generator)


def run(names: Sequence[str] = DEFAULT_SCENARIOS, repeats: int = 50, warmup: int = 10,
        dtype: torch.dtype = torch.float16,
        after_scenario: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> List[Dict[str, object]]:
    """Rows for every contender and mode on each scenario in ``names``; ``after_scenario`` receives the rows
    so far after each scenario. The i-th scenario times the contenders starting from the i-th."""
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats/warmup: expected >= 1 each (fastvlp compiles in its first call), got "
                         f"{repeats} and {warmup}")
    unknown = set(names) - set(SCENARIO_NAMES)
    if unknown:
        raise ValueError(f"names: unknown {sorted(unknown)}; expected names from {list(SCENARIO_NAMES)}")
    spin_up()
    rows: List[Dict[str, object]] = []
    worker = WorkerThread()
    chosen = [scenario for scenario in scenarios() if scenario["name"] in names]
    for index, scenario in enumerate(chosen):
        shape = (f"B{scenario['batch']} H{scenario['heads']} D{scenario['head_dim']} "
                 f"{scenario['query_length']}x{scenario['key_length']}")
        contenders = _contenders(scenario, *_scenario_tensors(scenario, dtype), worker)
        timed = {}
        for position, contender in enumerate(rotated(contenders, index)):
            for mode, call in contenders[contender].items():
                row = overhead_row(scenario["name"], contender, shape, mode, position, measure(call, repeats, warmup))
                timed[contender, mode] = row
                print(f"  {scenario['name']:<8} {contender:<38} {mode:<8} host {row['host_us']:8.1f} us   "
                      f"device {row['device_us']:8.1f} us   latency {row['latency_us']:8.1f} us"
                      + ("  unsettled" if row.get("settled") is False else "")
                      + (f"  {row['status']}" if row.get("status") else ""), flush=True)
        rows += [timed[contender, mode] for contender, calls in contenders.items() for mode in calls]
        if after_scenario is not None:
            after_scenario(rows)
    return rows


def profile_table(name: str = "S", dtype: torch.dtype = torch.float16, calls: int = 20) -> str:
    """``torch.profiler`` table of ``calls`` fastvlp forward+backward calls, by self CPU time."""
    found = [scenario for scenario in scenarios() if scenario["name"] == name]
    if not found:
        raise ValueError(f"name: unknown scenario {name!r}; expected one of {list(SCENARIO_NAMES)}")
    scenario = found[0]
    call = _contenders(scenario, *_scenario_tensors(scenario, dtype), WorkerThread())["fastvlp"]["fwd+bwd"]
    spin_up()
    warm_up(lambda _: call(), 5, MIN_CUDA_WARMUP_S, torch.cuda.synchronize)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastvlp.bench.attention_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="*", default=list(DEFAULT_SCENARIOS),
                        help=f"subset of {' '.join(SCENARIO_NAMES)}")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--profile", default="S", help="scenario for the profiler table ('' for none)")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats must be >= 1 and --warmup >= 1 (fastvlp's kernels compile and autotune in the "
                     "warm-up)")
    reject_unknown(parser, "--scenarios", args.scenarios, SCENARIO_NAMES)
    reject_unknown(parser, "--profile", [args.profile] if args.profile else [], SCENARIO_NAMES)
    if not torch.cuda.is_available():
        parser.error("the attention overhead benchmark needs a CUDA GPU")
    device = device_name("cuda")
    print(f"attention host overhead on {device}, float16, medians of {args.repeats}:")
    columns = ("name", "contender", "mode", "shape", "host_us", "device_us", "latency_us", "drift", "host_drift",
               "settled")

    def write(rows, complete=False) -> Path:
        return write_results("attention_overhead", rows, device, args.out_dir, table_columns=columns,
                             complete=complete, extra={"repeats": args.repeats, "warmup": args.warmup})

    path = write(run(args.scenarios, args.repeats, args.warmup, after_scenario=write), complete=True)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    if args.profile:
        table = profile_table(args.profile)
        print(table)
        profile_path = path.with_name("attention_overhead_profile.txt")
        profile_path.write_text(f"torch.profiler, scenario {args.profile}, fastvlp forward+backward, "
                                f"by self CPU time\n\n{table}\n")
        print(f"wrote {profile_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
