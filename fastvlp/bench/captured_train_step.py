"""The training-step benchmark's ``fastvlp-cuda-graph`` contender: fastvlp's step captured once in a CUDA graph
(:class:`fastvlp.train.captured_step.CapturedTrainingStep`) and replayed, on the same weights and batches as the
eager contenders, with each batch's detection targets padded on the host to the largest object count of the
benchmark's batches. Each timed step is the copy of the batch into the graph's inputs, the replay, and a device
synchronisation."""
from __future__ import annotations

import time
from typing import Dict, List

import torch

from fastvlp.bench.common import summarize, warm_up
from fastvlp.train.captured_step import CapturedTrainingStep
from fastvlp.train.optim import build_optimizer

CUDA_GRAPH = "fastvlp-cuda-graph"


def static_batches(model, batches) -> List:
    """``batches`` with their detection rows chosen and targets padded to the largest object count among them."""
    largest = max((len(target["labels"]) for batch in batches for target in batch.targets if target is not None),
                  default=0)
    return [model.static_batch(batch, largest) for batch in batches]


def time_captured(model, batches, repeats: int, warmup: int, amp: bool, device: torch.device,
                  min_warmup_s: float = 0.0) -> Dict[str, object]:
    """Time ``model``'s captured step on ``batches`` (static, :func:`static_batches`) like
    :func:`fastvlp.bench.train_step.time_contender` times an eager one: ``warmup`` eager steps before capture,
    replays for at least ``min_warmup_s``, then ``repeats`` timed replays. A replay has no parts to time
    separately, so ``stages`` is empty. The peak memory spans the warm-up, the capture (which allocates the
    graph's activations once, for good) and the replays (which allocate nothing)."""
    start_allocated, start_reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    optimizer = build_optimizer(model)
    model.train()
    captured = CapturedTrainingStep(model, optimizer, batches[0], amp=amp, clip_max_norm=model.config.clip_max_norm,
                                    warmup_steps=warmup)
    first_loss = float(captured.step(batches[0]).loss)  # the starting weights and batch 0, as the others' first step
    replays = 1 + warm_up(lambda index: captured.step(batches[(index + 1) % len(batches)]), 0, min_warmup_s,
                          torch.cuda.synchronize)
    totals = []
    for index in range(repeats):
        start = time.perf_counter()
        captured.step(batches[index % len(batches)])
        torch.cuda.synchronize(device)
        totals.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - start_allocated) / 2**20
    # The graph's private pool and the warm-up's cached blocks are both held: the footprint is the reserved memory.
    reserved = (torch.cuda.max_memory_reserved(device) - start_reserved) / 2**20
    backends = model.backend_report()
    del captured, optimizer
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return {"raw_ms": totals, "warmup_steps": warmup + replays, "first_step_loss": first_loss,
            "peak_memory_above_start_mb": peak, "peak_reserved_above_start_mb": reserved,
            "peak_rss_above_start_mb": None, "stages": {},
            "stages_raw_ms": {}, "matcher_check_finite": False, "backends": backends, "kernel_profile": None,
            "max_targets": batches[0].padded_targets.labels.shape[1]}
