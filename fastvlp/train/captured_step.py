"""A pre-training step captured once in a CUDA graph and replayed for every batch of the same shapes.

An eager step of ``e2e-vlp-6-r50`` launches thousands of kernels, and the host takes longer to launch them than
the device takes to run them. A replayed graph launches them all at once. Capture needs a step that never waits
on the device and never copies host data in the middle: fastvlp's step is such a step, with its batched solver
matching on the device, its attention drawing dropout seeds on the device, and the batch's detection rows and
padded targets prepared on the host (:meth:`fastvlp.models.E2EVLP.static_batch`). scipy's matcher copies every
cost matrix to the host, so a torch/scipy step cannot be captured.

The graph replays fixed shapes: every batch must have the example's (images padded to one size, texts to one
length, the same number of detection rows, targets padded to one ``max_targets``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from fastvlp.models.outputs import PretrainingOutput
from fastvlp.models.pretraining_batch import PretrainingBatch


def batch_tensors(batch: PretrainingBatch) -> Dict[str, Tensor]:
    """The tensors a static batch's forward reads, by field name (padded targets as ``padded_targets.<field>``);
    the per-image ``targets`` dicts are left out: the static forward does not read them."""
    named = {}
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, Tensor):
            named[field.name] = value
    if batch.padded_targets is not None:
        named.update({f"padded_targets.{name}": value for name, value in batch.padded_targets.tensors().items()})
    return named


def _check_capturable(model, optimizer, example: PretrainingBatch) -> torch.device:
    if not isinstance(example, PretrainingBatch):
        raise TypeError(f"example: expected a PretrainingBatch, got {type(example).__name__}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    device = parameters[0].device if parameters else torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"model: a captured step needs a model on a CUDA device, got {device}")
    if model.criterion.matcher.backend != "fastvlp":
        raise ValueError(f"model: its matcher ({model.criterion.matcher.backend!r}) runs on the host and cannot be "
                         "captured; use matcher_backend='fastvlp'")
    if example.targets is not None and example.padded_targets is None:
        raise ValueError("example: its targets are not padded to a fixed length; pass model.static_batch(batch, "
                         "max_targets)")
    for index, group in enumerate(optimizer.param_groups if optimizer is not None else ()):
        if "capturable" not in group:
            raise ValueError(f"optimizer: param group {index} has no 'capturable' setting "
                             f"({type(optimizer).__name__} cannot step inside a CUDA graph)")
    return device


class CapturedTrainingStep:
    """``model``'s pre-training step (forward, backward, gradient clipping at ``clip_max_norm``, ``optimizer``'s
    step; bf16 autocast with ``amp``) captured on ``example``'s shapes. ``step(batch)`` copies ``batch`` into
    the graph's inputs, replays it and returns the step's output, whose tensors the next replay overwrites;
    ``grad_norm`` holds the gradients' norm before clipping (with ``clip_max_norm``).

    With ``optimizer=None`` the graph ends after the clipping and leaves the gradients in the parameters'
    ``.grad`` (written, not accumulated: replays overwrite them), for a caller that steps the optimizer itself,
    e.g. after checking the loss. It must not set them to None (``zero_grad(set_to_none=False)`` is fine): the
    graph writes to those tensors.

    Capturing runs ``warmup_steps`` eager steps first (kernel compilation, autotuning, the optimizer's state),
    then puts the weights, the optimizer's state and the random number generators back as they were: the first
    replayed step starts where the model stood (state the warm-up created is zeroed, as an Adam-family
    optimizer's starts). The matcher's finiteness check, a host sync, is off while
    capturing: a non-finite matching cost gives placeholder matches and a NaN loss, which the caller sees.
    """

    def __init__(self, model, optimizer: Optional[torch.optim.Optimizer], example: PretrainingBatch, *, amp: bool = False,
                 clip_max_norm: Optional[float] = None, warmup_steps: int = 3):
        self.device = _check_capturable(model, optimizer, example)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected a positive int (kernels compile on their first call), "
                             f"got {warmup_steps!r}")
        self.model, self.optimizer, self.amp, self.clip_max_norm = model, optimizer, amp, clip_max_norm
        self.static = example.to(self.device)
        self.static = dataclasses.replace(self.static, **{
            field: value.clone() for field, value in vars(self.static).items() if isinstance(value, Tensor)})
        if self.static.padded_targets is not None:
            padded = self.static.padded_targets
            self.static.padded_targets = dataclasses.replace(
                padded, **{name: value.clone() for name, value in padded.tensors().items()})
        self.inputs = batch_tensors(self.static)
        for group in optimizer.param_groups if optimizer is not None else ():
            group["capturable"] = True
        matcher = model.criterion.matcher
        check_finite, matcher.check_finite = matcher.check_finite, False
        try:
            self._warm_up(warmup_steps)
            self.graph = torch.cuda.CUDAGraph()
            model.zero_grad(set_to_none=True)  # the graph's backward writes the gradients, not accumulates
            # Thread-local: a DataLoader's pin-memory thread may allocate pinned memory while this thread captures.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output, self.grad_norm = self._eager_step(self.static)
        finally:
            matcher.check_finite = check_finite

    def _eager_step(self, batch: PretrainingBatch) -> Tuple[PretrainingOutput, Optional[Tensor]]:
        # No autocast cache: a cached cast made during capture would be read, stale, by later replays.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
            output = self.model(batch)
        output.loss.backward()
        norm = None
        if self.clip_max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
        if self.optimizer is not None:
            self.optimizer.step()
        return output, norm

    def _warm_up(self, steps: int) -> None:
        """Run ``steps`` eager steps on a side stream, as capture requires, and undo what they changed."""
        model, optimizer = self.model, self.optimizer
        weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
        states = optimizer.state if optimizer is not None else {}
        known = {id(p): {key: value.clone() if isinstance(value, Tensor) else value for key, value in state.items()}
                 for p, state in states.items()}
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                self._eager_step(self.static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():
            for name, value in model.state_dict().items():
                value.copy_(weights[name])
            for p, state in states.items():
                before = known.get(id(p))
                for key, value in state.items():
                    if not isinstance(value, Tensor):
                        continue
                    if before is not None and key in before:
                        value.copy_(before[key])
                    else:  # state the warm-up created starts at zero, as a fresh optimizer's does
                        value.zero_()
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], self.device)

    def _mismatch(self, given: Dict[str, Tensor]) -> Optional[str]:
        """What keeps a batch with tensors ``given`` from the graph, or None."""
        for name, static in self.inputs.items():
            value = given.get(name)
            if value is None:
                return f"batch: has no {name}, which the captured step reads (pass model.static_batch(batch, max_targets))"
            if value.shape != static.shape or value.dtype != static.dtype:
                return (f"batch.{name}: {value.dtype} {list(value.shape)} differs from the captured {static.dtype} "
                        f"{list(static.shape)}; a captured step replays one shape")
        return None

    def accepts(self, batch: PretrainingBatch) -> bool:
        """Whether ``batch`` has every tensor the graph reads, each with the captured shape and dtype."""
        return self._mismatch(batch_tensors(batch)) is None

    def step(self, batch: PretrainingBatch) -> PretrainingOutput:
        """The captured step on ``batch`` (the example's shapes; on the host or the device). Raises ``ValueError``
        naming the first field that is missing or whose shape or dtype differs."""
        given = batch_tensors(batch)
        problem = self._mismatch(given)
        if problem:
            raise ValueError(problem)
        for name, static in self.inputs.items():
            static.copy_(given[name], non_blocking=True)
        self.graph.replay()
        return self.output
