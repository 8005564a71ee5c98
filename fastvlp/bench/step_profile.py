"""Where a training step's GPU time goes: the device time of its kernels by kind, from ``torch.profiler``.

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


def profile_steps(step: Callable[[int], None], steps: int, warmup: int = 1) -> Dict[str, object]:
    """Run ``step(i)`` ``warmup`` times, then ``steps`` times under ``torch.profiler`` (CUDA), and
    :func:`summarize_kernels` of the device kernels it ran."""
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
    for event in profiler.events():
        # A record_function range (the optimiser's "Optimizer.step#AdamW.step", say) also appears on the device
        # as a user annotation spanning the kernels inside it, which are counted already: skip those spans.
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            kernels.append((event.name, event.device_time))
    return summarize_kernels(kernels, steps)


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
    return lines
