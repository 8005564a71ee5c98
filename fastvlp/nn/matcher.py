"""Hungarian matcher for DETR-style set losses, solving the whole batch in one call."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from fastvlp.ops.lsap import batched_linear_sum_assignment
from fastvlp.ops.matching_cost import check_target_labels, matching_cost, pad_targets

MATCHER_BACKENDS = ("fastvlp", "scipy")


class HungarianMatcher(nn.Module):
    """Drop-in for DETR's ``HungarianMatcher``: same constructor, defaults, forward and output.

    The cost is built for the whole batch on targets padded to the largest count (in
    float32, even under autocast) and solved by one batched call on the inputs' device;
    the matches stay on that device. With ``check_finite=True`` a NaN cost raises (on CUDA
    that check is one host sync per call). ``check_finite=False`` keeps the call free of
    host syncs, so an image whose cost the solver rejects (NaN or ``-inf``, e.g. from NaN
    predictions) cannot be singled out on the host: it gets the placeholder matches
    prediction ``i`` to target ``i`` for ``i < min(num_queries, num_targets)``, valid
    indices but not a minimal-cost assignment. ``backend="scipy"`` is DETR's own path (the
    cost moved to the host and scipy called once per image, which raises on NaN either
    way), kept as the baseline.

    ``targets[i]['labels']`` may be any integer dtype; floating or bool labels raise
    ``TypeError``, and labels on the CPU outside ``[0, num_classes of pred_logits)`` raise
    ``ValueError`` naming the image. Predicted boxes with NaN or infinite coordinates are
    not an error in themselves, on any device: the cost they give (NaN, or ``+inf``, which
    only forbids the pair) is handled by the solver as above.

    Returns, for each image, ``(index_i, index_j)`` int64 tensors: the matched
    prediction indices in increasing order and their target indices, with
    ``len == min(num_queries, num_targets)``.
    """

    def __init__(
        self,
        cost_class: float = 1,
        cost_bbox: float = 1,
        cost_giou: float = 1,
        *,
        backend: str = "fastvlp",
        check_finite: bool = True,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou can't all be 0")
        if backend not in MATCHER_BACKENDS:
            raise ValueError(f"backend must be one of {MATCHER_BACKENDS}, got {backend!r}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.backend = backend
        self.check_finite = check_finite

    def extra_repr(self) -> str:
        return f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, backend={self.backend}"

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        pred_logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(f"targets must hold one dict per image ({pred_logits.shape[0]}), got {len(targets)}")
        device = pred_logits.device
        check_target_labels([target["labels"] for target in targets], pred_logits.shape[-1],
                            " (the classes of pred_logits)")
        labels, boxes, counts = pad_targets(
            [target["labels"] for target in targets], [target["boxes"] for target in targets], device
        )
        sizes = [len(target["labels"]) for target in targets]
        if self.backend == "scipy":
            cost = matching_cost(pred_logits, pred_boxes, labels, boxes, self.cost_class, self.cost_bbox, self.cost_giou)
            return _match_with_scipy(cost, sizes, device)
        return _split_assignment(self.assign(pred_logits, pred_boxes, labels, boxes, counts), sizes)

    @torch.no_grad()
    def assign(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, target_labels: torch.Tensor,
               target_boxes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The matches as one ``[B, Q]`` int64 tensor on the inputs' device, without a host sync: the target
        (column) matched to each prediction, or -1. Targets come padded (:func:`fastvlp.ops.pad_targets`:
        ``[B, T]`` labels, ``[B, T, 4]`` boxes, ``[B]`` counts). Only the batched solver gives this form
        (``backend="fastvlp"``); a problem it failed on (``check_finite=False``) gets the placeholder matches
        described in the class docstring."""
        if self.backend != "fastvlp":
            raise ValueError(f"assign: needs backend='fastvlp' (the batched solver), this matcher has {self.backend!r}")
        cost = matching_cost(pred_logits, pred_boxes, target_labels, target_boxes, self.cost_class, self.cost_bbox,
                             self.cost_giou)
        assignment = batched_linear_sum_assignment(cost, num_cols=counts, check_finite=self.check_finite)
        # A failed problem has no matched row: prediction i takes target i for i < min(Q, T) instead.
        rows = torch.arange(assignment.shape[1], device=assignment.device)
        placeholder = torch.where(rows < counts.to(assignment.device)[:, None], rows, -1)
        return torch.where((assignment < 0).all(1, keepdim=True), placeholder, assignment)


def _split_assignment(assignment: torch.Tensor, sizes: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``[B, Q]`` prediction-to-target assignment (-1: unmatched) -> per-image ``(rows, cols)`` without a host
    sync: the number of matches per image, ``min(Q, T_b)``, is known on the host."""
    num_queries = assignment.shape[1]
    # Matched rows first, each group in row order: a stable sort on the "unmatched" flag.
    order = torch.sort((assignment < 0).to(torch.uint8), dim=1, stable=True).indices
    matched_cols = assignment.gather(1, order)
    matches = []
    for index, size in enumerate(sizes):
        count = min(num_queries, size)
        matches.append((order[index, :count], matched_cols[index, :count]))
    return matches


def _match_with_scipy(cost: torch.Tensor, sizes: Sequence[int], device: torch.device):
    """DETR's path: one device-to-host copy, then scipy once per image."""
    from scipy.optimize import linear_sum_assignment as scipy_lsap

    host_cost = cost.cpu()
    matches = []
    for index, size in enumerate(sizes):
        rows, cols = scipy_lsap(host_cost[index, :, :size].numpy())
        matches.append(
            (torch.as_tensor(rows, dtype=torch.int64, device=device), torch.as_tensor(cols, dtype=torch.int64, device=device))
        )
    return matches
