"""Functional kernels with a stable API: each dispatches to a fast kernel or a plain reference."""
from fastvlp.ops.fmha import BackendChoice, attention, attention_reference, select_backend
from fastvlp.ops.boxes import box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou
from fastvlp.ops.lsap import batched_linear_sum_assignment, linear_sum_assignment
from fastvlp.ops.lsap_reference import batched_linear_sum_assignment_reference
from fastvlp.ops.matching_cost import matching_cost, pad_targets

__all__ = [
    "BackendChoice",
    "attention",
    "attention_reference",
    "select_backend",
    "batched_linear_sum_assignment",
    "batched_linear_sum_assignment_reference",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "linear_sum_assignment",
    "matching_cost",
    "pad_targets",
]
