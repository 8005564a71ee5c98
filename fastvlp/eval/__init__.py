"""Metrics of the downstream tasks, each through the field's own tool where one exists."""
from fastvlp.eval.caption_metrics import caption_scores, distinct_fraction, java_available
from fastvlp.eval.classification import classification_accuracy
from fastvlp.eval.detection_ap import coco_detection_ap
from fastvlp.eval.result_files import (
    caption_results, detection_results, vqa_results, write_caption_results, write_detection_results,
    write_vqa_results,
)
from fastvlp.eval.retrieval import fill_score_matrix, retrieval_ranks, retrieval_recall
from fastvlp.eval.vqa_accuracy import normalize_vqa_answer, vqa_accuracy, vqa_accuracy_score

__all__ = [
    "caption_results", "caption_scores", "distinct_fraction", "classification_accuracy", "coco_detection_ap", "detection_results",
    "fill_score_matrix", "java_available", "normalize_vqa_answer", "retrieval_ranks", "retrieval_recall",
    "vqa_accuracy", "vqa_accuracy_score", "vqa_results", "write_caption_results", "write_detection_results",
    "write_vqa_results",
]
