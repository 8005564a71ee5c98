"""Host cost of one fused attention call on small shapes, where it, not the kernels, sets the time.

For the decoder-sized scenarios of ``fastvlp bench attention`` (S, C-self, C-cross, X) it measures, per
call and as medians: the host time to issue a forward and a forward+backward (a host clock around the
call, synchronised before each, so launch queues never fill), and the device time of the same call
between CUDA events. Contenders: the public ``attention`` (eager path), the registered
``torch.ops.fastvlp.attention_forward`` op with autograd (the path ``torch.compile`` traces), the bare
kernel launchers (forward, then backward with saved outputs), and SDPA's default dispatch, given the same
prebuilt additive mask as in ``fastvlp bench attention`` (``fastvlp.bench.attention_masks``). The backward
launchers are also timed from a second Python thread (autograd runs a CUDA backward on its own device
thread), next to that thread's bare round trip, to show whether issuing them off the main thread costs
more. A ``torch.profiler`` table of one scenario's fastvlp forward+backward follows, by self CPU time.
In the results, ``host_us`` is host time and ``device_median_ms`` (also ``median_ms``) device time.
"""
from __future__ import annotations

import math
import queue
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .attention import scenarios
from .attention_masks import sdpa_mask
from .common import device_name, result_row, time_cuda_calls, write_results


def host_times_us(call: Callable[[], object], repeats: int, warmup: int) -> List[float]:
    """Microseconds the host spends issuing ``call``, synchronised before each so queues start empty."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return times


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


def run(names: Sequence[str] = ("S", "C-self", "C-cross", "X"), repeats: int = 50, warmup: int = 10,
        dtype: torch.dtype = torch.float16) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    worker = WorkerThread()
    for scenario in scenarios():
        if scenario["name"] not in names:
            continue
        if scenario["mask"] is not None:
            scenario["mask"] = scenario["mask"].cuda()
        generator = torch.Generator(device="cuda").manual_seed(0)
        shape = (f"B{scenario['batch']} H{scenario['heads']} D{scenario['head_dim']} "
                 f"{scenario['query_length']}x{scenario['key_length']}")

        def draw(length):
            return torch.randn(scenario["batch"], length, scenario["heads"], scenario["head_dim"], device="cuda",
                               dtype=dtype, generator=generator)

        q, k, v = draw(scenario["query_length"]), draw(scenario["key_length"]), draw(scenario["key_length"])
        grad_out = torch.randn_like(q)
        for contender, calls in _contenders(scenario, q, k, v, grad_out, worker).items():
            for mode, call in calls.items():
                host = host_times_us(call, repeats, warmup)
                device = time_cuda_calls(lambda _: call(), repeats, warmup)
                row = result_row(scenario["name"], contender, shape, device, mode=mode,
                                 host_us=statistics.median(host), host_raw_us=host)
                row["device_median_ms"] = row["median_ms"]
                rows.append(row)
                print(f"  {scenario['name']:<8} {contender:<26} {mode:<8} host {row['host_us']:8.1f} us   "
                      f"device {row['median_ms'] * 1e3:8.1f} us")
    return rows


def profile_table(name: str = "S", dtype: torch.dtype = torch.float16, calls: int = 20) -> str:
    """``torch.profiler`` table of ``calls`` fastvlp forward+backward calls, by self CPU time."""
    scenario = next(s for s in scenarios() if s["name"] == name)
    if scenario["mask"] is not None:
        scenario["mask"] = scenario["mask"].cuda()
    q, k, v = (torch.randn(scenario["batch"], length, scenario["heads"], scenario["head_dim"], device="cuda",
                           dtype=dtype)
               for length in (scenario["query_length"], scenario["key_length"], scenario["key_length"]))
    call = _contenders(scenario, q, k, v, torch.randn_like(q), WorkerThread())["fastvlp"]["fwd+bwd"]
    for _ in range(5):
        call()
    torch.cuda.synchronize()
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
    parser.add_argument("--scenarios", nargs="*", default=["S", "C-self", "C-cross", "X"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--profile", default="S", help="scenario for the profiler table ('' for none)")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if not torch.cuda.is_available():
        parser.error("the attention overhead benchmark needs a CUDA GPU")
    device = device_name("cuda")
    print(f"attention host overhead on {device}, float16, medians of {args.repeats}:")
    rows = run(args.scenarios, args.repeats, args.warmup)
    path = write_results("attention_overhead", rows, device, args.out_dir,
                         extra={"repeats": args.repeats, "warmup": args.warmup},
                         table_columns=("name", "contender", "mode", "shape", "host_us", "device_median_ms"))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    if args.profile:
        print(profile_table(args.profile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
