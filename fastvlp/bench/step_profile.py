"""Where a training step's GPU time goes: the device time of its kernels by kind, from ``torch.profiler``, and
what its host does meanwhile (synchronisations, copies, launches, the costliest host operations).

The attention kernels are the part that the attention backend changes, so their share of the step bounds
what any attention kernel can gain: with attention free, a step would still take its time minus that share.
Kernels are classed by name (:data:`KERNEL_KINDS`, first match wins): the fused attention kernels of both
backends (fastvlp's Triton kernels, and SDPA's flash, memory-efficient and cuDNN kernels), the Hungarian
solver's, and everything else. The rows keep the heaviest kernels by name, so the classes can be checked.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Sequence, Tuple

# (kind, name fragments): a kernel whose lower-cased name holds one of the fragments is of that kind.
KERNEL_KINDS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    # fastvlp: attention_forward_kernel, attention_backward_{dq,dkdv,delta}_kernel; SDPA: flash_fwd/bwd kernels,
    # fmha_cutlassF/B (memory-efficient), cuDNN's generated *sdpa* kernels.
    ("attention", ("attention_forward", "attention_backward", "flash_fwd", "flash_bwd", "fmha", "sdpa")),
    ("matcher", ("lsap", "linear_sum_assignment", "hungarian")),
)
OTHER = "other"


def kernel_kind(name: str) -> str:
    """The kind of the kernel called ``name`` (see :data:`KERNEL_KINDS`), else ``"other"``."""
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return OTHER


def summarize_kernels(kernels: Iterable[Tuple[str, float]], steps: int, top: int = 15) -> Dict[str, object]:
    """``kernels`` as (name, device microseconds) pairs over ``steps`` profiled steps: milliseconds per step
    by kind and in total, and the ``top`` heaviest kernel names with their kind and ms per step."""
    if steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    by_name: Dict[str, float] = {}
    for name, microseconds in kernels:
        by_name[name] = by_name.get(name, 0.0) + float(microseconds)
    per_step = {name: total / 1e3 / steps for name, total in by_name.items()}
    kinds = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    kinds[OTHER] = 0.0
    for name, ms in per_step.items():
        kinds[kernel_kind(name)] += ms
    heaviest = sorted(per_step.items(), key=lambda item: -item[1])[:top]
    return {
        "device_ms_per_step": {kind: round(ms, 4) for kind, ms in kinds.items()},
        "device_ms_per_step_total": round(sum(per_step.values()), 4),
        "heaviest_kernels": [{"name": name, "kind": kernel_kind(name), "ms_per_step": round(ms, 4)}
                             for name, ms in heaviest],
    }


# Host-side CUDA calls, by what they say about the step: synchronisations (the host waits for the device),
# copies (one to the host waits for the work queued before it; others are queued like kernels) and kernel
# launches (torch's and Triton's).
HOST_WAIT_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
                   "cuCtxSynchronize")
HOST_COPY_PREFIXES = ("cudaMemcpy", "cuMemcpy")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SCALAR_READ = "aten::_local_scalar_dense"  # .item(), bool(tensor), int(tensor): each one waits for the device


def summarize_host(calls: Iterable[Tuple[str, float]], steps: int, top: int = 10) -> Dict[str, object]:
    """``calls`` as (name, self host microseconds) pairs of the host-side events over ``steps`` profiled steps:
    per step, the synchronisations and copies (count, and ms of host time in those calls: waiting for the
    device, or copying), the kernel launches, the scalar reads (``.item()`` and the like) and the ``top`` host operations
    by their own time (``aten::`` ops and the like, runtime calls excluded)."""
    if steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    counts: Dict[str, int] = {}
    times: Dict[str, float] = {}
    for name, microseconds in calls:
        counts[name] = counts.get(name, 0) + 1
        times[name] = times.get(name, 0.0) + float(microseconds)

    def per_step(names) -> Dict[str, float]:
        return {"count": sum(counts[name] for name in names) / steps,
                "ms": round(sum(times[name] for name in names) / 1e3 / steps, 4)}

    waits = [name for name in counts if name in HOST_WAIT_CALLS]
    copies = [name for name in counts if name.startswith(HOST_COPY_PREFIXES)]
    launches = [name for name in counts if name in LAUNCH_CALLS]
    runtime = set(waits) | set(copies) | set(launches)
    operations = sorted((name for name in counts if name not in runtime and not name.startswith(("cuda", "cu"))),
                        key=lambda name: -times[name])[:top]
    return {
        "synchronizations_per_step": per_step(waits),
        "copies_per_step": per_step(copies),
        "launches_per_step": per_step(launches),
        "scalar_reads_per_step": per_step([SCALAR_READ] if SCALAR_READ in counts else []),
        "heaviest_host_operations": [{"name": name, "calls_per_step": counts[name] / steps,
                                      "self_ms_per_step": round(times[name] / 1e3 / steps, 4)}
                                     for name in operations],
    }


def profile_steps(step: Callable[[int], None], steps: int, warmup: int = 1) -> Dict[str, object]:
    """Run ``step(i)`` ``warmup`` times, then ``steps`` times under ``torch.profiler`` (CUDA):
    :func:`summarize_kernels` of the device kernels it ran, with :func:`summarize_host` of its host-side
    events under ``"host"`` (the profiler's own cost inflates those times; the counts are exact)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        raise RuntimeError("profile_steps: the kernel profile needs a CUDA GPU")
    for index in range(warmup):
        step(index)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for index in range(steps):
            step(warmup + index)
        torch.cuda.synchronize()
    kernels: List[Tuple[str, float]] = []
    host: List[Tuple[str, float]] = []
    for event in profiler.events():
        # A record_function range (the optimiser's "Optimizer.step#AdamW.step", say) also appears on the device
        # as a user annotation spanning the kernels inside it, which are counted already: skip those spans.
        if getattr(event, "is_user_annotation", False):
            continue
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append((event.name, event.device_time))
        else:
            host.append((event.name, event.self_cpu_time_total))
    summary = summarize_kernels(kernels, steps)
    summary["host"] = summarize_host(host, steps)
    return summary


def attention_bound(step_ms: float, attention_ms: float, matcher_ms: float = 0.0) -> float:
    """How many times faster a step of ``step_ms`` could get if its attention kernels (``attention_ms``) and
    matcher (``matcher_ms``) took no time at all: the ceiling of a speed-up that changes only those."""
    remaining = step_ms - attention_ms - matcher_ms
    if not remaining > 0:
        raise ValueError(f"attention_ms + matcher_ms: expected less than step_ms={step_ms}, got "
                         f"{attention_ms} + {matcher_ms}")
    return step_ms / remaining


def format_profile(contender: str, profile: Dict[str, object]) -> Sequence[str]:
    """Printable lines of one contender's profile."""
    kinds = profile["device_ms_per_step"]
    lines = [f"  {contender}: kernels {profile['device_ms_per_step_total']:.1f} ms/step on the device; "
             + ", ".join(f"{kind} {ms:.1f}" for kind, ms in kinds.items())]
    lines += [f"    {item['ms_per_step']:8.2f} ms  {item['kind']:<9} {item['name'][:100]}"
              for item in profile["heaviest_kernels"][:8]]
    host = profile.get("host")
    if host:
        waits, copies = host["synchronizations_per_step"], host["copies_per_step"]
        lines.append(f"  {contender}: host per step: {waits['count']:.1f} synchronizations ({waits['ms']:.1f} ms), "
                     f"{copies['count']:.1f} copies ({copies['ms']:.1f} ms), "
                     f"{host['scalar_reads_per_step']['count']:.1f} scalar reads, "
                     f"{host['launches_per_step']['count']:.0f} kernel launches ({host['launches_per_step']['ms']:.1f} ms)")
        lines += [f"    {item['self_ms_per_step']:8.2f} ms  host      {item['name'][:80]} "
                  f"({item['calls_per_step']:.0f} calls)" for item in host["heaviest_host_operations"][:8]]
    return lines
